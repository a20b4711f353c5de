"""``radgen export``: a trained run as a plain transformers LLaVA folder.

The main check trains a tiny overfit run (8 images, tiny Llama), exports it with the CLI, loads
the folder in a subprocess that never imports radgen (AutoProcessor + AutoModelForImageTextToText
only) and compares its greedy text with ``radgen generate`` on the same images, both through
the exported processor's 8-bit preprocessing and with radgen's own pixel values.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from radgen.model.export import (ExportError, LOGIT_TOLERANCE, check_exportable, config_problems,
                                 export_problems, llava_feature_layer, llava_projector_state,
                                 processor_chat_template, run_problems)
from radgen.model.vision import VisionFeatures

INDICATIONS = ["cough", "fever and shortness of breath for three days", None, "chest pain", "", "follow-up",
               "trauma", "pre-operative assessment"]


# ----------------------------------------------------------------------------------------------
# What can be expressed (fast)
# ----------------------------------------------------------------------------------------------
def test_feature_layer_maps_blocks_to_hidden_states():
    # hidden_states[0] is the embeddings: block b is hidden_states[b + 1] == hidden_states[b - depth]
    assert llava_feature_layer(-1, 12) == -1
    assert llava_feature_layer(-2, 12) == -2
    assert llava_feature_layer(0, 12) == -12  # never 0: transformers would then capture no hidden states
    assert llava_feature_layer(11, 12) == -1
    with pytest.raises(ExportError, match="out of range"):
        llava_feature_layer(12, 12)


VIT = {"arch": "vit_tiny", "img_size": 56, "patch_size": 14}


@pytest.mark.parametrize("kwargs, words", [
    ({"features": VisionFeatures(pool=4)}, ["encoder.pool=4", "no pooling"]),
    ({"features": VisionFeatures(norm=True)}, ["encoder.norm=true", "before it"]),
    ({"projector": "mlp4x_gelu"}, ["mlp4x_gelu", "four linear layers", "exportable: linear, mlp2x_gelu"]),
    ({"projector": "nonesuch"}, ["not a radgen projector"]),
    ({"vit": {**VIT, "num_register_tokens": 4}}, ["4 register tokens", "drops only token 0"]),
    ({"vit": {**VIT, "pos_interp": "dinov2_offset"}, "image_size": 112}, ["dinov2_offset", "native 56 px"]),
    ({"llm_dtype": "bfloat16"}, ["llm.dtype=bfloat16", "one dtype"]),
    ({"generate": {"repetition_penalty": 1.2}}, ["repetition_penalty=1.2", "penalise"]),
])
def test_refusals_say_why(kwargs, words):
    args = {"features": VisionFeatures(), "projector": "mlp2x_gelu", "vit": VIT, **kwargs}
    problems = export_problems(args.pop("features"), args.pop("projector"), **args)
    assert len(problems) == 1, problems
    for w in words:
        assert w in problems[0]
    with pytest.raises(ExportError, match="cannot export") as exc:
        check_exportable(problems)
    assert problems[0] in str(exc.value)


def test_exportable_choices():
    for features in (VisionFeatures(), VisionFeatures(layer=-2, select="cls+patch")):
        for projector in ("mlp2x_gelu", "linear"):
            assert export_problems(features, projector, vit=VIT, image_size=56,
                                   generate={"repetition_penalty": 1.0}) == []
    # dinov2_offset (an original DINOv2 checkpoint) at its native grid: no interpolation either side
    assert export_problems(VisionFeatures(), "mlp2x_gelu", vit={**VIT, "pos_interp": "dinov2_offset"},
                           image_size=56) == []
    # bicubic at another size: transformers' dinov2 interpolates the same way
    assert export_problems(VisionFeatures(), "mlp2x_gelu", vit=VIT, image_size=112) == []
    # several problems are all listed
    assert len(export_problems(VisionFeatures(pool=2, norm=True), "mlp4x_gelu")) == 3


def test_default_and_cpu_smollm2_configs_are_exportable():
    from omegaconf import OmegaConf

    from radgen.config import configs_dir, load_config

    for files in ([], ["cpu_smollm2"]):
        assert config_problems(load_config("reportgen", files, [])) == []
    # ... and with the encoder it names (configs/encoder cpu_tiny: vit_tiny at 112 px, no registers)
    enc = OmegaConf.merge(OmegaConf.load(configs_dir() / "encoder" / "default.yaml"),
                          OmegaConf.load(configs_dir() / "encoder" / "cpu_tiny.yaml")).model
    vit = {k: enc[k] for k in ("arch", "img_size", "patch_size", "num_register_tokens", "layerscale_init")}
    cfg = load_config("reportgen", ["cpu_smollm2"], [])
    features = VisionFeatures(layer=cfg.encoder.layer, select=cfg.encoder.select, norm=cfg.encoder.norm,
                              pool=cfg.encoder.pool)
    assert export_problems(features, cfg.projector.name, vit=vit, image_size=enc.img_size,
                           generate=dict(cfg.generate), llm_dtype=cfg.llm.dtype) == []
    bad = load_config("reportgen", ["cpu_smollm2"], ["encoder.pool=4", "projector.name=mlp4x_gelu"])
    assert len(config_problems(bad)) == 2


def test_projectors_map_exactly_onto_llava(one_thread):
    from transformers import Dinov2Config, LlamaConfig, LlavaConfig
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    from radgen.model.projector import build_projector

    x = torch.randn(2, 5, 24)
    for name, act in (("mlp2x_gelu", "gelu"), ("linear", "linear")):
        torch.manual_seed(0)
        ours = build_projector(name, 24, 16).eval()
        cfg = LlavaConfig(vision_config=Dinov2Config(hidden_size=24, num_hidden_layers=1, num_attention_heads=2),
                          text_config=LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                  intermediate_size=32, vocab_size=50),
                          projector_hidden_act=act, vision_feature_layer=-1)
        theirs = LlavaMultiModalProjector(cfg).eval()
        theirs.load_state_dict(llava_projector_state(ours, name), strict=True)
        with torch.no_grad():
            assert torch.equal(theirs(x), ours(x)), name
    with pytest.raises(ExportError, match="mlp4x_gelu"):
        llava_projector_state(build_projector("mlp4x_gelu", 24, 16), "mlp4x_gelu")


SMOLLM2_STYLE = (  # SmolLM2's template: a default system turn when the messages hold none
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.mark.parametrize("template", ["chatml", "smollm2", None])
def test_processor_chat_template_renders_radgen_prompt(tiny_llm_dir, template):
    from transformers import AutoTokenizer
    from tiny_llm import CHATML_TEMPLATE

    from radgen.model.chat import chat_prompt
    from radgen.model.prompt import PromptConfig

    tok = AutoTokenizer.from_pretrained(str(tiny_llm_dir))
    tok.chat_template = {"chatml": CHATML_TEMPLATE, "smollm2": SMOLLM2_STYLE, None: None}[template]
    prompt = PromptConfig()
    wrapper = processor_chat_template(tok.chat_template, prompt.image_token)
    for indication in (None, "cough"):
        expected = chat_prompt(tok, prompt.user_text(indication))
        text = prompt.instruction + (f"\n{prompt.indication.format(indication=indication)}" if indication else "")
        parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        plain = [{"role": "user", "content": prompt.user_text(indication)}]
        for messages in (parts, plain):
            got = tok.apply_chat_template(messages, chat_template=wrapper, add_generation_prompt=True, tokenize=False)
            assert got == expected
    if template is None:
        assert expected.startswith("USER: <image>\n") and expected.endswith("\nASSISTANT:")


def _fake_run(path: Path, **changes) -> Path:
    """A run folder holding only the model.json fields the exportability check reads."""
    info = {"format": "radgen-reportgen/1", "vision": VisionFeatures().to_dict(), "image_size": 56,
            "encoder": {"vit_config": VIT}, "projector": {"name": "mlp2x_gelu"},
            "llm": {"dtype": "float32"}, "generate": {"repetition_penalty": 1.0}}
    for key, value in changes.items():
        info[key] = {**info[key], **value} if isinstance(value, dict) else value
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.json").write_text(json.dumps(info))
    return path


def test_export_refuses_before_loading(tmp_path, capsys):
    from radgen.cli import main
    from radgen.model.export import check_run, run_export

    run = _fake_run(tmp_path / "pooled", vision={"pool": 4, "norm": True})
    with pytest.raises(ExportError) as exc:
        run_export(run, tmp_path / "out")
    assert "encoder.pool=4" in str(exc.value) and "encoder.norm=true" in str(exc.value)
    assert not (tmp_path / "out").exists()
    assert main(["export", "--model", str(run), "--out", str(tmp_path / "out")]) == 2
    assert "encoder.pool=4" in capsys.readouterr().err
    assert main(["export", "--model", str(run), "--check"]) == 2
    assert "cannot be exported" in capsys.readouterr().out

    good = _fake_run(tmp_path / "good")
    assert check_run(good) == []
    assert main(["export", "--model", str(good), "--check"]) == 0
    # a generation override is checked too
    assert "repetition_penalty=1.3" in check_run(good, {"repetition_penalty": 1.3})[0]
    assert run_problems(json.loads((good / "model.json").read_text()), {"repetition_penalty": None}) == []
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="not empty"):
        run_export(good, busy)
    assert main(["export", "--model", str(tmp_path / "nothing"), "--check"]) == 2
    assert "no model.json" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# A real export (slow: trains a tiny overfit run once for the module)
# ----------------------------------------------------------------------------------------------
def _train(out: Path, llm: Path, manifest: Path, overrides: list[str]) -> Path:
    from radgen.config import load_config
    from radgen.train import run_train

    cfg = load_config("reportgen", [], [
        f"out={out}", f"data.path={manifest}", "encoder.spec=random:vit_tiny:56:0", f"llm.path={llm}",
        "train.eval_every=0", "train.precision=fp32", "train.log_every=50", "data.workers=0",
        "data.val_split=null", "data.indication_field=indication", "lora.dropout=0.0", *overrides])
    run_train(cfg, progress=False)
    return out


@pytest.fixture(scope="module")
def material(tmp_path_factory, one_thread) -> dict:
    """Synthetic images, a manifest of 8 with indications, a tiny LLM and a run overfit on them."""
    from tiny_llm import RADIOLOGY_SENTENCES, make_tiny_llm_folder

    from radgen.config import load_config
    from radgen.data.synth.generate import generate_dataset

    root = tmp_path_factory.mktemp("export")
    generate_dataset(load_config("synth", [], [f"out={root / 'synth'}", "n=24", "size=64", "overwrite=true",
                                              "workers=1"]), progress=False)
    rows = [json.loads(line) for line in (root / "synth" / "manifest.jsonl").read_text().splitlines()]
    llm = make_tiny_llm_folder(root / "llm", [r["findings"] for r in rows if r["findings"]] + RADIOLOGY_SENTENCES,
                               vocab_size=500)
    rows = [r for r in rows if r["findings"]][:8]
    manifest = root / "train.jsonl"
    manifest.write_text("".join(json.dumps({"id": r["id"], "image": str(root / "synth" / r["image"]),
                                            "findings": r["findings"], "split": "train", "indication": ind}) + "\n"
                                for r, ind in zip(rows, INDICATIONS)))
    run = _train(root / "run", llm, manifest, [
        "stage1.max_steps=10", "stage2.max_steps=200", "stage1.batch_size=8", "stage2.batch_size=8",
        "stage1.lr=3e-3", "stage2.lr=1e-2", "stage2.warmup_ratio=0.0"])
    return {"root": root, "llm": llm, "manifest": manifest, "run": run}


PLAIN_SCRIPT = r'''
import json, sys
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

folder, manifest, pixels_file = sys.argv[1], sys.argv[2], sys.argv[3]
processor = AutoProcessor.from_pretrained(folder)
model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
instruction = json.load(open(folder + "/radgen_export.json"))["prompt"]["instruction"]
radgen_pixels = torch.load(pixels_file)
rows = [json.loads(line) for line in open(manifest)]

def prompt_for(row):
    text = instruction
    if row.get("indication") and row["indication"].strip():
        text += "\nIndication: " + row["indication"].strip()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)

def decode(ids, n_prompt):
    return [processor.decode(r[n_prompt:], skip_special_tokens=True).strip() for r in ids]

one, same_pixels = {}, {}
with torch.no_grad():
    for i, row in enumerate(rows):
        inputs = processor(images=Image.open(row["image"]), text=prompt_for(row), add_special_tokens=False,
                           return_tensors="pt")
        n = inputs["input_ids"].shape[1]
        one[row["id"]] = decode(model.generate(**inputs), n)[0]
        inputs["pixel_values"] = radgen_pixels[i:i + 1]
        same_pixels[row["id"]] = decode(model.generate(**inputs), n)[0]
    batch = processor(images=[Image.open(r["image"]) for r in rows], text=[prompt_for(r) for r in rows],
                      add_special_tokens=False, padding=True, return_tensors="pt")
    batched = dict(zip([r["id"] for r in rows], decode(model.generate(**batch), batch["input_ids"].shape[1])))
print(json.dumps({"one": one, "same_pixels": same_pixels, "batched": batched,
                  "imported": sorted(m for m in ("radgen", "encoder", "eval") if m in sys.modules),
                  "model_class": type(model).__name__, "processor_class": type(processor).__name__}))
'''


@pytest.mark.slow
def test_export_generates_radgen_text_without_radgen(material, tmp_path):
    from encoder.processor import RadDinoProcessor
    from radgen.cli import main
    from radgen.data.images import load_image
    from radgen.generation import model_sha256, read_records, run_generate

    run, manifest = material["run"], material["manifest"]
    folder = tmp_path / "llava"
    assert main(["export", "--model", str(run), "--out", str(folder)]) == 0
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "processor_config.json",
            "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "README.md",
            "radgen_export.json"} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["vision_config"]["model_type"] == "dinov2"
    assert (config["vision_feature_layer"], config["vision_feature_select_strategy"]) == (-1, "default")
    assert "trust_remote_code" not in (folder / "config.json").read_text() and "auto_map" not in config
    manifest_out = json.loads((folder / "radgen_export.json").read_text())
    info = json.loads((run / "model.json").read_text())
    assert manifest_out["source"]["model_sha256"] == model_sha256(run)
    assert manifest_out["n_image_tokens"] == info["n_image_tokens"] == 16
    assert manifest_out["check"]["max_abs_logit_diff"] <= LOGIT_TOLERANCE
    assert manifest_out["prompt"]["text"].startswith("<|im_start|>user\n<image>\nWrite the findings")
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["suppress_tokens"] == [info["llm"]["image_token_id"]]
    assert generation["do_sample"] is False and generation["max_new_tokens"] == 160

    reports = tmp_path / "reports.jsonl"
    run_generate(run, manifest, reports, progress=False, batch_size=8, workers=0, device="cpu")
    records = {r["id"]: r for r in read_records(reports)}
    assert sum(r["findings"] == r["reference"] for r in records.values()) == 8  # the run is overfit

    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    proc = RadDinoProcessor(shortest_edge=56, crop_size=56)
    torch.save(torch.stack([proc.one(load_image(r["image"])[0]) for r in rows]), tmp_path / "pixels.pt")
    script = tmp_path / "plain.py"
    script.write_text(PLAIN_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run([sys.executable, str(script), str(folder), str(manifest), str(tmp_path / "pixels.pt")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    plain = json.loads(done.stdout.strip().splitlines()[-1])
    assert plain["imported"] == []
    assert (plain["model_class"], plain["processor_class"]) == ("LlavaForConditionalGeneration", "LlavaProcessor")
    expected = {i: r["findings"] for i, r in records.items()}
    assert plain["same_pixels"] == expected  # radgen's own pixel values
    assert plain["one"] == expected          # the exported processor's 8-bit preprocessing
    assert plain["batched"] == expected      # left-padded batch


@pytest.mark.slow
def test_failed_export_leaves_nothing(material, tmp_path, monkeypatch):
    import radgen.model.export as export_module
    from radgen.model.export import run_export

    def broken(built, folder):
        raise ExportError("simulated check failure")

    monkeypatch.setattr(export_module, "verify_export", broken)
    with pytest.raises(ExportError, match="simulated"):
        run_export(material["run"], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    # an existing folder is replaced only with overwrite, and only once the new one is complete
    old = tmp_path / "out"
    old.mkdir()
    (old / "old.txt").write_text("old")
    with pytest.raises(ExportError, match="simulated"):
        run_export(material["run"], old, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (old / "old.txt").is_file()
    m = run_export(material["run"], old, overwrite=True, verify=False)
    assert "check" not in m and not (old / "old.txt").exists() and (old / "config.json").is_file()


@pytest.mark.slow
def test_export_linear_projector_with_cls_and_penultimate_layer(material, tmp_path):
    from radgen.model.export import run_export

    run = _train(tmp_path / "run", material["llm"], material["manifest"], [
        "stage1.max_steps=2", "stage2.max_steps=2", "projector.name=linear", "encoder.select=cls+patch",
        "encoder.layer=-2", "lora.r=4"])
    m = run_export(run, tmp_path / "llava")
    assert m["check"]["max_abs_logit_diff"] <= LOGIT_TOLERANCE and m["check"]["prompt_ids_equal"]
    assert m["n_image_tokens"] == 17  # CLS + 4x4 patches
    config = json.loads((tmp_path / "llava" / "config.json").read_text())
    assert config["projector_hidden_act"] == "linear"
    assert (config["vision_feature_layer"], config["vision_feature_select_strategy"]) == (-2, "full")
    processor = json.loads((tmp_path / "llava" / "processor_config.json").read_text())
    assert (processor["patch_size"], processor["num_additional_image_tokens"]) == (14, 1)
