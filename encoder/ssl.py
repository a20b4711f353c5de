"""DINOv2-style self-supervised meta-architecture: student, EMA teacher, heads and losses.

The student and teacher are ``nn.ModuleDict``s holding ``backbone``, ``dino_head`` and (when
iBOT uses its own head) ``ibot_head``. The teacher never receives gradients; it follows the
student by EMA (:meth:`SSLMetaArch.update_teacher`). Each loss is on when its weight is > 0.

Per step (DINOv2 definitions):
* the teacher sees only the 2 global crops (no masks); its CLS logits give the DINO targets and
  its patch logits at the student's masked positions give the iBOT targets;
* targets are centred softmax with the centre from *before* this step's update, or Sinkhorn-Knopp;
* the student sees masked global crops and unmasked local crops;
* KoLeo acts on the student's L2-normalised CLS features of each global crop separately.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from encoder.heads import DINOHead
from encoder.losses import DINOLoss, IBOTPatchLoss, KoLeoLoss
from encoder.vit import ViTEncoder

__all__ = ["SSLConfig", "SSLMetaArch", "logs_to_host"]


@dataclass
class SSLConfig:
    out_dim: int = 65536  # prototypes (DINOv2 default)
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    nlayers: int = 3
    ibot_separate_head: bool = False
    ibot_out_dim: int | None = None  # None: same as out_dim (only with a separate head)
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    centering: str = "centering"  # "centering" (EMA centre) | "sinkhorn_knopp"
    student_temp: float = 0.1
    center_momentum: float = 0.9

    def __post_init__(self) -> None:
        if self.centering not in ("centering", "sinkhorn_knopp"):
            raise ValueError(f"centering must be 'centering' or 'sinkhorn_knopp', got {self.centering!r}")
        if min(self.dino_weight, self.ibot_weight, self.koleo_weight) < 0:
            raise ValueError("loss weights must be >= 0")
        if self.dino_weight == 0 and self.ibot_weight == 0:
            raise ValueError("at least one of dino_weight and ibot_weight must be > 0")


def _rows(tokens: Tensor, flat_idx: Tensor) -> Tensor:
    """(V, N, C) tokens, (M,) flat indices into (V, N) -> (M, C): ``tokens[masks]`` without the
    host read a boolean mask needs."""
    return tokens.flatten(0, 1).index_select(0, flat_idx)


def logs_to_host(logs: dict) -> dict:
    """Tensor values of ``logs`` as Python floats, all in one device-to-host copy (others as they
    are). A DTensor (FSDP's gradient norm) counts as its full value: every rank must call it then."""
    keys = [k for k, v in logs.items() if torch.is_tensor(v)]
    if not keys:
        return dict(logs)
    full = [logs[k].full_tensor() if hasattr(logs[k], "full_tensor") else logs[k] for k in keys]
    vals = torch.stack([v.detach().double().reshape(()) for v in full]).tolist()
    return {**logs, **dict(zip(keys, vals))}


class SSLMetaArch(nn.Module):
    def __init__(self, backbone: ViTEncoder, cfg: SSLConfig):
        super().__init__()
        self.cfg = cfg
        self.do_dino = cfg.dino_weight > 0
        self.do_ibot = cfg.ibot_weight > 0
        self.do_koleo = cfg.koleo_weight > 0
        C = backbone.embed_dim

        def head(out_dim: int) -> DINOHead:
            return DINOHead(C, out_dim, hidden_dim=cfg.hidden_dim, bottleneck_dim=cfg.bottleneck_dim,
                            nlayers=cfg.nlayers)

        student = {"backbone": backbone, "dino_head": head(cfg.out_dim)}
        ibot_dim = cfg.out_dim
        if self.do_ibot and cfg.ibot_separate_head:
            ibot_dim = cfg.ibot_out_dim or cfg.out_dim
            student["ibot_head"] = head(ibot_dim)
        self.student = nn.ModuleDict(student)
        self.teacher = copy.deepcopy(self.student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.dino_loss = DINOLoss(cfg.out_dim, cfg.student_temp, cfg.center_momentum)
        self.ibot_loss = IBOTPatchLoss(ibot_dim, cfg.student_temp, cfg.center_momentum)
        self.koleo_loss = KoLeoLoss()

    def _ibot_head(self, which: nn.ModuleDict) -> nn.Module:
        return which["ibot_head"] if "ibot_head" in which else which["dino_head"]

    def _targets(self, loss, logits: Tensor, teacher_temp: float) -> Tensor:
        if self.cfg.centering == "sinkhorn_knopp":
            return loss.sinkhorn_knopp_teacher(logits, teacher_temp)
        probs = loss.softmax_center_teacher(logits, teacher_temp)  # centre from before this step
        loss.update_center(logits)
        return probs

    @torch.no_grad()
    def teacher_targets(self, global_crops: Tensor, mask_indices: Tensor, teacher_temp: float) -> dict:
        """Teacher outputs on the 2B global crops: DINO probs (2B, K), iBOT probs (M, K') at
        ``mask_indices`` (M,), flat indices into (2B, N) (``masking.masked_indices``)."""
        self.teacher.eval()
        out = self.teacher["backbone"](global_crops)
        res: dict[str, Tensor] = {}
        if self.do_dino:
            logits = self.teacher["dino_head"](out["cls"])  # (2B, K)
            res["dino"] = self._targets(self.dino_loss, logits, teacher_temp)
        if self.do_ibot:
            # Also with no masked patch (M = 0): the head (FSDP all-gather) and the centre update or
            # Sinkhorn (all-reduces) are collectives the other ranks are waiting in.
            masked = _rows(out["patches"], mask_indices)  # (M, C), row-major over (2B, N)
            res["ibot"] = self._targets(self.ibot_loss, self._ibot_head(self.teacher)(masked), teacher_temp)
        return res

    def forward(self, batch: dict, teacher_temp: float) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss and a dict of its parts and collapse monitors, as detached 0-dim tensors.

        ``batch`` (:func:`encoder.augment.collate_multicrop`): ``global_crops`` (2B,C,g,g)
        crop-major, ``local_crops`` (L*B,C,l,l) or None, ``masks`` (2B, N) bool, and the masks'
        ``mask_indices`` / ``mask_weights`` (M,) computed on the host. Nothing here reads a value
        back from the device (the iBOT rows are picked by index, not by boolean mask, whose size
        the host would have to wait for), so on a GPU the student's forward is queued right behind
        the teacher's; callers read the logs once, after backward (:func:`logs_to_host`).
        """
        g = batch["global_crops"]
        masks = batch["masks"]
        mask_idx = batch["mask_indices"]
        two_b = g.shape[0]
        B = two_b // 2
        targets = self.teacher_targets(g, mask_idx, teacher_temp)

        s_glob = self.student["backbone"](g, masks if self.do_ibot else None)
        s_loc = self.student["backbone"](batch["local_crops"]) if batch.get("local_crops") is not None else None
        total = g.new_zeros(())
        logs: dict[str, Tensor] = {}
        if self.do_dino:
            # every crop's CLS through the head in one call, as DINOv2 does (one FSDP all-gather of
            # the head instead of 2 + L, and larger GEMMs); crop-major, so 2 + L chunks of (B, K)
            cls = s_glob["cls"] if s_loc is None else torch.cat([s_glob["cls"], s_loc["cls"]])
            s_logits = list(self.student["dino_head"](cls).chunk(cls.shape[0] // B))
            dino = self.dino_loss(s_logits, list(targets["dino"].chunk(2)))
            total = total + self.cfg.dino_weight * dino
            logs["dino"] = dino.detach()
            t = targets["dino"]
            # collapse monitors: per-sample entropy (~ln K: uniform collapse) and entropy of
            # the batch-mean distribution (~0: every sample on the same prototype)
            logs["teacher_entropy"] = -(t * (t + 1e-12).log()).sum(-1).mean()
            tm = t.mean(0)
            logs["teacher_batch_entropy"] = -(tm * (tm + 1e-12).log()).sum()
        if self.do_ibot:
            masked = _rows(s_glob["patches"], mask_idx)  # (M, C); M = 0 still runs the head (a collective)
            s_logits = self._ibot_head(self.student)(masked)
            ibot = self.ibot_loss.forward_weighted(s_logits, targets["ibot"], batch["mask_weights"], masks.shape[0])
            total = total + self.cfg.ibot_weight * ibot
            logs["ibot"] = ibot.detach()
        if self.do_koleo:
            koleo = sum(self.koleo_loss(c) for c in s_glob["cls"].chunk(2))
            total = total + self.cfg.koleo_weight * koleo
            logs["koleo"] = koleo.detach()
        with torch.no_grad():  # collapse monitor: spread of normalised CLS features over the batch
            z = nn.functional.normalize(s_glob["cls"].float(), dim=-1)
            logs["cls_std"] = z.std(dim=0).mean()
        logs["loss"] = total.detach()
        return total, logs

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA: teacher = m * teacher + (1 - m) * student, parameter by parameter."""
        s = [p.detach() for p in self.student.parameters()]
        t = list(self.teacher.parameters())
        torch._foreach_mul_(t, momentum)
        torch._foreach_add_(t, s, alpha=1 - momentum)

    def config_dict(self) -> dict:
        return asdict(self.cfg)
