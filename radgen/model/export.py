"""Export a trained report generator as a plain transformers ``LlavaForConditionalGeneration`` folder.

The folder holds transformers' own classes only, so ``AutoProcessor.from_pretrained(folder)`` and
``AutoModelForImageTextToText.from_pretrained(folder)`` load it without radgen and without
``trust_remote_code``:

* ``config.json``: a ``LlavaConfig`` whose ``vision_config`` is the encoder as a ``Dinov2Config``
  (written by :func:`encoder.weights.save_hf_dinov2`, loaded back by transformers so the weight
  names are transformers' own), ``text_config`` the LLM's config, and the image token id;
* the weights: the Dinov2 tower, the projector as ``multi_modal_projector.linear_1/linear_2``
  and the LLM with its LoRA adapter merged (``peft`` ``merge_and_unload``);
* a ``LlavaProcessor``: ``BitImageProcessor`` with rad-dino's preprocessing at the run's image
  size, the tokenizer (with ``<image>``, left padding) and a chat template that renders a user
  message ``[{"type": "image"}, {"type": "text", "text": instruction}]`` to exactly radgen's
  prompt (:func:`processor_chat_template`);
* ``generation_config.json``: radgen's generation defaults, ``suppress_tokens=[image_token_id]``
  and radgen's EOS / pad ids;
* ``README.md`` (usage) and ``radgen_export.json`` (the exact prompt, image size, sources,
  and the parity check).

What transformers' LLaVA computes (read in transformers 5.24, ``models/llava``): the projector
reads ``vision_tower(...).hidden_states[vision_feature_layer]`` (Dinov2 hidden states:
``[0]`` is the embeddings output, ``[k]`` block ``k - 1``'s output, all *before* the final
LayerNorm); ``vision_feature_select_strategy="default"`` drops token 0 (CLS) and ``"full"``
keeps every token; the projector is ``linear_2(act(linear_1(x)))``; the processor expands
``<image>`` to ``(H // patch) * (W // patch) + num_additional_image_tokens`` ids, minus one for
``"default"``. A radgen feature choice outside that (pooling, post-norm features, a 4-layer
projector, register tokens, ...) is refused with the reason (:func:`export_problems`).

After writing, the folder is loaded back with transformers and checked against the radgen model
on a probe image: prompt text and ids must be identical and the logits equal within
:data:`LOGIT_TOLERANCE`. The folder is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from encoder.errors import InputError
from encoder.io import atomic_write_text, install_folder
from encoder.vit import ViTConfig
from encoder.weights import HF_POS_INTERP, preprocessor_for, save_hf_dinov2
from radgen.model.chat import _TEMPLATE_VARS, PLAIN_PROMPT, SYSTEM_DEFAULT, chat_prompt
from radgen.model.projector import PROJECTORS
from radgen.model.vision import VisionFeatures

__all__ = [
    "EXPORT_FORMAT",
    "EXPORT_MANIFEST",
    "EXPORTABLE_PROJECTORS",
    "ExportError",
    "LOGIT_TOLERANCE",
    "check_exportable",
    "check_run",
    "run_export",
    "config_problems",
    "export_llava",
    "export_problems",
    "llava_feature_layer",
    "llava_projector_state",
    "processor_chat_template",
    "run_problems",
    "verify_export",
]

EXPORT_FORMAT = "radgen-llava-export/1"
EXPORT_MANIFEST = "radgen_export.json"
# projector name -> LLaVA ``projector_hidden_act``. ``linear`` is linear_1 followed by an
# identity linear_2 (zero bias) through the ``"linear"`` (identity) activation: exact.
EXPORTABLE_PROJECTORS = {"mlp2x_gelu": "gelu", "linear": "linear"}
# Largest |logit| difference accepted between the radgen model and the exported folder on the
# probe (HF Dinov2 vs timm blocks, merged vs unmerged LoRA: float32 rounding only).
LOGIT_TOLERANCE = 1e-3
# Generation settings whose meaning changes when the prompt ids are visible to generate():
# radgen generates from inputs_embeds (no prompt ids), LLaVA from input_ids.
_PROMPT_SENSITIVE = ("repetition_penalty",)


class ExportError(InputError):
    """A run cannot be exported as a plain LLaVA folder, or the export failed its check."""


# ----------------------------------------------------------------------------------------------
# What can be expressed
# ----------------------------------------------------------------------------------------------
def llava_feature_layer(layer: int, depth: int) -> int:
    """radgen's ``VisionFeatures.layer`` (a block index) -> LLaVA's ``vision_feature_layer``.

    Dinov2's ``hidden_states`` has ``depth + 1`` entries, ``[0]`` being the embeddings, so block
    ``b`` is ``hidden_states[b + 1]``, written negative as ``b - depth`` (block ``-1`` -> ``-1``).
    Never ``0``: transformers 5.24 passes the index as ``output_hidden_states``, and ``0`` would
    switch hidden states off.
    """
    if not -depth <= layer < depth:
        raise ExportError(f"vision layer {layer} out of range for an encoder with {depth} blocks")
    return layer % depth - depth


def export_problems(features: VisionFeatures, projector: str, vit: ViTConfig | Mapping | None = None,
                    image_size: int | None = None, generate: Mapping | None = None,
                    llm_dtype: str = "float32", findings_head: bool = False) -> list[str]:
    """Why a model with these choices would not give radgen's outputs as a plain LLaVA folder
    (empty: exportable). ``vit`` (the encoder's config) and ``image_size`` enable the
    encoder-dependent checks; without them only the config choices are checked."""
    problems: list[str] = []
    if findings_head:
        problems.append("tasks.findings_head: a classifier on the image tokens states the findings line the LLM "
                        "writes on after; a LLaVA folder holds no such step (train with tasks.findings_head=false)")
    if features.pool:
        problems.append(f"encoder.pool={features.pool}: radgen average-pools the patch grid to "
                        f"{features.pool}x{features.pool} tokens, LLaVA passes every token of the chosen "
                        "layer to the projector and has no pooling step (train with encoder.pool=null)")
    if features.norm:
        problems.append("encoder.norm=true: radgen reads the features after the encoder's final LayerNorm, "
                        "transformers' LLaVA reads the Dinov2 tower's hidden_states, which come before it "
                        "(train with encoder.norm=false)")
    if projector not in EXPORTABLE_PROJECTORS:
        if projector == "mlp4x_gelu":
            why = ("has four linear layers; transformers' LlavaMultiModalProjector is exactly "
                   "Linear -> activation -> Linear")
        elif projector in PROJECTORS:
            why = "has no transformers LlavaMultiModalProjector equivalent"
        else:
            why = "is not a radgen projector"
        problems.append(f"projector {projector!r} {why} (exportable: {', '.join(sorted(EXPORTABLE_PROJECTORS))})")
    if str(llm_dtype) not in ("float32", "fp32"):
        problems.append(f"llm.dtype={llm_dtype}: radgen runs the vision tower and projector in float32 and the LLM "
                        f"in {llm_dtype}, a LLaVA folder loads as one dtype, so the outputs would differ "
                        "(train with llm.dtype=float32)")
    for key in _PROMPT_SENSITIVE:
        value = (generate or {}).get(key)
        if value is not None and float(value) != 1.0:
            problems.append(f"generate.{key}={value}: radgen generates from embeddings, so only generated tokens "
                            "are penalised; transformers' LLaVA generates from input_ids and would also penalise "
                            f"the prompt (instruction and image tokens), giving other text (export with {key} 1.0)")
    if vit is not None:
        cfg = vit if isinstance(vit, ViTConfig) else ViTConfig(**dict(vit))
        cfg = cfg.resolved()
        if cfg.num_register_tokens:
            problems.append(f"the encoder has {cfg.num_register_tokens} register tokens: LLaVA's "
                            "vision_feature_select_strategy drops only token 0 ('default') or nothing ('full'), so "
                            "the registers would reach the projector, which never saw them in radgen")
        model_type = "dinov2_with_registers" if cfg.num_register_tokens else "dinov2"
        size = int(image_size or cfg.img_size)
        if cfg.pos_interp != HF_POS_INTERP[model_type] and size // cfg.patch_size != cfg.img_size // cfg.patch_size:
            problems.append(f"the encoder resizes its position embeddings with {cfg.pos_interp!r}, transformers' "
                            f"{model_type} with {HF_POS_INTERP[model_type]!r}, and the run's {size} px images "
                            f"are not the encoder's native {cfg.img_size} px, so the positions would differ")
        if features.select not in ("patch", "cls+patch"):
            problems.append(f"vision select {features.select!r} has no LLaVA select strategy")
        if not -cfg.depth <= features.layer < cfg.depth:
            problems.append(f"vision layer {features.layer} out of range for an encoder with {cfg.depth} blocks")
    return problems


def config_problems(cfg: Any) -> list[str]:
    """:func:`export_problems` for a ``configs/reportgen`` config (the encoder itself unchecked:
    its registers and position-embedding recipe are known once it is loaded)."""
    enc = cfg["encoder"]
    features = VisionFeatures(layer=int(enc["layer"]), select=str(enc["select"]), norm=bool(enc["norm"]),
                              pool=None if enc["pool"] is None else int(enc["pool"]))
    generate = dict(cfg["generate"]) if "generate" in cfg and cfg["generate"] is not None else {}
    tasks = cfg.get("tasks") or {}
    return export_problems(features, str(cfg["projector"]["name"]), generate=generate,
                           llm_dtype=str(cfg["llm"]["dtype"]), findings_head=bool(tasks.get("findings_head")))


def run_problems(info: Mapping, settings: Mapping | None = None) -> list[str]:
    """:func:`export_problems` for a run's ``model.json`` (``settings`` override its generation
    defaults, as ``radgen generate`` flags do)."""
    generate = dict(info.get("generate") or {})
    generate.update({k: v for k, v in (settings or {}).items() if v is not None})
    return export_problems(VisionFeatures(**info["vision"]), str(info["projector"]["name"]),
                           vit=info["encoder"]["vit_config"], image_size=info.get("image_size"),
                           generate=generate, llm_dtype=str(info["llm"].get("dtype", "float32")),
                           findings_head=bool(info.get("findings_head")))


def check_exportable(problems: list[str], what: str = "this model") -> None:
    """Raise :class:`ExportError` listing ``problems``, if any."""
    if problems:
        raise ExportError(f"cannot export {what} as a plain transformers LLaVA folder:\n  - "
                          + "\n  - ".join(problems))


# ----------------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------------
def llava_projector_state(projector: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The state dict of transformers' ``LlavaMultiModalProjector`` for a radgen projector.

    ``mlp2x_gelu`` (``Sequential(Linear, GELU, Linear)``): ``linear_1`` / ``linear_2`` are its
    layers 0 / 2. ``linear``: ``linear_1`` is the layer, ``linear_2`` the identity with zero bias
    (use ``projector_hidden_act="linear"``)."""
    if name == "mlp2x_gelu":
        first, second = projector[0], projector[2]
        if not (isinstance(projector[1], nn.GELU) and projector[1].approximate == "none"):
            raise ExportError(f"projector layer 1 is {projector[1]!r}, not the exact GELU of 'mlp2x_gelu'")
        w2, b2 = second.weight, second.bias
    elif name == "linear":
        first = projector
        out_dim = first.weight.shape[0]
        w2 = torch.eye(out_dim, dtype=first.weight.dtype)
        b2 = torch.zeros(out_dim, dtype=first.weight.dtype)
    else:
        check_exportable([f"projector {name!r} is not exportable"])
    if first.bias is None:
        raise ExportError("the projector has no bias; LLaVA's multimodal_projector_bias applies to both layers")
    return {k: v.detach().cpu().clone().contiguous() for k, v in {
        "linear_1.weight": first.weight, "linear_1.bias": first.bias,
        "linear_2.weight": w2, "linear_2.bias": b2}.items()}


def processor_chat_template(tokenizer_template: str | None, image_token: str = "<image>",
                            around_user: tuple[str, str] | None = None) -> str:
    """A chat template for the processor (and tokenizer) that renders list content the radgen way.

    A message whose content is a list of parts becomes one string: ``image`` parts as
    ``image_token``, ``text`` parts as their text, joined by newlines, so
    ``[{"type": "image"}, {"type": "text", "text": T}]`` is radgen's user text ``"<image>\\nT"``.
    Then the LLM's own template runs unchanged (string content passes through), with
    ``date_string`` pinned as radgen pins it. Without an LLM template: radgen's plain
    ``"USER: {text}\\nASSISTANT:"`` prompt.

    ``around_user=(before, after)``: instead of the LLM's template, write the user text between
    these two literal strings (what radgen renders around it, generation prompt included). Used
    for runs trained without a system turn (``prompt.system: null``, which a template that adds a
    default system turn cannot express) or with their own system text; such a folder renders one
    user turn.
    """
    date = _TEMPLATE_VARS["date_string"]
    head = (
        f"{{%- if date_string is not defined %}}{{%- set date_string = {json.dumps(date)} %}}{{%- endif %}}"
        "{%- set ns = namespace(messages=[]) %}"
        "{%- for message in messages %}"
        "{%- if message['content'] is string %}"
        "{%- set ns.messages = ns.messages + [message] %}"
        "{%- else %}"
        "{%- set parts = namespace(text='', n=0) %}"
        "{%- for item in message['content'] %}"
        "{%- if item['type'] == 'image' or item['type'] == 'text' %}"
        "{%- if parts.n > 0 %}{%- set parts.text = parts.text + '\\n' %}{%- endif %}"
        f"{{%- if item['type'] == 'image' %}}{{%- set parts.text = parts.text + {json.dumps(image_token)} %}}"
        "{%- else %}{%- set parts.text = parts.text + item['text'] %}{%- endif %}"
        "{%- set parts.n = parts.n + 1 %}"
        "{%- endif %}"
        "{%- endfor %}"
        "{%- set ns.messages = ns.messages + [{'role': message['role'], 'content': parts.text}] %}"
        "{%- endif %}"
        "{%- endfor %}"
        "{%- set messages = ns.messages %}"
    )
    if around_user is not None:
        before, after = around_user
        return head + (
            "{%- for message in messages %}{%- if message['role'] == 'user' %}"
            f"{{{{ {json.dumps(before)} + message['content'] + {json.dumps(after)} }}}}"
            "{%- endif %}{%- endfor %}"
        )
    if tokenizer_template:
        return head + tokenizer_template
    user, _, assistant = PLAIN_PROMPT.partition("{text}")  # "USER: " / "\nASSISTANT:"
    return head + (
        "{%- for message in messages %}"
        "{%- if message['role'] == 'system' %}{{ message['content'] + '\\n' }}"
        f"{{%- elif message['role'] == 'user' %}}{{{{ {json.dumps(user)} + message['content'] }}}}"
        f"{{%- if not loop.last or add_generation_prompt %}}{{{{ {json.dumps(assistant)} }}}}{{%- endif %}}"
        "{%- else %}{{ ' ' + message['content'] + '\\n' }}"
        "{%- endif %}"
        "{%- endfor %}"
    )


def _versions() -> dict[str, str | None]:
    out = {}
    for name in ("radgen", "transformers", "torch", "peft", "tokenizers", "safetensors"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _merged_llm(llm: nn.Module) -> nn.Module:
    """The causal LM with LoRA merged (on a copy: the caller's model keeps its adapter)."""
    if hasattr(llm, "merge_and_unload"):
        return copy.deepcopy(llm).merge_and_unload()
    return llm


def _split_llm(merged: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(decoder, lm_head) of a causal LM, refusing anything LLaVA's forward would skip."""
    prefix = getattr(merged, "base_model_prefix", "model")
    decoder = getattr(merged, prefix, None)
    head = merged.get_output_embeddings()
    if decoder is None or head is None:
        raise ExportError(f"{type(merged).__name__} is not a decoder + lm_head causal LM")
    extra = [k for k in merged.state_dict() if not (k.startswith(prefix + ".") or k.startswith("lm_head."))]
    if extra:
        raise ExportError(f"{type(merged).__name__} has weights outside its decoder and lm_head "
                          f"({', '.join(extra[:3])}), which LlavaForConditionalGeneration would drop")
    text = merged.config.get_text_config()
    for attr, neutral in (("logits_scaling", 1.0), ("final_logit_softcapping", None), ("logit_scale", 1.0)):
        value = getattr(text, attr, neutral)
        if value is not None and value != neutral:
            raise ExportError(f"{type(merged).__name__} post-processes its logits ({attr}={value}); "
                              "LlavaForConditionalGeneration applies lm_head only")
    return decoder, head


def _findings_first_note(manifest: dict) -> str:
    if not manifest["prompt"].get("findings_first"):
        return ""
    return ("\nThis model was trained findings-first: its output starts with one line stating the positive "
            "findings (`Positive: Cardiomegaly.` or `No finding.`), then the findings text. radgen removes "
            "that line; do the same with `report.split(\"\\n\", 1)[-1].strip()`.\n"
            + ("It also writes each stated finding's sentence first, after a tag such as `[Edema] `; radgen "
               "removes the tags (`re.sub(r\"\\[[A-Za-z ]+\\]\\s*\", \"\", text)`).\n"
               if manifest["prompt"].get("finding_tags") else ""))


def _readme(manifest: dict) -> str:
    ins = manifest["prompt"]["instruction"]
    return f"""# radgen report generator (plain transformers LLaVA)

Exported by `radgen export` from `{manifest['source']['run_dir']}` (model SHA-256
`{manifest['source'].get('model_sha256')}`). A `LlavaForConditionalGeneration`: a Dinov2 vision tower
(RAD-DINO), a 2-layer projector and a causal LLM with LoRA merged. Loading needs transformers
(>= {manifest['versions']['transformers']} tested), no radgen and no `trust_remote_code`.

```python
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

folder = "{manifest['folder_name']}"
processor = AutoProcessor.from_pretrained(folder)
model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()

image = Image.open("chest_xray.png")   # 8-bit grayscale or RGB
text = {json.dumps(ins)}
# text += "\\nIndication: cough"   # radgen appends the indication line like this, when it has one
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": text}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=image, text=prompt, add_special_tokens=False, return_tensors="pt")
with torch.no_grad():
    out = model.generate(**inputs)  # greedy, {manifest['generation'].get('max_new_tokens')} new tokens at most
report = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
```
{_findings_first_note(manifest)}
For a batch, pass lists of images and prompts with `padding=True` (the tokenizer pads on the
left, as batched generation needs).

* Prompt: the chat template renders the user message above to exactly radgen's prompt (the one
  without an indication is `prompt.text` in `{EXPORT_MANIFEST}`). The processor expands the one
  `{manifest['image_token']}` into {manifest['n_image_tokens']} image tokens
  ({manifest['image_size']} px, patch {manifest['patch_size']}).
* Images: `BitImageProcessor` with rad-dino's recipe at {manifest['image_size']} px (shortest edge, bicubic,
  centre crop, mean 0.5307, std 0.2583). radgen resizes the same way in floating point, this
  processor resizes 8-bit images, so pixel values differ slightly. For 16-bit PNG or DICOM,
  convert to 8-bit first or compute `pixel_values` with that recipe yourself.
* Generation: `generation_config.json` holds radgen's defaults (greedy, its EOS and pad ids) and
  suppresses the image token (id {manifest['image_token_id']}).
"""


# ----------------------------------------------------------------------------------------------
# The export
# ----------------------------------------------------------------------------------------------
def export_llava(built, out: str | os.PathLike, *, settings: Mapping | None = None,
                 source: Mapping | None = None, overwrite: bool = False, verify: bool = True) -> dict:
    """Write ``built`` (a :class:`~radgen.model.run.BuiltModel` from ``load_run``) as a LLaVA folder.

    ``settings`` override the run's generation defaults; ``source`` (run folder, model hash)
    goes into ``radgen_export.json``. The model passed in is not changed (LoRA is merged on a
    copy). Returns the manifest written. Raises :class:`ExportError` when the model cannot be
    expressed, ``out`` is not empty (without ``overwrite``) or the written folder fails the check.
    """
    from transformers import (AutoModel, BitImageProcessor, GenerationConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    from radgen.model.run import generation_kwargs

    out = Path(out)
    info = built.info
    check_exportable(run_problems(info, settings), what=f"the run {(source or {}).get('run_dir', '')}".strip())
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ExportError(f"{out} exists and is not empty (pass overwrite to replace it)")
    model = built.model
    encoder = model.vision.encoder
    vcfg = encoder.cfg
    check_exportable(export_problems(model.vision.features, str(info["projector"]["name"]), vit=vcfg,
                                     image_size=built.image_size, llm_dtype=str(info["llm"].get("dtype"))))
    tokens = built.tokens
    tokenizer = copy.deepcopy(tokens.tokenizer)
    tokenizer.padding_side = "left"  # batched generation; init_kwargs is what save_pretrained writes
    tokenizer.init_kwargs["padding_side"] = "left"
    image_token = str(info["llm"]["image_token"])
    image_token_id = int(model.image_token_id)
    size, patch = int(built.image_size), int(vcfg.patch_size)
    select = model.vision.features.select
    strategy = "default" if select == "patch" else "full"
    gen = {k: v for k, v in (info.get("generate") or {}).items() if k != "batch_size"}
    gen.update({k: v for k, v in (settings or {}).items() if v is not None and k != "batch_size"})
    gen_kw = generation_kwargs(gen, tokens)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        # Vision: radgen's own HF export, loaded by transformers so the names are its own.
        vision_dir = tmp / "_vision"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # pos_interp at the native size: identical there
            save_hf_dinov2(encoder, vision_dir)
        tower = AutoModel.from_pretrained(str(vision_dir), local_files_only=True, dtype=torch.float32)
        depth = int(tower.config.num_hidden_layers)
        tower.config._name_or_path = ""  # not the temporary folder
        merged = _merged_llm(model.llm)
        decoder, head = _split_llm(merged)
        text_config = copy.deepcopy(merged.config)
        config = LlavaConfig(
            vision_config=tower.config.to_dict(), text_config=text_config.to_dict(),
            image_token_index=image_token_id, image_seq_length=tokens.n_image_tokens,
            projector_hidden_act=EXPORTABLE_PROJECTORS[str(info["projector"]["name"])],
            multimodal_projector_bias=True,
            vision_feature_layer=llava_feature_layer(model.vision.features.layer, depth),
            vision_feature_select_strategy=strategy,
            tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
        )
        config.dtype = torch.float32
        llava = LlavaForConditionalGeneration(config).eval()
        llava.model.vision_tower.load_state_dict(tower.state_dict(), strict=True)
        llava.model.multi_modal_projector.load_state_dict(
            llava_projector_state(model.projector, str(info["projector"]["name"])), strict=True)
        llava.model.language_model.load_state_dict(decoder.state_dict(), strict=True)
        llava.lm_head.load_state_dict(head.state_dict(), strict=True)
        del tower, merged, decoder, head
        shutil.rmtree(vision_dir)

        gcfg = copy.deepcopy(model.llm.generation_config) if getattr(model.llm, "generation_config", None) \
            else GenerationConfig()
        # radgen's generate passes suppress_tokens=[image id], which replaces the LLM's own list
        suppress = [image_token_id]
        gcfg.update(**gen_kw, suppress_tokens=suppress)
        llava.generation_config = gcfg
        llava.save_pretrained(str(tmp))
        del llava

        around = None
        if tokens.prompt.system != SYSTEM_DEFAULT and getattr(tokenizer, "chat_template", None):
            before, _, after = chat_prompt(tokenizer, "\ue002", system=tokens.prompt.system).partition("\ue002")
            around = (before, after)
        chat_template = processor_chat_template(getattr(tokenizer, "chat_template", None), image_token, around)
        tokenizer.chat_template = chat_template
        bit = {k: v for k, v in preprocessor_for(size).items() if k != "image_processor_type"}
        processor = LlavaProcessor(image_processor=BitImageProcessor(**bit), tokenizer=tokenizer,
                                   patch_size=patch, vision_feature_select_strategy=strategy,
                                   chat_template=chat_template, image_token=image_token,
                                   num_additional_image_tokens=1)
        if processor.image_token_id != image_token_id:
            raise ExportError(f"the processor's image token id {processor.image_token_id} is not the model's "
                              f"{image_token_id}")
        processor.save_pretrained(str(tmp))

        manifest = {
            "format": EXPORT_FORMAT,
            "folder_name": out.name,
            "source": {**dict(source or {}), "stage": info.get("stage"),
                       "encoder_sha256": info["encoder"]["sha256"], "llm_sha256": info["llm"]["sha256"]},
            # user text: "<image>\n" + instruction [+ "\n" + indication line], then the chat template
            "prompt": {"text": tokens.prompt_text(None), "instruction": tokens.prompt.instruction,
                       "indication_line": tokens.prompt.indication,
                       "user_text": tokens.prompt.user_text(None),
                       "user_text_with_indication": tokens.prompt.user_text("{indication}"),
                       "system": tokens.prompt.system,
                       # the model first states its findings on one line, then writes them (radgen strips the line)
                       "findings_first": tokens.findings_first, "finding_tags": tokens.finding_tags},
            "image_size": size, "patch_size": patch, "n_image_tokens": tokens.n_image_tokens,
            "image_token": image_token, "image_token_id": image_token_id,
            "vision": {**model.vision.features.to_dict(), "llava_feature_layer": config.vision_feature_layer,
                       "llava_select_strategy": strategy, "pos_interp": vcfg.pos_interp},
            "projector": str(info["projector"]["name"]),
            "generation": {**gen_kw, "suppress_tokens": suppress},
            "versions": _versions(),
        }
        if verify:
            manifest["check"] = verify_export(built, tmp)
        atomic_write_text(tmp / EXPORT_MANIFEST, json.dumps(manifest, indent=2) + "\n")
        atomic_write_text(tmp / "README.md", _readme(manifest))
        for f in tmp.iterdir():  # temp-file writers leave 0600; the folder is meant to be shared
            f.chmod(0o666 & ~umask)
        install_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _probe_image(size: int, seed: int = 0):
    """A textured 8-bit grayscale PIL image, larger than ``size`` and not square, so that both
    preprocessings resize and crop it."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = size * 3 // 2, size * 5 // 4
    yy, xx = np.mgrid[0:h, 0:w]
    img = 127 + 80 * np.sin(xx / 7.0) * np.cos(yy / 11.0) + rng.normal(0, 10, (h, w))
    return Image.fromarray(img.clip(0, 255).astype(np.uint8), mode="L")


@torch.no_grad()
def verify_export(built, folder: str | os.PathLike) -> dict:
    """Load ``folder`` with transformers' Auto classes and compare it with ``built``.

    Checks that the processor's chat template gives radgen's prompt text (with and without an
    indication), that the processor's ids equal radgen's expanded prompt ids, and that the logits
    on the probe image's pixel values (radgen's preprocessing) agree within
    :data:`LOGIT_TOLERANCE`. Raises :class:`ExportError` on any mismatch; returns the record."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import numpy as np

    from encoder.processor import RadDinoProcessor

    folder = Path(folder)
    processor = AutoProcessor.from_pretrained(str(folder), local_files_only=True)
    exported = AutoModelForImageTextToText.from_pretrained(str(folder), local_files_only=True,
                                                           dtype=torch.float32).eval()
    tokens, model = built.tokens, built.model
    image = _probe_image(built.image_size)
    problems = []
    for indication in (None, "cough"):
        text = tokens.prompt.instruction + ("\n" + tokens.prompt.indication.format(indication=indication)
                                            if indication else "")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        if prompt != tokens.prompt_text(indication):
            problems.append(f"the chat template renders {prompt!r}, "
                            f"radgen's prompt is {tokens.prompt_text(indication)!r}")
            continue
        ids = processor(images=image, text=prompt, add_special_tokens=False)["input_ids"][0]
        if list(ids) != tokens.prompt_ids(indication):
            problems.append(f"the processor's ids differ from radgen's prompt ids (indication {indication!r})")
        via_template = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}],
            add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"][0]
        if list(via_template) != tokens.prompt_ids(indication):
            problems.append(f"apply_chat_template(tokenize=True) ids differ from radgen's (indication {indication!r})")
    if problems:
        raise ExportError("the exported folder does not reproduce radgen's prompt: " + "; ".join(problems))

    pixels = RadDinoProcessor(shortest_edge=built.image_size, crop_size=built.image_size)(
        [np.asarray(image, dtype=np.float32) / 255.0])
    hf_pixels = processor(images=image, text=tokens.prompt_text(None), return_tensors="pt")["pixel_values"]
    batch = tokens.generation_batch([None])
    was_training = model.training
    model.eval()
    try:
        ref = model(batch["input_ids"], batch["attention_mask"], pixel_values=pixels)["logits"].float()
    finally:
        model.train(was_training)
    got = exported(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   pixel_values=pixels).logits.float()
    diff = float((got - ref).abs().max())
    if not diff <= LOGIT_TOLERANCE:
        raise ExportError(f"the exported model's logits differ from radgen's by up to {diff:.3g} "
                          f"(tolerance {LOGIT_TOLERANCE})")
    return {"max_abs_logit_diff": diff, "logit_scale": float(ref.abs().max()),
            "same_next_token": bool((got.argmax(-1) == ref.argmax(-1)).all()),
            "prompt_text_equal": True, "prompt_ids_equal": True,
            "pixel_mean_abs_diff": float((hf_pixels.float() - pixels).abs().mean()),
            "pixel_max_abs_diff": float((hf_pixels.float() - pixels).abs().max())}


# ----------------------------------------------------------------------------------------------
# A trained run folder
# ----------------------------------------------------------------------------------------------
def _read_info(model_dir: str | os.PathLike) -> dict:
    from radgen.model.run import MODEL_JSON

    path = Path(model_dir) / MODEL_JSON
    if not path.is_file():
        raise ExportError(f"{model_dir}: no {MODEL_JSON} (not a finished report-generator run)")
    return json.loads(path.read_text(encoding="utf-8"))


def check_run(model_dir: str | os.PathLike, settings: dict | None = None) -> list[str]:
    """Why the run in ``model_dir`` cannot be exported (empty: it can), from its ``model.json``."""
    return run_problems(_read_info(model_dir), settings)


def run_export(model_dir: str | os.PathLike, out: str | os.PathLike, settings: dict | None = None, *,
               overwrite: bool = False, verify: bool = True) -> dict:
    """Export the run in ``model_dir`` to ``out``; returns the manifest (``radgen_export.json``).

    The run is checked from its ``model.json`` before anything is loaded; ``settings``
    (``max_new_tokens``, ``num_beams``, ``repetition_penalty``) override its generation defaults.
    """
    from radgen.model.run import load_run, model_sha256

    check_exportable(check_run(model_dir, settings), what=f"the run {model_dir}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ExportError(f"{out} exists and is not empty (pass --overwrite to replace it)")
    built = load_run(model_dir, device="cpu")
    source = {"run_dir": str(Path(model_dir).resolve()), "model_sha256": model_sha256(model_dir)}
    return export_llava(built, out, settings=settings, source=source, overwrite=overwrite, verify=verify)
