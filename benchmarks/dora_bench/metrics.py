"""Figures derived from one row's raw results (ratios, speedups, TFLOP/s, bytes over LoRA), and
the row's verdicts on the targets that apply to it."""
from __future__ import annotations

from typing import Optional

import torch

from .cases import Case
from .targets import CHECKS, check_applies, evaluate_check


def ms_of(results: dict, name: str) -> Optional[float]:
    """A competitor's time in ms, or None where it did not run (or its time is not usable)."""
    r = results.get(name)
    return r.get("ms") if r and r.get("status") in ("ok", "derived") and r.get("ms") else None


def layer_metrics(case: Case, results: dict, bw: float) -> dict:
    m: dict = {}
    missing: dict = {}
    f = ms_of(results, "fused")
    status_f = results.get("fused", {}).get("status", "not run")
    fl = ms_of(results, "floor")
    act_bits = torch.finfo(case.torch_dtypes[0]).bits
    if case.mode == "norm":
        if f:
            # QDoRA: 4-bit codes plus about one byte of absmax per 64 (double quantization)
            W_bytes = case.N * case.K * ((0.5 + 1 / 64) if case.quant else act_bits / 8)
            m["norm_gbs"] = W_bytes / (f * 1e-3) / 1e9
            m["bw_frac"] = W_bytes / (f * 1e-3) / bw
            fwd = ms_of(results, "linear_fwd")
            if fwd:
                m["norm_frac_fwd"] = f / fwd
            pd = ms_of(results, "peft_dora")
            if pd:
                m["x_peft_dora"] = pd / f
            if fl:
                m["ratio_floor"] = f / fl
            if results["fused"].get("dense_tmp") is not None:
                m["dense_tmp"] = results["fused"]["dense_tmp"]
        else:
            missing.update(bw_frac=f"fused {status_f}", norm_frac_fwd=f"fused {status_f}",
                           dense_tmp=f"fused {status_f}")
        m["_missing"] = missing
        return m
    if f and fl:
        m["ratio_floor"] = f / fl
    for other, key in (("fused_composed", "ratio_floor_composed"), ("fused_auto", "ratio_floor_auto")):
        t = ms_of(results, other)  # the other routes, beside the fused one the targets judge
        if t and fl:
            m[key] = t / fl
    pd = [t for t in (ms_of(results, "peft_dora"), ms_of(results, "peft_dora_cached")) if t]
    if f and pd:
        m["x_peft_dora"] = min(pd) / f  # the faster PEFT DoRA variant (cached, in inference)
    for other, key in (("peft_lora", "x_peft_lora"), ("eager_dense", "x_eager"), ("ref_compile", "x_ref_compile")):
        t = ms_of(results, other)
        if f and t:
            m[key] = t / f
    if f:
        m["tflops"] = case.flops("fused") / (f * 1e-3) / 1e12
    fw, flw = results.get("fused", {}).get("wall_ms"), results.get("floor", {}).get("wall_ms")
    if fw and flw:
        m["wall_ratio_floor"] = fw / flw  # host clock, back-to-back: > ratio_floor where launch-bound
    fr, lr, dr = results.get("fused", {}), results.get("peft_lora", {}), results.get("peft_dora", {})
    if fr.get("saved_mib") is not None and lr.get("saved_mib") is not None:
        one_MN = case.M * case.N * act_bits / 8 / 2**20
        norm = case.N * 4 / 2**20  # the [out] fp32 norm each training forward computes and saves
        m["saved_excess_MN"] = (fr["saved_mib"] - lr["saved_mib"] - norm) / one_MN
    if fr.get("peak_mib") is not None and dr.get("peak_mib"):
        m["peak_vs_peft_dora"] = fr["peak_mib"] / dr["peak_mib"]
    if fr.get("dense_tmp") is not None:
        m["dense_tmp"] = fr["dense_tmp"]
    for key, who in (("ratio_floor", ("fused", "floor")), ("x_peft_dora", ("fused", "peft_dora")),
                     ("x_peft_lora", ("fused", "peft_lora")), ("saved_excess_MN", ("fused", "peft_lora")),
                     ("peak_vs_peft_dora", ("fused", "peft_dora")), ("dense_tmp", ("fused",))):
        if key not in m:
            bad = [f"{w} {results.get(w, {}).get('status', 'not run')}" for w in who
                   if results.get(w, {}).get("status") not in ("ok", "derived")]
            missing[key] = "; ".join(bad) if bad else ("needs a GPU" if fr.get("status") == "ok" else "n/a")
    m["_missing"] = missing
    return m


def model_metrics(results: dict) -> dict:
    m: dict = {"_missing": {}}
    fused_name = "fused_peft" if ms_of(results, "fused_peft") else "fused_replace"
    f = ms_of(results, fused_name)
    m["fused_variant"] = fused_name
    pd, pl = ms_of(results, "peft_dora"), ms_of(results, "peft_lora")
    if f and pd:
        m["x_peft_dora"] = pd / f
    if f and pl:
        m["ratio_peft_lora"] = f / pl
        m["x_peft_lora"] = pl / f
    fr, dr = results.get(fused_name, {}), results.get("peft_dora", {})
    if fr.get("peak_gib") and dr.get("peak_gib"):
        m["peak_vs_peft_dora"] = fr["peak_gib"] / dr["peak_gib"]
    for key in ("x_peft_dora", "ratio_peft_lora"):
        if key not in m:
            st = [f"{n}: {results.get(n, {}).get('status', 'not run')}"
                  for n in ("fused_peft", "fused_replace", "peft_dora", "peft_lora")
                  if results.get(n, {}).get("status") != "ok"]
            m["_missing"][key] = "; ".join(st) or "n/a"
    return m


def finish_row(row: dict, case, bw: float) -> dict:
    """Add 'metrics' and 'checks' to a row of raw results (a layer Case or a whole-model spec)."""
    if isinstance(case, Case):
        row["metrics"] = layer_metrics(case, row["results"], bw)
        M, r, quant = case.M, case.r, case.quant
    else:
        row["metrics"] = model_metrics(row["results"])
        M, r, quant = case.batch * case.seq, case.r, ""
    row["checks"] = [evaluate_check(c, row["metrics"]) for c in CHECKS if check_applies(c, case.mode, M, r, quant)]
    return row
