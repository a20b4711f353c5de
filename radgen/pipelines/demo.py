"""``radgen demo``: the whole system on the built-in synthetic default, as resumable stages.

data -> encoder (pretrain) -> probe; encoder -> generator (train) -> generate; baselines;
evaluate (generator vs every baseline) -> the results page (``index.html``). Each stage writes into
its own folder under ``--out`` and, last, a ``stage.json`` marker holding a key: the hash of the
stage's resolved settings and of the markers of the stages it reads. A re-run skips every stage
whose marker key still matches and whose outputs exist; deleting a stage's folder (or changing its
settings) redoes that stage and, because their keys change, every stage that reads it. A stage
interrupted part-way resumes where its job left off (pretraining and training resume from their
checkpoints, generation from the records written) when its settings are unchanged.

Every sub-job config is resolved and validated before the first stage runs, so a typo in an
override fails in a second, not after the pretraining.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from encoder.errors import InputError
from encoder.io import atomic_write_text
from radgen.config import ConfigError, load_config, save_config
from encoder.pixels import is_pixels_spec
from radgen.report_baselines import BASELINES
from radgen.model.oracle import is_oracle_spec

__all__ = ["STAGES", "DemoError", "DemoInterrupted", "stage_key", "run_demo"]

MARKER = "stage.json"
STARTED = ".stage-key"  # written when a stage starts: a partial folder with this key may resume


class DemoError(InputError):
    """The demo cannot run (bad settings, a foreign output folder); the message says why."""


class DemoInterrupted(RuntimeError):
    """A stage stopped early (SIGTERM); re-running resumes it."""


@dataclass(frozen=True)
class Stage:
    name: str                   # folder under --out
    title: str
    deps: tuple[str, ...]       # stages whose outputs it reads
    outputs: tuple[str, ...]    # files (relative to the stage folder) that must exist when done
    run: Callable[["Demo", Path], dict]


class Demo:
    """A demo run folder and its resolved settings (``cfg``: the demo config; ``jobs``: each
    sub-job's resolved config)."""

    def __init__(self, cfg: DictConfig, progress: bool = True):
        self.cfg = cfg
        self.out = Path(str(cfg.out))
        self.progress = progress
        self.jobs = resolve_job_configs(cfg, self.out)
        self.jobs["encoder"].train.progress = progress  # not part of the stage key (see _stage_settings)

    def path(self, stage: str, *parts: str) -> Path:
        return self.out.joinpath(stage, *parts)

    @property
    def checkpoint(self) -> str:
        return str(self.path("encoder", "checkpoint.pt"))


# ----------------------------------------------------------------------------------------------
# Config resolution (all before any stage runs)
# ----------------------------------------------------------------------------------------------
def resolve_job_configs(cfg: DictConfig, out: Path) -> dict[str, DictConfig]:
    """The resolved synth / encoder / reportgen configs of a demo config, validated."""
    data = out / "data"
    jobs = {
        "synth": load_config("synth", list(cfg.synth.config),
                             [*cfg.synth.overrides, f"out={data}", "overwrite=true"]),
        "encoder": load_config("encoder", list(cfg.encoder.config),
                               [*cfg.encoder.overrides, f"data.path={data}", f"out={out / 'encoder'}",
                                f"seed={int(cfg.seed)}"]),
        "reportgen": load_config("reportgen", list(cfg.generator.config),
                                 [*cfg.generator.overrides, f"data.path={data}", f"out={out / 'generator'}",
                                  f"encoder.spec={out / 'encoder' / 'checkpoint.pt'}", f"seed={int(cfg.seed)}"]),
    }
    for spec in cfg.get("controls") or []:
        if not (is_oracle_spec(spec) or is_pixels_spec(spec)):
            raise ConfigError(f"demo controls: {spec!r} is not a control encoder (oracle, pixels or pixels:<patch>)")
        name = control_name(spec)
        if name in jobs:
            raise ConfigError(f"demo controls: {name} listed twice")
        jobs[name] = load_config("reportgen", list(cfg.generator.config),
                                 [*cfg.generator.overrides, *(cfg.get("control_overrides") or []),
                                  f"data.path={data}", f"out={out / 'controls' / name / 'run'}",
                                  f"encoder.spec={spec}", f"seed={int(cfg.seed)}"])
    from encoder.train import validate_config as validate_encoder
    from radgen.probes import PROBES
    from radgen.train import validate_config as validate_reportgen

    try:
        validate_encoder(jobs["encoder"])
    except ValueError as exc:
        raise ConfigError(f"demo encoder settings: {exc}") from None
    for name, job in jobs.items():
        if name == "reportgen" or name.startswith("generator_"):
            validate_reportgen(job, check_files=False)
    bad = [p for p in cfg.probe.probes if p not in PROBES]
    if bad:
        raise ConfigError(f"demo probe.probes: unknown probe(s) {bad}; choose from {', '.join(PROBES)}")
    if int(cfg.probe.random_seeds) < 0 or int(cfg.report.examples) < 0:
        raise ConfigError("demo probe.random_seeds and report.examples must be >= 0")
    if cfg.evaluate.metrics is not None:
        from eval.score import METRICS

        unknown = [m for m in cfg.evaluate.metrics if m not in METRICS]
        if unknown:
            raise ConfigError(f"demo evaluate.metrics: unknown {unknown}; available: {', '.join(METRICS)}")
    return jobs


def load_demo_config(preset: str | None = None, files: list[str] = (), overrides: list[str] = ()) -> DictConfig:
    """The demo config: default, then the preset (``quick`` / ``full``), files and overrides."""
    return load_config("demo", ([preset] if preset else []) + list(files), overrides)


# ----------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------
def _stage_data(demo: Demo, d: Path) -> dict:
    from radgen.data.synth.generate import generate_dataset

    summary = generate_dataset(demo.jobs["synth"], progress=demo.progress)
    print(summary.format())
    return {"n": int(demo.jobs["synth"].n), "size": int(demo.jobs["synth"].size)}


def _stage_encoder(demo: Demo, d: Path) -> dict:
    from radgen.pretraining import run_pretrain

    summary = run_pretrain(demo.jobs["encoder"])
    if summary["status"] == "preempted":
        raise DemoInterrupted(f"encoder pretraining stopped at step {summary['steps']} (SIGTERM)")
    last = summary.get("last") or {}
    return {"steps": summary["steps"], "last_loss": last.get("loss"), "collapse": last.get("collapse"),
            "teacher_start_share": last.get("teacher_start_share"), "device": summary.get("device")}


def _stage_probe(demo: Demo, d: Path) -> dict:
    from radgen.probes import headline, resolve_encoders, run_probes, write_report

    p = demo.cfg.probe
    encoders, image_size = resolve_encoders({"pretrained": demo.checkpoint}, int(p.random_seeds))
    run = run_probes(demo.path("data"), encoders, image_size, probes=list(p.probes),
                     pixel_size=int(p.pixel_size) or None, seg_epochs=int(p.seg_epochs),
                     n_resamples=int(p.resamples), seed=int(demo.cfg.seed), cache_dir=d / "features",
                     progress=demo.progress)
    title = (f"Frozen-feature probes: pretrained vs {int(p.random_seeds)} random init(s) vs raw pixels, "
             f"image {image_size} (test split, 95% bootstrap CIs)")
    write_report(run, d, {"data": str(demo.path("data")), "image_size": image_size, "encoders": encoders}, title)
    print(headline(run.rows))
    return {"image_size": image_size, "encoders": list(encoders)}


def _stage_generator(demo: Demo, d: Path) -> dict:
    from radgen.train import run_train

    summary = run_train(demo.jobs["reportgen"], progress=demo.progress)
    if summary["status"] == "preempted":
        raise DemoInterrupted("report-generator training stopped early (SIGTERM)")
    return {k: summary.get(k) for k in ("n_train", "n_val", "n_skipped", "final_val_loss", "precision")}


def _stage_generate(demo: Demo, d: Path) -> dict:
    from radgen.generation import run_generate

    g = demo.cfg.generate
    summary = run_generate(demo.path("generator"), demo.path("data"), d / "generated.jsonl",
                           {"max_new_tokens": int(g.max_new_tokens)}, batch_size=int(g.batch_size),
                           split="test", resume=True, progress=demo.progress)
    print(f"generate: {summary['n_records']} records ({summary['n_failed_total']} errors), "
          f"{summary['reports_per_s']} reports/s")
    return {k: summary[k] for k in ("n_records", "n_failed_total", "reports_per_s")}


def control_name(spec: str) -> str:
    """System name of a control generator: ``generator_oracle``, ``generator_pixels``."""
    return "generator_" + ("oracle" if is_oracle_spec(spec) else "pixels")


def _stage_controls(demo: Demo, d: Path) -> dict:
    """Generators trained exactly like the demo's own, on control image tokens (``controls``):
    the oracle (the film's own labels: a ceiling of the generator alone, not a result) and the
    frozen pixels (the findings are in them). Each: train, then generate on the test split."""
    from radgen.generation import run_generate
    from radgen.train import run_train

    g, info = demo.cfg.generate, {}
    for spec in demo.cfg.controls:
        name = control_name(spec)
        cfg = demo.jobs[name]
        summary = run_train(cfg, progress=demo.progress)
        if summary["status"] == "preempted":
            raise DemoInterrupted(f"{name} training stopped early (SIGTERM)")
        gen = run_generate(str(cfg.out), demo.path("data"), d / name / "generated.jsonl",
                           {"max_new_tokens": int(g.max_new_tokens)}, batch_size=int(g.batch_size),
                           split="test", resume=True, progress=demo.progress)
        print(f"{name}: {gen['n_records']} records, {gen['reports_per_s']} reports/s")
        info[name] = {"spec": str(spec), "n_train": summary.get("n_train"), "final_val_loss": summary.get("final_val_loss")}
    return info


def _stage_baselines(demo: Demo, d: Path) -> dict:
    from radgen.report_baselines import run_baselines, run_encoder

    enc = run_encoder(demo.path("generator"))
    meta = run_baselines(demo.path("data"), enc["spec"], d, split="test", image_size=enc["image_size"],
                         progress=demo.progress, expect_encoder_sha256=enc["sha256"])
    return {"counts": meta["counts"], "most_common": meta["most_common"]["text"]}


def _stage_evaluate(demo: Demo, d: Path) -> dict:
    from eval.score import ScoreOptions
    from radgen.evaluation import format_scores, run_evaluate

    e = demo.cfg.evaluate
    opts = ScoreOptions(n_resamples=int(e.resamples), seed=int(demo.cfg.seed))
    metrics = list(e.metrics) if e.metrics is not None else None
    refs = str(demo.path("baselines", "references.jsonl"))
    controls = [control_name(c) for c in demo.cfg.controls]
    preds = {"generator": demo.path("generate", "generated.jsonl"),
             **{c: demo.path("controls", c, "generated.jsonl") for c in controls},
             **{b: demo.path("baselines", f"{b}.jsonl") for b in BASELINES}}
    summary: dict = {"systems": {}, "comparisons": {}, "control_comparisons": {}}
    for name, pred in preds.items():
        res = run_evaluate(str(pred), refs, str(d / name), metrics=metrics, options=opts)
        summary["systems"][name] = {"n_pairs": res["n_pairs"], "scores": res["scores"], "ci": res["ci"],
                                    "omitted": res["omitted"]}
        if name == "generator":
            print(format_scores(res, f"report generator on {res['n_pairs']} test reports"))
    for b in BASELINES:
        res = run_evaluate(str(preds["generator"]), refs, str(d / f"generator_vs_{b}"), metrics=metrics,
                           compare_with=str(preds[b]), options=opts)
        summary["comparisons"][b] = res["comparison"]["comparison"]
    for c in controls:  # each control generator against every baseline and against the demo's generator
        summary["control_comparisons"][c] = {}
        for other in (*BASELINES, "generator"):
            res = run_evaluate(str(preds[c]), refs, str(d / f"{c}_vs_{other}"), metrics=metrics,
                               compare_with=str(preds[other]), options=opts)
            summary["control_comparisons"][c][other] = res["comparison"]["comparison"]
    atomic_write_text(d / "summary.json", json.dumps(summary, indent=2, default=float) + "\n")
    return {"n_pairs": summary["systems"]["generator"]["n_pairs"]}


def _stage_report(demo: Demo, d: Path) -> dict:
    from radgen.report.page import build_page

    page = build_page(demo.out, examples=int(demo.cfg.report.examples))
    return {"page": str(page)}


STAGES: tuple[Stage, ...] = (
    Stage("data", "synthesise phantoms (images, masks, reports)", (), ("manifest.jsonl",), _stage_data),
    Stage("encoder", "pretrain the encoder (DINO + iBOT + KoLeo)", ("data",), ("checkpoint.pt", "log.csv"),
          _stage_encoder),
    Stage("probe", "probe frozen features: pretrained vs random init vs pixels", ("data", "encoder"),
          ("probe.json",), _stage_probe),
    Stage("generator", "train the report generator (projector, then projector + LoRA)", ("data", "encoder"),
          ("model.json", "log.csv"), _stage_generator),
    Stage("generate", "generate findings for the held-out test images", ("data", "generator"),
          ("generated.jsonl",), _stage_generate),
    Stage("controls", "control generators on oracle / pixel tokens (diagnostics, not results)", ("data",),
          (), _stage_controls),
    Stage("baselines", "baselines: normal template, most common report, nearest neighbour",
          ("data", "generator"), ("references.jsonl", "meta.json"), _stage_baselines),
    Stage("evaluate", "clinical and lexical metrics, generator vs every baseline", ("generate", "controls", "baselines"),
          ("summary.json",), _stage_evaluate),
    Stage("page", "results page", ("data", "encoder", "probe", "generator", "generate", "evaluate"),
          ("../index.html",), _stage_report),
)
_BY_NAME = {s.name: s for s in STAGES}


def _stage_settings(demo: Demo, name: str) -> object:
    c = demo.cfg
    return {"data": lambda: OmegaConf.to_container(demo.jobs["synth"]),
            "encoder": lambda: {**OmegaConf.to_container(demo.jobs["encoder"]), "train": {
                k: v for k, v in OmegaConf.to_container(demo.jobs["encoder"].train).items() if k != "progress"}},
            "probe": lambda: {**OmegaConf.to_container(c.probe), "seed": int(c.seed)},
            "generator": lambda: OmegaConf.to_container(demo.jobs["reportgen"]),
            "controls": lambda: {**{control_name(x): OmegaConf.to_container(demo.jobs[control_name(x)])
                                    for x in c.controls}, "generate": OmegaConf.to_container(c.generate)},
            "generate": lambda: OmegaConf.to_container(c.generate),
            "baselines": lambda: {},
            "evaluate": lambda: {**OmegaConf.to_container(c.evaluate), "seed": int(c.seed)},
            "page": lambda: OmegaConf.to_container(c.report)}[name]()


def _read_marker(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def stage_key(demo: Demo, stage: Stage, tokens: dict[str, str]) -> str:
    """Hash of the stage's settings and of the tokens of the markers of its dependencies (a
    dependency redone gets a new token, which invalidates every stage reading it)."""
    payload = {"stage": stage.name, "settings": _stage_settings(demo, stage.name),
               "deps": {d: tokens.get(d, "pending") for d in stage.deps}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _is_done(demo: Demo, stage: Stage, key: str) -> dict | None:
    """The stage's marker if it finished with ``key`` and its outputs still exist."""
    folder = demo.path(stage.name)
    marker = _read_marker(folder / MARKER)
    if marker and marker.get("key") == key and all((folder / o).exists() for o in stage.outputs):
        return marker
    return None


def _check_out(out: Path) -> None:
    """Refuse a non-empty folder that is not a demo run (the demo deletes stage folders in it)."""
    if out.is_file():
        raise DemoError(f"--out {out} is a file")
    if out.is_dir() and any(out.iterdir()) and not (out / "demo.yaml").is_file():
        raise DemoError(f"--out {out} is a non-empty folder that is not a radgen demo run (no demo.yaml); "
                        "choose another --out")


def run_demo(cfg: DictConfig, force: bool = False, progress: bool = True, log=print) -> dict:
    """Run (or resume) the demo ``cfg``; returns ``{"stages": [...], "page": path, "seconds"}``."""
    t_all = time.perf_counter()
    demo = Demo(cfg, progress=progress)  # resolves and validates every sub-job config first
    _check_out(demo.out)
    demo.out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, demo.out, "demo.yaml")
    rows = []
    n = len(STAGES)
    tokens: dict[str, str] = {}
    for i, stage in enumerate(STAGES, 1):
        folder = demo.path(stage.name)
        key = stage_key(demo, stage, tokens)
        marker = None if force else _is_done(demo, stage, key)
        if marker:
            tokens[stage.name] = marker["token"]
            log(f"[{i}/{n}] {stage.name}: done earlier ({marker.get('seconds', 0):.0f} s), skipped")
            rows.append({"stage": stage.name, "status": "skipped", "seconds": marker.get("seconds")})
            continue
        started = folder / STARTED
        if folder.exists() and (force or not (started.is_file() and started.read_text().strip() == key)):
            shutil.rmtree(folder)  # forced, or stale output of other settings or inputs: start clean
        resumed = folder.exists()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MARKER).unlink(missing_ok=True)
        atomic_write_text(started, key + "\n")
        log(f"[{i}/{n}] {stage.name}: {stage.title}" + (" (resuming)" if resumed else ""))
        t0 = time.perf_counter()
        info = stage.run(demo, folder)
        seconds = round(time.perf_counter() - t0, 1)
        token = uuid.uuid4().hex
        atomic_write_text(folder / MARKER, json.dumps({"stage": stage.name, "key": key, "token": token,
                                                       "seconds": seconds, "info": info,
                                                       "finished": time.strftime("%Y-%m-%dT%H:%M:%S")},
                                                      indent=2, default=str) + "\n")
        tokens[stage.name] = token
        log(f"[{i}/{n}] {stage.name}: done in {seconds:.0f} s")
        rows.append({"stage": stage.name, "status": "ran", "seconds": seconds})
    return {"stages": rows, "page": str(demo.out / "index.html"), "seconds": round(time.perf_counter() - t_all, 1)}
