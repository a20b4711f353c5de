"""iBOT masked-patch self-distillation loss."""

from __future__ import annotations

from torch import Tensor

from ._common import CenteredTeacherLoss, soft_cross_entropy

__all__ = ["IBOTPatchLoss"]


class IBOTPatchLoss(CenteredTeacherLoss):
    """Cross-entropy on masked patches: mean over each image's masked patches, then mean over all B images.

    Images with no masked patch contribute 0 (they still count in B). Centre updates should
    use the teacher's masked-patch logits only.
    """

    def forward(self, student_patch_logits: Tensor, teacher_patch_probs: Tensor, masks: Tensor) -> Tensor:
        """``student_patch_logits``/``teacher_patch_probs``: (B, N, K); ``masks``: (B, N) bool."""
        ce = soft_cross_entropy(student_patch_logits, teacher_patch_probs, self.student_temp)  # (B, N)
        # where(), not multiply: unmasked rows may hold anything (even inf) and must not leak in.
        ce = ce.masked_fill(~masks, 0.0)  # (B, N)
        per_image = ce.sum(dim=1) / masks.sum(dim=1).clamp(min=1)  # (B,)
        return per_image.mean()

    def forward_masked(
        self,
        student_logits_masked: Tensor,
        teacher_probs_masked: Tensor,
        masks: Tensor,
        n_masked_total: int | None = None,
    ) -> Tensor:
        """Same value as ``forward`` from only the masked rows.

        ``student_logits_masked``/``teacher_probs_masked``: (M, K), the rows of ``masks`` (B, N)
        that are True, in row-major order. ``n_masked_total``: if given, only the first that
        many rows are used (the rest is padding, e.g. fixed-size buffers).
        """
        if n_masked_total is not None:
            student_logits_masked = student_logits_masked[:n_masked_total]
            teacher_probs_masked = teacher_probs_masked[:n_masked_total]
        counts = masks.sum(dim=1)  # (B,)
        n_rows = student_logits_masked.shape[0]
        if n_rows != int(counts.sum()):
            raise ValueError(f"{n_rows} masked rows given but masks select {int(counts.sum())}")
        # Each patch weighs 1/(masked patches of its image): reproduces the per-image mean.
        weights = (1.0 / counts.clamp(min=1).float()).unsqueeze(1).expand(masks.shape)[masks]  # (M,)
        return self.forward_weighted(student_logits_masked, teacher_probs_masked, weights, masks.shape[0])

    def forward_weighted(self, student_logits_masked: Tensor, teacher_probs_masked: Tensor, weights: Tensor,
                         n_images: int) -> Tensor:
        """:meth:`forward_masked` with the rows' weights given (``masking.masked_indices``, computed
        with the masks on the host): no check and no host read, so it never waits for the device."""
        ce = soft_cross_entropy(student_logits_masked, teacher_probs_masked, self.student_temp)  # (M,)
        return (ce * weights).sum() / n_images
