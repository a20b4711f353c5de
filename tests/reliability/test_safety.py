"""Untrusted code paths: no model code runs without the user's explicit flag, no weights file is
unpickled, and the source tree keeps it that way."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from corpus import REPO

from radgen.model.llm import load_llm
from radgen.model.llm_source import LLMError
from radgen.model.run import FORMAT, RunError, load_run

pytestmark = pytest.mark.reliability

EVIL = '''from pathlib import Path
Path(__file__).with_name("CODE_RAN").write_text("the model's own code ran")
from transformers import LlamaConfig
class EvilConfig(LlamaConfig):
    model_type = "radgen_evil"
'''


def test_an_llm_with_its_own_code_is_refused_and_its_code_never_runs(tiny_llm_dir: Path, tmp_path: Path, ledger):
    folder = tmp_path / "evil_llm"
    shutil.copytree(tiny_llm_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="radgen_evil", auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                                   "AutoModelForCausalLM": "configuration_evil.EvilConfig"})
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "configuration_evil.py").write_text(EVIL)
    with pytest.raises(LLMError, match="llm.trust_remote_code=true"):
        load_llm(folder)
    ran = (folder / "CODE_RAN").exists()
    ledger.input("train", "LLM folder shipping its own Python code", "refused, its code not run",
                 "refused, its code not run" if not ran else "its code ran")
    assert not ran


def test_a_run_trained_with_remote_code_needs_the_flag_again(tmp_path: Path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.json").write_text(json.dumps({"format": FORMAT}))
    (run / "config.yaml").write_text("llm:\n  path: /nowhere\n  trust_remote_code: true\n")
    with pytest.raises(RunError, match="--trust-remote-code"):
        load_run(run)


def _sources() -> list[Path]:
    return [p for d in ("radgen", "encoder", "eval", "bench") for p in (REPO / d).rglob("*.py")]


def test_no_unsafe_loading_anywhere_in_the_source():
    """Every torch.load passes weights_only=True; trust_remote_code is never hard-coded True;
    nothing unpickles (pickle.load, np.load with allow_pickle)."""
    bad = []
    for p in _sources():
        text = p.read_text(encoding="utf-8")
        for m in re.finditer(r"torch\.load\((.*)", text):  # the call's line
            if "weights_only=True" not in m.group(1):
                bad.append(f"{p.relative_to(REPO)}: torch.load without weights_only=True")
        if re.search(r"trust_remote_code\s*=\s*True", text):
            bad.append(f"{p.relative_to(REPO)}: trust_remote_code=True")
        if re.search(r"\bpickle\.loads?\(|allow_pickle\s*=\s*True", text):
            bad.append(f"{p.relative_to(REPO)}: unpickling")
    assert not bad, bad
