"""The generator's controls and its step: pixel and oracle encoder specs, the prompt without a
system turn, and batches grouped by length."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch

from encoder.pixels import parse_pixels_spec, pixel_encoder
from eval.chexpert import CHEXPERT_14
from radgen.config import load_config
from radgen.data.batching import epoch_batches, padding_fraction
from radgen.data.reports import read_report_rows
from radgen.data.synth.generate import generate_dataset
from encoder.specs import encoder_config, load_encoder_spec
from radgen.train import run_train
from radgen.model.chat import _without_system_turn, chat_prompt
from radgen.model.oracle import ORACLE_DIM, OracleError, OracleVision, check_oracle_labels, oracle_tokens
from radgen.model.run import build_model
from radgen.model.vision import FrozenVision, VisionFeatures


# ------------------------------------------------------------------------------------- pixels
@pytest.mark.parametrize("spec,patch,size", [("pixels", 14, 112), ("pixels:28", 28, 224), ("pixels:16:64", 16, 64)])
def test_pixel_spec_tokens_equal_the_patch_pixels_exactly(spec, patch, size):
    assert parse_pixels_spec(spec) == (patch, size)
    enc = load_encoder_spec(spec)
    assert encoder_config(spec).embed_dim == patch * patch == enc.embed_dim
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, size, size, generator=g).expand(2, 3, size, size).contiguous()  # grayscale x3
    tokens = FrozenVision(enc, VisionFeatures(layer=-1, select="patch", norm=False))(x)
    side = size // patch
    # patch i (row-major over the grid) flattened row-major: the pixels themselves
    want = x[:, 0].unfold(1, patch, patch).unfold(2, patch, patch).reshape(2, side * side, patch * patch)
    assert torch.equal(tokens, want)
    # nothing to learn, and the same weights every time (a run's encoder hash is stable)
    assert not any(p.requires_grad for p in enc.parameters())
    assert all(torch.equal(a, b) for a, b in zip(enc.state_dict().values(), pixel_encoder(patch, size).state_dict().values()))


@pytest.mark.parametrize("spec", ["pixels:x", "pixels:14:7", "pixels:1:2:3"])
def test_bad_pixel_specs_are_refused_with_the_spec(spec):
    with pytest.raises(ValueError, match="pixels"):
        load_encoder_spec(spec)


# ------------------------------------------------------------------------------------- oracle
def test_oracle_tokens_spell_the_labels():
    labels = {o: None for o in CHEXPERT_14}
    labels.update({"Cardiomegaly": 1, "Edema": 0, "Pleural Effusion": -1})
    t = oracle_tokens(labels)
    assert t.shape == (14, ORACLE_DIM)
    assert torch.equal(t[:, :14], torch.eye(14))  # token j is observation j
    value = t[:, 14:].argmax(1).tolist()  # 0 positive, 1 negative, 2 uncertain, 3 not mentioned
    want = {"Cardiomegaly": 0, "Edema": 1, "Pleural Effusion": 2}
    assert value == [want.get(o, 3) for o in CHEXPERT_14]
    assert (t.sum(1) == 2).all()
    assert torch.equal(OracleVision()(t[None]), t[None])
    with pytest.raises(OracleError, match="not 1, 0, -1"):
        oracle_tokens({"Edema": 2})


def test_oracle_is_refused_where_image_features_are_needed():
    from radgen.features import FeatureJobError, image_encoder

    with pytest.raises(FeatureJobError, match="labels control"):
        image_encoder("oracle")


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "s"
    generate_dataset(load_config("synth", [], [f"out={out}", "n=16", "size=64", "workers=1", "seed=5"]), progress=False)
    return out


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory, synth) -> Path:
    from tiny_llm import RADIOLOGY_SENTENCES, make_tiny_llm_folder

    texts = [json.loads(line)["findings"] or "" for line in (synth / "manifest.jsonl").open()]
    return make_tiny_llm_folder(tmp_path_factory.mktemp("llm"), texts + RADIOLOGY_SENTENCES, vocab_size=500)


def test_oracle_spec_refuses_a_manifest_without_labels(tmp_path, synth, llm_dir):
    rows = [json.loads(line) for line in (synth / "manifest.jsonl").open()]
    bare = tmp_path / "manifest.jsonl"  # the same films and reports, no CheXpert label columns
    bare.write_text("".join(json.dumps({"id": r["id"], "image": str(synth / r["image"]), "split": r["split"],
                                        "findings": r["findings"]}) + "\n" for r in rows))
    with pytest.raises(OracleError, match="no.*labels|none"):
        check_oracle_labels(read_report_rows(bare, split="train"), bare)
    cfg = load_config("reportgen", [], [f"out={tmp_path / 'run'}", f"data.path={bare}", "encoder.spec=oracle",
                                        f"llm.path={llm_dir}", "train.precision=fp32", "data.workers=0"])
    with pytest.raises(OracleError, match="labels"):
        run_train(cfg, progress=False)
    assert not (tmp_path / "run" / "model.json").exists()
    # with labels it builds: 14 tokens of 18 dims, no encoder weights
    good = load_config("reportgen", [], [f"out={tmp_path / 'run2'}", f"data.path={synth}", "encoder.spec=oracle",
                                         f"llm.path={llm_dir}"])
    built = build_model(good)
    assert built.is_oracle and built.tokens.n_image_tokens == 14
    assert built.info["encoder"]["spec"] == "oracle" and "oracle" in built.info["encoder"]["control"]
    row = read_report_rows(synth, split="train")[0]
    assert torch.equal(built.input_loader()(row), oracle_tokens(row.labels))


# ------------------------------------------------------------------------------------- prompt
SMOL_LIKE = (  # ChatML that adds a default system turn when none is given (as SmolLM2's and Qwen2.5's)
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3_LIKE = (
    "{{ '<|begin_of_text|>' }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")


def _fake_tokenizer(template: str):
    from jinja2 import Template

    def apply(messages, add_generation_prompt=True, tokenize=False, **kw):
        return Template(template).render(messages=messages, add_generation_prompt=add_generation_prompt)
    return types.SimpleNamespace(chat_template=template, apply_chat_template=apply)


def test_no_system_turn_unless_the_config_asks_for_one():
    tok = _fake_tokenizer(SMOL_LIKE)
    user = "<image>\nWrite the findings."
    assert chat_prompt(tok, user, system=None) == f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    assert chat_prompt(tok, user, system="default").startswith("<|im_start|>system\nYou are a helpful AI assistant.")
    assert chat_prompt(tok, user, system="Be brief.").startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    llama = _fake_tokenizer(LLAMA3_LIKE)
    assert _without_system_turn(llama, user) == (
        f"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_prompt_token_count_is_what_the_config_says(synth, llm_dir):
    cfg = load_config("reportgen", [], [f"out=/tmp/unused", f"data.path={synth}", "encoder.spec=random:vit_tiny:56:0",
                                        f"llm.path={llm_dir}", "prompt.instruction=Findings?"])
    built = build_model(cfg)
    tok = built.tokens
    assert built.info["prompt"]["system"] is None
    text = tok.prompt_text()
    assert text == "<|im_start|>user\n<image>\nFindings?<|im_end|>\n<|im_start|>assistant\n"
    plain = tok.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(tok.prompt_ids()) == len(plain) - 1 + 16  # the one <image> becomes 16 image tokens
    # the template's own system turn only when asked for, and then it costs tokens
    cfg.prompt.system = "You are a radiologist."
    longer = build_model(cfg).tokens
    assert longer.prompt_text().startswith("<|im_start|>system\nYou are a radiologist.<|im_end|>\n")
    assert len(longer.prompt_ids()) > len(tok.prompt_ids())


# ------------------------------------------------------------------------------------- batching
def test_length_grouping_keeps_every_example_once_per_epoch_with_little_padding():
    g = torch.Generator().manual_seed(1)
    n, gb = 203, 8
    lengths = (40 + torch.randint(0, 60, (n,), generator=g)).tolist()
    for seed in range(3):
        grouped = epoch_batches(n, gb, seed, lengths=lengths, window=16)
        flat = [i for b in grouped for i in b]
        assert sorted(flat) == list(range(n))  # each example exactly once
        assert len(grouped) == -(-n // gb)  # as many steps as the shuffled order
        assert sorted(len(b) for b in grouped) == [n % gb] + [gb] * (n // gb)  # one short batch: 203 = 25 x 8 + 3
        assert epoch_batches(n, gb, seed, lengths=lengths, window=16) == grouped  # a function of the seed only
        shuffled = epoch_batches(n, gb, seed)
        assert all(len(b) == gb for b in shuffled)
        pad_g = padding_fraction([[lengths[i] for i in b] for b in grouped])
        pad_s = padding_fraction([[lengths[i] for i in b] for b in shuffled])
        assert pad_g < 0.05 < pad_s
    assert epoch_batches(n, gb, 0, lengths=lengths) != epoch_batches(n, gb, 1, lengths=lengths)
    # with 4 ranks the 3-row last batch is topped up to 4 rows, so no rank gets an empty share
    four = epoch_batches(n, gb, 0, lengths=lengths, window=16, min_size=4)
    assert min(len(b) for b in four) == 4 and set(i for b in four for i in b) == set(range(n))
    assert sum(len(b) for b in four) == n + 1


def test_padding_fraction_by_hand():
    # rows 3 and 5 padded to 5: 2 of 10 positions; row 4 alone: none -> 2 / 14
    assert padding_fraction([[3, 5], [4]]) == pytest.approx(2 / 14)


# ------------------------------------------------------------------------------------- regression
@pytest.mark.slow
def test_generator_on_oracle_tokens_names_the_findings(tmp_path_factory, one_thread):
    """Today's failure, as a test: a generator that learns the report language and writes a normal
    report for every film. Trained on oracle tokens (the films' own labels) with the default
    recipe's targets (``cpu_smollm2``: findings-first), a small generator (the tiny test LLM, which
    learns the report language from scratch, hence its many steps) must name the findings of films
    it never saw."""
    import numpy as np

    from eval.chexpert import CHEXPERT_5
    from eval.chexpert.f1 import chexpert_f1
    from eval.chexpert.labeler import label_reports
    from radgen.generation import read_records, run_generate
    from tiny_llm import RADIOLOGY_SENTENCES, make_tiny_llm_folder

    data = tmp_path_factory.mktemp("oracle") / "s"
    generate_dataset(load_config("synth", [], [f"out={data}", "n=160", "size=32", "workers=1", "seed=11"]),
                     progress=False)
    texts = [json.loads(line)["findings"] or "" for line in (data / "manifest.jsonl").open()]
    llm = make_tiny_llm_folder(tmp_path_factory.mktemp("llm"), texts + RADIOLOGY_SENTENCES, vocab_size=600)
    out = data.parent / "run"
    cfg = load_config("reportgen", ["cpu_smollm2"], [
        f"out={out}", f"data.path={data}", "encoder.spec=oracle", f"llm.path={llm}", "train.precision=fp32",
        "data.workers=0", "data.val_split=null", "stage1.max_steps=0", "stage2.max_steps=1500", "stage2.lr=1e-2",
        "stage2.warmup_ratio=0.0", "lora.dropout=0.0", "train.eval_every=0", "train.log_every=50",
        "prompt.max_target_tokens=80", "generate.max_new_tokens=80"])
    assert cfg.tasks.findings_first  # the recipe under test
    assert run_train(cfg, progress=False)["status"] == "complete"
    gen = data.parent / "test.jsonl"
    run_generate(out, data, gen, split="test", progress=False, batch_size=16)
    recs = read_records(gen)
    assert len(recs) >= 16 and all(r["status"] == "ok" for r in recs)
    ref = label_reports([r["reference"] for r in recs])
    hyp = label_reports([r["findings"] for r in recs])
    idx5 = [CHEXPERT_14.index(o) for o in CHEXPERT_5]
    with_findings = np.nansum(ref[:, idx5] == 1, axis=1) > 0
    assert with_findings.sum() >= 4  # the test split has abnormal films to get right
    m = chexpert_f1(ref, hyp, "rules")
    f1_5 = m.aggregate(m.stats)["chexpert_f1_5_micro"]
    # the failure wrote "normal" for all: F1 0 and one or two distinct texts. Measured: 0.77 with
    # findings-first targets, 0.22 with plain findings targets and the same 1,500 steps
    assert f1_5 >= 0.5, [r["findings"] for r in recs][:5]
    assert len({r["findings"] for r in recs}) > len(recs) // 3
