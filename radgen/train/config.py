"""Checks of a ``configs/reportgen`` config, all made before any model is loaded."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from encoder.guards import train_config_errors
from encoder.specs import missing_file
from radgen.config import ConfigError
from radgen.model.oracle import is_oracle_spec
from radgen.model.run import RunError, line_guidance_scale

__all__ = ["STAGES", "STAGE_TASKS", "validate_config"]

STAGES = ("stage1", "stage2")
STAGE_TASKS = ("report", "findings_list")  # what a stage trains on (radgen.train.plan.training_examples)


def validate_config(cfg: DictConfig, check_files: bool = True) -> None:
    """Raise one :class:`ConfigError` listing every problem of a ``configs/reportgen`` config.

    ``check_files=False`` skips the existence of ``data.path`` and ``encoder.spec`` (a pipeline
    validating before an earlier stage has written them)."""
    from radgen.model.projector import PROJECTORS
    from radgen.model.vision import SELECTS

    errors = []
    if not cfg.out:
        errors.append("out is not set (--out RUN_DIR)")
    if not cfg.data.path:
        errors.append("data.path is not set (--data MANIFEST)")
    elif check_files and not Path(str(cfg.data.path)).exists():
        errors.append(f"data.path {cfg.data.path}: no such file or folder")
    spec = cfg.encoder.spec
    if not spec:
        errors.append("encoder.spec is not set (--encoder SPEC)")
    elif check_files and not is_oracle_spec(spec) and (problem := missing_file(spec)):
        errors.append(f"encoder.spec {spec}: {problem}")
    llm = str(cfg.llm.path or "")
    if not llm:
        errors.append("llm.path is not set")
    elif not llm.startswith("builtin") and not (Path(llm) / "config.json").is_file():
        errors.append(f"llm.path {llm}: not a local Hugging Face model folder (no config.json)")
    if cfg.projector.name not in PROJECTORS:
        errors.append(f"projector.name {cfg.projector.name!r}: choose one of {sorted(PROJECTORS)}")
    if cfg.encoder.select not in SELECTS:
        errors.append(f"encoder.select {cfg.encoder.select!r}: choose one of {list(SELECTS)}")
    if cfg.encoder.pool is not None and int(cfg.encoder.pool) < 1:
        errors.append("encoder.pool must be a positive integer or null")
    if cfg.train.precision not in ("auto", "fp32", "bf16"):
        errors.append(f"train.precision {cfg.train.precision!r}: choose auto, fp32 or bf16")
    if cfg.llm.dtype not in ("float32", "bfloat16"):
        errors.append(f"llm.dtype {cfg.llm.dtype!r}: choose float32 or bfloat16")
    for name in STAGES:
        st = cfg[name]
        for key in ("batch_size", "accum_steps"):
            if int(st[key]) < 1:
                errors.append(f"{name}.{key} must be >= 1")
        if st.max_steps is None and st.epochs <= 0:
            errors.append(f"{name}: epochs must be > 0 (or set max_steps; 0 skips the stage)")
        if st.max_steps is not None and int(st.max_steps) < 0:
            errors.append(f"{name}.max_steps must be >= 0")
        if st.lr <= 0:
            errors.append(f"{name}.lr must be > 0")
        if not 0 <= st.decay_ratio < 1:
            errors.append(f"{name}.decay_ratio must be in [0, 1)")
        elif st.warmup_ratio + st.decay_ratio > 1:
            errors.append(f"{name}: warmup_ratio + decay_ratio must be <= 1 (no steps left at the full rate)")
        if str(st.task) not in STAGE_TASKS:
            errors.append(f"{name}.task {st.task!r}: choose one of {list(STAGE_TASKS)}")
    if cfg.tasks.repeat_abnormal < 1:
        errors.append("tasks.repeat_abnormal must be >= 1")
    for key in ("findings_head_max_false_alarm", "findings_head_min_precision"):
        if cfg.tasks.get(key) is not None and not 0 <= float(cfg.tasks[key]) <= 1:
            errors.append(f"tasks.{key} must be between 0 and 1 (or null)")
    for key in ("first_line_weight", "finding_sentence_weight"):
        if cfg.tasks[key] < 0:
            errors.append(f"tasks.{key} must be >= 0")
    if cfg.tasks.finding_tags and not cfg.tasks.findings_first:
        errors.append("tasks.finding_tags plans the findings after the stated line: it needs tasks.findings_first=true")
    if cfg.tasks.get("findings_head") and not cfg.tasks.findings_first:
        errors.append("tasks.findings_head states the findings line the LLM writes on after: it needs "
                      "tasks.findings_first=true (the LLM trained to continue from that line)")
    try:
        line_guidance_scale(OmegaConf.to_container(cfg.generate), headed=cfg.tasks.findings_head)
    except RunError as exc:
        errors.append(f"generate.{exc}")
    errors += train_config_errors(cfg.train)
    if cfg.prompt.max_target_tokens < 2:
        errors.append("prompt.max_target_tokens must be >= 2")
    if "{indication}" not in str(cfg.prompt.indication):
        errors.append("prompt.indication must contain '{indication}'")
    if cfg.train.tensorboard:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            errors.append("train.tensorboard needs the tensorboard package (pip install tensorboard)")
    if errors:
        raise ConfigError("invalid report-generator config:\n  " + "\n  ".join(errors))
