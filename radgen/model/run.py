"""Build a report generator from config, and save / load the run folder that describes it.

A run folder holds only what was trained plus what rebuilds the rest:

* ``model.json``: format tag, the encoder spec + weights SHA-256 + ``ViTConfig``, the vision
  feature choice, image size, the LLM path + folder SHA-256, the image token, projector name and
  dims, LoRA settings, prompt, and the stage the weights come from;
* ``projector.safetensors``: the projector's weights;
* ``adapter/``: the LoRA adapter in peft's own format (``adapter_config.json`` +
  ``adapter_model.safetensors``);
* ``findings_head.safetensors`` (runs trained with ``tasks.findings_head``): the classifier whose
  decisions are the stated findings line (:mod:`radgen.model.findings_head`);
* ``config.yaml``: the resolved training config.

:func:`load_run` rebuilds the model from these and the two frozen parts on disk, checking their
hashes, so a moved or changed encoder / LLM is an error rather than silently different reports.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file

from encoder.checkpoint import weights_sha256
from encoder.errors import InputError
from encoder.io import atomic_write_bytes, atomic_write_text, install_folder
from encoder.specs import load_encoder_spec, which_of
from radgen.model.findings_head import FindingsHead
from radgen.model.guidance import PairedGuidance
from radgen.model.chat import SYSTEM_DEFAULT
from radgen.model.llm import add_image_token, apply_lora, load_llm
from radgen.model.llm_source import folder_sha256, resolve_llm_path
from radgen.model.model import ReportGenerator
from radgen.model.oracle import OracleVision, is_oracle_spec, oracle_tokens
from radgen.model.projector import build_projector
from radgen.model.prompt import NO_FINDING_LINE, PromptConfig, ReportTokenizer, findings_list_text
from radgen.model.repeats import RepeatedSentenceStop, drop_repeated_sentences
from radgen.model.vision import FrozenVision, VisionFeatures

__all__ = ["FORMAT", "RunError", "BuiltModel", "build_model", "save_trained", "load_run",
           "weights_sha256", "model_sha256", "MODEL_JSON", "PROJECTOR_FILE", "ADAPTER_DIR", "HEAD_FILE"]

FORMAT = "radgen-reportgen/1"
MODEL_JSON, PROJECTOR_FILE, ADAPTER_DIR = "model.json", "projector.safetensors", "adapter"
HEAD_FILE = "findings_head.safetensors"


class RunError(InputError):
    """A run folder is missing, incomplete, or its frozen parts changed; the message says which."""


class BuiltModel:
    """A model with its tokenizer helper and the description ``model.json`` stores."""

    def __init__(self, model: ReportGenerator, tokens: ReportTokenizer, info: dict,
                 head: FindingsHead | None = None):
        self.model, self.tokens, self.info = model, tokens, info
        self.head = head  # with tasks.findings_head: decides the stated findings line

    @property
    def image_size(self) -> int:
        return int(self.info["image_size"])

    @property
    def is_oracle(self) -> bool:
        return bool(getattr(self.model.vision, "is_oracle", False))

    def input_loader(self):
        """``row -> model input``: the preprocessed image at the run's size, or for the oracle
        control the row's label tokens (:mod:`radgen.model.oracle`)."""
        from radgen.data.reports import image_loader

        if self.is_oracle:
            return _oracle_input
        from encoder.processor import RadDinoProcessor

        return image_loader(RadDinoProcessor(shortest_edge=self.image_size, crop_size=self.image_size).one)


def _oracle_input(row) -> torch.Tensor:
    from radgen.data.images import ImageLoadError

    if not row.labels:
        raise ImageLoadError(row.image or "<none>", "row has no CheXpert labels (oracle control)")
    return oracle_tokens(row.labels)


def _dtype(name: str) -> torch.dtype:
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16}[str(name)]
    except KeyError:
        raise RunError(f"llm.dtype must be float32 or bfloat16, got {name!r}") from None


def build_model(cfg, encoder=None, with_lora: bool = True) -> BuiltModel:
    """A fresh model from a ``configs/reportgen`` config (``encoder``: an already loaded one).

    The projector gets the seeded default init of its layers; LoRA B matrices start at zero,
    so the stage-1 model is the frozen LLM reading projected image tokens.
    """
    if not cfg.encoder.spec and encoder is None:
        raise RunError("encoder.spec is not set (--encoder SPEC)")
    features = VisionFeatures(layer=int(cfg.encoder.layer), select=str(cfg.encoder.select),
                              norm=bool(cfg.encoder.norm),
                              pool=None if cfg.encoder.pool is None else int(cfg.encoder.pool))
    if is_oracle_spec(cfg.encoder.spec):  # the labels control: no encoder, no pixels
        vision, image_size = OracleVision(), 0
        encoder_info = {"spec": str(cfg.encoder.spec), "which": None, "sha256": None, "vit_config": None,
                        "control": "oracle: image tokens are the film's own CheXpert labels"}
    else:
        if encoder is None:
            encoder = load_encoder_spec(str(cfg.encoder.spec), which=str(cfg.encoder.which))
        vision = FrozenVision(encoder, features)
        image_size = int(cfg.data.image_size or encoder.cfg.img_size)
        encoder_info = {"spec": str(cfg.encoder.spec), "which": which_of(cfg.encoder.spec, str(cfg.encoder.which)),
                        "sha256": weights_sha256(encoder), "vit_config": asdict(encoder.cfg)}
    llm_path = resolve_llm_path(str(cfg.llm.path))
    llm, tokenizer = load_llm(str(llm_path), dtype=_dtype(cfg.llm.dtype),
                              trust_remote_code=bool(cfg.llm.get("trust_remote_code", False)))
    image_token_id = add_image_token(tokenizer, llm, token=str(cfg.prompt.image_token))
    if cfg.llm.get("gradient_checkpointing"):
        llm.gradient_checkpointing_enable()
        llm.enable_input_require_grads()
    hidden = int(llm.config.get_text_config().hidden_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg.seed))
        projector = build_projector(str(cfg.projector.name), vision.embed_dim, hidden)
    lora = cfg.lora
    targets = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    if with_lora:
        llm = apply_lora(llm, r=int(lora.r), alpha=float(lora.alpha), dropout=float(lora.dropout),
                         target_modules=targets)
    model = ReportGenerator(vision, projector, llm, image_token_id)
    # runs saved before prompt.system existed rendered the template's default system turn
    system = cfg.prompt.get("system", SYSTEM_DEFAULT)
    prompt = PromptConfig(instruction=str(cfg.prompt.instruction), indication=str(cfg.prompt.indication),
                          image_token=str(cfg.prompt.image_token), system=None if system is None else str(system))
    tasks = cfg.get("tasks") or {}  # runs saved before tasks existed: plain findings targets
    tokens = ReportTokenizer(tokenizer, prompt, image_token_id, vision.num_tokens(image_size),
                             max_target_tokens=int(cfg.prompt.max_target_tokens),
                             findings_first=bool(tasks.get("findings_first", False)),
                             first_line_weight=float(tasks.get("first_line_weight", 1.0)),
                             finding_sentence_weight=float(tasks.get("finding_sentence_weight", 1.0)),
                             finding_tags=bool(tasks.get("finding_tags", False)))
    info = {
        "format": FORMAT,
        "encoder": encoder_info,
        "vision": features.to_dict(),
        "image_size": image_size,
        "n_image_tokens": tokens.n_image_tokens,
        "llm": {"path": str(llm_path), "spec": str(cfg.llm.path), "sha256": folder_sha256(llm_path),
                "dtype": str(cfg.llm.dtype), "architecture": type(llm.get_base_model() if with_lora else llm).__name__,
                "image_token": str(cfg.prompt.image_token), "image_token_id": image_token_id,
                "vocab_size": len(tokenizer)},
        "projector": {"name": str(cfg.projector.name), "in_dim": vision.embed_dim, "out_dim": hidden},
        "lora": {"r": int(lora.r), "alpha": float(lora.alpha), "dropout": float(lora.dropout),
                 "target_modules": targets} if with_lora else None,
        "prompt": {**prompt.to_dict(), "max_target_tokens": tokens.max_target_tokens,
                   "findings_first": tokens.findings_first, "finding_tags": tokens.finding_tags},
        # manifest columns the model reads at generation time (the indication goes in the prompt)
        "data": {"text_field": str(cfg.data.text_field), "indication_field": cfg.data.indication_field},
        "generate": dict(cfg.generate) if "generate" in cfg else {},
    }
    return BuiltModel(model, tokens, info)


def save_trained(built: BuiltModel, run_dir: str | os.PathLike, stage: str, extra: dict | None = None) -> Path:
    """Write projector, adapter and ``model.json`` (last, as the commit record) into ``run_dir``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / MODEL_JSON).unlink(missing_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in built.model.projector.state_dict().items()}
    from safetensors.torch import save as st_save

    atomic_write_bytes(run_dir / PROJECTOR_FILE, st_save(sd, metadata={"format": FORMAT}))
    if built.head is not None:
        head_sd = {k: v.detach().cpu().contiguous() for k, v in built.head.state_dict().items()}
        atomic_write_bytes(run_dir / HEAD_FILE, st_save(head_sd, metadata={"format": FORMAT}))
    llm = built.model.llm
    if hasattr(llm, "peft_config"):
        tmp = run_dir / f".{ADAPTER_DIR}.tmp"
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)
        # The resized embedding rows are rebuilt deterministically (zeros) from the LLM path, so
        # the adapter holds only LoRA weights (peft would otherwise save the whole embedding).
        llm.save_pretrained(str(tmp), save_embedding_layers=False)
        install_folder(tmp, run_dir / ADAPTER_DIR)
    info = {**built.info, "stage": stage, **(extra or {})}
    atomic_write_text(run_dir / MODEL_JSON, json.dumps(info, indent=2) + "\n")
    built.info = info
    return run_dir


def load_run(run_dir: str | os.PathLike, device: str | torch.device = "cpu", check_hashes: bool = True,
             encoder_spec: str | None = None, llm_path: str | None = None,
             trust_remote_code: bool = False) -> BuiltModel:
    """Rebuild a trained model from its run folder (``encoder_spec`` / ``llm_path`` relocate the
    frozen parts; their hashes must still match). A run trained with
    ``llm.trust_remote_code=true`` loads only when ``trust_remote_code`` is set here as well: the
    consent is the user's at each use, not stored in a folder someone may hand on."""
    from omegaconf import OmegaConf
    from peft import PeftModel

    run_dir = Path(run_dir)
    mj = run_dir / MODEL_JSON
    if not mj.is_file():
        raise RunError(f"{run_dir}: no {MODEL_JSON} (not a finished report-generator run)")
    info = json.loads(mj.read_text(encoding="utf-8"))
    if info.get("format") != FORMAT:
        raise RunError(f"{mj}: format {info.get('format')!r} is not {FORMAT!r}")
    cfg = OmegaConf.load(run_dir / "config.yaml")
    if cfg.llm.get("trust_remote_code") and not trust_remote_code:
        raise RunError(f"{run_dir} was trained with llm.trust_remote_code=true: its LLM runs its own Python "
                       "code; pass --trust-remote-code (radgen generate) if you trust it")
    spec = encoder_spec or info["encoder"]["spec"]
    encoder = None if is_oracle_spec(spec) else load_encoder_spec(spec, which=info["encoder"]["which"])
    if is_oracle_spec(spec) != is_oracle_spec(info["encoder"]["spec"]):
        raise RunError(f"encoder {spec!r} cannot stand in for {info['encoder']['spec']!r} of {run_dir}")
    if encoder is not None and check_hashes and weights_sha256(encoder) != info["encoder"]["sha256"]:
        raise RunError(f"encoder {spec!r} is not the one {run_dir} was trained with (weights SHA-256 differs)")
    cfg.encoder.spec = spec
    cfg.llm.path = llm_path or info["llm"]["path"]
    if check_hashes and folder_sha256(resolve_llm_path(str(cfg.llm.path))) != info["llm"]["sha256"]:
        raise RunError(f"LLM {cfg.llm.path} is not the one {run_dir} was trained with (files SHA-256 differ)")
    built = build_model(cfg, encoder=encoder, with_lora=False)
    built.model.projector.load_state_dict(load_file(str(run_dir / PROJECTOR_FILE)))
    adapter = run_dir / ADAPTER_DIR
    if info.get("lora"):
        if not (adapter / "adapter_config.json").is_file():
            raise RunError(f"{run_dir}: {ADAPTER_DIR}/ is missing or incomplete")
        built.model.llm = PeftModel.from_pretrained(built.model.llm, str(adapter), is_trainable=False)
    if info.get("findings_head"):
        if not (run_dir / HEAD_FILE).is_file():
            raise RunError(f"{run_dir}: {HEAD_FILE} is missing (the run states its findings with a findings head)")
        head_sd = load_file(str(run_dir / HEAD_FILE))
        built.head = FindingsHead(*head_sd["basis"].shape)
        built.head.load_state_dict(head_sd)
        built.head.to(device).eval()
    built.info = {**built.info, **{k: info[k] for k in ("stage", "lora") if k in info}}
    built.info.update({k: v for k, v in info.items() if k not in built.info})
    built.model.to(device).eval()
    return built


GENERATION_KEYS = ("max_new_tokens", "num_beams", "do_sample", "temperature", "top_p",
                   "repetition_penalty", "line_guidance", "stop_on_repeat")


def model_sha256(run_dir: str | os.PathLike) -> str:
    """Hash of what a run folder trained: model.json, the projector, the findings head, the LoRA
    adapter (or a merged run's LLM folder)."""
    run_dir = Path(run_dir)
    h = hashlib.sha256()
    files = [run_dir / MODEL_JSON, run_dir / PROJECTOR_FILE, run_dir / HEAD_FILE]
    files += sorted((run_dir / ADAPTER_DIR).glob("*")) if (run_dir / ADAPTER_DIR).is_dir() else []
    files += sorted((run_dir / "llm").glob("*")) if (run_dir / "llm").is_dir() else []  # merged runs
    for f in files:
        if f.is_file():
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def generation_kwargs(settings: dict, tokens: ReportTokenizer) -> dict:
    """HF ``generate`` arguments from radgen's generation settings (greedy unless told otherwise)."""
    kw = {k: settings[k] for k in GENERATION_KEYS
          if settings.get(k) is not None and k not in ("line_guidance", "stop_on_repeat")}
    kw["max_new_tokens"] = int(kw.get("max_new_tokens", 160))
    kw["num_beams"] = int(kw.get("num_beams", 1))
    if not kw.get("do_sample"):
        kw.pop("temperature", None)
        kw.pop("top_p", None)  # greedy / beam: no sampling knobs (avoids HF warnings)
        kw["do_sample"] = False
    kw.update(pad_token_id=tokens.pad_id, eos_token_id=tokens.tokenizer.eos_token_id)
    return kw


def line_guidance_scale(settings: dict, headed: bool) -> float:
    """The ``line_guidance`` scale of the generation settings (1: off), checked: it needs a run
    with a findings head (the line it guides on) and greedy or beam decoding
    (:mod:`radgen.model.guidance`)."""
    value = settings.get("line_guidance")
    scale = 1.0 if value is None else float(value)
    if not (math.isfinite(scale) and scale >= 1.0):
        raise RunError(f"line_guidance must be a number >= 1 (1: off), got {value!r}")
    if scale == 1.0:
        return 1.0
    if not headed:
        raise RunError("line_guidance needs a run trained with tasks.findings_head (it guides the "
                       "writer on the head's stated line)")
    if settings.get("do_sample"):
        raise RunError("line_guidance works with greedy or beam decoding, not with sampling")
    return scale


def generate_reports(built: BuiltModel, indications: list[str | None], settings: dict,
                     pixel_values: torch.Tensor | None = None,
                     vision_tokens: torch.Tensor | None = None, with_stated: bool = False) -> list:
    """Findings text for a batch of images (left-padded prompts, KV cache, one ``generate`` call).

    A run with a findings head states each film's findings line from its image tokens
    (:meth:`~radgen.model.findings_head.FindingsHead.decide`) and the LLM writes on after that
    line; otherwise the LLM writes the whole target. ``with_stated``: ``(stated line or None,
    findings)`` pairs instead of the findings alone.
    """
    model = built.model
    device = next(model.projector.parameters()).device
    stated = None
    if built.head is not None:
        if vision_tokens is None:
            with torch.no_grad():
                vision_tokens = model.vision(pixel_values.to(device))
            pixel_values = None
        stated = [findings_list_text(d) for d in built.head.decide(vision_tokens.to(device))]
    scale = line_guidance_scale(settings, headed=stated is not None)
    kwargs = generation_kwargs(settings, built.tokens)
    stop_on_repeat = bool(settings.get("stop_on_repeat"))
    if stop_on_repeat:
        from transformers import StoppingCriteriaList

        kwargs["stopping_criteria"] = StoppingCriteriaList([RepeatedSentenceStop(built.tokens.tokenizer)])
    if scale != 1.0:  # each film twice: after its stated line, then after the neutral line
        indications = list(indications) * 2
        stated = stated + [NO_FINDING_LINE] * len(stated)
        vision_tokens = torch.cat([vision_tokens, vision_tokens])
        from transformers import LogitsProcessorList

        kwargs["logits_processor"] = LogitsProcessorList([PairedGuidance(scale)])
    batch = built.tokens.generation_batch(indications, stated)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                             pixel_values=None if pixel_values is None else pixel_values.to(device),
                             vision_tokens=None if vision_tokens is None else vision_tokens.to(device),
                             **kwargs)
    finally:
        model.train(was_training)
    if scale != 1.0:  # both halves hold the same tokens; keep the conditional one
        out, stated = out[: len(out) // 2], stated[: len(stated) // 2]
    if stated is None:  # the LLM wrote the stated line itself (findings_first) or none
        pairs = [built.tokens.split_output(built.tokens.tokenizer.decode(row, skip_special_tokens=True))
                 for row in out]
    else:
        pairs = [(line, built.tokens.decode(row)) for line, row in zip(stated, out)]
    if stop_on_repeat:
        pairs = [(line, drop_repeated_sentences(text)) for line, text in pairs]
    return pairs if with_stated else [text for _, text in pairs]
