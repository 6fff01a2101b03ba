"""Run order and the wall-time budget: the tier-1 layer cases, then the whole-model cases, then
the coverage cases; what does not fit in the budget is listed as not run. Progress on the log."""
from __future__ import annotations

import time
from typing import List

import torch

from .cases import Case, ModelSpec
from .instruments import Timer
from .report import auto_cell, cell
from .runners import run_layer_case, run_model_case


def _model_need_s(spec: ModelSpec) -> int:
    """Seconds of budget a whole-model case needs to be started."""
    return 180 if spec.mode == "paper" else 90


def run_plan(cases: List[Case], specs: List[ModelSpec], args, dev: torch.device, timer: Timer, bw: float, log,
             t_start: float, budget_min: float, smoke: bool):
    """(rows, skipped [(key, why)]) of the whole plan."""
    deadline = t_start + budget_min * 60 if budget_min else None
    reserve = sum(_model_need_s(s) for s in specs)
    rows: List[dict] = []
    skipped: List[tuple] = []

    def left() -> float:
        return float("inf") if deadline is None else deadline - time.time()

    def run_layers(batch, reserve_s, total_offset):
        for i, case in enumerate(batch):
            if left() < reserve_s:
                skipped.append((case.key, f"time budget ({budget_min:g} min; raise --max-minutes)"))
                continue
            t0 = time.time()
            row = run_layer_case(case, args, dev, timer, bw, log)
            rows.append(row)
            res, m = row["results"], row["metrics"]
            fr = res.get("fused", {})
            head = f"[{total_offset + i + 1:>3}/{len(cases)} {time.time() - t_start:6.0f}s] {case.key}:"
            if fr.get("status") == "ok":
                routes = "".join(f"  {name} x{cell(m.get(key), '{:.2f}')}" for name, key in (
                    ("composed", "ratio_floor_composed"), ("auto", "ratio_floor_auto")) if key in m)
                if routes and auto_cell(res) != "-":
                    routes += f" ({auto_cell(res)})"
                log(f"{head} fused {fr['ms']:.4g} ms  x{cell(m.get('ratio_floor'), '{:.2f}')} floor{routes}  "
                    f"{cell(m.get('x_peft_dora'), '{:.2f}')}x PEFT DoRA  "
                    f"{cell(m.get('x_peft_lora'), '{:.2f}')}x PEFT LoRA"
                    f"  ({time.time() - t0:.1f}s)")
            else:
                log(f"{head} fused {fr.get('status', 'not run')}  ({time.time() - t0:.1f}s)")
            others = [f"{k}: {v['status']}" for k, v in res.items() if v.get("status") not in ("ok", "derived")
                      and k != "fused"]
            if others:
                log("      " + "; ".join(others))

    log("")
    log("== layer cases" + ("" if not smoke else " (one pass of the harness; CPU timings are meaningless)"))
    first = [c for c in cases if c.tier <= 1]
    rest = [c for c in cases if c.tier > 1]
    run_layers(first, reserve, 0)
    if specs:
        log("")
        log("== whole-model cases")
    for spec in specs:
        if left() < _model_need_s(spec) and not smoke:
            skipped.append((spec.key,
                            f"time budget ({budget_min:g} min; raise --max-minutes or run --modes {spec.mode})"))
            log(f"  {spec.key}: skipped (time budget)")
            continue
        t0 = time.time()
        row = run_model_case(spec, args, dev, log, left)
        rows.append(row)
        log(f"  {spec.key}: done in {time.time() - t0:.0f}s")
    run_layers(rest, 0, len(first))
    if smoke:
        log("  paper protocol: skipped (an 8B model at r=384 needs a GPU)")
    return rows, skipped
