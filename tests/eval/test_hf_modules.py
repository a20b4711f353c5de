"""Each metric loads as a Hugging Face `evaluate` module from a local path and equals eval.score."""

from __future__ import annotations

import evaluate
import pytest

from eval.hf_modules import MODULES, module_path
from eval.score import score

REFS = ["Moderate cardiomegaly. Small left pleural effusion.", "No pneumothorax. Lungs are clear.",
        "Right lower lobe consolidation, possibly pneumonia."]
HYPS = ["Cardiomegaly with a small left effusion.", "Lungs are clear without pneumothorax.", ""]


@pytest.mark.parametrize("name,families", [("chexpert_f1", ["chexpert"]), ("radgraph_proxy_f1", ["radgraph_proxy"]),
                                           ("lexical", ["bleu", "meteor", "rouge_l", "cider"])])
def test_module_loads_by_path_and_matches_score(name, families):
    module = evaluate.load(module_path(name))
    got = module.compute(predictions=HYPS, references=REFS)
    want = score(REFS, HYPS, families, n_resamples=0)["scores"]
    assert got == pytest.approx(want, abs=1e-12)
    assert len(got) >= 3


@pytest.mark.parametrize("name", ["radgraph_f1", "radcliq_v1"])
def test_modules_without_weights_say_what_is_missing(name):
    module = evaluate.load(module_path(name))
    with pytest.raises(RuntimeError, match="radgraph"):
        module.compute(predictions=HYPS, references=REFS)


def test_module_path_lists_every_module_folder():
    for name in MODULES:
        assert module_path(name).endswith(name)
    with pytest.raises(ValueError, match="available"):
        module_path("bleu")
