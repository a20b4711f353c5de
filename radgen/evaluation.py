"""``radgen evaluate``: score generated reports against references and write JSON/CSV/Markdown/PNG.

Files are JSONL (one object per line), JSON (a list of objects) or CSV/TSV with an id column and a
text column. Rows are joined on id; ids present on one side only are an error unless
``--allow-missing`` (missing predictions are then scored as empty reports, extra ones ignored,
and both counts recorded). Empty predictions are always scored, never dropped; an empty
reference is an error. A text longer than :data:`MAX_REPORT_CHARS` is cut to that length and
counted (``inputs.reports_cut_to_max_chars`` in metrics.json).
"""

from __future__ import annotations

import csv
import io
import json
import sys
import time
from pathlib import Path

from encoder.errors import InputError
from encoder.io import NotUTF8Error, atomic_write_text, parse_jsonl, read_utf8
from eval.chexpert.observations import CHEXPERT_14
from eval.score import METRICS, ScoreOptions, compare, compute_outputs, summarise

__all__ = ["EvaluateError", "read_reports", "cap_reports", "join_reports", "MAX_REPORT_CHARS", "run_evaluate",
           "format_scores", "format_per_finding", "per_finding_rows"]

MAX_REPORT_CHARS = 20_000  # ~10x the longest real findings section
TEXT_FIELDS = ("report", "text", "findings", "prediction", "generated", "hypothesis", "reference")


class EvaluateError(InputError):
    """Bad input for ``radgen evaluate``; the message names the file and the reason."""


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise EvaluateError(f"{path}: file not found")
    suffix = path.suffix.lower()
    try:
        text = read_utf8(path)
    except NotUTF8Error as e:
        raise EvaluateError(f"{path}:{e.line}: {e}") from None
    if suffix in (".jsonl", ".ndjson"):
        try:
            return parse_jsonl(text, path)
        except ValueError as e:
            raise EvaluateError(str(e)) from None
    if suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise EvaluateError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(rows, list):
            raise EvaluateError(f"{path}: expected a JSON list of objects")
        return rows
    if suffix in (".csv", ".tsv"):
        return list(csv.DictReader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ","))
    raise EvaluateError(f"{path}: unsupported extension {suffix!r} (use .jsonl, .json, .csv or .tsv)")


def read_reports(path: str | Path, id_field: str = "id", text_field: str | None = None) -> dict[str, str]:
    """``{id: text}`` from one file; ``text_field=None`` picks the first of :data:`TEXT_FIELDS` present."""
    path = Path(path)
    rows = _rows(path)
    if not rows:
        raise EvaluateError(f"{path}: no rows")
    for n, r in enumerate(rows, 1):
        if not isinstance(r, dict):
            raise EvaluateError(f"{path}: row {n} is not an object")
    keys = rows[0].keys()
    if id_field not in keys:
        raise EvaluateError(f"{path}: no {id_field!r} column (columns: {', '.join(keys)}); set --id-field")
    field = text_field or next((f for f in TEXT_FIELDS if f in keys), None)
    if field is None or field not in keys:
        raise EvaluateError(f"{path}: no text column {text_field or ' / '.join(TEXT_FIELDS)!r} "
                            f"(columns: {', '.join(keys)}); set --text-field")
    out: dict[str, str] = {}
    for n, r in enumerate(rows, 1):
        rid = r.get(id_field)
        if rid is None or str(rid).strip() == "":
            raise EvaluateError(f"{path}: row {n} has an empty {id_field!r}")
        rid = str(rid).strip()
        if rid in out:
            raise EvaluateError(f"{path}: id {rid!r} appears more than once")
        if field not in r:
            raise EvaluateError(f"{path}: row {n} (id {rid!r}) has no {field!r} field (use null or \"\" for an empty report)")
        t = r[field]
        if t is not None and not isinstance(t, str):
            raise EvaluateError(f"{path}: row {n} (id {rid!r}): {field!r} is {type(t).__name__}, not text")
        out[rid] = t or ""
    return out


def cap_reports(reports: dict[str, str], max_chars: int = MAX_REPORT_CHARS) -> list[str]:
    """Cut texts longer than ``max_chars`` (in place); returns the ids cut.

    The longest real findings sections run to a few thousand characters; a text far beyond
    that is a broken input (a concatenated file, a runaway generation) and would only stall
    METEOR's Java process and the labelers."""
    cut = [i for i, t in reports.items() if len(t) > max_chars]
    for i in cut:
        reports[i] = reports[i][:max_chars]
    return cut


def join_reports(refs: dict[str, str], preds: dict[str, str], allow_missing: bool = False,
                 ref_name: str = "references", pred_name: str = "predictions") -> tuple[list[str], list[str], list[str], dict]:
    """Pair on id, in reference order: ``(ids, ref_texts, pred_texts, join_record)``."""
    missing = [i for i in refs if i not in preds]
    extra = [i for i in preds if i not in refs]
    if (missing or extra) and not allow_missing:
        parts = []
        if missing:
            parts.append(f"{len(missing)} id(s) of {ref_name} have no prediction in {pred_name} "
                         f"(e.g. {', '.join(missing[:5])})")
        if extra:
            parts.append(f"{len(extra)} id(s) of {pred_name} are not in {ref_name} (e.g. {', '.join(extra[:5])})")
        raise EvaluateError("; ".join(parts) + "; pass --allow-missing to score missing predictions as "
                            "empty reports and ignore extra ones")
    empty_refs = [i for i, t in refs.items() if not t.strip()]
    if empty_refs:
        raise EvaluateError(f"{ref_name}: {len(empty_refs)} reference(s) are empty (e.g. "
                            f"{', '.join(empty_refs[:5])}); a metric against an empty reference is undefined")
    ids = list(refs)
    record = {"n_pairs": len(ids), "missing_predictions_scored_empty": len(missing),
              "extra_predictions_ignored": len(extra),
              "empty_predictions": sum(1 for i in ids if not preds.get(i, "").strip())}
    return ids, [refs[i] for i in ids], [preds.get(i, "") for i in ids], record


# ------------------------------------------------------------------------------------ outputs
def _main_keys(scores: dict) -> list[str]:
    return [k for k in scores if "/" not in k]


def format_scores(result: dict, title: str = "") -> str:
    """Markdown table of the headline scores with CIs, then omitted metrics and timings."""
    lines = [f"## {title}", ""] if title else []
    r = result["bootstrap"]
    ci_head = f"{int(100 * (1 - r['alpha']))}% CI" if r["resamples"] else "CI"
    lines += [f"| metric | value | {ci_head} |", "|---|---:|---:|"]
    for k in _main_keys(result["scores"]):
        ci = result["ci"].get(k)
        ci_s = f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "-"
        lines.append(f"| {k} | {result['scores'][k]:.4f} | {ci_s} |")
    lines.append("")
    lines.append(f"{result['n_pairs']} report pairs; bootstrap: {r['resamples']} resamples, seed {r['seed']} "
                 f"({r['method']}).")
    for fam, why in result["omitted"].items():
        lines.append(f"- omitted {fam}: {why}")
    lab = result["info"].get("chexpert", {}).get("labeler")
    if lab:
        lines.append(f"- CheXpert labels from: {lab}")
    secs = ", ".join(f"{k} {v:.2f} s" for k, v in result["seconds"].items())
    lines.append(f"- time per metric: {secs}")
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def _false_alarm_text(fa: dict) -> str:
    n = fa["n_no_finding"]
    if not n:
        return "no reference is No Finding: no false-alarm rate"
    top = fa.get("max_findings") or ([fa["max_finding"]] if fa["max_finding"] else [])
    most = (f"most named: {', '.join(top)} on {fa['named'][top[0]]}{' each' if len(top) > 1 else ''} "
            f"({fa['max']:.1%})" if top else "none named")
    return f"names a finding on {fa['n_any']} of {n} No-Finding films ({fa['any']:.1%}); {most}"


def format_per_finding(summaries: dict[str, dict]) -> str:
    """Markdown table of per-finding precision/recall and the false-alarm lines, for one system
    (``{"A": result["per_finding"]}``) or several side by side (``{"A": ..., "B": ...}``)."""
    names = list(summaries)
    one = len(names) == 1
    head = ["finding", "support"]
    for n in names:
        pre = "" if one else f"{n} "
        head += [f"{pre}predicted", f"{pre}precision", f"{pre}recall"] + (["F1"] if one else [])
    lines = ["### Per finding", "", "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    rows = {n: summaries[n]["findings"] for n in names}
    for j, first in enumerate(rows[names[0]]):
        cells = [first["finding"], str(first["support"])]
        for n in names:
            r = rows[n][j]
            cells += [str(r["predicted"]), _pct(r["precision"]), _pct(r["recall"])] + ([_pct(r["f1"])] if one else [])
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for n in names:
        lines.append(f"- false alarms{'' if one else ', ' + n}: {_false_alarm_text(summaries[n]['false_alarm'])}")
    s0 = summaries[names[0]]
    lines.append(f"- support = films whose reference names the finding; predicted = films whose report names it "
                 f"(CheXpert label {'1' if s0['variant'] == 'chexpert_f1' else '1 or -1'}, "
                 f"{s0.get('labeler') or '?'} labeler); — = undefined (nothing to divide by). A false alarm: "
                 f"a film whose reference is No Finding, with any observation other than No Finding and "
                 f"Support Devices named in the report.")
    return "\n".join(lines)


def per_finding_rows(summary: dict, system: str = "A") -> list[dict]:
    """``per_finding.csv`` rows of one system: the six findings, then the "any finding" false-alarm row."""
    fa = summary["false_alarm"]
    rows = []
    for r in summary["findings"]:
        named = fa["named"].get(r["finding"])  # None for Support Devices: not a false alarm
        rows.append({"system": system, **{k: r[k] for k in ("finding", "support", "predicted", "tp", "fp", "fn",
                                                             "precision", "recall", "f1")},
                     "no_finding_films": fa["n_no_finding"], "named_on_no_finding": named,
                     "false_alarm_rate": fa["rate"].get(r["finding"])})
    rows.append({"system": system, "finding": "any finding", "support": None, "predicted": None, "tp": None,
                 "fp": None, "fn": None, "precision": None, "recall": None, "f1": None,
                 "no_finding_films": fa["n_no_finding"], "named_on_no_finding": fa["n_any"],
                 "false_alarm_rate": fa["any"]})
    return rows


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    return buf.getvalue()


def _save_png(fig, path: Path) -> None:
    from eval.figures import save_png

    fig.tight_layout()
    save_png(fig, path, dpi=120, tight=False)


def _plot_per_observation(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    obs = list(CHEXPERT_14)
    vals = np.array([result["scores"].get(f"chexpert_f1/{o}", np.nan) for o in obs])
    cis = np.array([result["ci"].get(f"chexpert_f1/{o}", [np.nan, np.nan]) for o in obs])
    err = np.vstack([vals - cis[:, 0], cis[:, 1] - vals]).clip(min=0)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.bar(range(len(obs)), vals, yerr=np.nan_to_num(err), capsize=3, color="#4c72b0")
    ax.set_xticks(range(len(obs)), obs, rotation=45, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("F1 (uncertain = negative)")
    lab = result["info"]["chexpert"].get("labeler", "?")
    ax.set_title(f"CheXpert F1 per observation ({lab} labels, {result['n_pairs']} pairs, 95% CI)")
    _save_png(fig, path)


def _plot_comparison(cmp: dict, path: Path, names: tuple[str, str]) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = [k for k in cmp["comparison"] if "/" not in k]
    if not keys:  # every requested metric was omitted: nothing to draw
        return False
    d = np.array([cmp["comparison"][k]["diff"] for k in keys])
    ci = np.array([cmp["comparison"][k]["ci"] for k in keys])
    err = np.vstack([d - ci[:, 0], ci[:, 1] - d]).clip(min=0)
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(keys) + 1.5))
    ax.barh(range(len(keys)), d, xerr=np.nan_to_num(err), capsize=3,
            color=["#55a868" if x > 0 else "#c44e52" for x in d])
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(keys)), keys)
    ax.invert_yaxis()
    ax.set_xlabel(f"{names[0]} - {names[1]} (paired bootstrap {1 - cmp['bootstrap']['alpha']:.0%} CI)")
    _save_png(fig, path)
    return True


def _write_result(result: dict, out: Path, ids: list[str]) -> list[str]:
    written = []
    main = [{"metric": k, "value": result["scores"][k], "ci_low": result["ci"].get(k, [None])[0],
             "ci_high": result["ci"].get(k, [None, None])[1]} for k in result["scores"]]
    per_pair = [{"id": i, **{k: v[j] for k, v in result["per_pair"].items()}} for j, i in enumerate(ids)]
    md = format_scores(result, "radgen evaluate") + "\n"
    if "per_finding" in result:
        md += "\n" + format_per_finding({"A": result["per_finding"]}) + "\n"
    files = {"metrics.json": json.dumps(result, indent=2, default=float),
             "metrics.csv": _csv(main), "metrics.md": md, "per_report.csv": _csv(per_pair)}
    if "per_finding" in result:
        files["per_finding.csv"] = _csv(per_finding_rows(result["per_finding"]))
    if "per_observation" in result:
        rows = [{**r, "f1_ci_low": result["ci"].get(f"chexpert_f1/{r['observation']}", [None])[0],
                 "f1_ci_high": result["ci"].get(f"chexpert_f1/{r['observation']}", [None, None])[1]}
                for r in result["per_observation"]]
        files["per_observation.csv"] = _csv(rows)
    for name, text in files.items():
        atomic_write_text(out / name, text)
        written.append(name)
    if "per_observation" in result:
        _plot_per_observation(result, out / "chexpert_f1_per_observation.png")
        written.append("chexpert_f1_per_observation.png")
    return written


def run_evaluate(predictions: str, references: str, out: str, metrics: list[str] | None = None,
                 compare_with: str | None = None, allow_missing: bool = False, id_field: str = "id",
                 text_field: str | None = None, ref_text_field: str | None = None,
                 options: ScoreOptions | None = None) -> dict:
    """Read, join, score (and optionally compare), write outputs; returns the result dict."""
    opts = options or ScoreOptions()
    for m in metrics or []:
        if m not in METRICS:
            raise EvaluateError(f"unknown metric {m!r}; available: {', '.join(METRICS)}")
    t0 = time.perf_counter()
    refs = read_reports(references, id_field, ref_text_field or text_field)
    preds = read_reports(predictions, id_field, text_field)
    cut = cap_reports(refs) + cap_reports(preds)
    ids, ref_texts, hyp_texts, join = join_reports(refs, preds, allow_missing, str(references), str(predictions))
    join["reports_cut_to_max_chars"] = len(cut)
    if cut:
        print(f"warning: {len(cut)} report(s) longer than {MAX_REPORT_CHARS:,} characters were cut to that "
              f"length (e.g. id {cut[0]})", file=sys.stderr)
    out_p = Path(out)
    out_p.mkdir(parents=True, exist_ok=True)
    computed = compute_outputs(ref_texts, hyp_texts, metrics, opts)  # reused by --compare
    result = summarise(computed, len(ids), opts)
    result["inputs"] = {"predictions": str(predictions), "references": str(references), **join}
    result["seconds"]["total"] = time.perf_counter() - t0
    result["written"] = _write_result(result, out_p, ids)
    if compare_with:
        other = read_reports(compare_with, id_field, text_field)
        cap_reports(other)
        _, _, hyp_b, join_b = join_reports(refs, other, allow_missing, str(references), str(compare_with))
        cmp = compare(ref_texts, hyp_texts, hyp_b, metrics, opts, computed_a=computed)
        cmp["inputs"] = {"a": str(predictions), "b": str(compare_with), "join_b": join_b}
        rows = [{"metric": k, **{kk: vv for kk, vv in v.items() if kk != "ci"},
                 "ci_low": v["ci"][0], "ci_high": v["ci"][1]} for k, v in cmp["comparison"].items()]
        atomic_write_text(out_p / "comparison.json", json.dumps(cmp, indent=2, default=float))
        atomic_write_text(out_p / "comparison.csv", _csv(rows))
        level = f"{1 - opts.alpha:.0%} CI"
        md = [f"| metric | A | B | A - B | {level} | p (two-sided) |", "|---|---:|---:|---:|---:|---:|"]
        md += [f"| {r['metric']} | {r['a']:.4f} | {r['b']:.4f} | {r['diff']:+.4f} | "
               f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] | {r['p_two_sided']:.3f} |"
               for r in rows if "/" not in r["metric"]]
        if "per_finding" in cmp:
            md += ["", format_per_finding({"A": cmp["per_finding"]["a"], "B": cmp["per_finding"]["b"]})]
            rows_pf = per_finding_rows(cmp["per_finding"]["a"], "A") + per_finding_rows(cmp["per_finding"]["b"], "B")
            atomic_write_text(out_p / "per_finding.csv", _csv(rows_pf))  # A's rows, then B's
        atomic_write_text(out_p / "comparison.md", f"A = {predictions}, B = {compare_with}\n\n" + "\n".join(md) + "\n")
        plotted = _plot_comparison(cmp, out_p / "comparison.png", ("A", "B"))
        result["comparison"] = cmp
        result["written"] += ["comparison.json", "comparison.csv", "comparison.md"] + (["comparison.png"] if plotted else [])
    return result
