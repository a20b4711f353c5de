"""Official RadGraph-F1: annotate reports with the ``radgraph`` package's model, score with our reward.

Needs the ``radgraph`` package (PyPI, tested against the 0.1.18 API) *and* its unpacked model folder
(``config.json``, ``weights.th``, ``vocabulary/``) already on disk; the BERT encoder named in that
config must also be in the local Hugging Face cache. Nothing is downloaded: the weight folder is
checked before the package is asked to load it (the package would otherwise fetch it from the Hub),
and the Hub is put in offline mode while the model is built.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from eval.metric import MetricOutput
from eval.radgraph.reward import radgraph_reward

__all__ = ["RadGraphUnavailable", "RadGraphAnnotator", "convert_package_output", "radgraph_f1", "MODEL_TYPES"]

MODEL_TYPES: tuple[str, ...] = ("radgraph", "radgraph-xl")
# What the package's RadGraph.__init__ reads from <model_cache_dir>/<model_type>/ (radgraph 0.1.18).
REQUIRED_FILES: tuple[str, ...] = ("config.json", "weights.th", "vocabulary")


class RadGraphUnavailable(RuntimeError):
    """The radgraph package or its model weights are not available locally."""


def _import_radgraph() -> Any:
    """Import ``radgraph.radgraph`` (heavy: torch, transformers) or say exactly what is missing."""
    try:
        return importlib.import_module("radgraph.radgraph")
    except ImportError as e:
        raise RadGraphUnavailable(
            "RadGraph-F1 needs the 'radgraph' package, which is not installed or failed to import "
            f"({e}). Install it with `pip install radgraph==0.1.18` and place its model folder locally; "
            "for an offline stand-in use eval.radgraph.radgraph_proxy_reward (not RadGraph-F1)."
        ) from e


def _check_model_dir(model_dir: Path, model_type: str) -> None:
    missing = [f for f in REQUIRED_FILES if not (model_dir / f).exists()]
    if missing:
        raise RadGraphUnavailable(
            f"RadGraph weights for model_type={model_type!r} not found at {model_dir} "
            f"(missing: {', '.join(missing)}). Unpack the package's {model_type}.tar.gz there "
            "(or pass model_cache_dir=<folder that contains a '" + model_type + "' subfolder>); "
            "nothing is downloaded."
        )


@contextmanager
def _hub_offline() -> Iterator[None]:
    """Ask transformers / huggingface_hub not to reach the network while the model is built."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def convert_package_output(inference: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """The package's ``{"0": {"text", "entities", ...}, ...}`` -> list of n annotations in our format."""
    out = []
    for i in range(n):
        if str(i) not in inference:
            # The package logs and skips a report whose post-processing failed; do not invent a score.
            raise RuntimeError(f"radgraph returned no annotation for report {i}")
        doc = inference[str(i)]
        ents = {
            str(eid): {
                "tokens": e["tokens"],
                "label": e["label"],
                "start_ix": e.get("start_ix"),
                "end_ix": e.get("end_ix"),
                "relations": [[r[0], str(r[1])] for r in e.get("relations", [])],
            }
            for eid, e in doc.get("entities", {}).items()
        }
        out.append({"text": doc.get("text", ""), "entities": ents})
    return out


class RadGraphAnnotator:
    """Entity/relation annotator backed by the ``radgraph`` package's model (loaded lazily, offline).

    model_type:      'radgraph' (Jain et al. 2021 model, labels like 'OBS-DP') or 'radgraph-xl'
                     (labels like 'Observation::definitely present').
    model_cache_dir: folder holding ``<model_type>/{config.json, weights.th, vocabulary/}``; default
                     the package's own cache (``radgraph.radgraph.CACHE_DIR``).
    device:          None or "auto": CUDA when available (``encoder.inference.resolve_device``).
    """

    def __init__(self, model_type: str = "radgraph", model_cache_dir: str | os.PathLike | None = None,
                 batch_size: int = 1, device: str | None = None) -> None:
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
        self.model_type = model_type
        self._cache_dir = model_cache_dir
        self._batch_size, self._device = batch_size, device
        self._model: Any = None
        self.package_version: str | None = None

    def _load(self) -> Any:
        if self._model is None:
            from encoder.inference import resolve_device

            pkg = _import_radgraph()
            dev = resolve_device(self._device)
            cache = Path(self._cache_dir) if self._cache_dir is not None else Path(pkg.CACHE_DIR)
            _check_model_dir(cache / self.model_type, self.model_type)
            self.package_version = getattr(pkg, "version", None)
            try:
                with _hub_offline():
                    self._model = pkg.RadGraph(model_type=self.model_type, model_cache_dir=str(cache),
                                               batch_size=self._batch_size,
                                               cuda=dev.index if dev.type == "cuda" else -1)  # -1: CPU
            except OSError as e:  # transformers: encoder/tokenizer not in the local HF cache
                raise RadGraphUnavailable(
                    f"radgraph found its weights at {cache / self.model_type} but could not build the "
                    f"model offline ({e}); the BERT encoder named in its config.json must be in the local "
                    "Hugging Face cache."
                ) from e
        return self._model

    def __call__(self, texts: Sequence[str]) -> list[dict[str, Any]]:
        """Annotate reports; an empty/blank report gets no entities (the package skips those too)."""
        texts = list(texts)
        idx = [i for i, t in enumerate(texts) if t and t.strip()]
        out: list[dict[str, Any]] = [{"text": t, "entities": {}} for t in texts]
        if idx:
            model = self._load()
            annotated = convert_package_output(model([texts[i] for i in idx]), len(idx))
            for i, ann in zip(idx, annotated):
                out[i] = ann
        return out


def radgraph_f1(refs: Sequence[str], hyps: Sequence[str], model_type: str = "radgraph",
                lowercase: bool = True, annotator: RadGraphAnnotator | None = None,
                **annotator_kwargs: Any) -> MetricOutput:
    """RadGraph-F1 (``radgraph_{simple,partial,complete}_f1``) with the real RadGraph model."""
    if len(refs) != len(hyps):
        raise ValueError(f"got {len(refs)} references and {len(hyps)} hypotheses")
    ann = annotator or RadGraphAnnotator(model_type=model_type, **annotator_kwargs)
    # As the package's F1RadGraph: a pair with an empty side scores 0 and is not annotated; the rest
    # go to the model in one call, hypotheses first, then references. (Blank = empty here.)
    keep = [i for i, (r, h) in enumerate(zip(refs, hyps)) if r.strip() and h.strip()]
    empty = {"text": "", "entities": {}}
    hyp_ann: list[dict[str, Any]] = [empty] * len(hyps)
    ref_ann: list[dict[str, Any]] = [empty] * len(refs)
    both = ann([hyps[i] for i in keep] + [refs[i] for i in keep])
    for k, i in enumerate(keep):
        hyp_ann[i], ref_ann[i] = both[k], both[len(keep) + k]
    return radgraph_reward(ref_ann, hyp_ann, lowercase=lowercase, prefix="radgraph", info={
        "annotator": "radgraph package model",
        "model_type": ann.model_type,
        "radgraph_version": ann.package_version,
    })
