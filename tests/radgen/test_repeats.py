"""``generate.stop_on_repeat``: a row stops when it completes a sentence it already wrote, and the
repeat is dropped from its text. Checked by hand."""

from __future__ import annotations

import torch

from radgen.model.repeats import RepeatedSentenceStop, drop_repeated_sentences, ends_with_a_repeat
from test_finding_weights import _folders  # noqa: E402  (pytest puts this folder on sys.path)

LOOP = "Normal heart size. No pneumothorax. No displaced rib fracture. No displaced rib fracture."


def test_a_completed_repeat_is_found_and_dropped():
    assert ends_with_a_repeat(LOOP)
    assert not ends_with_a_repeat(LOOP[:-1])  # the repeat is not complete yet
    assert not ends_with_a_repeat("Normal heart size. No pneumothorax.")
    assert drop_repeated_sentences(LOOP) == "Normal heart size. No pneumothorax. No displaced rib fracture."
    assert drop_repeated_sentences("A small effusion. No edema.") == "A small effusion. No edema."


def test_the_stop_is_per_row(tmp_path):
    from transformers import AutoTokenizer

    for folder in _folders(tmp_path):
        tok = AutoTokenizer.from_pretrained(str(folder))
        rows = [tok(t, add_special_tokens=False)["input_ids"] for t in (LOOP, "Normal heart size. No pneumothorax.")]
        width = max(map(len, rows))
        ids = torch.tensor([r + [tok.eos_token_id] * (width - len(r)) for r in rows])
        assert RepeatedSentenceStop(tok)(ids, None).tolist() == [True, False]
