"""The findings head: a logistic regression per finding on the image tokens whose decisions are the
stated findings line the LLM writes on after (radgen/model/findings_head.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from radgen.config import load_config
from radgen.data.synth.generate import generate_dataset
from radgen.model.findings_head import FINDINGS, _best_threshold, fit_findings_head, label_matrix
from radgen.model.prompt import FIRST_LINE_END, findings_list_text


def test_best_threshold_by_hand():
    # scores 3 2 1 0 for labels 1 1 0 0: the cut between 2 and 1 is perfect
    thr, stats = _best_threshold(torch.tensor([3.0, 2.0, 1.0, 0.0]), torch.tensor([1.0, 1.0, 0.0, 0.0]))
    assert thr == pytest.approx(1.5) and stats == {"f1": 1.0, "precision": 1.0, "recall": 1.0, "false_alarm": 0.0}
    # tied scores are never split: 2 2 for labels 1 0 -> both in or both out
    thr, stats = _best_threshold(torch.tensor([2.0, 2.0, 0.0]), torch.tensor([1.0, 0.0, 0.0]))
    assert thr == pytest.approx(1.0) and stats["precision"] == pytest.approx(0.5)
    # a false-alarm budget: films 2 and 4 have no finding at all
    scores, y, normal = torch.tensor([3.0, 2.0, 1.0, 0.0]), torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([0, 1, 0, 1]).bool()
    thr, stats = _best_threshold(scores, y, normal)  # best F1 (0.8) names it on half the normal films
    assert thr == pytest.approx(0.5) and stats["f1"] == pytest.approx(0.8) and stats["false_alarm"] == 0.5
    thr, stats = _best_threshold(scores, y, normal, max_false_alarm=0.25)
    assert thr == pytest.approx(2.5) and stats["f1"] == pytest.approx(2 / 3) and stats["false_alarm"] == 0.0
    # a precision floor: scores 4 3 2 1 for labels 1 0 1 0; best F1 (0.8, precision 2/3) cuts at 1.5,
    # a floor of 0.9 leaves only the first cut (precision 1, F1 2/3), a floor above 1 none at all
    scores, y = torch.tensor([4.0, 3.0, 2.0, 1.0]), torch.tensor([1.0, 0.0, 1.0, 0.0])
    thr, stats = _best_threshold(scores, y)
    assert thr == pytest.approx(1.5) and stats["precision"] == pytest.approx(2 / 3)
    thr, stats = _best_threshold(scores, y, min_precision=0.9)
    assert thr == pytest.approx(3.5) and stats["precision"] == 1.0 and stats["f1"] == pytest.approx(2 / 3)
    thr, _ = _best_threshold(scores, y, min_precision=1.01)
    assert math.isinf(thr)
    # the normal film scores highest: every cut that finds the positive names it too -> never stated
    thr, stats = _best_threshold(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([1, 0]).bool(), 0.0)
    assert math.isinf(thr) and stats["recall"] == 0.0


def test_head_reads_a_finding_from_the_tokens_and_never_states_a_rare_one():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(200, 3, 4, generator=g)  # (films, tokens, dims)
    cardio = tokens[:, 1, 2] > 0.3  # one feature decides Cardiomegaly
    labels = [{"Cardiomegaly": int(c), "Edema": 1 if i < 3 else 0} for i, c in enumerate(cardio.tolist())]
    head, report = fit_findings_head(tokens[:150], labels[:150])
    assert report["findings"]["Edema"] == {"positives": 3}  # under min_positives: no threshold, never stated
    assert report["findings"]["Cardiomegaly"]["f1"] > 0.9  # out of fold
    decided = head.decide(tokens[150:])
    got = torch.tensor([d["Cardiomegaly"] for d in decided], dtype=torch.bool)
    assert (got == cardio[150:]).float().mean() > 0.95
    assert all(d["Edema"] == 0 for d in decided) and math.isinf(float(head.threshold[FINDINGS.index("Edema")]))
    assert label_matrix(decided).shape == (50, len(FINDINGS))


def test_head_refuses_too_few_films():
    with pytest.raises(ValueError, match="at least"):
        fit_findings_head(torch.zeros(4, 1, 2), [{"Edema": 1}] * 4)


def _tokenizers():
    """The built-in SmolLM2's tokenizer when a previous run converted it (tests stay offline)."""
    out = []
    cached = Path.home() / ".cache" / "radgen" / "models" / "SmolLM2-135M-Instruct"
    if (cached / "tokenizer.json").is_file():
        out.append(str(cached))
    return out


def test_stated_line_ids_begin_the_findings_first_target(tmp_path):
    """Generation appends the stated line's ids to the prompt; they must be exactly the ids that
    begin the same line in a training target, or the LLM continues from a context it never saw."""
    from transformers import AutoTokenizer

    from tiny_llm import RADIOLOGY_SENTENCES, make_tiny_llm_folder
    from radgen.model.prompt import PromptConfig, ReportTokenizer

    folders = [make_tiny_llm_folder(tmp_path, RADIOLOGY_SENTENCES, vocab_size=400)] + _tokenizers()
    lines = ["No finding.", "Positive: Cardiomegaly.", "Positive: Lung Opacity, Edema, Pleural Effusion, Support Devices."]
    bodies = ["Heart size is normal. No pneumothorax.", "The heart is mildly enlarged.", "  Moderate pulmonary edema."]
    for folder in folders:
        tok = AutoTokenizer.from_pretrained(str(folder))
        rt = ReportTokenizer(tok, PromptConfig(), image_token_id=0, n_image_tokens=1, findings_first=True)
        for line in lines:
            for body in bodies:
                full = rt.target_ids(f"{line}{FIRST_LINE_END}{body.strip()}")
                stated = rt.stated_ids(line)
                assert full[: len(stated)] == stated, (folder, line, body)


@pytest.mark.slow
@pytest.mark.parametrize("cache", ["true", "false"])  # false: the head encodes the training films itself
def test_generator_with_findings_head_states_the_oracle_findings(tmp_path_factory, one_thread, cache):
    """End to end on oracle tokens and the tiny LLM: the head is fit before training, saved in the
    run folder, and generation writes after the line it states, which on oracle tokens is the film's
    own findings line (every finding with enough training positives); the run is not exportable,
    and a merged copy of it (merge_lora) keeps the head."""
    from radgen.generation import read_records, run_generate
    from radgen.train import run_train
    from radgen.model.export import run_problems
    from radgen.model.run import HEAD_FILE, load_run
    from tiny_llm import RADIOLOGY_SENTENCES, make_tiny_llm_folder

    data = tmp_path_factory.mktemp("head") / "s"
    generate_dataset(load_config("synth", [], [f"out={data}", "n=80", "size=32", "workers=1", "seed=3"]), progress=False)
    texts = [json.loads(line)["findings"] or "" for line in (data / "manifest.jsonl").open()]
    llm = make_tiny_llm_folder(tmp_path_factory.mktemp("llm"), texts + RADIOLOGY_SENTENCES, vocab_size=500)
    out = data.parent / "run"
    cfg = load_config("reportgen", ["cpu_smollm2"], [
        f"out={out}", f"data.path={data}", "encoder.spec=oracle", f"llm.path={llm}", "train.precision=fp32",
        "data.workers=0", "data.val_split=null", "stage1.max_steps=0", "stage2.max_steps=4", "train.eval_every=0",
        "tasks.findings_head=true", "prompt.max_target_tokens=64", "generate.max_new_tokens=24",
        f"data.cache_vision={cache}"])
    summary = run_train(cfg, progress=False)
    assert summary["status"] == "complete" and (out / HEAD_FILE).is_file()
    info = json.loads((out / "model.json").read_text())
    fitted = [f for f, e in info["findings_head"]["findings"].items() if "f1" in e]
    assert fitted and all(info["findings_head"]["findings"][f]["f1"] == 1.0 for f in fitted)
    assert any("findings_head" in p for p in run_problems(info))

    gen = data.parent / "test.jsonl"
    run_generate(out, data, gen, split="test", progress=False, batch_size=8)
    recs = read_records(gen)
    from radgen.data.reports import read_report_rows

    rows = {r.id: r for r in read_report_rows(data, split="test")}
    assert recs and all(r["status"] == "ok" for r in recs)
    for r in recs:
        labels = rows[r["id"]].labels or {}
        assert r["stated"] == findings_list_text({f: int(labels.get(f) == 1) for f in fitted}), r
        assert not r["findings"].startswith(("Positive:", "No finding"))  # the line is not in the findings
    loaded = load_run(out)
    assert loaded.head is not None and torch.equal(loaded.head.threshold, load_run(out).head.threshold)
    # line guidance: the same stated lines, recorded in the settings; a film stated "No finding."
    # decodes exactly as without guidance (its two rows are the same), the others stay in step
    guided = data.parent / "guided.jsonl"
    run_generate(out, data, guided, {"line_guidance": 3.0}, split="test", progress=False, batch_size=8,
                 built=loaded)
    plain = {r["id"]: r for r in recs}
    for r in read_records(guided):
        assert r["status"] == "ok" and r["stated"] == plain[r["id"]]["stated"]
        assert r["settings"]["line_guidance"] == 3.0
        if r["stated"] == "No finding.":
            assert r["findings"] == plain[r["id"]]["findings"]
    if cache == "true":  # a merged run keeps its head (it states the lines its reports follow)
        from radgen.generation import merge_lora

        merged = load_run(merge_lora(out, data.parent / "merged"))
        assert merged.head is not None and torch.equal(merged.head.threshold, loaded.head.threshold)


def test_model_hash_covers_the_findings_head(tmp_path):
    """Generation records model_sha256 with every report: a run's head decides the stated lines, so
    a different head is a different model."""
    from radgen.model.run import HEAD_FILE, MODEL_JSON, PROJECTOR_FILE, model_sha256

    for name in (MODEL_JSON, PROJECTOR_FILE, HEAD_FILE):
        (tmp_path / name).write_bytes(b"a")
    before = model_sha256(tmp_path)
    (tmp_path / HEAD_FILE).write_bytes(b"b")
    assert model_sha256(tmp_path) != before
