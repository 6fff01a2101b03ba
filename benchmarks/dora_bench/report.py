"""Reports: the markdown report, the one-line-per-case stdout summary, the speedup chart (PNG),
and the files a run writes (JSON, markdown, chart)."""
from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import List, Optional

from .cases import Case
from .competitors import COMPETITORS
from .metrics import ms_of
from .provenance import slug
from .targets import CHECKS, judged


def cell(v, fmt="{:.3g}", none="-") -> str:
    """v formatted, or '-' for a missing figure."""
    if v is None:
        return none
    return fmt.format(v)


def _x(v) -> str:
    return cell(v, "{:.2f}x")


def _md_row(cells: List[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _header(*cells: str) -> List[str]:
    """A markdown table's header and separator lines."""
    return [_md_row(list(cells)), "|" + "---|" * len(cells)]


def _fused_ms_cell(fr: dict) -> str:
    """The fused time, or why there is none (its status)."""
    return cell(fr.get("ms")) if fr.get("status") == "ok" else fr.get("status", "-")


def auto_cell(res: dict) -> str:
    """The routes fused_auto took for a case, "forward / backward" (inference: the forward's), or '-'."""
    chose = res.get("fused_auto", {}).get("auto_route")
    return " / ".join(chose.values()) if chose else "-"


def _verdicts(row: dict, smoke: bool) -> str:
    if not row.get("checks"):
        return ""
    verdicts = [c["verdict"] for c in row["checks"] if judged(c["id"], smoke)]
    if smoke and len(verdicts) < len(row["checks"]):
        verdicts.append("timings: no verdicts on CPU")
    return "; ".join(verdicts)


def markdown_report(meta: dict, rows: List[dict], smoke: bool) -> str:
    L = []
    L.append(f"# fused_dora benchmark — {meta['device']} — {meta['date']}")
    L.append("")
    L.append(f"- command: `{meta['command']}`")
    L.append(f"- torch {meta['versions'].get('torch')}, triton {meta['versions'].get('triton')}, "
             f"peft {meta['versions'].get('peft')}, transformers {meta['versions'].get('transformers')}, "
             f"fused_dora {meta['versions'].get('fused_dora')} (git {meta.get('git', '?')})")
    L.append(f"- measured memory bandwidth: {meta['bandwidth_gbs']:.0f} GB/s; timing: {meta['timing']}")
    L.append(f"- wall time {meta['wall_s']:.0f} s; budget {meta['budget']}")
    if smoke:
        L.append("- **CPU smoke run: the Triton kernels ran under the interpreter; no figure below is a timing "
                 "worth reading. Timings need a GPU.**")
    L.append("")
    layer = [r for r in rows if r["case"].get("mode") in ("infer", "merged", "train0", "train05")]
    norm = [r for r in rows if r["case"].get("mode") == "norm"]
    models = [r for r in rows if r["case"].get("mode") in ("model", "paper")]
    if layer:
        L.append("## Per layer: fused_dora (Triton) against the others")
        L.append("")
        L.append("Ratios are times. `fused/floor`: GPU time (CUDA events, L2 flushed) over F.linear's; "
                 "`wall fused/floor`: "
                 "the same from back-to-back calls on the host clock (higher than `fused/floor` where the path is "
                 "launch-bound). `composed/floor`, `auto/floor`: the same ratio for fused_dora's other routes, "
                 "`route=\"composed\"` (cuBLAS for the two big GEMMs, light Triton passes around them) and "
                 "`route=\"auto\"` (composed where it timed at least 5% faster on first use); `auto chose`: the "
                 "routes it took, forward / backward (`fused (untimed)`: auto does not time there, e.g. fp16 "
                 "activations). Every other figure and the targets are the fused route's. `xPEFT` = PEFT "
                 "time / fused time (higher is better; inference: the faster of PEFT DoRA with and without "
                 "DoraCaching). peak = extra memory of one call; saved = bytes autograd keeps for "
                 "backward (unique storages other than parameters and state the layer keeps between steps, "
                 "such as fused_dora's cached norm; the input included when saved). Byte counts (saved, dense "
                 "[N,K] temporaries) do not depend on the device: a CPU smoke run measures them too, fp16 "
                 "standing for bf16.")
        L.append("")
        L += _header("case", "fused ms", "floor ms", "fused/floor", "wall fused/floor", "composed/floor", "auto/floor",
                     "auto chose", "xPEFT DoRA", "xPEFT LoRA", "xeager", "fused TFLOP/s", "peak MiB fused / PEFT DoRA",
                     "saved MiB fused / LoRA / DoRA", "rel err", "targets")
        for row in layer:
            res, m = row["results"], row["metrics"]
            fr = res.get("fused", {})
            fused_ms = _fused_ms_cell(fr)
            L.append(_md_row([
                row["key"], fused_ms, cell(ms_of(res, "floor")), _x(m.get("ratio_floor")),
                _x(m.get("wall_ratio_floor")), _x(m.get("ratio_floor_composed")), _x(m.get("ratio_floor_auto")),
                auto_cell(res), _x(m.get("x_peft_dora")), _x(m.get("x_peft_lora")), _x(m.get("x_eager")),
                cell(m.get("tflops"), "{:.0f}"),
                f"{cell(fr.get('peak_mib'), '{:.0f}')} / {cell(res.get('peft_dora', {}).get('peak_mib'), '{:.0f}')}",
                f"{cell(fr.get('saved_mib'), '{:.3g}')} / "
                f"{cell(res.get('peft_lora', {}).get('saved_mib'), '{:.3g}')} / "
                f"{cell(res.get('peft_dora', {}).get('saved_mib'), '{:.3g}')}",
                cell(fr.get("err"), "{:.1e}"), _verdicts(row, smoke)]))
        L.append("")
    if norm:
        L.append("## The norm ||W + s*B@A|| (one pass over W)")
        L.append("")
        L += _header("case", "fused ms", "ideal ms (W at measured BW)", "fused GB/s (% of BW)", "% of a forward",
                     "PEFT DoRA norm ms", "eager dense ms", "reference ms", "peak MiB fused / PEFT", "targets")
        for row in norm:
            res, m = row["results"], row["metrics"]
            fr = res.get("fused", {})
            fused_ms = _fused_ms_cell(fr)
            gbs = f"{cell(m.get('norm_gbs'), '{:.0f}')} ({cell(m.get('bw_frac') and 100 * m['bw_frac'], '{:.0f}')}%)"
            L.append(_md_row([
                row["key"], fused_ms, cell(ms_of(res, "floor")), gbs,
                cell(m.get("norm_frac_fwd") and 100 * m["norm_frac_fwd"], "{:.1f}%"),
                cell(ms_of(res, "peft_dora")), cell(ms_of(res, "eager_dense")), cell(ms_of(res, "ref_eager")),
                f"{cell(fr.get('peak_mib'), '{:.0f}')} / {cell(res.get('peft_dora', {}).get('peak_mib'), '{:.0f}')}",
                _verdicts(row, smoke)]))
        L.append("")
    if models:
        L.append("## Whole model")
        L.append("")
        L += _header("case", "competitor", "step ms", "tokens/s", "peak GiB", "xPEFT DoRA",
                     "time / PEFT LoRA", "status")
        for row in models:
            res = row["results"]
            pd, pl = ms_of(res, "peft_dora"), ms_of(res, "peft_lora")
            for name, r in res.items():
                t = r.get("ms")
                L.append(_md_row([
                    row["key"], name, cell(t, "{:.1f}"), cell(r.get("tokens_per_s"), "{:.0f}"),
                    cell(r.get("peak_gib"), "{:.2f}"),
                    _x(pd / t if (pd and t) else None), _x(t / pl if (pl and t) else None), r.get("status", "")]))
            L.append(f"| {row['key']} | **targets** | | | | | | {_verdicts(row, smoke)} |")
        L.append("")
    L.append("## Targets")
    L.append("")
    L += _header("id", "target", "met", "missed", "n/a", "worst case")
    for chk in CHECKS:
        got = [(row["key"], c) for row in rows for c in row.get("checks", []) if c["id"] == chk.id]
        met = sum(1 for _, c in got if c["met"] is True)
        missed = [(k, c) for k, c in got if c["met"] is False]
        na = sum(1 for _, c in got if c["met"] is None)
        worst = ""
        if missed:
            key = (lambda kc: -kc[1]["value"]) if chk.op == "<=" else (lambda kc: kc[1]["value"])
            k, c = sorted([kc for kc in missed if kc[1]["value"] is not None], key=key)[0] if any(
                kc[1]["value"] is not None for kc in missed) else missed[0]
            worst = f"{k}: {c['verdict']}"
        if not judged(chk.id, smoke):
            L.append(f"| {chk.id} | {chk.text} | - | - | {len(got)} | smoke run: a timing, no verdict on CPU |")
        else:
            L.append(f"| {chk.id} | {chk.text} | {met} | {len(missed)} | {na} | {worst} |")
    L.append("")
    L.append("## Every competitor")
    L.append("")
    L += _header("case", "competitor", "median ms", "p20-p80 ms", "reps", "wall ms", "x floor", "TFLOP/s", "peak MiB",
                 "saved MiB", "dense [N,K] tmp", "rel err", "status")
    for row in layer + norm:
        c = Case(**row["case"])
        res = row["results"]
        fl = ms_of(res, "floor")
        for name, r in res.items():
            t = r.get("ms")
            tf = c.flops(name) / (t * 1e-3) / 1e12 if (t and c.mode != "norm" and name != "linear_fwd") else None
            L.append(_md_row([
                row["key"], name, cell(t), f"{cell(r.get('p20'))}-{cell(r.get('p80'))}" if "p20" in r else "-",
                cell(r.get("reps"), "{}"), cell(r.get("wall_ms")), _x(t / fl if (t and fl) else None),
                cell(tf, "{:.0f}"), cell(r.get("peak_mib"), "{:.0f}"), cell(r.get("saved_mib"), "{:.4g}"),
                cell(r.get("dense_tmp"), "{}") + (f" ({r['dense_tmp_mib']:.0f} MiB)" if r.get("dense_tmp") else ""),
                cell(r.get("err"), "{:.1e}"), r.get("status", "")]))
    skipped = meta.get("skipped_cases") or []
    if skipped:
        L.append("")
        L.append(f"## Not run ({len(skipped)} cases)")
        L.append("")
        for k, why in skipped:
            L.append(f"- {k}: {why}")
    L.append("")
    L.append("Competitors: " + "; ".join(f"`{k}` {v}" for k, v in COMPETITORS.items()) + ".")
    L.append("")
    return "\n".join(L)


def summary_table(rows: List[dict], smoke: bool) -> str:
    """The compact stdout table: one line per case."""
    L = _header("case", "fused ms", "floor ms", "fused/floor", "composed/floor", "auto/floor (chose)", "xPEFT DoRA",
                "xPEFT LoRA", "xeager", "peak fused/DoRA", "targets")
    for row in rows:
        res, m = row["results"], row["metrics"]
        mode = row["case"]["mode"]
        if mode in ("model", "paper"):
            fv = m.get("fused_variant", "fused_peft")
            fr = res.get(fv, {})
            L.append(_md_row([
                row["key"] + f" [{fv}]", cell(fr.get("ms"), "{:.1f}") if fr.get("ms") else fr.get("status", "-"),
                "-", "-", "-", "-", _x(m.get("x_peft_dora")), _x(m.get("x_peft_lora")), "-",
                _x(m.get("peak_vs_peft_dora")), _verdicts(row, smoke)]))
            continue
        fr = res.get("fused", {})
        pk = None
        if fr.get("peak_mib") is not None and res.get("peft_dora", {}).get("peak_mib"):
            pk = fr["peak_mib"] / res["peft_dora"]["peak_mib"]
        L.append(_md_row([
            row["key"], _fused_ms_cell(fr),
            cell(ms_of(res, "floor")), _x(m.get("ratio_floor")), _x(m.get("ratio_floor_composed")),
            _x(m.get("ratio_floor_auto")) + (f" ({auto_cell(res)})" if auto_cell(res) != "-" else ""),
            _x(m.get("x_peft_dora")), _x(m.get("x_peft_lora")),
            _x(m.get("x_eager")), _x(pk), _verdicts(row, smoke)]))
    return "\n".join(L)


def write_chart(rows: List[dict], path: Path, title: str) -> Optional[str]:
    """The speedups as a bar chart (PNG); returns why not where it cannot draw one."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib, or .[bench]): chart skipped"
    series = [("x_peft_dora", "x PEFT DoRA"), ("x_peft_lora", "x PEFT LoRA"), ("x_eager", "x eager dense"),
              ("floor_speed", "floor time / fused time")]
    labels, values = [], {k: [] for k, _ in series}
    for row in rows:
        m = dict(row["metrics"])
        if m.get("ratio_floor"):
            m["floor_speed"] = 1.0 / m["ratio_floor"]
        if not any(m.get(k) for k, _ in series):
            continue
        labels.append(row["key"])
        for k, _ in series:
            values[k].append(m.get(k) or float("nan"))  # a missing figure draws no bar
    if not labels:
        return "no speedups to chart"
    n = len(labels)
    fig, ax = plt.subplots(figsize=(11, 1.5 + 0.32 * n))
    h = 0.8 / len(series)
    for j, (k, lab) in enumerate(series):
        ys = [i + j * h for i in range(n)]
        ax.barh(ys, values[k], height=h, label=lab)
        for y, v in zip(ys, values[k]):
            if v == v:  # not nan
                ax.text(v, y, f" {v:.2f}", va="center", fontsize=5)
    ax.set_yticks([i + 0.4 - h / 2 for i in range(n)])
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_xlabel("speedup of fused_dora (log scale; > 1 is faster)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def save_reports(out: Path, meta: dict, rows: List[dict], md: str, smoke: bool) -> str:
    """Write <date>_<device>[_smoke].{json,md,png} to out; returns the line that says so."""
    out.mkdir(parents=True, exist_ok=True)
    stem = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M") + "_" + slug(meta["device"])
    if smoke:
        stem += "_smoke"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    (out / f"{stem}.md").write_text(md)
    msg = write_chart(rows, out / f"{stem}.png", f"fused_dora speedups — {meta['device']} — {meta['date']}")
    return f"\nwrote {out / stem}.json, .md" + ("" if msg else ", .png") + (f"  ({msg})" if msg else "")
