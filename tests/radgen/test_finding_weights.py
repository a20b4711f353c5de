"""Loss weight on the report sentences that say a finding (``tasks.finding_sentence_weight``).

The sentences of normal training reports form the "normal" set; every other sentence of a
report target (the ones that name a finding) gets the weight. Checked by hand on the tiny
tokenizer and, when it is cached, SmolLM2's."""

from __future__ import annotations

import pytest
import torch

from radgen.model.prompt import (
    FIRST_LINE_END,
    PromptConfig,
    ReportTokenizer,
    normal_sentences,
    sentence_spans,
)
from test_findings_head import _tokenizers  # noqa: E402  (pytest puts this folder on sys.path)

NORMAL = {"No Finding": 1, "Cardiomegaly": 0, "Edema": None}
EFFUSION = {"No Finding": None, "Pleural Effusion": 1}


def test_sentence_spans_and_the_normal_set():
    text = "Positive: Edema.\nNormal heart size. Small right pleural effusion.  No pneumothorax!"
    start = text.index(FIRST_LINE_END) + 1
    assert [text[b:e] for b, e in sentence_spans(text, start)] == [
        "Normal heart size.", "Small right pleural effusion.", "No pneumothorax!"]
    got = normal_sentences([("Normal heart size. No pneumothorax.", NORMAL),
                            ("Normal heart size. Small right pleural effusion.", EFFUSION),
                            ("The lungs are clear.", None),  # no labels: not known to be normal
                            ("Heart size is normal.", {"No Finding": None, "Edema": None})])  # no label at all
    assert got == {"Normal heart size.", "No pneumothorax."}


def _report_tokenizer(folder, **kw) -> ReportTokenizer:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return ReportTokenizer(tok, PromptConfig(), image_token_id=tok.convert_tokens_to_ids("<image>"),
                           n_image_tokens=2, **kw)


def _folders(tmp_path):
    from tiny_llm import RADIOLOGY_SENTENCES, make_tiny_llm_folder

    return [make_tiny_llm_folder(tmp_path, RADIOLOGY_SENTENCES, vocab_size=400)] + _tokenizers()


@pytest.mark.parametrize("findings_first", [True, False])
def test_only_finding_sentences_weigh_more(tmp_path, findings_first):
    body = "Normal heart size. Small right pleural effusion. No pneumothorax."
    target = (f"Positive: Pleural Effusion.{FIRST_LINE_END}" if findings_first else "") + body
    for folder in _folders(tmp_path):
        rt = _report_tokenizer(folder, findings_first=findings_first, finding_sentence_weight=4.0)
        tok = rt.tokenizer
        plain = rt.train_batch([target])
        assert "label_weights" not in plain  # no normal set yet: every token weighs 1
        rt.set_normal_sentences(frozenset({"Normal heart size.", "No pneumothorax."}))
        ids = rt.target_ids(target)
        pos = rt.finding_token_positions(target)
        assert tok.decode([ids[i] for i in pos]).strip() == "Small right pleural effusion.", folder
        batch = rt.train_batch([target, target], instructions=[None, "List the positive findings."])
        w, labels = batch["label_weights"], batch["labels"]
        n_prompt = len(rt.prompt_ids(None))
        want = torch.ones(w.shape[1])
        want[[n_prompt + i for i in pos]] = 4.0
        assert torch.equal(w[0], want)
        assert torch.equal(w[1], torch.ones(w.shape[1]))  # another task's target weighs 1
        assert all(labels[0, n_prompt + i] == ids[i] for i in pos)  # the weights sit on those tokens


def test_cut_targets_and_the_line_weight_combine(tmp_path):
    rt = _report_tokenizer(_folders(tmp_path)[0], findings_first=True, first_line_weight=0.5,
                           finding_sentence_weight=3.0, max_target_tokens=6)
    rt.set_normal_sentences(frozenset({"Normal heart size."}))
    target = f"No finding.{FIRST_LINE_END}Small right pleural effusion. Normal heart size."
    assert all(i < 5 for i in rt.finding_token_positions(target))  # only the kept tokens
    w = rt.train_batch([target])["label_weights"][0]
    n_prompt, n_line = len(rt.prompt_ids(None)), rt.first_line_tokens(rt.target_ids(target))
    assert (w[n_prompt:n_prompt + n_line] == 0.5).all()
    assert set(w[n_prompt + n_line:].tolist()) <= {1.0, 3.0}


def test_config_refuses_a_negative_weight(tmp_path):
    from radgen.config import load_config
    from radgen.config import ConfigError
    from radgen.train import validate_config

    cfg = load_config("reportgen", ["cpu_smollm2"], [f"out={tmp_path}", "data.path=x", "encoder.spec=oracle",
                                                      "tasks.finding_sentence_weight=-1"])
    with pytest.raises(ConfigError, match="finding_sentence_weight must be >= 0"):
        validate_config(cfg)
