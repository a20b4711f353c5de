"""RadGraph-F1 reward (Delbrouck et al., Findings of EMNLP 2022) on entity/relation annotations.

This is our own implementation of the reward that the ``radgraph`` PyPI package computes in
``radgraph/rewards.py::compute_reward`` (``F1RadGraph``). Checked against the sdists of releases
0.0.9, 0.1.2 and 0.1.18 (0.1.18 is the newest on PyPI); the definition is identical in all three:

* per report, three candidate *sets* are built from ``annotation["entities"]`` (duplicates count once);
* ``simple``:   one ``(tokens, label)`` per entity;
* ``partial``:  ``(tokens, label)`` for an entity without relations and ``(tokens, label, True)`` for
  one with at least one relation. The flag is therefore "has any outgoing relation", and it is encoded
  by tuple *length* (there is never a ``False`` element); we keep that exact shape;
* ``complete``: ``(tokens, label)`` for an entity without relations, and for an entity with relations
  one ``(tokens, label, relation_type, target_tokens)`` per outgoing relation (the bare
  ``(tokens, label)`` is then *not* added);
* F1 = 2PR/(P+R) of the two sets, 0 when P+R = 0; the report scores 0 on all levels when either side
  has no entities at all (so empty vs empty is 0, not 1); the corpus score is the mean over reports.

Token case: every release (0.0.9 … 0.1.18) compares tokens *as written* in ``simple``, ``partial`` and
the relation-less ``complete`` tuples, but lower-cases both token strings of the relation tuples of
``complete`` (``entity["tokens"].lower()``, ``target["tokens"].lower()``). We expose this as
``lowercase``: ``False`` reproduces the released package exactly (mixed case as above); ``True``
(default) lower-cases every token string at every level, i.e. case-insensitive matching throughout.
For lower-case text (e.g. MIMIC-CXR as usually preprocessed) both settings give the same numbers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from eval.metric import MetricOutput, mean_aggregate

__all__ = ["LEVELS", "LEVEL_DEFINITIONS", "entity_set", "set_f1", "report_scores", "radgraph_reward"]

LEVELS: tuple[str, ...] = ("simple", "partial", "complete")

LEVEL_DEFINITIONS: dict[str, str] = {
    "simple": "set of (tokens, label), one per entity",
    "partial": "set of (tokens, label) for entities without relations and (tokens, label, True) for "
    "entities with >= 1 outgoing relation",
    "complete": "set of (tokens, label) for entities without relations and one "
    "(tokens, label, relation_type, target_tokens) per outgoing relation otherwise",
}


def _entities(annotation: Mapping[str, Any], where: str = "annotation") -> Mapping[str, Mapping[str, Any]]:
    """The entity mapping of one report: ``annotation["entities"]`` (package format) or the mapping itself."""
    if not isinstance(annotation, Mapping):
        raise TypeError(f"{where}: expected a dict with 'entities' (or an entity dict), got {type(annotation).__name__}")
    ents = annotation["entities"] if "entities" in annotation else annotation
    if not isinstance(ents, Mapping):
        raise TypeError(f"{where}: 'entities' must be a dict id -> entity, got {type(ents).__name__}")
    for eid, ent in ents.items():
        if not isinstance(ent, Mapping) or not {"tokens", "label"} <= set(ent):
            raise ValueError(f"{where}: entity {eid!r} must be a dict with at least 'tokens' and 'label'")
    return ents


def entity_set(annotation: Mapping[str, Any], level: str, lowercase: bool = True) -> set[tuple]:
    """Candidate set of one report at ``level`` ('simple' | 'partial' | 'complete'); see the module doc."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    ents = _entities(annotation)

    def tok(s: str, in_relation: bool = False) -> str:
        # lowercase=False mirrors the package: only relation tuples (complete level) are lower-cased.
        return s.lower() if (lowercase or in_relation) else s

    out: set[tuple] = set()
    for eid, ent in ents.items():
        rels = ent.get("relations") or []
        tokens, label = ent["tokens"], ent["label"]
        if level == "simple":
            out.add((tok(tokens), label))
        elif level == "partial":
            out.add((tok(tokens), label, True) if rels else (tok(tokens), label))
        elif not rels:
            out.add((tok(tokens), label))
        else:
            for rel in rels:
                rel_type, target_id = rel[0], rel[1]
                target = ents.get(target_id, ents.get(str(target_id)))
                if target is None:
                    raise ValueError(f"entity {eid!r} has a {rel_type!r} relation to unknown entity id {target_id!r}")
                out.add((tok(tokens, True), label, rel_type, tok(target["tokens"], True)))
    return out


def set_f1(a: set, b: set) -> float:
    """F1 of two sets (symmetric): 2PR/(P+R), 0.0 when either set is empty or nothing matches."""
    if not a or not b:
        return 0.0
    hit = len(a & b)
    if hit == 0:
        return 0.0
    p, r = hit / len(a), hit / len(b)
    return 2 * p * r / (p + r)


def report_scores(ref: Mapping[str, Any], hyp: Mapping[str, Any], lowercase: bool = True) -> tuple[float, float, float]:
    """(simple, partial, complete) F1 of one report pair; all 0 when either side has no entities."""
    if not _entities(ref, "reference") or not _entities(hyp, "hypothesis"):
        return (0.0, 0.0, 0.0)
    return tuple(set_f1(entity_set(hyp, lv, lowercase), entity_set(ref, lv, lowercase)) for lv in LEVELS)  # type: ignore[return-value]


def radgraph_reward(
    ref_annotations: Sequence[Mapping[str, Any]],
    hyp_annotations: Sequence[Mapping[str, Any]],
    lowercase: bool = True,
    prefix: str = "radgraph",
    info: Mapping[str, Any] | None = None,
) -> MetricOutput:
    """RadGraph-F1 of N annotated (reference, hypothesis) pairs.

    stats: (N, 3) per-report F1, columns [simple, partial, complete]; the score is their mean,
    named ``{prefix}_simple_f1``, ``{prefix}_partial_f1``, ``{prefix}_complete_f1``.
    ``info`` entries (e.g. the annotator used) are merged into the output's info.
    """
    if len(ref_annotations) != len(hyp_annotations):
        raise ValueError(f"got {len(ref_annotations)} reference and {len(hyp_annotations)} hypothesis annotations")
    stats = np.zeros((len(ref_annotations), 3), dtype=float)
    for i, (ref, hyp) in enumerate(zip(ref_annotations, hyp_annotations)):
        try:
            stats[i] = report_scores(ref, hyp, lowercase)
        except (TypeError, ValueError) as e:
            raise type(e)(f"report {i}: {e}") from e
    names = [f"{prefix}_{lv}_f1" for lv in LEVELS]
    out_info: dict[str, Any] = {
        "metric": "RadGraph-F1 reward (Delbrouck et al. 2022)",
        "implementation": "eval.radgraph.reward: re-implementation of radgraph (PyPI 0.1.18) rewards.compute_reward",
        "lowercase": lowercase,
        "lowercase_meaning": "True: all token strings lower-cased at every level; False: as the radgraph "
        "package (tokens as written, except relation tuples of 'complete', which it lower-cases)",
        "levels": dict(LEVEL_DEFINITIONS),
        "empty_rule": "0 on every level when either report has no entities (empty vs empty = 0)",
        "aggregate": "mean over reports",
    }
    out_info.update(info or {})
    return MetricOutput(
        stats=stats,
        aggregate=mean_aggregate(names),
        info=out_info,
        per_pair={n: stats[:, j].copy() for j, n in enumerate(names)},
    )
