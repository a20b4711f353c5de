"""Continued pretraining from a DINOv2-format *training* checkpoint: both networks and every head.

The dinov2 trainer saves its ``SSLMetaArch`` (``{"model": state_dict, "optimizer": ...,
"iteration": ...}``), whose state dict holds, for ``student`` and ``teacher`` alike:

* ``<net>.backbone.*``: the ViT (blocks possibly grouped in FSDP chunks, ``blocks.<chunk>.<i>.*``);
* ``<net>.dino_head.*``: the DINO head (``mlp.{0,2,4}`` and the weight-normalised prototypes
  ``last_layer.weight_g`` / ``last_layer.weight_v``);
* ``<net>.ibot_head.*``: the iBOT head, when the run had a separate one;

plus the loss centres ``dino_loss.center`` and ``ibot_patch_loss.center``. The RAD-DINO authors
released their continued-pretraining checkpoint in this layout so that others can go on from it.

Loading the backbone alone and starting the heads at random is what ``model.init_from`` does with
a backbone file; dinov2 users report that continued pretraining then collapses
(facebookresearch/dinov2#204): the random prototypes give the teacher uniform targets and the
student's first updates undo what the backbone knew. :func:`load_training_checkpoint` loads
everything the checkpoint has into an :class:`~encoder.ssl.SSLMetaArch` and says what it could not.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from encoder.ssl import SSLMetaArch
from encoder.weights import WeightsError, load_dinov2_state, load_strict, read_state_dict

__all__ = ["is_training_checkpoint", "load_training_checkpoint", "load_training_state", "HEAD_RISK"]

NETS = ("student", "teacher")
HEADS = ("dino_head", "ibot_head")
# loss centre buffers: dinov2's name -> ours
CENTERS = {"dino_loss.center": "dino_loss", "ibot_patch_loss.center": "ibot_loss"}
HEAD_RISK = ("continued pretraining with randomly initialised DINO/iBOT heads can collapse or undo "
             "the backbone's features in its first steps (facebookresearch/dinov2#204); a dinov2 "
             "training checkpoint (student and teacher with their heads) avoids it")


def is_training_checkpoint(sd: dict) -> bool:
    """Whether a state dict is a whole ``SSLMetaArch`` (``student.*`` / ``teacher.*`` keys)."""
    return any(k.startswith(("student.backbone.", "teacher.backbone.")) for k in sd)


def _under(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _head_state(sd: dict) -> dict:
    """dinov2's ``nn.utils.weight_norm`` names (``weight_g``, ``weight_v``) -> torch's
    parametrization names, which :class:`~encoder.heads.DINOHead` uses."""
    names = {"last_layer.weight_g": "last_layer.parametrizations.weight.original0",
             "last_layer.weight_v": "last_layer.parametrizations.weight.original1"}
    return {names.get(k, k): v for k, v in sd.items()}


def _load_head(head: torch.nn.Module, sd: dict, where: str) -> None:
    try:
        load_strict(head, sd, where)
    except WeightsError as exc:
        raise WeightsError(f"{exc}: set ssl.out_dim, ssl.hidden_dim, ssl.bottleneck_dim and ssl.nlayers to the "
                           "checkpoint's (dinov2 ViT-B/14: 65536, 2048, 256, 3)") from None


def load_training_checkpoint(meta: SSLMetaArch, path: str | os.PathLike,
                             pos_interp: str | None = None) -> dict:
    """Load a dinov2-layout training checkpoint into ``meta`` (student, teacher, heads, centres).

    Backbones go through :func:`~encoder.weights.load_dinov2_state` (FSDP chunk names, position
    embeddings resized with the recipe of their source). A teacher missing from the file starts
    as a copy of the student; a head missing from the file stays at its random init (named in
    the returned ``random`` list, with :data:`HEAD_RISK`). Returns ``{"loaded": [...], "random":
    [...], "notes": [...]}``. Raises :class:`~encoder.weights.WeightsError` on a file that is not
    in this layout or whose parts do not fit the configured model."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: file not found")
    return load_training_state(meta, read_state_dict(path), str(path), pos_interp)


def load_training_state(meta: SSLMetaArch, sd: dict, path: str, pos_interp: str | None = None) -> dict:
    """:func:`load_training_checkpoint` on a state dict already read (``path`` names it in messages)."""
    if not is_training_checkpoint(sd):
        raise WeightsError(f"{path}: not a dinov2 training checkpoint (no student.backbone.* / "
                           "teacher.backbone.* keys)")
    report: dict[str, list[str]] = {"loaded": [], "random": [], "notes": []}
    nets = {net: _under(sd, f"{net}.backbone.") for net in NETS}
    if not nets["student"]:
        nets["student"] = nets["teacher"]
        report["notes"].append("no student backbone in the file: the student starts from the teacher's")
    if not nets["teacher"]:
        nets["teacher"] = nets["student"]
        report["notes"].append("no teacher backbone in the file: the teacher starts from the student's")
    for net in NETS:
        load_dinov2_state(getattr(meta, net)["backbone"], nets[net], f"{path} ({net}.backbone)",
                          pos_interp=pos_interp)
        report["loaded"].append(f"{net}.backbone")
    for net in NETS:
        modules = getattr(meta, net)
        for name in HEADS:
            if name not in modules:
                if _under(sd, f"{net}.{name}."):
                    report["notes"].append(f"{net}.{name} in the file is not used: this config shares the DINO "
                                           "head for iBOT (ssl.ibot_separate_head=true would use it)")
                continue
            got = _head_state(_under(sd, f"{net}.{name}."))
            if not got and name == "ibot_head" and _under(sd, f"{net}.dino_head."):
                got = _head_state(_under(sd, f"{net}.dino_head."))  # the file's run shared one head
                report["notes"].append(f"{net}.ibot_head starts from the file's dino_head (its run shared one head)")
            if not got:
                report["random"].append(f"{net}.{name}")
                continue
            _load_head(modules[name], got, f"{path} ({net}.{name})")
            report["loaded"].append(f"{net}.{name}")
    for key, loss in CENTERS.items():
        if key in sd and hasattr(meta, loss):
            buf = getattr(meta, loss).center
            if sd[key].numel() == buf.numel():
                buf.copy_(sd[key].reshape(buf.shape))
                report["loaded"].append(key)
    if report["random"]:
        report["notes"].append(f"{', '.join(report['random'])} not in the file (random init): {HEAD_RISK}")
    return report
