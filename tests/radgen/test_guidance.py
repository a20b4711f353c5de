"""Line guidance (radgen/model/guidance.py): classifier-free guidance of the writer on the findings
head's stated line, decoded as (cond, uncond) row pairs in one HF ``generate`` call."""

from __future__ import annotations

import pytest
import torch

from radgen.model.guidance import PairedGuidance, guided_scores
from radgen.model.run import RunError, line_guidance_scale


def test_guided_scores_by_hand():
    cond = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    uncond = torch.log(torch.tensor([[0.25, 0.5, 0.25]]))
    # scale 1: the conditional log-probabilities; scale 2: 2 log p_c - log p_u
    assert torch.allclose(guided_scores(cond, uncond, 1.0), cond)
    want = torch.log(torch.tensor([[1.0, 0.125, 0.25]]))
    assert torch.allclose(guided_scores(cond, uncond, 2.0), want)
    # the same row twice (a film the head calls normal): guidance changes nothing
    assert torch.allclose(guided_scores(cond, cond, 3.0), cond)
    # raw logits are normalised first
    assert torch.allclose(guided_scores(cond + 7.0, uncond - 3.0, 2.0), want)


def test_paired_guidance_gives_both_halves_the_guided_scores():
    torch.manual_seed(0)
    scores = torch.randn(6, 11)
    scores[:, 4] = float("-inf")  # a suppressed id (the image token) in every row
    out = PairedGuidance(1.5)(torch.zeros(6, 1, dtype=torch.long), scores)
    assert torch.equal(out[:3], out[3:])  # greedy / beam picks the same token for a pair: they stay in step
    assert torch.allclose(out[:3, :4], guided_scores(scores[:3], scores[3:], 1.5)[:, :4])
    assert torch.isneginf(out[:, 4]).all() and not torch.isnan(out).any()
    with pytest.raises(ValueError, match="even batch"):
        PairedGuidance(2.0)(torch.zeros(3, 1, dtype=torch.long), scores[:3])


def test_line_guidance_scale_is_checked():
    assert line_guidance_scale({}, headed=False) == 1.0
    assert line_guidance_scale({"line_guidance": 1.0}, headed=False) == 1.0
    assert line_guidance_scale({"line_guidance": 1.5}, headed=True) == 1.5
    with pytest.raises(RunError, match="findings_head"):
        line_guidance_scale({"line_guidance": 2.0}, headed=False)
    with pytest.raises(RunError, match="sampling"):
        line_guidance_scale({"line_guidance": 2.0, "do_sample": True}, headed=True)
    with pytest.raises(RunError, match=">= 1"):
        line_guidance_scale({"line_guidance": 0.5}, headed=True)


def test_train_config_refuses_line_guidance_without_a_head():
    from radgen.config import ConfigError, load_config
    from radgen.train import validate_config

    cfg = load_config("reportgen", ["cpu_smollm2"], ["out=x", "data.path=y", "encoder.spec=oracle",
                                                      "generate.line_guidance=2"])
    with pytest.raises(ConfigError, match="line_guidance"):
        validate_config(cfg, check_files=False)



def test_line_guidance_rejects_non_numbers_and_a_row_masked_only_unconditionally():
    for bad in (0, 0.0, float("nan"), float("inf")):
        with pytest.raises(RunError, match=">= 1"):
            line_guidance_scale({"line_guidance": bad}, headed=True)
    scores = torch.zeros(2, 5)
    scores[1, 2] = float("-inf")  # masked in the unconditional row only: not produced
    out = PairedGuidance(3.0)(torch.zeros(2, 1, dtype=torch.long), scores)
    assert torch.equal(out[0], out[1]) and torch.isneginf(out[0, 2]) and torch.isfinite(out[0, [0, 1, 3, 4]]).all()
