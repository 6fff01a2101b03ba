#!/usr/bin/env python
"""Benchmark fused_dora's DoRA layers against cuBLAS, PEFT LoRA / DoRA and eager baselines.

    python benchmarks/bench.py                 full preset (~8 min budget on an H100)
    python benchmarks/bench.py --quick         a handful of key cases (~2 min)
    python benchmarks/bench.py --list          print the case plan and exit
    python benchmarks/bench.py --grid --cases qo --tokens 1,4096 --modes infer,train05

Every competitor of a case runs in the same process, on the same weights and inputs:

    floor             F.linear (cuBLAS): forward (inference), forward + input gradient with the
                      weight frozen (training); the cost no DoRA implementation can go below
    peft_lora         PEFT lora.Linear (use_dora=False)
    peft_dora         PEFT lora.Linear (use_dora=True)
    peft_dora_cached  the same under peft.helpers.DoraCaching (inference only)
    eager_dense       eager DoRA forming the dense B @ A once per call (torchtune / axolotl style)
    ref_eager         fused_dora's pure-PyTorch reference path (FusedDoraLinear, backend="reference")
    ref_compile       the reference path under torch.compile
    fused             fused_dora's Triton path (FusedDoraLinear, backend="triton")

Figures: median time (CUDA events, warm-up, many repeats, L2 flushed before each repeat, rotating
inputs), ratio to the floor, speedups over PEFT DoRA / PEFT LoRA / eager, TFLOP/s, peak extra
memory, bytes saved for backward (torch.autograd.graph.saved_tensors_hooks, unique non-parameter
storages), dense [out, in] temporaries (a TorchDispatchMode watching every aten op's outputs).
The targets of the issue are the CHECKS table below; verdicts are computed from it.

Without a GPU the script runs a smoke mode: tiny shapes, the Triton kernels under the
interpreter (TRITON_INTERPRET=1, set here before triton is imported), parity of the fused path
against a float64 reference and PEFT, and one pass of the whole harness; timings need a GPU.
"""
from __future__ import annotations

import os
import sys


def _prepare_environment() -> None:
    """No GPU: run Triton's interpreter. It must be chosen before triton is imported."""
    import torch  # importing torch does not import triton

    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return
    os.environ["TRITON_INTERPRET"] = "1"
    if "triton" in sys.modules:  # too late for this process: start it again with the variable set
        os.execv(sys.executable, [sys.executable] + sys.argv)


if __name__ == "__main__":
    _prepare_environment()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Dict, List, Optional  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"

# ---------------------------------------------------------------------------------------------
# The case space
# ---------------------------------------------------------------------------------------------
# key: (label, in_features K, out_features N, rank fixed by the case or None)
SHAPES = {
    "qo": ("q/o_proj 4096->4096", 4096, 4096, None),
    "kv": ("k/v_proj 4096->1024", 4096, 1024, None),
    "up": ("gate/up_proj 4096->14336", 4096, 14336, None),
    "down": ("down_proj 14336->4096", 14336, 4096, None),
    "hr": ("high-rank 8192->8192", 8192, 8192, 384),
    "tiny": ("smoke 48->40", 48, 40, 8),
    # CPU smoke shapes for the byte-count targets (T9, T11): big enough that no dimension coincides
    "cpu": ("smoke 96->80", 96, 80, None),
    "cpuhr": ("smoke high-rank 72->56", 72, 56, 384),  # r above in and out: a dense B@A would still be [56, 72]
}
LLAMA_SHAPES = ("qo", "kv", "up", "down")
TOKENS = (1, 16, 512, 4096, 16384)
RANKS = (16, 64)
DROPOUT = 0.05
# activation dtype, adapter dtype. fp32 / fp16 only for the CPU smoke (the interpreter has no bf16)
DTYPES = {
    "bf16+fp32": ("bfloat16", "float32"),  # PEFT's default over a bf16 base: adapters upcast to fp32
    "bf16": ("bfloat16", "bfloat16"),
    "fp16+fp32": ("float16", "float32"),
    "fp16": ("float16", "float16"),
    "fp32": ("float32", "float32"),
}
MODES = {
    "norm": "row norm ||W + s*B@A|| alone",
    "infer": "inference: eval, no grad, unmerged",
    "merged": "inference with the adapter merged into W",
    "train0": "training forward+backward, dropout 0",
    "train05": f"training forward+backward, dropout {DROPOUT}",
    "model": "whole model: ~1B Llama, all projections, batch x seq = 4 x 2048, step incl. AdamW",
    "paper": "Scaling-DoRA protocol (arXiv 2603.22276): r=384, alpha=2r, all linear, 1 x 4096, "
             "grad. checkpointing, optimizer step excluded",
}
LAYER_MODES = ("norm", "infer", "merged", "train0", "train05")
COMPETITORS = {
    "floor": "F.linear (cuBLAS); training: forward + input gradient, weight frozen",
    "peft_lora": "PEFT lora.Linear",
    "peft_dora": "PEFT lora.Linear, use_dora=True",
    "peft_dora_cached": "PEFT DoRA under peft.helpers.DoraCaching (inference)",
    "eager_dense": "eager DoRA, dense B@A formed once per call (torchtune/axolotl style)",
    "ref_eager": "fused_dora reference path (eager)",
    "ref_compile": "fused_dora reference path under torch.compile",
    "fused": "fused_dora Triton path",
    # norm mode only
    "linear_fwd": "F.linear forward at --norm-fwd-tokens tokens (what 'a forward' costs)",
}
MODE_COMPETITORS = {
    "norm": ["floor", "linear_fwd", "peft_dora", "eager_dense", "ref_eager", "fused"],
    "infer": ["floor", "peft_lora", "peft_dora", "peft_dora_cached", "eager_dense", "ref_eager", "ref_compile", "fused"],
    "merged": ["floor", "peft_lora", "peft_dora", "fused"],
    "train0": ["floor", "peft_lora", "peft_dora", "eager_dense", "ref_eager", "ref_compile", "fused"],
    "train05": ["floor", "peft_lora", "peft_dora", "eager_dense", "ref_eager", "ref_compile", "fused"],
}
MODEL_COMPETITORS = ["peft_lora", "peft_dora", "fused_peft", "fused_replace"]
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODEL_CONFIGS = {
    # Llama-3.2-1B dimensions (1.24B parameters), random weights
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True,
                     max_position_embeddings=8192),
    # Llama-3-8B dimensions (8.0B parameters), random weights
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=False,
                     max_position_embeddings=8192),
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, max_position_embeddings=256),
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One layer case: a mode, a projection shape, M tokens, rank r, a dtype pair."""

    mode: str
    shape: str
    M: int
    r: int
    dtype: str = "bf16+fp32"
    tier: int = 1  # run order: 1 (targets) before the whole-model cases before 3 (coverage)

    @property
    def K(self) -> int:
        return SHAPES[self.shape][1]

    @property
    def N(self) -> int:
        return SHAPES[self.shape][2]

    @property
    def alpha(self) -> float:
        return 2.0 * self.r  # alpha = 2r: scaling 2, as in the Scaling-DoRA protocol

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @property
    def p(self) -> float:
        return DROPOUT if self.mode == "train05" else 0.0

    @property
    def training(self) -> bool:
        return self.mode in ("train0", "train05")

    @property
    def key(self) -> str:
        m = "" if self.mode == "norm" else f" M={self.M}"
        return f"{self.mode} {self.shape}{m} r={self.r} {self.dtype}"

    def flops(self, competitor: str) -> float:
        """Useful flops: the floor's own GEMMs for the floor, the DoRA layer's for the others.

        Training: forward GEMM + LoRA down/up, dx GEMM + its LoRA terms, dA and dB.
        The norm (one pass over W) is not counted: it is memory traffic, not GEMM work.
        """
        M, N, K, r = self.M, self.N, self.K, self.r
        base = 2.0 * M * N * K
        if self.mode == "norm":
            return 2.0 * N * K * r  # B @ A formed (implicitly or not) once
        if competitor == "floor" or self.mode == "merged":
            return base * (2 if self.training else 1)
        lora = 2.0 * M * r * (N + K)
        if self.training:
            return 2 * base + 3 * lora
        return base + lora


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    mode: str  # "model" or "paper"
    config: str
    batch: int
    seq: int
    r: int
    alpha: float
    dropout: float
    grad_ckpt: bool
    optimizer: bool
    targets: tuple = tuple(PROJECTIONS)

    @property
    def key(self) -> str:
        return (f"{self.mode} {self.config} {self.batch}x{self.seq} r={self.r} "
                f"{'ckpt ' if self.grad_ckpt else ''}{'+opt' if self.optimizer else 'no-opt'}")


def preset_cases(preset: str) -> List[Case]:
    """The curated case list of a preset (tier 1 first: the ones the targets are about)."""
    cases: List[Case] = []
    add = cases.append
    if preset == "smoke":
        add(Case("norm", "tiny", 0, 8, "fp32"))
        add(Case("infer", "tiny", 33, 8, "fp32"))
        add(Case("merged", "tiny", 33, 8, "fp32"))
        add(Case("train05", "tiny", 33, 8, "fp32"))
        # the byte-count targets, which a CPU measures as a GPU would: fp16 stands for bf16 (same
        # element size), with fp32 adapters (PEFT's default over a 16-bit base) and all-16-bit
        for mode in ("train0", "train05"):
            for dt in ("fp16+fp32", "fp16"):
                add(Case(mode, "cpu", 40, 16, dt))
        add(Case("train0", "cpuhr", 24, 384, "fp16+fp32"))
        add(Case("norm", "cpuhr", 0, 384, "fp16+fp32"))
        return cases  # parity of fp16 and dropout 0 is covered by smoke_parity
    if preset == "quick":
        add(Case("norm", "up", 0, 16))
        for mode in ("train05", "train0"):
            for shape in ("qo", "up"):
                add(Case(mode, shape, 4096, 16))
        add(Case("infer", "qo", 16, 16))
        add(Case("infer", "qo", 4096, 16))
        add(Case("merged", "qo", 4096, 16))
        return cases
    if preset != "full":
        raise ValueError(f"unknown preset {preset!r}")
    # tier 1: every target has at least one case here
    for s in LLAMA_SHAPES:
        add(Case("norm", s, 0, 16))
    add(Case("norm", "hr", 0, 384))
    for mode in ("train05", "train0"):
        for s in LLAMA_SHAPES:
            for r in RANKS:
                add(Case(mode, s, 4096, r))
        add(Case(mode, "hr", 4096, 384))
    for s in LLAMA_SHAPES:
        for m in (1, 16, 512, 4096):
            add(Case("infer", s, m, 16))
    for m in (16, 4096):
        add(Case("infer", "hr", m, 384))
    for s in LLAMA_SHAPES:
        for m in (16, 4096):
            add(Case("merged", s, m, 16))
    # tier 3: coverage (M = 16384, r = 64 inference, all-bf16 adapters, small-M training)
    for mode in ("train05", "train0"):
        for s in LLAMA_SHAPES:
            for r in RANKS:
                add(Case(mode, s, 16384, r, tier=3))
    for s in LLAMA_SHAPES:
        add(Case("infer", s, 16384, 16, tier=3))
        for m in (1, 16, 512, 4096):
            add(Case("infer", s, m, 64, tier=3))
    for s in LLAMA_SHAPES:
        for mode in ("train05", "train0"):
            add(Case(mode, s, 4096, 16, "bf16", tier=3))
        for m in (16, 4096):
            add(Case("infer", s, m, 16, "bf16", tier=3))
    for s in LLAMA_SHAPES:
        add(Case("train05", s, 512, 16, tier=3))
        add(Case("norm", s, 0, 64, tier=3))
    for m in (1, 512):
        add(Case("infer", "hr", m, 384, tier=3))
    return cases


def grid_cases(shapes, tokens, ranks, dtypes, modes) -> List[Case]:
    """The full cross product of the filters (the high-rank shape keeps its r = 384)."""
    out = []
    for mode in modes:
        if mode not in LAYER_MODES:
            continue
        for s in shapes:
            rs = [SHAPES[s][3]] if SHAPES[s][3] else ranks
            for r in rs:
                for d in dtypes:
                    for m in ([0] if mode == "norm" else tokens):
                        out.append(Case(mode, s, m, r, d))
    return out


def model_specs(smoke: bool, args) -> Dict[str, ModelSpec]:
    if smoke:
        # two projections only: the interpreter is slow, and one of each kind (attention, MLP) shows the path
        return {"model": ModelSpec("model", "tiny", 2, 16, 8, 16.0, 0.0, False, True, ("q_proj", "down_proj"))}
    return {
        "model": ModelSpec("model", args.model_config, 4, 2048, args.model_r, 2.0 * args.model_r,
                           args.model_dropout, False, True),
        "paper": ModelSpec("paper", args.paper_config, 1, 4096, 384, 768.0, 0.0, True, False),
    }


# ---------------------------------------------------------------------------------------------
# Targets, as data: the verdicts are computed from this table
# ---------------------------------------------------------------------------------------------
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
    Check("T9", "bytes saved for backward <= PEFT LoRA's + one [M, out] tensor", ("train0", "train05"),
          "saved_excess_MN", "<=", 1.0, unit=" [M,out] tensors over LoRA", counts_bytes=True),
    Check("T10", "training peak memory >= 40% below PEFT DoRA's", ("train0", "train05"),
          "peak_vs_peft_dora", "<=", 0.60, unit="x PEFT DoRA's peak"),
    Check("T11", "r=384: no dense [out, in] temporary", ("train0", "train05", "infer", "norm"),
          "dense_tmp", "<=", 0, min_r=256, unit=" temporaries", counts_bytes=True),
    Check("T12", "whole model: step >= 1.6x faster than PEFT DoRA", ("model",), "x_peft_dora", ">=", 1.6),
    Check("T13", "whole model: step within 1.1x of PEFT LoRA", ("model",), "ratio_peft_lora", "<=", 1.1),
    Check("T14", "Scaling-DoRA protocol: clearly above the paper's 1.5-1.9x over PEFT DoRA (>= 1.9x)",
          ("paper",), "x_peft_dora", ">=", 1.9),
]


CHECK_BY_ID = {c.id: c for c in CHECKS}


def check_applies(chk: Check, mode: str, M: int, r: int) -> bool:
    if mode not in chk.modes:
        return False
    if mode in ("model", "paper", "norm"):
        return r >= chk.min_r and r <= chk.max_r
    if chk.M_in and M not in chk.M_in:
        return False
    return chk.min_M <= M <= chk.max_M and chk.min_r <= r <= chk.max_r


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


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------
class Unavailable(Exception):
    """A competitor that cannot run here (missing package or feature): recorded as skipped."""


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def cleanup(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


class Timer:
    """Median time of call(i) with CUDA events: warm-up, then `reps` repeats, each after an L2 flush.

    call(i) gets the repeat index; the callers rotate through a pool of inputs with it. The number
    of repeats adapts to the call's cost: about target_ms of timed work, within [min_reps, max_reps].
    On a CPU (smoke mode) it runs the call once or twice with perf_counter: the figure means nothing.
    """

    def __init__(self, dev: torch.device, target_ms: float = 80.0, min_reps: int = 5, max_reps: int = 300,
                 warmup_ms: float = 25.0, flush: bool = True):
        self.dev, self.target_ms, self.min_reps, self.max_reps = dev, target_ms, min_reps, max_reps
        self.warmup_ms, self.flush = warmup_ms, flush
        self.cache = None
        if dev.type == "cuda" and flush:
            l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 << 20) or (50 << 20)
            self.cache = torch.empty(max(4 * l2, 256 << 20), dtype=torch.int8, device=dev)

    def measure(self, call: Callable[[int], None], pool: int) -> dict:
        if self.dev.type != "cuda":  # smoke: one call, to show the path runs
            t0 = time.perf_counter()
            call(0)
            ms = (time.perf_counter() - t0) * 1e3
            return {"ms": ms, "p20": ms, "p80": ms, "reps": 1}
        call(0)  # compile, autotune
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for j in range(3):
            call(j % pool)
        e.record()
        torch.cuda.synchronize()
        est = max(s.elapsed_time(e) / 3, 1e-3)
        for j in range(min(50, int(self.warmup_ms / est))):
            call(j % pool)
        reps = int(min(self.max_reps, max(self.min_reps, self.target_ms / est)))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            if self.cache is not None:
                self.cache.zero_()
            starts[i].record()
            call(i % pool)
            ends[i].record()
        torch.cuda.synchronize()
        times = sorted(a.elapsed_time(b) for a, b in zip(starts, ends))
        q = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
        return {"ms": q(0.5), "p20": q(0.2), "p80": q(0.8), "reps": reps}

    def wall(self, call: Callable[[int], None], pool: int, n: int = 30) -> Optional[float]:
        """Back-to-back calls, no flush, host clock: includes launch overhead where the CPU is the bottleneck."""
        if self.dev.type != "cuda":
            return None
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(n):
            call(i % pool)
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3 / n

    def peak_mib(self, call: Callable[[int], None], reset: Callable[[], None]) -> Optional[float]:
        """Peak memory allocated above what was live before one call, MiB (CUDA only)."""
        if self.dev.type != "cuda":
            return None
        reset()
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(self.dev)
        base = torch.cuda.memory_allocated(self.dev)
        call(0)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated(self.dev) - base) / 2**20


def _storage_key(t: torch.Tensor):
    try:
        st = t.untyped_storage()
        return st.data_ptr(), st.nbytes()
    except Exception:  # tensor subclasses without storage, meta tensors
        return None, 0


def saved_bytes(fwd: Callable, x: torch.Tensor, exclude: set, kept: Callable[[], list] = list) -> int:
    """Bytes of the unique storages autograd saves for backward in fwd(x).

    Not counted: storages in ``exclude`` (parameters, frozen tensors) and those in ``kept()``,
    asked after the call: state the layer keeps between calls anyway (fused_dora's cached norm),
    which saving for backward does not make live any longer.
    """
    seen: Dict[int, int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor):
            ptr, nb = _storage_key(t)
            if ptr and ptr not in exclude:
                seen[ptr] = max(seen.get(ptr, 0), nb)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fwd(x)
    del y
    for t in kept():
        seen.pop(_storage_key(t)[0], None)
    return sum(seen.values())


def count_dense_temporaries(call: Callable[[], None], N: int, K: int, exclude: set):
    """(count, largest bytes) of unique storages of shape [N, K] or [K, N] made by aten ops in call().

    Parameters (and views of them) are excluded. A dense B @ A (or W + s * B @ A) shows up here.
    """
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    shapes = {(N, K), (K, N)}

    class Counter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen, self.max_bytes = set(), 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.dim() == 2 and tuple(t.shape) in shapes:
                    ptr, nb = _storage_key(t)
                    if ptr and ptr not in exclude and ptr not in self.seen:
                        self.seen.add(ptr)
                        self.max_bytes = max(self.max_bytes, t.numel() * t.element_size())
            return out

    counter = Counter()
    with counter:
        call()
    return len(counter.seen), counter.max_bytes


def measure_bandwidth(dev: torch.device) -> float:
    """Device memory bandwidth in bytes/s, measured with a large device-to-device copy."""
    if dev.type != "cuda":
        n = 16 << 20
        src, dst = torch.empty(n, dtype=torch.uint8), torch.empty(n, dtype=torch.uint8)
        dst.copy_(src)
        t0 = time.perf_counter()
        dst.copy_(src)
        return 2 * n / max(time.perf_counter() - t0, 1e-9)
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        dst.copy_(src)
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    del src, dst
    cleanup(dev)
    return 2 * n / (sorted(times)[len(times) // 2] * 1e-3)


# ---------------------------------------------------------------------------------------------
# Competitors for one layer case
# ---------------------------------------------------------------------------------------------
def _dt(name: str) -> torch.dtype:
    return getattr(torch, name)


@dataclasses.dataclass
class CaseData:
    case: Case
    dev: torch.device
    act: torch.dtype
    ad: torch.dtype
    W: nn.Parameter  # [N, K] frozen, shared by every competitor (merged mode: each gets a copy)
    A: torch.Tensor  # [r, K] fp32 masters; each competitor casts to its adapter dtype
    B: torch.Tensor  # [N, r]
    mag: torch.Tensor  # [N]
    xs: list
    dys: list


def make_data(case: Case, dev: torch.device, norm_fwd_tokens: int = 4096) -> CaseData:
    act, ad = (_dt(n) for n in DTYPES[case.dtype])
    K, N, r, s = case.K, case.N, case.r, case.scaling
    g = torch.Generator(device=dev).manual_seed(1234)
    bound = 1.0 / math.sqrt(K)
    W = (torch.rand(N, K, generator=g, device=dev) * 2 - 1).mul_(bound)
    A = (torch.rand(r, K, generator=g, device=dev) * 2 - 1).mul_(bound)
    # lora_B non-zero, so the DoRA math is not trivial: s * B @ A is ~20% of W in norm
    B = torch.randn(N, r, generator=g, device=dev).mul_(0.1 / math.sqrt(r))
    with torch.no_grad():
        # the adapters as the competitors will hold them (rounded to the adapter dtype)
        norm = torch.linalg.vector_norm(W.to(act).float() + s * (B.to(ad).float() @ A.to(ad).float()), dim=1)
        mag = norm * (1 + 0.1 * torch.randn(N, generator=g, device=dev))
    Wp = nn.Parameter(W.to(act), requires_grad=False)
    del W, norm
    M = norm_fwd_tokens if case.mode == "norm" else case.M
    x_bytes = M * K * torch.finfo(act).bits // 8
    l2 = 50 << 20
    if dev.type == "cuda":
        l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", l2) or l2
    pool = 2 if dev.type != "cuda" else int(min(8, max(2, math.ceil(3 * l2 / max(x_bytes, 1)))))
    if case.mode == "norm":
        pool = 1  # only the F.linear forward it is compared with reads x
    xs = [torch.randn(M, K, generator=g, device=dev).to(act).requires_grad_(case.training) for _ in range(pool)]
    dys = [torch.randn(M, N, generator=g, device=dev).to(act) for _ in range(pool)] if case.training else []
    return CaseData(case, dev, act, ad, Wp, A, B, mag, xs, dys)


@dataclasses.dataclass
class Competitor:
    name: str
    fwd: Callable  # x -> y (layer modes) or () -> norm (norm mode)
    params: list  # trainable parameters (grads reset every step)
    frozen: list  # other tensors owned by the competitor (excluded from "saved bytes")
    pre_step: Optional[Callable] = None  # runs at the start of every training step
    context: Callable = contextlib.nullcontext
    traceable: bool = True  # saved_tensors_hooks / dispatch-mode figures are meaningful
    kept: Callable[[], list] = list  # state kept between calls (not "saved for backward"); see saved_bytes

    def owned_storages(self) -> set:
        """Storages of its parameters and frozen tensors: never counted as saved or as temporaries."""
        return {_storage_key(t)[0] for t in self.params + self.frozen}
    computes_dora: bool = True  # output comparable with the DoRA reference
    note: str = ""


class _Holder(nn.Module):
    """A one-Linear model for get_peft_model."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.proj = lin

    def forward(self, x):
        return self.proj(x)


def _linear_sharing(W: nn.Parameter) -> nn.Linear:
    lin = nn.Linear(W.shape[1], W.shape[0], bias=False, device="meta")
    lin.weight = W
    return lin


def _weight_for(data: CaseData) -> nn.Parameter:
    """merge() writes into W: in merged mode every competitor gets its own copy."""
    if data.case.mode == "merged":
        return nn.Parameter(data.W.detach().clone(), requires_grad=False)
    return data.W


def _set_param(p: nn.Parameter, value: torch.Tensor, dtype: torch.dtype) -> None:
    p.data = value.detach().to(device=p.device, dtype=dtype).clone()


def _build_peft_layer(data: CaseData, use_dora: bool, W: Optional[nn.Parameter] = None):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise Unavailable(f"peft not installed ({exc})")
    c = data.case
    W = W if W is not None else _weight_for(data)
    cfg = LoraConfig(r=c.r, lora_alpha=c.alpha, lora_dropout=c.p, target_modules=["proj"], use_dora=use_dora,
                     bias="none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(_Holder(_linear_sharing(W)), cfg, autocast_adapter_dtype=(data.ad == torch.float32))
    layer = pm.base_model.model.proj
    _set_param(layer.lora_A["default"].weight, data.A, data.ad)
    _set_param(layer.lora_B["default"].weight, data.B, data.ad)
    if use_dora:
        _set_param(layer.lora_magnitude_vector["default"].weight, data.mag, data.ad)
    layer.train(c.training)
    return layer, W


def _peft_competitor(data: CaseData, name: str) -> Competitor:
    use_dora = name != "peft_lora"
    layer, W = _build_peft_layer(data, use_dora)
    context = contextlib.nullcontext
    if name == "peft_dora_cached":
        try:
            from peft.helpers import DoraCaching
        except ImportError:
            raise Unavailable("this PEFT has no peft.helpers.DoraCaching")
        context = DoraCaching
    if data.case.mode == "merged":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layer.merge()
    params = [p for p in layer.parameters() if p.requires_grad]
    frozen = [p for p in layer.parameters() if not p.requires_grad] + [W]
    return Competitor(name, layer, params, frozen, context=context, computes_dora=use_dora)


class EagerDenseDora(nn.Module):
    """DoRA in plain PyTorch, the torchtune / axolotl way: the dense B @ A once per call.

    One base GEMM (y = c * (x W^T + s * B(A(dropout(x))))), the norm in fp32 from the dense
    W + s * B @ A (detached), the LoRA GEMMs in the activation dtype. A stronger baseline than
    PEFT's, which forms B @ A by pushing an identity matrix through both adapters.
    """

    def __init__(self, W, A, B, mag, scaling, p):
        super().__init__()
        self.weight = W
        self.lora_A, self.lora_B, self.magnitude = nn.Parameter(A), nn.Parameter(B), nn.Parameter(mag)
        self.scaling = scaling
        self.dropout = nn.Dropout(p) if p > 0 else nn.Identity()

    def forward(self, x):
        dt = x.dtype
        A, B = self.lora_A.to(dt), self.lora_B.to(dt)
        with torch.no_grad():
            dense = self.weight + self.scaling * (B @ A)  # [N, K] temporary, once per call
            norm = torch.linalg.vector_norm(dense, dim=1, dtype=torch.float32)
            del dense
        c = (self.magnitude / norm).to(dt)
        y = F.linear(x, self.weight) + self.scaling * F.linear(F.linear(self.dropout(x), A), B)
        return c * y


def _eager_competitor(data: CaseData) -> Competitor:
    c = data.case
    W = _weight_for(data)
    layer = EagerDenseDora(W, data.A.to(data.ad).clone(), data.B.to(data.ad).clone(), data.mag.to(data.ad).clone(),
                           c.scaling, c.p).train(c.training)
    return Competitor("eager_dense", layer, [layer.lora_A, layer.lora_B, layer.magnitude], [W])


def _fused_layer(data: CaseData, backend: str):
    from fused_dora import FusedDoraLinear

    c = data.case
    W = _weight_for(data)
    # backend "auto" while building (the layer is first made on the meta device), then the one asked for
    layer = FusedDoraLinear.from_linear(_linear_sharing(W), r=c.r, lora_alpha=c.alpha, lora_dropout=c.p,
                                        adapter_dtype=data.ad, backend="auto")
    layer.backend = backend
    _set_param(layer.lora_A, data.A, data.ad)
    _set_param(layer.lora_B, data.B, data.ad)
    _set_param(layer.magnitude, data.mag, data.ad)
    layer.clear_norm_cache()
    layer.train(c.training)
    return layer, W


def _fused_competitor(data: CaseData, name: str, norm_per_step: bool) -> Competitor:
    backend = "triton" if name == "fused" else "reference"
    if backend == "triton":
        from fused_dora.functional import triton_available_for

        why = triton_available_for(data.dev)
        if why:
            raise Unavailable(f"Triton path cannot run here: {why}")
    layer, W = _fused_layer(data, backend)
    if data.case.mode == "merged":
        layer.merge()
    params = [layer.lora_A, layer.lora_B, layer.magnitude]
    pre = layer.clear_norm_cache if (data.case.training and norm_per_step) else None
    # the norm [N] the layer caches (and reuses until the next optimizer step) is also what its
    # backward reads: the cache, not the saving, keeps it alive
    return Competitor(name, layer, params, [W], pre_step=pre, kept=lambda: [layer.weight_norm()])


_COMPILED = {}


def _make_reference_fn():
    from fused_dora import reference

    def reference_fn(x, W, A, B, mag, norm, scaling: float, p: float, training: bool):
        return reference.dora_linear(x, W, None, A, B, mag, scaling, p, training=training, norm=norm)

    return reference_fn


def _compile_competitor(data: CaseData) -> Competitor:
    if data.dev.type != "cuda" and not os.environ.get("BENCH_COMPILE_BACKEND"):
        raise Unavailable("torch.compile is measured on a GPU only")
    from fused_dora import reference

    c = data.case
    if "fn" not in _COMPILED:  # one compiled function for the whole run: its graphs are reused
        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, max(64, getattr(torch._dynamo.config, knob)))
        _COMPILED["fn"] = torch.compile(_make_reference_fn(), backend=os.environ.get("BENCH_COMPILE_BACKEND", "inductor"))
    fn = _COMPILED["fn"]
    W = _weight_for(data)
    A, B, mag = (nn.Parameter(t.to(data.ad).clone()) for t in (data.A, data.B, data.mag))
    # training: the norm is computed inside every call (once per step); inference: once, up front
    norm = None if c.training else reference.weight_norm(W, A, B, c.scaling).float()
    s, p, tr = c.scaling, c.p, c.training
    fwd = lambda x: fn(x, W, A, B, mag, norm, s, p, tr)  # noqa: E731
    return Competitor("ref_compile", fwd, [A, B, mag], [W], traceable=False)


def _floor_competitor(data: CaseData) -> Competitor:
    W = _weight_for(data)
    return Competitor("floor", lambda x: F.linear(x, W), [], [W], computes_dora=False)


def _norm_competitor(data: CaseData, name: str) -> Competitor:
    """Norm mode: the call computes the row norm of W + s * B @ A, as each implementation does it."""
    c = data.case
    W, s = data.W, c.scaling
    A, B = data.A.to(data.ad), data.B.to(data.ad)
    if name == "fused":
        from fused_dora import dora_weight_norm
        from fused_dora.functional import triton_available_for

        why = triton_available_for(data.dev)
        if why:
            raise Unavailable(f"Triton path cannot run here: {why}")
        fn = lambda: dora_weight_norm(W, A, B, s, backend="triton")  # noqa: E731
    elif name == "peft_dora":
        layer, _ = _build_peft_layer(data, True, W)
        dora = layer.lora_magnitude_vector["default"]
        la, lb = layer.lora_A["default"], layer.lora_B["default"]

        def fn():  # what PEFT's DoRA forward does for the norm (no adapter_name: never cached)
            lora_weight = dora.get_lora_weight(lora_A=la, lora_B=lb).to(data.act)
            return dora.get_weight_norm(weight=W.to(data.act), lora_weight=lora_weight.detach(), scaling=s)
    elif name == "eager_dense":
        fn = lambda: torch.linalg.vector_norm(  # noqa: E731
            W + s * (B.to(data.act) @ A.to(data.act)), dim=1, dtype=torch.float32)
    elif name == "ref_eager":
        from fused_dora import reference

        fn = lambda: reference.weight_norm(W, A, B, s)  # noqa: E731
    elif name == "linear_fwd":
        x = data.xs[0]
        fn = lambda: F.linear(x, W)  # noqa: E731
    else:
        raise Unavailable(f"{name} has no norm-mode variant")
    return Competitor(name, fn, [], [W, A, B])


def build_competitor(name: str, data: CaseData, norm_per_step: bool = True) -> Competitor:
    if data.case.mode == "norm":
        return _norm_competitor(data, name)
    if name == "floor":
        return _floor_competitor(data)
    if name in ("peft_lora", "peft_dora", "peft_dora_cached"):
        return _peft_competitor(data, name)
    if name == "eager_dense":
        return _eager_competitor(data)
    if name in ("ref_eager", "fused"):
        return _fused_competitor(data, name, norm_per_step)
    if name == "ref_compile":
        return _compile_competitor(data)
    raise ValueError(f"unknown competitor {name!r}")


def make_call(data: CaseData, comp: Competitor):
    """(call(i), reset()) for the case's mode; call(i) uses input i of the rotation pool."""
    xs, dys = data.xs, data.dys
    fwd = comp.fwd

    def reset():
        for p in comp.params:
            p.grad = None
        for x in xs:
            x.grad = None

    if data.case.mode == "norm":
        def call(i):
            with torch.no_grad():
                fwd()
    elif data.case.training:
        params, pre = comp.params, comp.pre_step

        def call(i):
            if pre is not None:
                pre()
            for p in params:
                p.grad = None
            x = xs[i]
            x.grad = None
            fwd(x).backward(dys[i])
    else:
        def call(i):
            with torch.no_grad():
                fwd(xs[i])
    return call, reset


def prepare(case: Case, name: str, dev: torch.device, norm_per_step: bool = True):
    """(call(i), pool size, competitor, data) for one competitor of one case: for other harnesses
    (benchmarks/test_bench_kernels.py). Raises Unavailable where the competitor cannot run."""
    data = make_data(case, dev)
    if name == "floor" and case.mode == "norm":
        raise Unavailable("the norm-mode floor is derived from the bandwidth, not timed")
    comp = build_competitor(name, data, norm_per_step)
    call, _ = make_call(data, comp)
    return call, len(data.xs), comp, data


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-300))


def run_layer_case(case: Case, args, dev: torch.device, timer: Timer, bw: float, log) -> dict:
    """Every selected competitor of one case; returns {'case', 'results', 'metrics', 'checks'}."""
    data = make_data(case, dev, args.norm_fwd_tokens)
    results: Dict[str, dict] = {}
    y_ref = None
    if case.mode in ("infer", "merged", "train0"):  # a DoRA output to compare with (fp32 reference)
        from fused_dora import reference

        with torch.no_grad():
            y_ref = reference.dora_linear(data.xs[0].detach(), data.W, None, data.A.to(data.ad), data.B.to(data.ad),
                                          data.mag.to(data.ad), case.scaling)
    names = [n for n in MODE_COMPETITORS[case.mode] if n in args.competitor_set or n in ("floor", "linear_fwd")]
    for name in names:
        res: dict = {"status": "ok"}
        comp = None
        try:
            if name == "floor" and case.mode == "norm":
                res.update(status="derived", ms=data.W.numel() * data.W.element_size() / bw * 1e3,
                           note="W read once at the measured bandwidth")
                results[name] = res
                continue
            comp = build_competitor(name, data, args.train_norm == "per-step")
            call, reset = make_call(data, comp)
            pool = len(data.xs)
            with comp.context():
                res.update(timer.measure(call, pool))
                if case.mode != "norm":  # host-clock throughput: shows launch-bound (CPU-bound) paths
                    res["wall_ms"] = timer.wall(call, pool, n=int(min(30, max(3, 40.0 / max(res["ms"], 1e-3)))))
                res["peak_mib"] = timer.peak_mib(call, reset)
                exclude = comp.owned_storages()
                if case.training and comp.traceable:
                    reset()
                    res["saved_mib"] = saved_bytes(comp.fwd, data.xs[0], exclude, comp.kept) / 2**20
                dense_ok = case.M not in (case.N, case.K) and name != "linear_fwd"
                if comp.traceable and dense_ok and case.mode != "merged":
                    reset()
                    n, nb = count_dense_temporaries(lambda: call(0), case.N, case.K, exclude)
                    res["dense_tmp"], res["dense_tmp_mib"] = n, nb / 2**20
                # (not for ref_compile in training: a no-grad call would compile one more graph)
                if y_ref is not None and comp.computes_dora and not (name == "ref_compile" and case.training):
                    with torch.no_grad():
                        res["err"] = _rel_err(comp.fwd(data.xs[0].detach()), y_ref)
                reset()
        except Unavailable as exc:
            res = {"status": f"skipped: {exc}"}
        except torch.cuda.OutOfMemoryError:
            res = {"status": "OOM"}
        except Exception as exc:  # recorded, the run goes on
            res = {"status": f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
            if args.verbose:
                traceback.print_exc()
        finally:
            comp = None
            cleanup(dev)
        results[name] = res
    del data, y_ref
    cleanup(dev)
    return finish_row({"case": dataclasses.asdict(case), "key": case.key, "results": results}, case, bw)


def _ms(results: dict, name: str) -> Optional[float]:
    r = results.get(name)
    return r.get("ms") if r and r.get("status") in ("ok", "derived") and r.get("ms") else None


def layer_metrics(case: Case, results: dict, bw: float) -> dict:
    m: dict = {}
    missing: dict = {}
    f = _ms(results, "fused")
    status_f = results.get("fused", {}).get("status", "not run")
    fl = _ms(results, "floor")
    if case.mode == "norm":
        if f:
            W_bytes = case.N * case.K * torch.finfo(_dt(DTYPES[case.dtype][0])).bits / 8
            m["norm_gbs"] = W_bytes / (f * 1e-3) / 1e9
            m["bw_frac"] = W_bytes / (f * 1e-3) / bw
            fwd = _ms(results, "linear_fwd")
            if fwd:
                m["norm_frac_fwd"] = f / fwd
            pd = _ms(results, "peft_dora")
            if pd:
                m["x_peft_dora"] = pd / f
            if fl:
                m["ratio_floor"] = f / fl
            if results["fused"].get("dense_tmp") is not None:
                m["dense_tmp"] = results["fused"]["dense_tmp"]
        else:
            missing.update(bw_frac=f"fused {status_f}", norm_frac_fwd=f"fused {status_f}", dense_tmp=f"fused {status_f}")
        m["_missing"] = missing
        return m
    if f and fl:
        m["ratio_floor"] = f / fl
    pd = [t for t in (_ms(results, "peft_dora"), _ms(results, "peft_dora_cached")) if t]
    if f and pd:
        m["x_peft_dora"] = min(pd) / f  # the faster PEFT DoRA variant (cached, in inference)
    for other, key in (("peft_lora", "x_peft_lora"), ("eager_dense", "x_eager"), ("ref_compile", "x_ref_compile")):
        t = _ms(results, other)
        if f and t:
            m[key] = t / f
    if f:
        m["tflops"] = case.flops("fused") / (f * 1e-3) / 1e12
    fw, flw = results.get("fused", {}).get("wall_ms"), results.get("floor", {}).get("wall_ms")
    if fw and flw:
        m["wall_ratio_floor"] = fw / flw  # host clock, back-to-back: > ratio_floor where launch-bound
    fr, lr, dr = results.get("fused", {}), results.get("peft_lora", {}), results.get("peft_dora", {})
    if fr.get("saved_mib") is not None and lr.get("saved_mib") is not None:
        one_MN = case.M * case.N * torch.finfo(_dt(DTYPES[case.dtype][0])).bits / 8 / 2**20
        m["saved_excess_MN"] = (fr["saved_mib"] - lr["saved_mib"]) / one_MN
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


def finish_row(row: dict, case, bw: float) -> dict:
    if isinstance(case, Case):
        row["metrics"] = layer_metrics(case, row["results"], bw)
        M, r = case.M, case.r
    else:
        row["metrics"] = model_metrics(row["results"])
        M, r = case.batch * case.seq, case.r
    row["checks"] = [evaluate_check(c, row["metrics"]) for c in CHECKS if check_applies(c, case.mode, M, r)]
    return row


# ---------------------------------------------------------------------------------------------
# Whole-model cases
# ---------------------------------------------------------------------------------------------
def _fused_integrations():
    out = {}
    try:
        from fused_dora.integrations.peft import enable_fused_dora

        out["enable_fused_dora"] = enable_fused_dora
    except Exception as exc:  # not written yet, or peft missing
        out["enable_fused_dora_error"] = f"{type(exc).__name__}: {exc}"
    try:
        from fused_dora import replace_linear
    except Exception:
        try:
            from fused_dora.replace import replace_linear
        except Exception as exc:
            replace_linear = None
            out["replace_linear_error"] = f"{type(exc).__name__}: {exc}"
    if replace_linear is not None:
        out["replace_linear"] = replace_linear
    return out


def _build_llama(spec: ModelSpec, dev: torch.device, dtype: torch.dtype):
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as exc:
        raise Unavailable(f"transformers not installed ({exc})")
    cfg = LlamaConfig(**MODEL_CONFIGS[spec.config], attention_dropout=0.0, use_cache=False)
    try:
        cfg._attn_implementation = "sdpa"
    except Exception:
        pass
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    model.to(dtype)
    if spec.grad_ckpt:  # non-reentrant activation checkpointing of every decoder layer
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
                on = model.is_activation_checkpointing
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                on = model.is_gradient_checkpointing
        if not on:
            raise RuntimeError("gradient checkpointing did not switch on")
    model.train()
    return model, cfg


def _make_model_competitor(name: str, spec: ModelSpec, dev: torch.device, dtype: torch.dtype, integ: dict):
    model, cfg = _build_llama(spec, dev, dtype)
    if name in ("peft_lora", "peft_dora", "fused_peft"):
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as exc:
            raise Unavailable(f"peft not installed ({exc})")
        if name == "fused_peft" and "enable_fused_dora" not in integ:
            raise Unavailable("fused_dora.integrations.peft.enable_fused_dora not available "
                              f"({integ.get('enable_fused_dora_error', '?')})")
        lcfg = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=list(spec.targets),
                          use_dora=name != "peft_lora", bias="none")
        with warnings.catch_warnings(), torch.device(dev):  # adapters made on the GPU directly
            warnings.simplefilter("ignore")
            model = get_peft_model(model, lcfg)
            if name == "fused_peft":
                n = integ["enable_fused_dora"](model)
                if not n:
                    raise RuntimeError("enable_fused_dora switched no layer")
    else:  # fused_replace
        if "replace_linear" not in integ:
            raise Unavailable(f"fused_dora.replace_linear not available ({integ.get('replace_linear_error', '?')})")
        model.requires_grad_(False)
        n = integ["replace_linear"](model, list(spec.targets), r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout)
        if not n:
            raise RuntimeError("replace_linear replaced no module")
        from fused_dora import FusedDoraLinear

        for mod in model.modules():
            if isinstance(mod, FusedDoraLinear):
                for p in (mod.lora_A, mod.lora_B, mod.magnitude):
                    p.requires_grad_(True)
    with torch.no_grad():  # lora_B non-zero (PEFT and replace_linear start it at zero)
        g = torch.Generator(device=dev).manual_seed(7)
        for pname, p in model.named_parameters():
            if "lora_B" in pname:
                p.copy_(torch.randn(p.shape, generator=g, device=dev, dtype=torch.float32).mul_(1e-3).to(p.dtype))
    return model, cfg


def _bump_versions(params) -> None:
    """Stand-in for an optimizer step when it is excluded: adapters 'changed', so cached norms are stale."""
    inc = getattr(torch.autograd.graph, "increment_version", None)
    if inc is not None:
        for p in params:
            inc(p)
    else:
        with torch.no_grad():
            for p in params:
                p.add_(0.0)


def run_model_case(spec: ModelSpec, args, dev: torch.device, log, left: Callable[[], float] = lambda: math.inf) -> dict:
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    integ = _fused_integrations()
    names = [n for n in MODEL_COMPETITORS if n in args.competitor_set or n.startswith("fused_") and "fused" in args.competitor_set]
    if spec.mode == "paper" and "fused_peft" in names and "enable_fused_dora" in integ:
        names = [n for n in names if n != "fused_replace"]  # one fused variant is enough for the 8B model
    warm, steps = (0, 1) if dev.type != "cuda" else (args.model_warmup, args.model_steps)
    results: Dict[str, dict] = {}
    for name in names:
        res: dict = {"status": "ok"}
        model = opt = None
        if left() < 0:
            results[name] = {"status": "skipped: time budget"}
            log(f"    {spec.mode} {name}: skipped (time budget)")
            continue
        try:
            model, cfg = _make_model_competitor(name, spec, dev, dtype, integ)
            params = [p for p in model.parameters() if p.requires_grad]
            res["trainable_params"] = sum(p.numel() for p in params)
            opt = torch.optim.AdamW(params, lr=1e-5) if spec.optimizer else None
            g = torch.Generator(device=dev).manual_seed(11)
            ids = torch.randint(0, cfg.vocab_size, (spec.batch, spec.seq), generator=g, device=dev)

            def step():
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                if opt is not None:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                else:
                    for p in params:
                        p.grad = None
                    _bump_versions(params)

            for _ in range(warm):
                step()
            _sync(dev)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            times = []
            for _ in range(steps):
                if dev.type == "cuda":
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s.record()
                    step()
                    e.record()
                    torch.cuda.synchronize()
                    times.append(s.elapsed_time(e))
                else:
                    t0 = time.perf_counter()
                    step()
                    times.append((time.perf_counter() - t0) * 1e3)
            times.sort()
            res.update(ms=times[len(times) // 2], p20=times[int(0.2 * (len(times) - 1))],
                       p80=times[int(0.8 * (len(times) - 1))], reps=len(times),
                       tokens_per_s=spec.batch * spec.seq / (times[len(times) // 2] * 1e-3))
            if dev.type == "cuda":
                res["peak_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
        except Unavailable as exc:
            res = {"status": f"skipped: {exc}"}
        except torch.cuda.OutOfMemoryError:
            res = {"status": "OOM"}
        except Exception as exc:
            res = {"status": f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
            if args.verbose:
                traceback.print_exc()
        finally:
            model = opt = None
            cleanup(dev)
        results[name] = res
        log(f"    {spec.mode} {name}: " + (f"{res['ms']:.1f} ms/step" if "ms" in res else res["status"]))
    return finish_row({"case": dataclasses.asdict(spec), "key": spec.key, "results": results}, spec, 0.0)


def model_metrics(results: dict) -> dict:
    m: dict = {"_missing": {}}
    fused_name = "fused_peft" if _ms(results, "fused_peft") else "fused_replace"
    f = _ms(results, fused_name)
    m["fused_variant"] = fused_name
    pd, pl = _ms(results, "peft_dora"), _ms(results, "peft_lora")
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
            st = [f"{n}: {results.get(n, {}).get('status', 'not run')}" for n in ("fused_peft", "fused_replace", "peft_dora", "peft_lora")
                  if results.get(n, {}).get("status") != "ok"]
            m["_missing"][key] = "; ".join(st) or "n/a"
    return m


# ---------------------------------------------------------------------------------------------
# Reports: markdown, JSON, PNG
# ---------------------------------------------------------------------------------------------
def _f(v, fmt="{:.3g}", none="-") -> str:
    if v is None:
        return none
    return fmt.format(v)


def _x(v) -> str:
    return _f(v, "{:.2f}x")


def _md_row(cells: List[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _fused_ms_cell(fr: dict) -> str:
    """The fused time, or why there is none (its status)."""
    return _f(fr.get("ms")) if fr.get("status") == "ok" else fr.get("status", "-")


def _judged(check_id: str, smoke: bool) -> bool:
    """Whether this run can judge the target: a CPU smoke run only judges byte counts."""
    return not smoke or CHECK_BY_ID[check_id].counts_bytes


def _verdicts(row: dict, smoke: bool) -> str:
    if not row.get("checks"):
        return ""
    judged = [c["verdict"] for c in row["checks"] if _judged(c["id"], smoke)]
    if smoke and len(judged) < len(row["checks"]):
        judged.append("timings: no verdicts on CPU")
    return "; ".join(judged)


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
        L.append("Ratios are times. `fused/floor`: GPU time (CUDA events, L2 flushed) over F.linear's; `wall fused/floor`: "
                 "the same from back-to-back calls on the host clock (higher than `fused/floor` where the path is "
                 "launch-bound). `xPEFT` = PEFT time / fused time (higher is better; inference: the faster of PEFT DoRA "
                 "with and without DoraCaching). peak = extra memory of one call; saved = bytes autograd keeps for "
                 "backward (unique storages other than parameters and state the layer keeps between steps, "
                 "such as fused_dora's cached norm; the input included when saved). Byte counts (saved, dense "
                 "[N,K] temporaries) do not depend on the device: a CPU smoke run measures them too, fp16 "
                 "standing for bf16.")
        L.append("")
        L.append("| case | fused ms | floor ms | fused/floor | wall fused/floor | xPEFT DoRA | xPEFT LoRA | xeager "
                 "| fused TFLOP/s | peak MiB fused / PEFT DoRA | saved MiB fused / LoRA / DoRA | rel err | targets |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for row in layer:
            res, m = row["results"], row["metrics"]
            fr = res.get("fused", {})
            fused_ms = _fused_ms_cell(fr)
            L.append(_md_row([
                row["key"], fused_ms, _f(_ms(res, "floor")), _x(m.get("ratio_floor")), _x(m.get("wall_ratio_floor")),
                _x(m.get("x_peft_dora")),
                _x(m.get("x_peft_lora")), _x(m.get("x_eager")), _f(m.get("tflops"), "{:.0f}"),
                f"{_f(fr.get('peak_mib'), '{:.0f}')} / {_f(res.get('peft_dora', {}).get('peak_mib'), '{:.0f}')}",
                f"{_f(fr.get('saved_mib'), '{:.3g}')} / {_f(res.get('peft_lora', {}).get('saved_mib'), '{:.3g}')} / "
                f"{_f(res.get('peft_dora', {}).get('saved_mib'), '{:.3g}')}",
                _f(fr.get("err"), "{:.1e}"), _verdicts(row, smoke)]))
        L.append("")
    if norm:
        L.append("## The norm ||W + s*B@A|| (one pass over W)")
        L.append("")
        L.append("| case | fused ms | ideal ms (W at measured BW) | fused GB/s (% of BW) | % of a forward | "
                 "PEFT DoRA norm ms | eager dense ms | reference ms | peak MiB fused / PEFT | targets |")
        L.append("|---|---|---|---|---|---|---|---|---|---|")
        for row in norm:
            res, m = row["results"], row["metrics"]
            fr = res.get("fused", {})
            fused_ms = _fused_ms_cell(fr)
            gbs = f"{_f(m.get('norm_gbs'), '{:.0f}')} ({_f(m.get('bw_frac') and 100 * m['bw_frac'], '{:.0f}')}%)"
            L.append(_md_row([
                row["key"], fused_ms, _f(_ms(res, "floor")), gbs,
                _f(m.get("norm_frac_fwd") and 100 * m["norm_frac_fwd"], "{:.1f}%"),
                _f(_ms(res, "peft_dora")), _f(_ms(res, "eager_dense")), _f(_ms(res, "ref_eager")),
                f"{_f(fr.get('peak_mib'), '{:.0f}')} / {_f(res.get('peft_dora', {}).get('peak_mib'), '{:.0f}')}",
                _verdicts(row, smoke)]))
        L.append("")
    if models:
        L.append("## Whole model")
        L.append("")
        L.append("| case | competitor | step ms | tokens/s | peak GiB | xPEFT DoRA | time / PEFT LoRA | status |")
        L.append("|---|---|---|---|---|---|---|---|")
        for row in models:
            res = row["results"]
            pd, pl = _ms(res, "peft_dora"), _ms(res, "peft_lora")
            for name, r in res.items():
                t = r.get("ms")
                L.append(_md_row([
                    row["key"], name, _f(t, "{:.1f}"), _f(r.get("tokens_per_s"), "{:.0f}"), _f(r.get("peak_gib"), "{:.2f}"),
                    _x(pd / t if (pd and t) else None), _x(t / pl if (pl and t) else None), r.get("status", "")]))
            L.append(f"| {row['key']} | **targets** | | | | | | {_verdicts(row, smoke)} |")
        L.append("")
    L.append("## Targets")
    L.append("")
    L.append("| id | target | met | missed | n/a | worst case |")
    L.append("|---|---|---|---|---|---|")
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
        if not _judged(chk.id, smoke):
            L.append(f"| {chk.id} | {chk.text} | - | - | {len(got)} | smoke run: a timing, no verdict on CPU |")
        else:
            L.append(f"| {chk.id} | {chk.text} | {met} | {len(missed)} | {na} | {worst} |")
    L.append("")
    L.append("## Every competitor")
    L.append("")
    L.append("| case | competitor | median ms | p20-p80 ms | reps | wall ms | x floor | TFLOP/s | peak MiB | saved MiB "
             "| dense [N,K] tmp | rel err | status |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in layer + norm:
        c = Case(**row["case"])
        res = row["results"]
        fl = _ms(res, "floor")
        for name, r in res.items():
            t = r.get("ms")
            tf = c.flops(name) / (t * 1e-3) / 1e12 if (t and c.mode != "norm" and name != "linear_fwd") else None
            L.append(_md_row([
                row["key"], name, _f(t), f"{_f(r.get('p20'))}-{_f(r.get('p80'))}" if "p20" in r else "-",
                _f(r.get("reps"), "{}"), _f(r.get("wall_ms")), _x(t / fl if (t and fl) else None), _f(tf, "{:.0f}"),
                _f(r.get("peak_mib"), "{:.0f}"), _f(r.get("saved_mib"), "{:.4g}"),
                _f(r.get("dense_tmp"), "{}") + (f" ({r['dense_tmp_mib']:.0f} MiB)" if r.get("dense_tmp") else ""),
                _f(r.get("err"), "{:.1e}"), r.get("status", "")]))
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
    L = ["| case | fused ms | floor ms | fused/floor | xPEFT DoRA | xPEFT LoRA | xeager | peak fused/DoRA | targets |",
         "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        res, m = row["results"], row["metrics"]
        mode = row["case"]["mode"]
        if mode in ("model", "paper"):
            fv = m.get("fused_variant", "fused_peft")
            fr = res.get(fv, {})
            L.append(_md_row([
                row["key"] + f" [{fv}]", _f(fr.get("ms"), "{:.1f}") if fr.get("ms") else fr.get("status", "-"),
                "-", "-", _x(m.get("x_peft_dora")), _x(m.get("x_peft_lora")), "-",
                _x(m.get("peak_vs_peft_dora")), _verdicts(row, smoke)]))
            continue
        fr = res.get("fused", {})
        pk = None
        if fr.get("peak_mib") is not None and res.get("peft_dora", {}).get("peak_mib"):
            pk = fr["peak_mib"] / res["peft_dora"]["peak_mib"]
        L.append(_md_row([
            row["key"], _fused_ms_cell(fr),
            _f(_ms(res, "floor")), _x(m.get("ratio_floor")), _x(m.get("x_peft_dora")), _x(m.get("x_peft_lora")),
            _x(m.get("x_eager")), _x(pk), _verdicts(row, smoke)]))
    return "\n".join(L)


def write_chart(rows: List[dict], path: Path, title: str) -> Optional[str]:
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


def _versions() -> dict:
    v = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("triton", "peft", "transformers", "fused_dora"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception:
            v[mod] = None
    return v


def _git_rev() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("+dirty" if dirty else "") if rev else "?"
    except Exception:
        return "?"


def device_info(dev: torch.device) -> dict:
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        return {"device": torch.cuda.get_device_name(dev), "capability": list(torch.cuda.get_device_capability(dev)),
                "sms": p.multi_processor_count, "memory_gib": round(p.total_memory / 2**30, 1),
                "l2_mib": round(getattr(p, "L2_cache_size", 0) / 2**20, 1), "cuda": torch.version.cuda}
    return {"device": f"CPU ({platform.processor() or platform.machine()}), Triton interpreter"}


def slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")[:48] or "device"


# ---------------------------------------------------------------------------------------------
# CPU smoke: parity of the Triton path (interpreter) with a float64 reference and with PEFT
# ---------------------------------------------------------------------------------------------
def smoke_parity(dev: torch.device, log) -> bool:
    from fused_dora import FusedDoraLinear, reference
    from fused_dora.functional import draw_dropout_seed, triton_available_for

    why = triton_available_for(dev)
    if why:
        log(f"  parity: fused Triton path cannot run here ({why}); skipped")
        return True
    M, K, N, r = 33, 48, 40, 8
    s = 2.0
    ok = True
    log(f"  parity at M={M}, in={K}, out={N}, r={r}: relative error ||a - b|| / ||b|| against float64")
    log("  | dtype | dropout | path | y | dx | dA | dB | dmag | tol | ok |")
    log("  |---|---|---|---|---|---|---|---|---|---|---|")
    for act_name, tol in (("float32", 1e-4), ("float16", 2e-3)):
        act = _dt(act_name)
        for p in (0.0, DROPOUT):
            g = torch.Generator().manual_seed(5)
            W = nn.Parameter((torch.randn(N, K, generator=g) / math.sqrt(K)).to(dev, act), requires_grad=False)
            A = torch.randn(r, K, generator=g) / math.sqrt(K)
            B = torch.randn(N, r, generator=g) * 0.2
            mag = torch.linalg.vector_norm(W.double() + s * B.double() @ A.double(), dim=1) * (
                1 + 0.1 * torch.randn(N, generator=g, dtype=torch.float64))
            x0 = torch.randn(M, K, generator=g).to(dev, act)
            gy = torch.randn(M, N, generator=g).to(dev, act)
            layer = FusedDoraLinear.from_linear(_linear_sharing(W), r=r, lora_alpha=s * r, lora_dropout=p,
                                                adapter_dtype=torch.float32)
            layer.backend = "triton"
            for prm, val in ((layer.lora_A, A), (layer.lora_B, B), (layer.magnitude, mag)):
                _set_param(prm, val, torch.float32)
            layer.clear_norm_cache()
            layer.train()
            x = x0.clone().requires_grad_(True)
            mask = None
            if p > 0:  # the seed the op will draw, to rebuild its mask for the reference
                state = torch.get_rng_state()
                seed = draw_dropout_seed()
                torch.set_rng_state(state)
            y = layer(x)
            y.backward(gy)
            if p > 0:
                try:
                    from fused_dora.kernels import dropout_mask

                    mask = dropout_mask(seed, M, K, p, dev)
                except Exception as exc:
                    log(f"  | {act_name} | {p} | fused | dropout mask not reproducible ({exc}); skipped |")
                    continue
            x64 = x0.double().requires_grad_(True)
            A64, B64, m64 = (t.double().clone().requires_grad_(True) for t in (A, B, mag))
            y64 = reference.dora_linear(x64, W.double(), None, A64, B64, m64, s, p, training=p > 0, dropout_mask=mask)
            y64.backward(gy.double())
            errs = [_rel_err(y, y64), _rel_err(x.grad, x64.grad), _rel_err(layer.lora_A.grad, A64.grad),
                    _rel_err(layer.lora_B.grad, B64.grad), _rel_err(layer.magnitude.grad, m64.grad)]
            good = all(e <= tol for e in errs)
            ok &= good
            log(f"  | {act_name} | {p} | fused (Triton, interpreter) | " + " | ".join(f"{e:.1e}" for e in errs)
                + f" | {tol:g} | {'ok' if good else 'FAIL'} |")
            if p == 0:  # PEFT DoRA computes the same function without dropout
                try:
                    data = CaseData(Case("train0", "tiny", M, r), dev, act, torch.float32, W, A.float(), B.float(),
                                    mag.float(), [], [])
                    peft_layer, _ = _build_peft_layer(data, True, W)
                    xp = x0.clone().requires_grad_(True)
                    yp = peft_layer(xp)
                    yp.backward(gy)
                    pa = peft_layer.lora_A["default"].weight.grad
                    pb = peft_layer.lora_B["default"].weight.grad
                    pm = peft_layer.lora_magnitude_vector["default"].weight.grad
                    perrs = [_rel_err(yp, y64), _rel_err(xp.grad, x64.grad), _rel_err(pa, A64.grad),
                             _rel_err(pb, B64.grad), _rel_err(pm, m64.grad)]
                    log(f"  | {act_name} | {p} | PEFT DoRA (for comparison) | " + " | ".join(f"{e:.1e}" for e in perrs)
                        + " | - | info |")
                except Unavailable as exc:
                    log(f"  | {act_name} | {p} | PEFT DoRA | skipped: {exc} |")
    return ok


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------
def _csv(kind):
    def parse(s: str):
        items = [t.strip() for t in s.split(",") if t.strip()]
        return [kind(t) for t in items]
    return parse


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Shapes: " + ", ".join(f"{k} = {v[0]}" for k, v in SHAPES.items())
                                 + "\nModes: " + "; ".join(f"{k}: {v}" for k, v in MODES.items())
                                 + "\nCompetitors: " + "; ".join(f"{k}: {v}" for k, v in COMPETITORS.items()))
    ap.add_argument("--preset", choices=("full", "quick"), default="full",
                    help="curated case list (default full: ~8 min budget on an H100)")
    ap.add_argument("--quick", action="store_const", const="quick", dest="preset", help="same as --preset quick")
    ap.add_argument("--grid", action="store_true",
                    help="run the full cross product of --cases/--tokens/--ranks/--dtypes/--modes instead of a preset")
    ap.add_argument("--cases", type=_csv(str), help=f"shape keys, comma separated: {','.join(SHAPES)}")
    ap.add_argument("--tokens", type=_csv(int), help=f"token counts M (default for --grid: {','.join(map(str, TOKENS))})")
    ap.add_argument("--ranks", type=_csv(int), help=f"ranks r (default for --grid: {','.join(map(str, RANKS))}; hr keeps 384)")
    ap.add_argument("--dtypes", type=_csv(str), help=f"dtype pairs: {','.join(DTYPES)} (activation+adapters)")
    ap.add_argument("--modes", type=_csv(str), help=f"modes: {','.join(MODES)}")
    ap.add_argument("--competitors", type=_csv(str),
                    help="competitors to run (floor always runs): " + ",".join(k for k in COMPETITORS if k != "linear_fwd"))
    ap.add_argument("--model", action="store_true", help="add the whole-model case (in the full preset already)")
    ap.add_argument("--paper-protocol", action="store_true", help="add the Scaling-DoRA protocol (in the full preset already)")
    ap.add_argument("--no-model", action="store_true", help="drop the whole-model and paper cases")
    ap.add_argument("--model-config", choices=[k for k in MODEL_CONFIGS if k != "tiny"], default="llama-1b")
    ap.add_argument("--model-r", type=int, default=16)
    ap.add_argument("--model-dropout", type=float, default=0.0)
    ap.add_argument("--paper-config", choices=[k for k in MODEL_CONFIGS if k != "tiny"], default="llama-8b")
    ap.add_argument("--model-warmup", type=int, default=2)
    ap.add_argument("--model-steps", type=int, default=5)
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="wall-time budget; cases past it are listed as not run (default 8 full, 2 quick; 0 = none)")
    ap.add_argument("--target-ms", type=float, default=None, help="timed work per measurement (default 80, quick 50)")
    ap.add_argument("--min-reps", type=int, default=5)
    ap.add_argument("--no-flush", action="store_true", help="do not flush L2 before each timed repeat")
    ap.add_argument("--train-norm", choices=("per-step", "cached"), default="per-step",
                    help="training: fused/reference recompute the norm every step (as after an optimizer step; "
                         "default) or reuse it (gradient accumulation)")
    ap.add_argument("--norm-fwd-tokens", type=int, default=4096, help="M of the forward the norm is compared with")
    ap.add_argument("--autotune-rep-ms", type=float, default=25.0,
                    help="Triton autotune timing per config (ms; 0 = Triton's default 100 ms): keeps the run short")
    ap.add_argument("--smoke", action="store_true", help="tiny-shape smoke run (automatic without a GPU)")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results; smoke: a temp dir)")
    ap.add_argument("--no-save", action="store_true", help="print only; write no files")
    ap.add_argument("--list", action="store_true", help="print the plan and exit")
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of failing competitors")
    args = ap.parse_args(argv)
    return args


def select_cases(args, smoke: bool):
    """(layer cases in run order, whole-model specs in run order)."""
    if smoke:
        cases = preset_cases("smoke")
    elif args.grid:
        cases = grid_cases(args.cases or list(LLAMA_SHAPES) + ["hr"], args.tokens or list(TOKENS),
                           args.ranks or list(RANKS), args.dtypes or ["bf16+fp32"], args.modes or list(LAYER_MODES))
    else:
        cases = preset_cases(args.preset)
    if not args.grid:
        if args.cases:
            cases = [c for c in cases if c.shape in args.cases]
        if args.tokens:
            cases = [c for c in cases if c.mode == "norm" or c.M in args.tokens]
        if args.ranks:
            cases = [c for c in cases if c.r in args.ranks]
        if args.dtypes and not smoke:
            cases = [c for c in cases if c.dtype in args.dtypes]
        if args.modes:
            cases = [c for c in cases if c.mode in args.modes]
    for c in cases:
        if c.shape not in SHAPES or c.dtype not in DTYPES:
            raise SystemExit(f"unknown shape or dtype in {c.key}")
    cases = sorted(dict.fromkeys(cases), key=lambda c: c.tier)  # stable: preset order inside a tier
    specs = model_specs(smoke, args)
    if smoke:
        want = ["model"] if (not args.modes or "model" in args.modes) else []
    else:
        want = []
        default_on = args.preset == "full" and not args.grid
        for mode in ("model", "paper"):
            flag = args.model if mode == "model" else args.paper_protocol
            if flag or (args.modes and mode in args.modes) or (default_on and not args.modes):
                want.append(mode)
        if args.no_model:
            want = []
    return cases, [specs[m] for m in want]


def patch_autotune(rep_ms: float) -> int:
    """Shorter autotune timing for the fused kernels' autotuners (the choice stays Triton's)."""
    if rep_ms <= 0:
        return 0
    try:
        import triton.testing
        from triton.runtime.autotuner import Autotuner

        import fused_dora.kernels as kern
    except Exception:
        return 0
    bench = lambda kernel_call, quantiles: triton.testing.do_bench(  # noqa: E731
        kernel_call, warmup=max(1, rep_ms / 5), rep=rep_ms, quantiles=quantiles)
    import importlib
    import pkgutil

    patched = 0
    for info in pkgutil.iter_modules(kern.__path__):
        mod = importlib.import_module(f"fused_dora.kernels.{info.name}")
        for obj in vars(mod).values():
            if isinstance(obj, Autotuner):
                obj._do_bench = bench
                obj.__dict__.pop("do_bench", None)
                patched += 1
    return patched


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    has_cuda = torch.cuda.is_available()
    smoke = args.smoke or (not has_cuda and not args.list)  # --list shows the GPU plan unless --smoke
    dev = torch.device("cuda") if has_cuda else torch.device("cpu")
    log = lambda s="": print(s, flush=True)  # noqa: E731

    known = set(COMPETITORS) | set(MODEL_COMPETITORS)
    comp = args.competitors or [k for k in known if not (args.preset == "quick" and k == "ref_compile")]
    bad = [c for c in comp if c not in known]
    if bad:
        raise SystemExit(f"unknown competitor(s) {bad}; known: {sorted(known)}")
    args.competitor_set = set(comp) | {"floor"}

    cases, specs = select_cases(args, smoke)
    budget_min = args.max_minutes if args.max_minutes is not None else (2.0 if args.preset == "quick" else 8.0)
    if smoke:
        budget_min = 0
    if args.list:
        for c in cases:
            log(f"tier {c.tier}  {c.key}")
        for s in specs:
            log(f"model   {s.key}")
        log(f"{len(cases)} layer cases, {len(specs)} whole-model cases; competitors: {sorted(args.competitor_set)}")
        return 0

    log(f"fused_dora bench: {'SMOKE (CPU, Triton interpreter)' if smoke and not has_cuda else ('smoke' if smoke else args.preset)}"
        f" on {device_info(dev)['device']}")
    if smoke and not has_cuda:
        log("No CUDA device: running the smoke mode. Timings need a GPU; the figures below only show that "
            "every code path runs.")
        log(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}")
    if not smoke:
        patch_autotune(args.autotune_rep_ms)
    timer = Timer(dev, target_ms=args.target_ms or (50.0 if args.preset == "quick" else 80.0),
                  min_reps=args.min_reps, flush=not args.no_flush)
    bw = measure_bandwidth(dev)
    log(f"measured memory bandwidth: {bw / 1e9:.0f} GB/s" + (" (host memory; meaningless)" if dev.type != "cuda" else ""))

    parity_ok = True
    if smoke:
        log("")
        log("== parity (fused Triton path vs float64 reference, forward and every gradient)")
        parity_ok = smoke_parity(dev, log)

    deadline = t_start + budget_min * 60 if budget_min else None
    reserve = sum(180 if s.mode == "paper" else 90 for s in specs)
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
                log(f"{head} fused {fr['ms']:.4g} ms  x{_f(m.get('ratio_floor'), '{:.2f}')} floor  "
                    f"{_f(m.get('x_peft_dora'), '{:.2f}')}x PEFT DoRA  {_f(m.get('x_peft_lora'), '{:.2f}')}x PEFT LoRA"
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
        need = 180 if spec.mode == "paper" else 90
        if left() < need and not smoke:
            skipped.append((spec.key, f"time budget ({budget_min:g} min; raise --max-minutes or run --modes {spec.mode})"))
            log(f"  {spec.key}: skipped (time budget)")
            continue
        t0 = time.time()
        row = run_model_case(spec, args, dev, log, left)
        rows.append(row)
        log(f"  {spec.key}: done in {time.time() - t0:.0f}s")
    run_layers(rest, 0, len(first))
    if smoke:
        log("  paper protocol: skipped (an 8B model at r=384 needs a GPU)")

    wall = time.time() - t_start
    meta = {
        **device_info(dev),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + shlex.join([os.path.relpath(sys.argv[0]) if sys.argv and sys.argv[0] else "bench.py"]
                                           + (argv if argv is not None else sys.argv[1:])),
        "versions": _versions(), "git": _git_rev(), "bandwidth_gbs": bw / 1e9,
        "timing": ("CUDA events, median of adaptive repeats after warm-up, L2 flushed before each, "
                   f"rotating inputs; training norm: {args.train_norm}; autotune rep {args.autotune_rep_ms:g} ms"
                   if dev.type == "cuda" else "CPU smoke (perf_counter, one call; meaningless)"),
        "preset": "smoke" if smoke else ("grid" if args.grid else args.preset),
        "budget": f"{budget_min:g} min" if budget_min else "none", "wall_s": wall,
        "smoke": smoke, "skipped_cases": skipped,
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
        "env": {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "FUSED_DORA_AUTOTUNE", "CUDA_VISIBLE_DEVICES")},
        "checks": [dataclasses.asdict(c) for c in CHECKS],
        "parity_ok": parity_ok,
    }
    log("")
    log("== summary" + (" (smoke run: CPU timings are meaningless; only the byte-count targets get verdicts)"
                        if smoke else ""))
    log(summary_table(rows, smoke))
    md = markdown_report(meta, rows, smoke)
    if not smoke:
        log("")
        log(md[md.index("## Targets"):md.index("## Every competitor")].rstrip())
    if skipped:
        log(f"\n{len(skipped)} case(s) not run: " + ", ".join(k for k, _ in skipped[:8]) + (" ..." if len(skipped) > 8 else ""))

    if not args.no_save:
        out = args.out or (Path(tempfile.mkdtemp(prefix="fused_dora_smoke_")) if smoke else RESULTS_DIR)
        out.mkdir(parents=True, exist_ok=True)
        stem = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M") + "_" + slug(meta["device"])
        if smoke:
            stem += "_smoke"
        (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
        (out / f"{stem}.md").write_text(md)
        msg = write_chart(rows, out / f"{stem}.png", f"fused_dora speedups — {meta['device']} — {meta['date']}")
        log(f"\nwrote {out / stem}.json, .md" + ("" if msg else ", .png") + (f"  ({msg})" if msg else ""))

    if smoke:
        log("")
        if not has_cuda:
            log("SMOKE MODE: no CUDA device. Timings need a GPU: run `python benchmarks/bench.py` on an H100/H200.")
            log("Measured here: parity, and the byte-count targets T9 (bytes saved for backward) and T11 (no dense "
                "[out, in] temporary), which do not depend on the device (fp16 standing for bf16).")
            log("Skipped here: all timings and peak memory, torch.compile (ref_compile), bf16 (the interpreter "
                "has no bf16), the timing and peak-memory verdicts, the ~1B-model and Scaling-DoRA cases (a tiny "
                "model ran instead).")
        log("parity: " + ("ok" if parity_ok else "FAILED (see the table above)"))
    log(f"done in {time.time() - t_start:.0f}s")
    return 0 if parity_ok else 1


if __name__ == "__main__":
    sys.exit(main())
