"""The report generator: frozen encoder -> projector -> (LoRA-tuned) causal LLM.

``ReportGenerator`` has three named parts, as transformers' LLaVA: ``vision`` (a
:class:`~radgen.model.vision.FrozenVision`), ``projector`` (from the registry) and ``llm`` (a
Hugging Face causal LM, usually wrapped by peft). Image features enter through
:func:`~radgen.model.splice.splice_image_features` and nowhere else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from radgen.model.splice import IGNORE_INDEX, splice_image_features
from radgen.model.vision import FrozenVision

__all__ = ["ReportGenerator", "token_loss_sum"]


def token_loss_sum(logits: Tensor, labels: Tensor, weights: Tensor | None = None) -> tuple[Tensor, int]:
    """Summed next-token cross-entropy and the number of predicted tokens.

    ``logits`` (B, L, V) at positions 0..L-1 predict ``labels`` (B, L) at 1..L; ``IGNORE_INDEX``
    labels are skipped. Summing (rather than averaging per micro-batch) lets gradient
    accumulation and data parallelism weight every target token equally. ``weights`` (B, L), if
    given, multiply each label's loss (the count stays the number of labels).
    """
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    keep = shift_labels != IGNORE_INDEX
    ce = F.cross_entropy(shift_logits[keep], shift_labels[keep], reduction="none")
    if weights is not None:
        ce = ce * weights[:, 1:].reshape(-1)[keep].to(ce.dtype)
    return ce.sum(), int(keep.sum())


def _plain_lm_head(model: nn.Module) -> bool:
    """Whether logits are just ``lm_head(final hidden state)`` (no soft-capping or scaling), so the
    head may be applied to selected positions only."""
    cfg = model.config.get_text_config() if hasattr(model, "config") else None
    return (cfg is not None and getattr(cfg, "final_logit_softcapping", None) is None
            and getattr(cfg, "logit_scale", None) is None and model.get_output_embeddings() is not None)


class ReportGenerator(nn.Module):
    def __init__(self, vision: FrozenVision, projector: nn.Module, llm: nn.Module, image_token_id: int):
        super().__init__()
        self.vision = vision
        self.projector = projector
        self.llm = llm
        self.image_token_id = int(image_token_id)

    def image_features(self, pixel_values: Tensor | None = None, vision_tokens: Tensor | None = None) -> Tensor:
        """Projected image tokens (B, T, D_llm) from images (B, 3, S, S) or cached encoder tokens (B, T, C)."""
        if vision_tokens is None:
            if pixel_values is None:
                raise ValueError("give pixel_values or vision_tokens")
            vision_tokens = self.vision(pixel_values)
        p = next(self.projector.parameters())
        return self.projector(vision_tokens.to(device=p.device, dtype=p.dtype))

    def embed(self, input_ids: Tensor, pixel_values: Tensor | None = None,
              vision_tokens: Tensor | None = None) -> Tensor:
        """Token embeddings (B, L, D) with the image tokens spliced in at the placeholder ids."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        feats = self.image_features(pixel_values, vision_tokens)
        return splice_image_features(embeds, input_ids, feats, self.image_token_id)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor | None = None,
                vision_tokens: Tensor | None = None, position_ids: Tensor | None = None,
                labels: Tensor | None = None, label_weights: Tensor | None = None) -> dict[str, Tensor]:
        """Without ``labels``: ``logits`` (B, L, V). With ``labels``: ``loss_sum`` and ``n_tokens``
        (see :func:`token_loss_sum`; ``label_weights`` (B, L) scale each label's loss), the
        vocabulary projection computed only at the predicted
        positions (a third of them in a typical batch; measured 1.16x faster per training step)."""
        embeds = self.embed(input_ids, pixel_values, vision_tokens)
        base = self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm
        if labels is None or not _plain_lm_head(base):
            out = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=False)
            result = {"logits": out.logits}
            if labels is not None:
                result["loss_sum"], result["n_tokens"] = token_loss_sum(out.logits, labels, label_weights)
            return result
        hidden = base.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask,
                                    position_ids=position_ids, use_cache=False).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX  # (B, L-1): positions whose next token is predicted
        logits = base.get_output_embeddings()(hidden[:, :-1][keep])  # (n, V)
        ce = F.cross_entropy(logits.float(), targets[keep], reduction="none")
        if label_weights is not None:
            ce = ce * label_weights[:, 1:][keep].to(ce.dtype)
        return {"loss_sum": ce.sum(), "n_tokens": int(keep.sum())}

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor | None = None,
                 vision_tokens: Tensor | None = None, **generate_kwargs) -> Tensor:
        """New token ids (B, T_new) for left-padded prompts; ``generate_kwargs`` go to HF ``generate``.

        Uses the KV cache; the image placeholder id is never generated.
        """
        embeds = self.embed(input_ids, pixel_values, vision_tokens)
        suppress = list(generate_kwargs.pop("suppress_tokens", None) or []) + [self.image_token_id]
        return self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask,
                                 suppress_tokens=suppress, **generate_kwargs)
