"""Shared body of the `evaluate` modules: each is a thin shell over :func:`eval.score.score`."""

from __future__ import annotations

from pathlib import Path

from eval.score import ScoreOptions, score

MODULES = ("lexical", "chexpert_f1", "radgraph_f1", "radgraph_proxy_f1", "radcliq_v1")


def module_path(name: str) -> str:
    """Local folder of one module, for ``evaluate.load(module_path("chexpert_f1"))`` (no hub access)."""
    if name not in MODULES:
        raise ValueError(f"unknown module {name!r}; available: {', '.join(MODULES)}")
    return str(Path(__file__).resolve().parent / name)


KWARGS = ("predictions: list of generated reports; references: list of reference reports "
          "(same order); optional keyword arguments as in the module's _compute")


def metric_info(description: str, citation: str):
    """The ``evaluate.MetricInfo`` every module shares: two string features."""
    import datasets
    import evaluate

    return evaluate.MetricInfo(description=description, citation=citation, inputs_description=KWARGS,
                               features=datasets.Features({"predictions": datasets.Value("string"),
                                                           "references": datasets.Value("string")}))


def compute_family(families: str | list[str], predictions, references, **options) -> dict:
    """Scores of the given metric families (no bootstrap: evaluate modules return point values).

    A family that cannot run here (missing weights) raises with the reason instead of returning
    a silently incomplete dict.
    """
    fams = [families] if isinstance(families, str) else list(families)
    opts = ScoreOptions(n_resamples=0, **{k: v for k, v in options.items() if v is not None})
    res = score(list(references), list(predictions), fams, opts)
    if res["omitted"]:
        raise RuntimeError("; ".join(f"{k}: {v}" for k, v in res["omitted"].items()))
    return res["scores"]
