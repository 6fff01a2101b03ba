"""The project's targets as data (CHECKS), and the verdict of one target on one row's metrics."""
from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class Check:
    id: str
    text: str
    modes: tuple
    metric: str
    op: str  # "<=" or ">="
    target: float
    min_M: int = 0
    max_M: int = 1 << 62
    M_in: tuple = ()
    max_r: int = 1 << 30
    min_r: int = 0
    alt: Optional[tuple] = None  # (metric, op, target, unit): the check is met if either holds
    unit: str = "x"
    counts_bytes: bool = False  # a count of bytes / tensors, not a time: a CPU smoke run measures it too
    quant: bool = False  # a QDoRA check (4-bit base weight): applies to QDoRA cases only, and they only to it


CHECKS = [
    Check("T1", "training fwd+bwd <= 1.15x the floor (M>=4096, r<=64)", ("train0", "train05"),
          "ratio_floor", "<=", 1.15, min_M=4096, max_r=64),
    Check("T2", "training >= 2.5x faster than PEFT DoRA, dropout 0.05 (M>=4096, r<=64)", ("train05",),
          "x_peft_dora", ">=", 2.5, min_M=4096, max_r=64),
    Check("T3", "training >= 1.5x faster than PEFT DoRA, dropout 0 (M>=4096, r<=64)", ("train0",),
          "x_peft_dora", ">=", 1.5, min_M=4096, max_r=64),
    Check("T4", "training no slower than PEFT LoRA (M>=4096, r<=64)", ("train0", "train05"),
          "x_peft_lora", ">=", 1.0, min_M=4096, max_r=64),
    Check("T5", "inference unmerged <= 1.05x F.linear (M>=512)", ("infer",), "ratio_floor", "<=", 1.05, min_M=512),
    Check("T6", "inference unmerged <= 1.5x F.linear (M in {1,16})", ("infer",), "ratio_floor", "<=", 1.5,
          M_in=(1, 16)),
    Check("T7", "merged equal to F.linear (<= 1.02x: timing noise)", ("merged",), "ratio_floor", "<=", 1.02),
    Check("T8", "norm reads W at >= 80% of measured bandwidth, or costs < 5% of a forward", ("norm",),
          "bw_frac", ">=", 0.80, alt=("norm_frac_fwd", "<=", 0.05, " of a forward"), unit=" of BW"),
    Check("T9", "bytes saved for backward <= PEFT LoRA's + one [M, out] tensor + the [out] fp32 norm",
          ("train0", "train05"),
          "saved_excess_MN", "<=", 1.0, unit=" [M,out] tensors over LoRA", counts_bytes=True),
    Check("T10", "training peak memory >= 40% below PEFT DoRA's", ("train0", "train05"),
          "peak_vs_peft_dora", "<=", 0.60, unit="x PEFT DoRA's peak"),
    Check("T11", "r=384: no dense [out, in] temporary", ("train0", "train05", "infer", "norm"),
          "dense_tmp", "<=", 0, min_r=256, unit=" temporaries", counts_bytes=True),
    Check("Q1", "QDoRA: the norm from the packed 4-bit weight makes no dense [out, in] temporary", ("norm",),
          "dense_tmp", "<=", 0, unit=" temporaries", counts_bytes=True, quant=True),
    Check("T12", "whole model: step >= 1.6x faster than PEFT DoRA", ("model",), "x_peft_dora", ">=", 1.6),
    Check("T13", "whole model: step within 1.1x of PEFT LoRA", ("model",), "ratio_peft_lora", "<=", 1.1),
    Check("T14", "Scaling-DoRA protocol: clearly above the paper's 1.5-1.9x over PEFT DoRA (>= 1.9x)",
          ("paper",), "x_peft_dora", ">=", 1.9),
]


CHECK_BY_ID = {c.id: c for c in CHECKS}


def check_applies(chk: Check, mode: str, M: int, r: int, quant: str = "") -> bool:
    if mode not in chk.modes or chk.quant != bool(quant):
        return False
    if mode in ("model", "paper", "norm"):
        return r >= chk.min_r and r <= chk.max_r
    if chk.M_in and M not in chk.M_in:
        return False
    return chk.min_M <= M <= chk.max_M and chk.min_r <= r <= chk.max_r


def judged(check_id: str, smoke: bool) -> bool:
    """Whether this run can judge the target: a CPU smoke run only judges byte counts."""
    return not smoke or CHECK_BY_ID[check_id].counts_bytes


def _holds(value: float, op: str, target: float) -> bool:
    return value <= target if op == "<=" else value >= target


def evaluate_check(chk: Check, metrics: dict) -> dict:
    """{'id', 'met': True/False/None, 'value', 'text'}: None when a needed figure is missing."""
    v = metrics.get(chk.metric)
    alt_v = metrics.get(chk.alt[0]) if chk.alt else None
    if v is None and alt_v is None:
        why = metrics.get("_missing", {}).get(chk.metric, "figure missing")
        return {"id": chk.id, "met": None, "value": None, "verdict": f"{chk.id} n/a ({why})"}
    met = v is not None and _holds(v, chk.op, chk.target)
    alt_met = alt_v is not None and _holds(alt_v, chk.alt[1], chk.alt[2]) if chk.alt else False
    parts = []
    if v is not None:
        parts.append(_margin_text(v, chk.op, chk.target, chk.unit))
    if chk.alt and alt_v is not None:
        parts.append("or " + _margin_text(alt_v, chk.alt[1], chk.alt[2], chk.alt[3]))
    ok = met or alt_met
    return {"id": chk.id, "met": ok, "value": v, "alt_value": alt_v,
            "verdict": f"{chk.id} {'met' if ok else 'MISSED'} " + " ".join(parts)}


def _margin_text(v: float, op: str, t: float, unit: str = "x") -> str:
    """'1.2x (<=1.15, over by 4.3%)': the value, the target and, when missed, by how much."""
    ok = _holds(v, op, t)
    if t == 0:
        return f"{v:g}{unit} ({op}0)"
    if op == "<=":
        rel = (v - t) / abs(t)
        return f"{v:.3g}{unit} ({op}{t:g}" + ("" if ok else f", over by {100 * rel:.1f}%") + ")"
    rel = (t - v) / abs(t)
    return f"{v:.3g}{unit} ({op}{t:g}" + ("" if ok else f", short by {100 * rel:.1f}%") + ")"
