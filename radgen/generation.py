"""``radgen generate``: findings for a folder (or manifest) of X-rays, batched, streamed, resumable.

Images are decoded and preprocessed by a thread pool while the model generates the previous
batch; prompts are left-padded and generated together with the KV cache. Output is one record
per input, appended and fsync'ed batch by batch (JSONL, or CSV when ``--out`` ends in ``.csv``):

``{"id", "image", "status": "ok"|"error", "findings", "reference"?, "error"?, "reason"?,
"model_sha256", "settings"}``

An unreadable image gets an ``error`` record and the run goes on; the exit status is 3 when any
input failed. ``--resume`` keeps the records already written (a torn last line from a kill is
dropped) and does only the rest. Out of GPU memory, the batch is halved and the same rows are
generated again (at batch 1 the job stops with an error); the summary records the back-offs.
Under ``torchrun`` each rank takes every ``world``-th input and writes a part file; rank 0 merges
the parts in input order. Records never hold DICOM metadata: the id is the file's path relative
to the input folder (or the manifest id).
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from pathlib import Path

import torch

from encoder.errors import InputError
from encoder.io import atomic_write_text, install_folder, parse_jsonl
from radgen.data.reports import ReportRow, image_batches, read_report_rows, record_image_path
from radgen.model.oracle import check_oracle_labels
from radgen.model.run import (GENERATION_KEYS, BuiltModel, generate_reports, generation_kwargs,
                              line_guidance_scale, load_run, model_sha256)

__all__ = ["run_generate", "read_records", "merge_lora",
           "GenerateError", "EXIT_FAILURES"]

EXIT_FAILURES = 3
CSV_FIELDS = ["id", "image", "status", "findings", "reference", "error", "reason", "model_sha256", "settings"]


class GenerateError(InputError):
    """Bad arguments or an unusable output file; the message says which."""


# ----------------------------------------------------------------------------------------------
# Output records
# ----------------------------------------------------------------------------------------------
def _is_csv(path: Path) -> bool:
    return path.suffix.lower() in (".csv", ".tsv")


def read_records(path: str | os.PathLike, repair: bool = False) -> list[dict]:
    """Records of an output file; with ``repair`` a torn (unterminated) last line is cut off."""
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        if repair:
            with path.open("r+b") as fh:
                fh.truncate(cut)
        data = data[:cut]
    text = data.decode("utf-8")
    if _is_csv(path):
        rows = list(csv.DictReader(io.StringIO(text), delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
        for r in rows:
            r["settings"] = json.loads(r["settings"]) if r.get("settings") else {}
        return rows
    try:
        return parse_jsonl(text, path)
    except ValueError as exc:
        raise GenerateError(str(exc)) from None


def _count_records(path: Path) -> tuple[int, int]:
    """(records, error records) of an output file, read one record at a time."""
    n = n_err = 0
    with open(path, encoding="utf-8", newline="") as fh:
        rows = (csv.DictReader(fh, delimiter="\t" if path.suffix.lower() == ".tsv" else ",") if _is_csv(path)
                else (json.loads(line) for line in fh if line.strip()))
        for r in rows:
            n += 1
            n_err += r.get("status") == "error"
    return n, n_err


class _Writer:
    """Appends records and makes each batch durable (flush + fsync) before the next starts."""

    def __init__(self, path: Path):
        self.path = path
        self.csv = _is_csv(path)
        new = not path.is_file() or path.stat().st_size == 0
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = path.open("a", encoding="utf-8", newline="")
        if self.csv:
            self.w = csv.DictWriter(self.fh, fieldnames=CSV_FIELDS, extrasaction="ignore",
                                    delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            if new:
                self.w.writeheader()

    def write(self, records: list[dict]) -> None:
        for r in records:
            if self.csv:
                self.w.writerow({**r, "settings": json.dumps(r.get("settings", {}), sort_keys=True)})
            else:
                self.fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        self.fh.flush()
        os.fsync(self.fh.fileno())

    def close(self) -> None:
        self.fh.close()


# ----------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------
class _OOMBackoff:
    """Generation in sub-batches of ``size`` rows; out of GPU memory halves ``size`` and retries the
    same rows, and the size stays halved for the rest of the job."""

    def __init__(self, size: int):
        self.size, self.backoffs = int(size), 0

    def run(self, generate, n: int) -> list[str]:
        """``generate(lo, hi)`` -> texts of rows ``lo:hi``; the texts of all ``n`` rows in order."""
        texts: list[str] = []
        while len(texts) < n:
            lo = len(texts)
            hi = min(n, lo + self.size)
            try:
                texts += generate(lo, hi)
                continue
            except torch.OutOfMemoryError as exc:  # torch.cuda.OutOfMemoryError is the same class
                if hi - lo == 1:
                    raise GenerateError(f"out of GPU memory at batch size 1 ({str(exc).splitlines()[0]}); "
                                        "try --precision bf16, fewer --max-new-tokens or --num-beams, or "
                                        "a GPU with more memory (records so far are kept: --resume)") from None
            # only after an out-of-memory error; outside the except block, so the failed attempt's
            # tensors (held by the traceback) are freed before the retry
            self.size = max(1, (hi - lo) // 2)
            self.backoffs += 1
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            print(f"generate: out of GPU memory at batch {hi - lo}: retrying at batch {self.size}", file=sys.stderr)
        return texts


def run_generate(model_dir: str | os.PathLike, images: str | os.PathLike, out: str | os.PathLike,
                 settings: dict | None = None, *, batch_size: int | None = None, split: str | None = None,
                 resume: bool = False, overwrite: bool = False, workers: int = 2,
                 device: str | None = None, precision: str = "fp32", seed: int = 0,
                 progress: bool = True, built: BuiltModel | None = None,
                 trust_remote_code: bool = False) -> dict:
    """Generate findings for every image of ``images`` into ``out``; returns a summary dict.

    ``settings`` override the run's generation defaults (``max_new_tokens``, ``num_beams``,
    ``do_sample``, ``temperature``, ``top_p``, ``repetition_penalty``, ``line_guidance``).
    """
    from tqdm import tqdm

    from encoder.distributed import setup_distributed
    from encoder.inference import resolve_device

    out = Path(out)
    dev = resolve_device(device)
    rank, world = setup_distributed(dev)
    if precision not in ("fp32", "bf16"):
        raise GenerateError(f"precision must be fp32 or bf16, got {precision!r}")
    if out.exists() and out.stat().st_size > 0 and not (resume or overwrite):
        raise GenerateError(f"{out} exists; pass --resume to continue it or --overwrite to replace it")
    src = Path(images)
    if built is None:
        built = load_run(model_dir, device=dev, trust_remote_code=trust_remote_code)
    fields = built.info.get("data") or {}
    rows = read_report_rows(src, split=split, text_field=fields.get("text_field") or "findings",
                            indication_field=fields.get("indication_field"))
    if built.is_oracle:  # its "images" are the rows' labels: a plain folder or a label-less manifest has none
        check_oracle_labels(rows, src)
    root = src if src.is_dir() else src.parent
    gen = {k: v for k, v in (built.info.get("generate") or {}).items() if k in GENERATION_KEYS}
    gen.update({k: v for k, v in (settings or {}).items() if v is not None})
    bs = int(batch_size or gen.pop("batch_size", 8) or 8)
    gen.pop("batch_size", None)
    mhash = model_sha256(model_dir)
    effective = {k: v for k, v in generation_kwargs(gen, built.tokens).items()
                 if k not in ("pad_token_id", "eos_token_id")}
    guidance = line_guidance_scale(gen, headed=built.head is not None)  # checked before any work
    rec_settings = {**effective, "precision": precision, **({"seed": seed} if gen.get("do_sample") else {}),
                    **({"line_guidance": guidance} if guidance != 1.0 else {}),
                    **({"stop_on_repeat": True} if gen.get("stop_on_repeat") else {})}

    part = out if world == 1 else out.with_name(f"{out.name}.part{rank}-of-{world}")
    if rank == 0 and overwrite and not resume:
        out.unlink(missing_ok=True)
    if overwrite and not resume:
        part.unlink(missing_ok=True)
    done = {r["id"] for r in read_records(out)} if resume else set()
    done |= {r["id"] for r in read_records(part, repair=True)} if resume and part != out else set()
    if resume and part == out:
        read_records(out, repair=True)
    mine = [r for i, r in enumerate(rows) if i % world == rank and r.id not in done]

    order = {r.id: i for i, r in enumerate(mine)}  # once: rebuilt per batch it was quadratic in N
    load_row = built.input_loader()  # the image, or for the oracle control the row's label tokens
    writer = _Writer(part)
    n_ok = n_err = 0
    t0 = time.perf_counter()
    ctx = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    backoff = _OOMBackoff(bs)
    try:
        with tqdm(total=len(mine), desc="generate", unit="report", disable=not (progress and rank == 0)) as bar:
            for k, b in enumerate(image_batches(mine, load_row, bs, workers)):
                records = {}
                for row, err in b.failures:
                    records[row.id] = {"id": row.id, "image": record_image_path(row.image, root), "status": "error",
                                       "findings": None, **_ref(row), "error": err["error"],
                                       "reason": err["reason"], "model_sha256": mhash, "settings": rec_settings}
                if b.inputs is not None:
                    if gen.get("do_sample"):
                        torch.manual_seed(seed * 1_000_003 + rank * 10_007 + k)
                    indications = [r.indication for r in b.items]

                    def generate(lo: int, hi: int, b=b, indications=indications) -> list:
                        with ctx:
                            return generate_reports(built, indications[lo:hi], gen,
                                                    pixel_values=b.inputs[lo:hi], with_stated=True)

                    pairs = backoff.run(generate, len(b.items))
                    for row, (stated, text) in zip(b.items, pairs):
                        records[row.id] = {"id": row.id, "image": record_image_path(row.image, root), "status": "ok",
                                           "findings": text, **({"stated": stated} if stated else {}),
                                           **_ref(row), "model_sha256": mhash, "settings": rec_settings}
                batch_rows = b.items + [f[0] for f in b.failures]
                writer.write([records[r.id] for r in sorted(batch_rows, key=lambda r: order[r.id])])
                n_ok += len(b.items)
                n_err += len(b.failures)
                bar.update(b.n)
                elapsed = time.perf_counter() - t0
                bar.set_postfix(reports_s=f"{(n_ok + n_err) / max(elapsed, 1e-9):.2f}", failed=n_err)
    finally:
        writer.close()
    seconds = time.perf_counter() - t0
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        if rank == 0:
            _merge_parts(out, world, [r.id for r in rows])
        dist.barrier()
    n_records, n_failed_total = _count_records(out) if rank == 0 else (0, 0)
    return {"rank": rank, "world_size": world, "n_inputs": len(rows), "n_resumed": len(done),
            "n_ok": n_ok, "n_failed": n_err, "n_failed_total": n_failed_total,
            "n_records": n_records, "seconds": round(seconds, 2), "batch_size": bs,
            "batch_size_final": backoff.size, "oom_backoffs": backoff.backoffs,
            "reports_per_s": round((n_ok + n_err) / seconds, 3) if seconds > 0 else None, "out": str(out)}


def _ref(row: ReportRow) -> dict:
    return {"reference": row.text} if row.text is not None else {}


def _merge_parts(out: Path, world: int, order: list[str]) -> None:
    """Rank 0: existing ``out`` records + every part file -> ``out`` in input order (atomic)."""
    by_id = {r["id"]: r for r in read_records(out)}
    parts = [out.with_name(f"{out.name}.part{r}-of-{world}") for r in range(world)]
    for p in parts:
        by_id.update({r["id"]: r for r in read_records(p, repair=True)})
    pos = {i: k for k, i in enumerate(order)}
    recs = sorted(by_id.values(), key=lambda r: pos.get(r["id"], len(pos)))
    tmp = out.with_name(f".{out.name}.merge")
    tmp.unlink(missing_ok=True)
    w = _Writer(tmp)
    w.write(recs)
    w.close()
    os.replace(tmp, out)
    for p in parts:
        p.unlink(missing_ok=True)


def merge_lora(model_dir: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """A standalone run folder: the LLM with LoRA merged (``dest/llm``), projector, model.json."""
    import shutil

    from radgen.model.llm_source import folder_sha256
    from radgen.model.run import HEAD_FILE, MODEL_JSON, PROJECTOR_FILE

    model_dir, dest = Path(model_dir), Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise GenerateError(f"{dest} is not empty")
    built = load_run(model_dir)
    llm = built.model.llm
    if hasattr(llm, "merge_and_unload"):
        llm = llm.merge_and_unload()
    tmp = dest.with_name(f".{dest.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "llm").mkdir(parents=True)
    llm.save_pretrained(str(tmp / "llm"))
    built.tokens.tokenizer.save_pretrained(str(tmp / "llm"))
    shutil.copy2(model_dir / PROJECTOR_FILE, tmp / PROJECTOR_FILE)
    if (model_dir / HEAD_FILE).is_file():  # the run states its findings with a head: it goes along
        shutil.copy2(model_dir / HEAD_FILE, tmp / HEAD_FILE)
    shutil.copy2(model_dir / "config.yaml", tmp / "config.yaml")
    info = json.loads((model_dir / MODEL_JSON).read_text())
    info["lora"] = None
    info["merged_from"] = str(model_dir.resolve())
    info["llm"] = {**info["llm"], "path": str((dest / "llm").resolve()), "sha256": folder_sha256(tmp / "llm"),
                   "merged_lora": True}
    atomic_write_text(tmp / MODEL_JSON, json.dumps(info, indent=2) + "\n")
    return install_folder(tmp, dest)
