"""CUDA device choices, tested on the CPU with ``torch.cuda`` faked (no call here needs a GPU)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def two_gpus(monkeypatch):
    """``torch.cuda`` says two devices are there; ``set_device`` only records its argument."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    return calls


class _Chosen(Exception):
    pass


def test_resolve_device_uses_local_rank(two_gpus, monkeypatch):
    from encoder.inference import resolve_device

    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == resolve_device(None) == resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)  # an explicit index is kept
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ValueError, match="LOCAL_RANK=2"):
        resolve_device("auto")
    monkeypatch.delenv("LOCAL_RANK")
    assert resolve_device("auto") == torch.device("cuda", 0)


@pytest.mark.parametrize("job", ["generate", "train", "pretrain"])
def test_jobs_put_rank_1_on_cuda_1(two_gpus, monkeypatch, tmp_path, job):
    """Under torchrun (LOCAL_RANK=1) every job joins the process group on its own GPU."""
    import encoder.distributed

    def chosen(device):
        raise _Chosen(device)

    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(encoder.distributed, "setup_distributed", chosen)
    with pytest.raises(_Chosen) as exc:
        if job == "generate":
            from radgen.generation import run_generate

            run_generate(tmp_path / "run", tmp_path / "images", tmp_path / "out.jsonl", progress=False)
        elif job == "train":
            import radgen.train.loop as tr
            from radgen.config import load_config

            monkeypatch.setattr(tr, "setup_distributed", chosen)
            monkeypatch.setattr(tr, "validate_config", lambda cfg: None)
            tr.run_train(load_config("reportgen", [], [f"out={tmp_path}"]), progress=False)
        else:
            import encoder.train as et
            from radgen.config import load_config

            monkeypatch.setattr(et, "setup_distributed", chosen)
            monkeypatch.setattr(et, "validate_config", lambda cfg: None)
            et.train(load_config("encoder", [], [f"out={tmp_path}"]), [])
    assert exc.value.args[0] == torch.device("cuda", 1)


@pytest.mark.parametrize("native", [True, False], ids=["native-bf16", "emulated-bf16"])
def test_auto_precision_needs_native_bf16(two_gpus, monkeypatch, tmp_path, native):
    """``precision: auto`` is bf16 only on GPUs that run it natively, in every job."""
    import encoder.train as et
    from encoder.inference import resolve_precision
    from radgen.config import load_config
    from radgen.train.loop import _autocast

    # torch.cuda.is_bf16_supported() is True on pre-Ampere GPUs too (emulated): only the
    # including_emulation=False answer tells them apart.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
    want = "bf16" if native else "fp32"
    assert resolve_precision("auto", "cuda") == want
    assert et._device_and_precision(load_config("encoder", [], [f"out={tmp_path}", "train.device=cuda"]))[1] == want
    assert _autocast(torch.device("cuda", 0), "auto")[1] == want
    assert et._device_and_precision(load_config("encoder", [], [f"out={tmp_path}", "train.device=cpu"]))[1] == "fp32"


def test_tf32_enabled_on_cuda(two_gpus, monkeypatch):
    """fp32 matmuls and convolutions left on a CUDA device run as TF32 (set once, where the device is chosen)."""
    from encoder.inference import resolve_device

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        resolve_device("cpu")
        assert not torch.backends.cuda.matmul.allow_tf32
        resolve_device("auto")
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture
def keep_tf32():
    """Restore the TF32 flags that choosing a (faked) CUDA device sets."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_chexbert_defaults_to_cuda(two_gpus, keep_tf32, monkeypatch, tmp_path):
    """CheXbert goes to the GPU when there is one (the ``.to`` call is recorded, nothing moves)."""
    from transformers import BertConfig

    from eval.chexpert.chexbert import CheXbertLabeler, CheXbertNet

    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64)
    path = tmp_path / "small.pth"
    torch.save({"model_state_dict": {"module." + k: v for k, v in CheXbertNet(config).state_dict().items()}}, path)
    moved = []
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, device: (moved.append(device), self)[1])
    assert CheXbertLabeler(path, config=config).device == torch.device("cuda", 0)
    assert CheXbertLabeler(path, config=config, device="cpu").device == torch.device("cpu")
    assert moved == [torch.device("cuda", 0), torch.device("cpu")]


def test_radgraph_defaults_to_cuda(two_gpus, keep_tf32, monkeypatch, tmp_path):
    """The radgraph package is asked for GPU 0 by default (its ``cuda`` index; -1 is the CPU)."""
    import sys
    import types

    from eval.radgraph.model import RadGraphAnnotator

    for f in ("config.json", "weights.th", "vocabulary"):
        (tmp_path / "radgraph").mkdir(exist_ok=True)
        (tmp_path / "radgraph" / f).write_text("{}")
    asked = []
    sub = types.ModuleType("radgraph.radgraph")
    sub.CACHE_DIR, sub.version = str(tmp_path), "0.1.18"
    sub.RadGraph = lambda **kw: asked.append(kw["cuda"])
    monkeypatch.setitem(sys.modules, "radgraph", types.ModuleType("radgraph"))
    monkeypatch.setitem(sys.modules, "radgraph.radgraph", sub)
    RadGraphAnnotator(model_cache_dir=tmp_path)._load()
    RadGraphAnnotator(model_cache_dir=tmp_path, device="cpu")._load()
    assert asked == [0, -1]


def test_evaluate_passes_its_device_to_the_scoring_models(monkeypatch, tmp_path):
    """``radgen evaluate --device`` (default auto) reaches CheXbert, RadGraph and BERTScore."""
    import sys
    import types

    import eval.chexpert.chexbert
    import eval.radgraph.model
    import radgen.jobs.evaluate as leaf
    from eval.radcliq import bertscore_f1
    from eval.score import ScoreOptions, _chexbert, _radgraph_annotations
    from radgen.cli import build_parser

    def chosen(*args):
        raise _Chosen(args[-1])

    monkeypatch.setattr(leaf, "run_evaluate", chosen)  # the name the command calls
    for extra, want in (([], "auto"), (["--device", "cpu"], "cpu")):
        args = build_parser("evaluate").parse_args(["evaluate", "--predictions", "p", "--references", "r",
                                                    "--out", "o", *extra])
        with pytest.raises(_Chosen) as exc:
            args.func(args)
        assert exc.value.args[0].device == want
    seen = []

    class Recorder:
        def __init__(self, *a, device=None, **kw):
            seen.append(str(device))

        def __call__(self, texts):
            return [{"text": t, "entities": {}} for t in texts]

        def score(self, hyps, refs):
            return None, None, torch.zeros(len(hyps))

    monkeypatch.setattr(eval.chexpert.chexbert, "CheXbertLabeler", Recorder)
    monkeypatch.setattr(eval.radgraph.model, "RadGraphAnnotator", Recorder)
    fake = types.ModuleType("bert_score")
    fake.__file__, fake.BERTScorer = str(tmp_path / "bert_score.py"), Recorder
    monkeypatch.setitem(sys.modules, "bert_score", fake)
    opts = ScoreOptions(chexbert="c.pth", radgraph_dir="d", device="cpu")
    _chexbert(opts, {})
    _radgraph_annotations(["a"], ["b"], opts, {})
    bertscore_f1(["a"], ["b"], "m", device=opts.device)
    assert seen == ["cpu", "cpu", "cpu"]
