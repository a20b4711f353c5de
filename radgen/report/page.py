"""``radgen report RUN_DIR``: one offline results page (``RUN_DIR/index.html`` + ``RUN_DIR/page/``).

The page builder reads whatever a run folder holds and leaves out the sections it finds nothing
for, so it works on a ``radgen demo`` run and on any folder of job outputs:

- report metrics: every ``metrics.json`` (``radgen evaluate``), one column per system, with CIs;
- per finding: the same systems' precision / recall for the CheXpert-5 findings and Support
  Devices, and their false-alarm rate on films whose reference is No Finding;
- paired comparisons: every ``comparison.json`` (``radgen evaluate --compare``), with the plain
  list of metrics where the first system falls short of the second;
- probes: every ``probe.json`` (``radgen probe``): the headline table and the gap to random init;
- training curves: every ``log.csv`` of encoder pretraining (losses and the collapse monitors)
  and of report-generator training (train and validation loss per stage);
- examples: the first records of every ``generated.jsonl`` with an image, each with its reference
  and generated findings (word differences highlighted) and their CheXpert labels;
- stage timings of a demo run (``*/stage.json``).

Everything the page shows is copied or drawn into ``page/`` next to ``index.html``, so the pair
can be moved and opened from disk with no server; links to source files are relative.
"""

from __future__ import annotations

import difflib
import html
import json
import os
import shutil
import time
from pathlib import Path
from typing import Iterable

from encoder.io import atomic_write_text
from eval.chexpert.per_finding import FINDINGS_6
from radgen.report.discovery import (PAGE_DIR, as_number, find_image, find_outputs, probe_rows, read_csv, read_json,
                                     stage_markers, system_order)
from radgen.report.figures import plot_pretrain, plot_train, thumbnail

__all__ = ["build_page", "word_diff_html", "shortfalls", "summary_markdown"]

# metrics shown in the main table, in order (others are in each system's metrics.md)
MAIN_METRICS = ("chexpert_f1_14_micro", "chexpert_f1_5_micro", "chexpert_f1_14_macro", "chexpert_f1_5_macro",
                "bleu_1", "bleu_4", "meteor", "rouge_l", "cider_d", "radgraph_proxy_partial_f1",
                "radgraph_partial_f1", "radcliq_v1")
# the comparisons the page's verdict is about (the issue's goal: ahead on both)
VERDICT_METRICS = ("chexpert_f1_14_micro", "chexpert_f1_5_micro")


# ----------------------------------------------------------------------------------------------
# Discovery
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# Small pure pieces (tested directly)
# ----------------------------------------------------------------------------------------------
def word_diff_html(reference: str, generated: str) -> tuple[str, str]:
    """``(reference_html, generated_html)``: words of the reference the generator missed marked
    ``<del>``, words it wrote that the reference does not have marked ``<ins>`` (a word-level
    alignment, case-insensitive)."""
    ref_w, gen_w = reference.split(), generated.split()
    sm = difflib.SequenceMatcher(a=[w.lower().strip(".,;:") for w in ref_w],
                                 b=[w.lower().strip(".,;:") for w in gen_w], autojunk=False)
    ref_out, gen_out = [], []
    for op, i1, i2, j1, j2 in sm.get_opcodes():
        r = html.escape(" ".join(ref_w[i1:i2]))
        g = html.escape(" ".join(gen_w[j1:j2]))
        if op == "equal":
            ref_out.append(r)
            gen_out.append(g)
        else:
            if r:
                ref_out.append(f"<del>{r}</del>")
            if g:
                gen_out.append(f"<ins>{g}</ins>")
    return " ".join(ref_out), " ".join(gen_out)


def shortfalls(comparisons: dict[str, dict], metrics: Iterable[str] = VERDICT_METRICS) -> list[dict]:
    """Per (baseline, metric): where system A is behind B. Each dict: ``baseline``, ``metric``,
    ``a``, ``b``, ``diff``, ``ci``, ``significant`` (the paired CI excludes 0)."""
    out = []
    for base, cmp in comparisons.items():
        for m in metrics:
            c = cmp.get(m)
            if not c or c.get("diff") is None or c["diff"] >= 0:
                continue
            ci = c.get("ci") or [None, None]
            out.append({"baseline": base, "metric": m, "a": c["a"], "b": c["b"], "diff": c["diff"], "ci": ci,
                        "significant": ci[1] is not None and ci[1] < 0})
    return out


def _fmt(v, digits: int = 3) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _ci_text(value, ci) -> str:
    if value is None:
        return "—"
    if not ci or ci[0] is None:
        return _fmt(value)
    return f"{value:.3f} <span class=ci>[{ci[0]:.3f}, {ci[1]:.3f}]</span>"


def _rel(p: Path, root: Path) -> str:
    return os.path.relpath(p, root).replace(os.sep, "/")


def _table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    th = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table class='{cls}'><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


# the demo's control generators (radgen demo ``controls``): diagnostics, named as such everywhere
CONTROL_NAMES = {"generator_oracle": "generator (oracle tokens)", "generator_pixels": "generator (pixel tokens)"}


def _display(name: str) -> str:
    return CONTROL_NAMES.get(name, name)


def _system_name(metrics_json: Path, run: Path) -> str:
    rel = _rel(metrics_json.parent, run)
    return _display(metrics_json.parent.name) if rel.count("/") <= 1 else rel


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------
def _section_metrics(found, run: Path) -> tuple[str, dict]:
    systems = {}
    # a comparison folder's metrics.json scores its first system: listed only if nothing else is
    for p in found["metrics"] or found["comparison"]:
        d = read_json(p)
        if d and "scores" in d:
            systems[_system_name(p, run)] = (p, d)
    if not systems:
        return "", {}
    order = system_order(systems)
    present = [m for m in MAIN_METRICS if any(m in systems[s][1]["scores"] for s in order)]
    rows = []
    for m in present:
        vals = {s: systems[s][1]["scores"].get(m) for s in order}
        finite = [v for v in vals.values() if v is not None]
        lower_better = m.startswith("radcliq")
        best = (min if lower_better else max)(finite) if finite else None
        cells = []
        for s in order:
            v = vals[s]
            txt = _ci_text(v, (systems[s][1].get("ci") or {}).get(m))
            cells.append(f"<b>{txt}</b>" if v is not None and v == best and len(finite) > 1 else txt)
        rows.append([m] + cells)
    n = {s: systems[s][1].get("n_pairs") for s in order}
    header = ["metric"] + [f"<a href='{_rel(systems[s][0].with_name('metrics.md'), run)}'>{html.escape(s)}</a>"
                           f"<br><span class=ci>n={n[s]}</span>" if systems[s][0].with_name("metrics.md").is_file()
                           else html.escape(s) for s in order]
    omitted = sorted({o if isinstance(o, str) else str(o) for s in order for o in systems[s][1].get("omitted") or []})
    body = _table(header, rows, "metrics")
    body += ("<p class=note>Value [95% percentile bootstrap CI over report pairs]; the best value of each row in "
             "bold. CheXpert F1 reads both reports with the labeler named in each metrics.md; 14 = all "
             "observations, 5 = Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural Effusion. "
             "<code>radgraph_proxy_f1</code> is a rule-based approximation, not RadGraph F1.</p>")
    if omitted:
        body += f"<p class=note>Not computed here (need local weights): {html.escape(', '.join(omitted))}.</p>"
    return _sec("metrics", "Report metrics (test split)", body), systems


def _per_finding(d: dict) -> dict | None:
    """A system's per-finding summary (``metrics.json["per_finding"]``). An older metrics.json has
    only ``per_observation``: precision / recall are taken from it, with no false-alarm rate."""
    pf = d.get("per_finding")
    if isinstance(pf, dict) and isinstance(pf.get("findings"), list):
        return pf
    obs = {r.get("observation"): r for r in d.get("per_observation") or [] if isinstance(r, dict)}
    if not all(f in obs for f in FINDINGS_6):
        return None
    rows = [{"finding": f, "support": obs[f].get("support"), "predicted": obs[f].get("predicted"),
             "precision": obs[f].get("precision") if obs[f].get("predicted") else None,
             "recall": obs[f].get("recall") if obs[f].get("support") else None} for f in FINDINGS_6]
    return {"findings": rows, "false_alarm": None}


def _per_finding_cells(systems: dict) -> tuple[list[str], list[tuple[str, str, list[tuple[str, str]]]]]:
    """The per-finding table of every system that has one, as plain text: ``(systems, rows)``, each
    row ``(label, note, [(value, aside) per system])``; the page and summary.md format it."""
    pfs = {s: _per_finding(systems[s][1]) for s in system_order(systems)}
    pfs = {s: pf for s, pf in pfs.items() if pf}
    if not pfs:
        return [], []
    order = list(pfs)
    rows = []
    for f in FINDINGS_6:
        by = {s: next((r for r in pfs[s]["findings"] if r.get("finding") == f), None) for s in order}
        supports = {r.get("support") for r in by.values() if r}
        cells = []
        for s in order:
            r = by[s]
            if not r:
                cells.append(("—", ""))
                continue
            aside = f"{r.get('predicted')} named" + ("" if len(supports) == 1 else f", n={r.get('support')}")
            cells.append((f"{_fmt(as_number(r.get('precision')))} / {_fmt(as_number(r.get('recall')))}", aside))
        rows.append((f, f"n={supports.pop()}" if len(supports) == 1 else "", cells))
    fas = {s: pfs[s].get("false_alarm") for s in order}
    if any(fas.values()):
        ns = {fa.get("n_no_finding") for fa in fas.values() if fa}
        any_cells, max_cells = [], []
        for s in order:
            fa = fas[s]
            if not fa or fa.get("any") is None:
                any_cells.append(("—", "no No-Finding film" if fa else ""))
                max_cells.append(("—", ""))
                continue
            any_cells.append((_fmt(as_number(fa["any"])), f"{fa.get('n_any')} of {fa.get('n_no_finding')}"))
            top = fa.get("max_findings") or ([fa["max_finding"]] if fa.get("max_finding") else [])
            max_cells.append((_fmt(as_number(fa.get("max"))), ", ".join(top) or "none named"))
        note = f"n={ns.pop()} No-Finding films" if len(ns) == 1 else "share of No-Finding films"
        rows.append(("false alarm: any finding", note, any_cells))
        rows.append(("false alarm: most named finding", "", max_cells))
    return order, rows


def _section_per_finding(systems: dict, run: Path) -> str:
    order, rows = _per_finding_cells(systems)
    if not order:
        return ""
    header = ["finding"] + [f"{html.escape(s)}<br><span class=ci>precision / recall</span>" for s in order]
    body_rows = [[f"{html.escape(label)}" + (f" <span class=ci>{html.escape(note)}</span>" if note else "")]
                 + [html.escape(v) + (f" <span class=ci>({html.escape(a)})</span>" if a else "") for v, a in cells]
                 for label, note, cells in rows]
    labelers = sorted({str((_per_finding(systems[s][1]) or {}).get("labeler") or "") for s in order} - {""})
    body = _table(header, body_rows, "metrics")
    body += ("<p class=note>Over the test films: n = films whose reference names the finding; named = films whose "
             "report from that system names it (CheXpert label 1, uncertain counts as not named"
             + (f"; {html.escape(', '.join(labelers))} labeler" if labelers else "") + "); — = undefined "
             "(nothing to divide by). <b>False alarm</b>: among the films whose reference is No Finding, the share "
             "whose report names any observation other than No Finding and Support Devices; the most named finding "
             "is the single finding with the highest such share.</p>")
    return _sec("per_finding", "Per finding", body)


def _section_comparisons(found, run: Path) -> tuple[str, dict, dict]:
    """The comparisons section; ``(html, generator's comparisons by baseline, controls' comparisons
    by (control, other))``. A folder ``A_vs_B`` compares A with B (A a control of
    :data:`CONTROL_NAMES`, or else the trained generator); a bare folder name is the trained
    generator against it."""
    cmps, controls, every = {}, {}, []
    for p in found["comparison"]:
        d = read_json(p.with_name("comparison.json"))
        if d and "comparison" in d:
            a, sep, b = p.parent.name.partition("_vs_")
            a, b = (a, b) if sep else ("generator", a)
            if a not in CONTROL_NAMES:  # any other A is the trained generator under its folder's name
                a = "generator"
                cmps[b] = d["comparison"]
            else:
                controls[(a, b)] = d["comparison"]
            every.append((a, b, d["comparison"]))
    if not every:
        return "", {}, {}
    parts = []
    for a, name, cmp in sorted(every, key=lambda t: (t[0] != "generator", t[0], t[1])):
        rows = []
        for m in [m for m in MAIN_METRICS if m in cmp]:
            c = cmp[m]
            ci = c.get("ci") or [None, None]
            sig = ci[0] is not None and (ci[0] > 0 or ci[1] < 0)
            cls = "" if not sig else ("ahead" if c["diff"] > 0 else "behind")
            rows.append([m, _fmt(c.get("a")), _fmt(c.get("b")),
                         f"<span class='{cls}'>{c['diff']:+.3f}</span>",
                         f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci[0] is not None else "—",
                         _fmt(c.get("p_two_sided"))])
        who = "trained generator" if a == "generator" else _display(a)
        parts.append(f"<h3>{html.escape(who)} (A) vs {html.escape(_display(name))} (B)</h3>"
                     + _table(["metric", "A", "B", "A − B", "95% CI", "p"], rows, "cmp"))
    intro = ("<p class=note>Paired bootstrap over the same report pairs: green = A ahead with a CI that "
             "excludes 0, red = A behind with a CI that excludes 0.</p>")
    return _sec("comparisons", "Paired comparisons", intro + "".join(parts)), cmps, controls


def _controls_text(controls: dict) -> str:
    """One line per control generator: its CheXpert-5 micro F1 against each system it was compared
    with (the oracle is a ceiling of the generator alone, the pixels say whether the findings in
    the pixels reach the reports)."""
    m = "chexpert_f1_5_micro"
    lines = []
    for a in sorted({a for a, _ in controls}):
        bits = []
        for (a2, b), cmp in sorted(controls.items()):
            c = cmp.get(m) if a2 == a else None
            if c and c.get("ci") and c["ci"][0] is not None:
                word = "ahead of" if c["ci"][0] > 0 else "behind" if c["ci"][1] < 0 else "level with"
                bits.append(f"{word} {html.escape(_display(b))} ({c['diff']:+.3f}, CI [{c['ci'][0]:+.3f}, "
                            f"{c['ci'][1]:+.3f}])")
        a_val = next((c[m]["a"] for (a2, _), c in controls.items() if a2 == a and c.get(m)), None)
        if bits:
            lines.append(f"<li><b>{html.escape(_display(a))}</b>: CheXpert-5 micro F1 {_fmt(a_val)}; "
                         + "; ".join(bits) + ".</li>")
    if not lines:
        return ""
    return ("<p><b>Controls</b> (diagnostics, not results: the oracle's image tokens are the film's own labels, "
            "the pixel control's are its raw pixels):</p><ul>" + "".join(lines) + "</ul>")


def _verdict(cmps: dict, controls: dict | None = None) -> str:
    if not cmps:
        return ""
    short = shortfalls(cmps)
    ahead = [(b, m) for b, c in cmps.items() for m in VERDICT_METRICS
             if c.get(m) and c[m]["diff"] > 0 and (c[m].get("ci") or [None])[0] is not None and c[m]["ci"][0] > 0]
    items = []
    for s in short:
        how = "behind, and the paired CI excludes 0" if s["significant"] else "behind, within the CI (not significant)"
        items.append(f"<li>{s['metric']}: {s['a']:.3f} vs <b>{html.escape(s['baseline'])}</b> {s['b']:.3f} "
                     f"({s['diff']:+.3f}, CI [{s['ci'][0]:+.3f}, {s['ci'][1]:+.3f}]) — {how}.</li>")
    n_pairs = len(cmps) * len(VERDICT_METRICS)
    not_ahead = n_pairs - len(short) - len(ahead)  # ties, or ahead within the CI
    tie_note = (f"<p>On {not_ahead} more it is not ahead either: tied, or ahead by less than the paired CI.</p>"
                if not_ahead else "")
    if not short and not not_ahead:
        text = (f"<p>The trained generator is ahead of every baseline on CheXpert-14 and CheXpert-5 micro F1 "
                f"({len(ahead)} of {n_pairs} differences with a CI excluding 0).</p>")
    elif not short:
        text = ("<p><b>Where the trained model falls short:</b> it is behind no baseline on CheXpert-14 and "
                "CheXpert-5 micro F1, but it is not ahead of every one.</p>")
    else:
        text = (f"<p><b>Where the trained model falls short:</b> it is behind a baseline on {len(short)} of "
                f"{n_pairs} headline comparisons (CheXpert-14 and CheXpert-5 micro F1 against each baseline):</p>"
                f"<ul>{''.join(items)}</ul>")
    return _sec("verdict", "Verdict", text + tie_note + _controls_text(controls or {}), cls="verdict")


def _section_probe(found, run: Path, assets: Path) -> str:
    from radgen.probes import HEADLINE

    parts = []
    for p in found["probe"]:
        d = read_json(p)
        rows = probe_rows(d)
        if not rows:  # not a `radgen probe` result (or an older format): nothing to show
            continue
        present = [h for h in HEADLINE if any((r["probe"], r["target"], r["metric"]) == h[:3] for r in rows)]
        by = {(r["model"], r["probe"], r["target"], r["metric"]): r for r in rows}
        models = list(dict.fromkeys(r["model"] for r in rows))
        table_rows = []
        for m in models:
            cells = []
            for h in present:
                r = by.get((m, *h[:3]))
                cells.append("—" if not r or r.get("value") is None else
                             _ci_text(r["value"], [r.get("low"), r.get("high")] if r.get("low") is not None else None))
            table_rows.append([html.escape(m)] + cells)
        body = _table(["model"] + [h[3] for h in present], table_rows, "probe")
        gaps = [s for s in d.get("summary", []) if s.get("n_random") and s.get("value") is not None
                and s["target"] in {h[1] for h in present} and (s["probe"], s["target"], s["metric"])
                in {h[:3] for h in present}]
        if gaps:
            paired = any(s.get("paired_low") is not None for s in gaps)

            def verdict(s: dict) -> str:
                if s.get("paired_low") is None:  # an older probe.json: the rough screen only
                    return "yes" if s["beyond_ci"] else "no"
                pci = f"[{s['paired_low']:+.3f}, {s['paired_high']:+.3f}]"
                word = "beyond" if s["beyond_paired_ci"] else ("behind" if s["behind_paired_ci"] else "level")
                return f"{word} {pci}"

            def cls(s: dict) -> str:
                if s.get("paired_low") is not None:
                    return "ahead" if s["beyond_paired_ci"] else ("behind" if s["behind_paired_ci"] else "")
                return "ahead" if s["beyond_ci"] else ("behind" if (s["better_by"] or 0) < 0 else "")

            grow = [[f"{s['probe']} {s['target']} {s['metric']}", _fmt(s["value"]), _fmt(s["random_mean"]),
                     f"<span class='{cls(s)}'>{s['better_by']:+.3f}</span>", verdict(s), _fmt(s["pixels"])]
                    for s in gaps]
            body += "<h3>pretrained vs random init</h3>" + _table(
                ["probe / target / metric", "pretrained", "random (mean)", "better by",
                 "paired 95% CI of the gap" if paired else "beyond CI", "raw pixels"], grow, "probe")
            pix_behind = [s for s in gaps if s["pixels"] is not None and s["metric"] != "mae" and s["value"] < s["pixels"]]
            notes = []
            if paired:  # behind = the whole paired interval on the wrong side of 0
                behind = [s for s in gaps if s.get("behind_paired_ci")]
                if behind:
                    notes.append(f"the pretrained encoder is behind random init beyond the paired 95% CI on "
                                 f"{len(behind)} of {len(gaps)} headline numbers")
            elif behind := [s for s in gaps if (s["better_by"] or 0) < 0]:
                notes.append(f"the pretrained encoder is behind random init on {len(behind)} of {len(gaps)} headline numbers")
            if pix_behind:
                notes.append(f"behind raw pixels on {len(pix_behind)}")
            if notes:
                body += f"<p class=shortfall>Plainly: {'; '.join(notes)}.</p>"
        imgs = []
        for png in ("logistic_auroc.png", "segment_dice.png", "age.png", "segment_examples.png", "knn_auroc.png"):
            src = p.parent / png
            if src.is_file():
                dest = assets / f"probe_{len(parts)}_{png}"
                shutil.copyfile(src, dest)
                imgs.append(f"<img src='{_rel(dest, run)}' alt='{png}'>")
        body += f"<div class=figs>{''.join(imgs)}</div>"
        md = p.with_name("probe.md")
        link = f" (<a href='{_rel(md, run)}'>every number</a>)" if md.is_file() else ""
        parts.append(f"<h3>{html.escape(_rel(p.parent, run))}{link}</h3>{body}")
    if not parts:
        return ""
    intro = ("<p class=note>Frozen features, test split, 95% bootstrap CIs. Logistic = L2 logistic regression "
             "(C chosen on validation), macro AUROC over findings; kNN = cosine, k=20; Dice = 1×1 head on patch "
             "tokens; age = ridge regression (MAE in years, lower is better).</p>")
    return _sec("probe", "Encoder probes: pretrained vs random init vs raw pixels", intro + "".join(parts))


def _start_share_note(share: float | None) -> str:
    """What a probe of this teacher reads: how much of it is still its starting weights (logs since 2026-12-06)."""
    if share is None:
        return ""
    return (f" The EMA teacher still gives its starting weights {share:.0%}; a probe of the teacher (the default) "
            "reads at least that much init, so a high share compares the init with itself as much as the training.")


def _section_curves(found, run: Path, assets: Path) -> str:
    figs = []
    for i, p in enumerate(found["pretrain_log"]):
        log = read_csv(p)
        if not log:
            continue
        dest = plot_pretrain(log, assets / f"pretrain_{i}.png", f"encoder pretraining ({_rel(p.parent, run)})")
        last = log[-1]
        flagged = sum(1 for r in log if r.get("collapse") not in (None, "", "ok"))
        figs.append(f"<img src='{_rel(dest, run)}' alt='pretraining curves'>"
                    f"<p class=note>{len(log)} logged steps up to step {last.get('step')}; last loss "
                    f"{_fmt(as_number(last.get('loss')))}, teacher entropy {_fmt(as_number(last.get('teacher_entropy')))}, "
                    f"CLS std {_fmt(as_number(last.get('cls_std')), 4)}; collapse monitor at the end: "
                    f"<b>{html.escape(str(last.get('collapse')))}</b> ({flagged} logged steps flagged)."
                    + _start_share_note(as_number(last.get("teacher_start_share"))) + "</p>")
    for i, p in enumerate(found["train_log"]):
        log = read_csv(p)
        if not log:
            continue
        dest = plot_train(log, assets / f"train_{i}.png", f"report-generator training ({_rel(p.parent, run)})")
        val = [r for r in log if as_number(r.get("val_loss")) is not None]
        figs.append(f"<img src='{_rel(dest, run)}' alt='training curves'>"
                    f"<p class=note>last train loss {_fmt(as_number(log[-1].get('loss')))}"
                    + (f", last validation loss {_fmt(as_number(val[-1]['val_loss']))}" if val else "") + ".</p>")
    if not figs:
        return ""
    return _sec("curves", "Training curves", "".join(f"<div class=fig>{f}</div>" for f in figs))


def _section_examples(found, run: Path, assets: Path, k: int) -> str:
    from eval.chexpert.labeler import label_report

    if not found["generated"] or k <= 0:
        return ""
    gen_file = found["generated"][0]
    nn = {}
    for p in run.rglob("nearest_neighbour.jsonl"):
        for line in p.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
                nn[r["id"]] = r.get("findings")
            except (ValueError, KeyError):
                pass
        break
    cards = []
    n_err = 0
    for line in gen_file.read_text(encoding="utf-8").splitlines():
        if len(cards) >= k:
            break
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if r.get("status") != "ok":
            n_err += 1
            continue
        ref, gen = r.get("reference") or "", r.get("findings") or ""
        src = find_image(str(r.get("image", "")), gen_file, run)
        dest = assets / f"example_{len(cards)}.png"
        if src is None or not thumbnail(src, dest):
            continue
        ref_h, gen_h = word_diff_html(ref, gen)

        def pos(text):
            return sorted(o for o, v in label_report(text).items() if v == 1)

        pr, pg = pos(ref), pos(gen)
        lab = (f"<p class=labels>CheXpert (rules labeler) — reference: {html.escape(', '.join(pr) or 'none')}; "
               f"generated: {html.escape(', '.join(pg) or 'none')}"
               + (" ✓" if pr == pg else " ✗") + "</p>")
        nn_h = (f"<p><span class=tag>nearest neighbour</span> {html.escape(nn[r['id']])}</p>"
                if nn.get(r["id"]) else "")
        cards.append(f"<div class=card><img src='{_rel(dest, run)}' alt='{html.escape(str(r['id']))}'>"
                     f"<div><p class=id>{html.escape(str(r['id']))}</p>"
                     f"<p><span class=tag>reference</span> {ref_h}</p>"
                     f"<p><span class=tag>generated</span> {gen_h}</p>{nn_h}{lab}</div></div>")
    if not cards:
        return ""
    intro = (f"<p class=note>The first {len(cards)} test images of <code>{html.escape(_rel(gen_file, run))}</code>. "
             "<del>struck</del> = in the reference, missed by the generator; <ins>marked</ins> = written by the "
             "generator, not in the reference.</p>")
    return _sec("examples", "Examples: reference vs generated findings", intro + f"<div class=grid>{''.join(cards)}</div>")


def _section_stages(found, run: Path) -> str:
    stages = stage_markers(found)
    if not stages:
        return ""
    rows = [[html.escape(d["stage"]), f"{d.get('seconds', 0):.0f} s", html.escape(str(d.get("finished", "")))]
            for d in stages]
    total = sum(d.get("seconds", 0) for d in stages)
    return _sec("stages", "Stages", _table(["stage", "time (last run)", "finished"], rows, "small")
                + f"<p class=note>total {total / 60:.1f} min of stage time.</p>")


def _sec(anchor: str, title: str, body: str, cls: str = "") -> str:
    return f"<section id='{anchor}' class='{cls}'><h2>{title}</h2>{body}</section>"


CSS = """
body{font-family:system-ui,-apple-system,'DejaVu Sans',sans-serif;margin:0 auto;max-width:1200px;padding:16px 24px;
color:#1b1b1b;line-height:1.4}
h1{font-size:1.6em;margin-bottom:0} h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;margin:8px 0;font-size:0.88em} th,td{border:1px solid #ddd;padding:3px 7px;text-align:right}
th:first-child,td:first-child{text-align:left} thead{background:#f3f3f3}
.ci{color:#777;font-size:0.85em} .note{color:#555;font-size:0.88em} .ahead{color:#137a2d;font-weight:600}
.behind{color:#b3261e;font-weight:600} .shortfall{color:#b3261e} .verdict{background:#fff7e6;padding:2px 14px;
border-left:4px solid #e0a800} nav a{margin-right:12px} .figs img,.fig img{max-width:100%;margin:6px 0}
.figs{display:flex;flex-wrap:wrap;gap:8px;align-items:flex-start} .figs img{max-width:32%;height:auto}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:12px}
.card{display:flex;gap:10px;border:1px solid #ddd;border-radius:6px;padding:8px;font-size:0.86em}
.card img{width:190px;height:190px;object-fit:contain;background:#000} .card p{margin:3px 0}
.id{font-family:monospace;color:#666} .tag{display:inline-block;min-width:82px;color:#555;font-weight:600}
del{background:#fde2e1;color:#8a1c14} ins{background:#dff3e2;color:#0d5c22;text-decoration:none}
.labels{color:#444} code{background:#f3f3f3;padding:0 3px} .limits li{margin:3px 0}
"""

LIMITS = """<ul class=limits>
<li>This run trains and tests on <b>synthetic phantoms</b> (radgen's built-in generator), not on patients. It shows
that the system runs end to end and how its parts compare; <b>it is not a clinical model</b> and its numbers say
nothing about real radiographs.</li>
<li>The encoder and the generator are tiny and trained for minutes on a CPU; the published RAD-DINO encoder
(ViT-B/14, 518 px) and a 7B LLM are set up in the README.</li>
<li>Offline, CheXpert F1 uses radgen's rules labeler unless CheXbert weights are given; RadGraph F1 and
RadCliQ need local model weights and are left out without them. <code>radgraph_proxy_f1</code> is an
approximation and is named as one.</li>
<li>The demo's generator reads its encoder's patch grid average-pooled to 4 x 4 tokens
(<code>encoder.pool=4</code>, so it trains in minutes on a CPU), and its findings line is stated by a findings
head (a linear reader of those tokens, <code>tasks.findings_head</code>). transformers' LLaVA has neither step,
so <code>radgen export</code> refuses this run; a generator trained with <code>--config cpu_smollm2</code> and no
<code>encoder.pool</code> (every patch token) exports to a plain LLaVA folder.</li>
</ul>"""


def build_page(run: str | os.PathLike, examples: int = 8, title: str | None = None) -> Path:
    """Write ``run/index.html`` and ``run/page/*.png`` from the job outputs found in ``run``."""
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: no such run folder")
    assets = run / PAGE_DIR
    assets.mkdir(exist_ok=True)
    for old in assets.glob("*.png"):  # drawn afresh: nothing stale from an earlier build
        old.unlink()
    found = find_outputs(run)
    metrics_html, systems = _section_metrics(found, run)
    cmp_html, cmps, control_cmps = _section_comparisons(found, run)
    # the examples right after the headline numbers: what a reader wants to look at first
    sections = [_verdict(cmps, control_cmps), metrics_html, _section_per_finding(systems, run),
                _section_examples(found, run, assets, examples), cmp_html,
                _section_probe(found, run, assets), _section_curves(found, run, assets), _section_stages(found, run)]
    sections = [s for s in sections if s]
    if not sections:
        raise FileNotFoundError(f"{run}: no job outputs found (metrics.json, probe.json, log.csv, generated.jsonl)")
    import importlib.metadata as md

    try:
        version = md.version("radgen")
    except md.PackageNotFoundError:
        version = "?"
    links = [f"<a href='#{a}'>{t}</a>" for a, t in (
        ("verdict", "verdict"), ("metrics", "metrics"), ("per_finding", "per finding"), ("examples", "examples"),
        ("comparisons", "comparisons"),
        ("probe", "probes"), ("curves", "training curves"), ("stages", "stages"), ("limits", "limitations"))
        if f"id='{a}'" in "".join(sections) or a == "limits"]
    cfg_link = "".join(f" · <a href='{n}'>{n}</a>" for n in ("demo.yaml",) if (run / n).is_file())
    doc = (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title or run.name)} — radgen"
           f"</title><style>{CSS}</style></head><body><h1>{html.escape(title or 'radgen results: ' + run.name)}</h1>"
           f"<p class=note>radgen {version} · built {time.strftime('%Y-%m-%d %H:%M')} from "
           f"<code>{html.escape(str(run.resolve()))}</code>{cfg_link}</p><nav>{''.join(links)}</nav>"
           + "".join(sections) + _sec("limits", "Limitations", LIMITS) + "</body></html>\n")
    page = run / "index.html"
    atomic_write_text(page, doc)
    atomic_write_text(run / "summary.md", summary_markdown(found, systems, cmps))
    return page


SUMMARY_METRICS = (("chexpert_f1_14_micro", "CheXpert-14 micro F1"), ("chexpert_f1_5_micro", "CheXpert-5 micro F1"),
                   ("bleu_4", "BLEU-4"), ("rouge_l", "ROUGE-L"), ("radgraph_proxy_partial_f1", "RadGraph proxy F1"))


def summary_markdown(found: dict, systems: dict, cmps: dict) -> str:
    """The page's headline numbers as Markdown (``summary.md``: for READMEs and notes)."""
    def ci(v, c):
        return "—" if v is None else (f"{v:.3f}" if not c or c[0] is None else f"{v:.3f} [{c[0]:.3f}, {c[1]:.3f}]")

    out = []
    if systems:
        order = system_order(systems)
        keys = [(k, t) for k, t in SUMMARY_METRICS if any(k in systems[s][1]["scores"] for s in order)]
        out += ["| system | n | " + " | ".join(t for _, t in keys) + " |", "|---|---:|" + "---|" * len(keys)]
        for s in order:
            d = systems[s][1]
            out.append(f"| {s} | {d.get('n_pairs')} | " + " | ".join(
                ci(d["scores"].get(k), (d.get("ci") or {}).get(k)) for k, _ in keys) + " |")
        out.append("")
        pf_order, pf_rows = _per_finding_cells(systems)
        if pf_order:
            out += ["Per finding: precision / recall (films named by the system); false alarm = share of "
                    "No-Finding reference films whose report names a finding.", "",
                    "| finding | " + " | ".join(pf_order) + " |", "|---|" + "---|" * len(pf_order)]
            for label, note, cells in pf_rows:
                out.append(f"| {label}{f' ({note})' if note else ''} | "
                           + " | ".join(v + (f" ({a})" if a else "") for v, a in cells) + " |")
            out.append("")
    if cmps:
        keys = [(k, t) for k, t in SUMMARY_METRICS if any(k in c for c in cmps.values())]
        out += ["| generator − baseline | " + " | ".join(t for _, t in keys) + " |", "|---|" + "---|" * len(keys)]
        for b, c in cmps.items():
            out.append(f"| {b} | " + " | ".join(
                "—" if k not in c else f"{c[k]['diff']:+.3f} [{c[k]['ci'][0]:+.3f}, {c[k]['ci'][1]:+.3f}]"
                for k, _ in keys) + " |")
        out.append("")
    from radgen.probes import headline

    for p in found["probe"]:
        rows = probe_rows(read_json(p))
        if rows:
            out += [headline(rows), ""]
    stages = stage_markers(found)
    if stages:
        out += ["| stage | seconds |", "|---|---:|"] + [f"| {d['stage']} | {d.get('seconds', 0):.0f} |" for d in stages]
        out.append(f"| total | {sum(d.get('seconds', 0) for d in stages):.0f} |")
    return "\n".join(out) + "\n"
