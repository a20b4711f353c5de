"""The language-model side of the report generator: load and adapt a causal LLM, offline.

* :func:`load_llm` loads model + tokenizer from a local folder (an LLM spec resolved by
  :func:`radgen.model.llm_source.resolve_llm_path`; ``local_files_only``, no remote code) and
  makes sure the tokenizer has a pad token. Padding *side* is the caller's choice.
* :func:`add_image_token` adds ``<image>`` as a special token and grows the embeddings with
  *zero* rows, so a run rebuilds the identical model from the LLM path + its config alone.
* :func:`apply_lora` wraps the LLM in a peft LoRA model; the default ``"all-linear"`` targets
  every ``nn.Linear`` of the decoder and not ``lm_head`` (peft 0.21.2
  ``tuners_utils._maybe_include_all_linear_layers`` drops ``model.get_output_embeddings()`` when
  the model is a ``PreTrainedModel``, which is why :func:`apply_lora` insists on one).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from radgen.model.llm_source import LLMError, resolve_llm_path

if TYPE_CHECKING:  # heavy imports stay out of module import time (`radgen info`, CLI start-up)
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["add_image_token", "apply_lora", "load_llm", "lora_target_names"]


def load_llm(spec: str | os.PathLike, dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu", trust_remote_code: bool = False,
             ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``(model, tokenizer)`` from an LLM spec (see :func:`resolve_llm_path`), in eval mode.

    Only local files are read, and no code shipped with the model runs unless
    ``trust_remote_code`` (the user's explicit ``llm.trust_remote_code=true``). A
    tokenizer without a pad token gets its EOS (else UNK) token as pad; which side to pad on is
    the caller's business (right for training, left for batched generation)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_llm_path(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True,
                                                  trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True,
                                                     trust_remote_code=trust_remote_code, dtype=dtype)
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            raise
        raise LLMError(f"the LLM in {path} needs its own Python code to load; radgen does not run it unless "
                       "you set llm.trust_remote_code=true (only for code you have read)") from None
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise LLMError(f"the tokenizer in {path} has no pad, eos or unk token to pad with")
        tokenizer.pad_token = fallback
    if model.generation_config.pad_token_id is None:  # generate() warns and guesses otherwise
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to(device)
    model.eval()
    return model, tokenizer


def add_image_token(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, token: str = "<image>") -> int:
    """Add ``token`` as an extra special token and return its id; idempotent.

    Embedding rows created for it are zero, in the input embedding and (when untied) the output
    one, instead of the random or mean init ``resize_token_embeddings`` would give: a run then
    rebuilds exactly the same model from the LLM path and its config, without storing embeddings.
    (Its input row is never read anyway: image features replace it. Its logit is a constant 0
    when tied, so generation should suppress it.)"""
    vocab = tokenizer.get_vocab()
    added = token not in vocab
    if added:
        tokenizer.add_special_tokens({"extra_special_tokens": [token]}, replace_extra_special_tokens=False)
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise LLMError(f"could not add {token!r} to the tokenizer")
    emb = model.get_input_embeddings()
    old_rows = emb.weight.shape[0]
    new_rows = []
    if token_id >= old_rows or len(tokenizer) > old_rows:
        # mean_resizing=False: the mean/covariance init samples random rows, which we zero anyway;
        # fork_rng: that init must not shift the caller's RNG stream (projector, LoRA init) either.
        with torch.random.fork_rng(devices=[]):
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        emb = model.get_input_embeddings()
        new_rows = list(range(old_rows, emb.weight.shape[0]))
    elif added:
        new_rows = [token_id]  # a padded vocabulary (e.g. Qwen2) already had a spare row for it
    if new_rows:
        with torch.no_grad():
            emb.weight[new_rows] = 0
            out = model.get_output_embeddings()
            if out is not None and out.weight is not emb.weight:
                out.weight[new_rows] = 0
                if getattr(out, "bias", None) is not None:
                    out.bias[new_rows] = 0
    return int(token_id)


# ---------------------------------------------------------------------------------------- LoRA

def _lora_config(target_modules: str | Sequence[str], r: int = 16, alpha: float = 32, dropout: float = 0.05):
    from peft import LoraConfig, TaskType

    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    return LoraConfig(r=int(r), lora_alpha=alpha, lora_dropout=float(dropout), target_modules=targets,
                      bias="none", task_type=TaskType.CAUSAL_LM)


def _check_llm(model: nn.Module, target_modules: str | Sequence[str]) -> None:
    from transformers import PreTrainedModel

    if isinstance(target_modules, str) and target_modules.lower() == "all-linear" \
            and not isinstance(model, PreTrainedModel):
        # peft only leaves lm_head out for a PreTrainedModel; on a wrapper (vision + projector +
        # LLM) "all-linear" would also adapt lm_head and the projector.
        raise LLMError(f"apply LoRA to the LLM itself (a transformers PreTrainedModel), not to a "
                       f"{type(model).__name__}: 'all-linear' leaves lm_head out only then")


def apply_lora(model: PreTrainedModel, r: int = 16, alpha: float = 32, dropout: float = 0.05,
               target_modules: str | Sequence[str] = "all-linear") -> PeftModel:
    """Wrap ``model`` in a LoRA :class:`peft.PeftModel` (task ``CAUSAL_LM``, no bias training).

    ``"all-linear"`` adapts every linear layer of the decoder (attention q/k/v/o and MLP
    gate/up/down for Llama-style models) and not ``lm_head``; a list is matched by peft (exact
    name or ``.name`` suffix). Only ``lora_A``/``lora_B`` weights are trainable afterwards: the
    base model, embeddings included, is frozen. lora_A is randomly initialised from torch's
    global RNG (lora_B is zero, so the wrapped model starts equal to the base one): seed first."""
    from peft import get_peft_model

    _check_llm(model, target_modules)
    return get_peft_model(model, _lora_config(target_modules, r, alpha, dropout))


def lora_target_names(model: nn.Module, target_modules: str | Sequence[str] = "all-linear") -> list[str]:
    """Full names of the modules LoRA adapts: for a PeftModel the ones it did adapt, otherwise
    the ones :func:`apply_lora` would adapt (resolved by peft's own rules; ``model`` is untouched)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    if isinstance(model, PeftModel):
        base = model.get_base_model()
        return sorted(name for name, m in base.named_modules() if isinstance(m, LoraLayer))
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers, check_target_module_exists

    _check_llm(model, target_modules)
    config = _maybe_include_all_linear_layers(_lora_config(target_modules), model)
    return sorted(name for name, _ in model.named_modules() if name and check_target_module_exists(config, name))
