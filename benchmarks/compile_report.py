#!/usr/bin/env python
"""Compile every fused_dora kernel for a named GPU on a machine without one, and report.

    python benchmarks/compile_report.py --target sm_90                   markdown on stdout
    python benchmarks/compile_report.py --target sm_90,sm_80 --out benchmarks/results/compile_report_{target}.md
    python benchmarks/compile_report.py --target sm_90 --subset ci --check --json report.json

Every autotuned kernel x every GPU config x the dtype combinations the API accepts (activations
fp16 / bf16 / fp32; adapters fp32 or the activation dtype) x r in {16, 384} x dropout on / off
where the kernel has that switch (the forward epilogues: training, which also stores q, and
inference; lora_up_grad: e = dy * c also stored, for the composed route's torch.mm, or not).
fused_dora's own drivers of the launchers run on meta tensors, on both routes (fused: the
Triton GEMMs; composed: torch.mm with the passes of kernels/composed.py), with each kernel's
launch captured instead of executed, so the arguments (block sizes, precisions, upcasts,
specialisations) are the ones a GPU run would pass; each config is then compiled through
``JITFunction.warmup`` against a stand-in driver that reports the target. Triton's cache keeps
the results (a re-run is quick); compiles run in a process pool (``--jobs``).

Per config: the launcher's shared-memory estimate (its ``smem_bytes``, what tuning.autotune
prunes by) against the compiled ``metadata.shared``; whether the autotuner can pick the config on
that GPU (it survives the pruning by shared memory and by kernels/_spills.py, the configs measured
to spill, which ``--write-spills`` rewrites from this report); registers and stack (spill) bytes per
thread from the bundled ``cuobjdump -res-usage``; the tensor-core instructions in the PTX
(tcgen05: Blackwell MMA; wgmma: Hopper warpgroup MMA; mma: the Ampere-style mma.sync).

``--check`` exits 1 on what tests/test_compile_report.py fails on: a compile error, a spill in
a pickable config, an estimate below the compiled figure, a GEMM tile with BLOCK_M >= 64
without wgmma on sm_90.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.runtime.driver import driver

from fused_dora import drivers
from fused_dora.kernels import tuning
from fused_dora.kernels.quant_norm import dora_quant_row_norm
from fused_dora.kernels.tuning import case_variant, config_name, pickable_configs, smem_budget, spill_case

ROOT = Path(__file__).resolve().parents[1]
TUNED_KERNELS = tuning.tuned_kernels()  # every kernel family imported: compiled for the GPU named, never run

warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")

# name -> (Triton target, max shared memory per block (opt-in) in bytes, GPUs)
TARGETS = {
    "sm_80": (GPUTarget("cuda", 80, 32), 166912, "A100"),
    "sm_90": (GPUTarget("cuda", 90, 32), 232448, "H100 / H200"),
    "sm_100": (GPUTarget("cuda", 100, 32), 232448, "B200"),
}
GEMM_KERNELS = ("_dora_forward_kernel", "_dora_input_grad_kernel")  # the two [M, N, K] GEMMs
SHAPE = dict(M=4096, K=4096, N=4096)  # sizes only decide specialisations (multiples of 16)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# (activations, adapters): what dora_linear accepts
DTYPE_PAIRS = [("bf16", "fp32"), ("bf16", "bf16"), ("fp16", "fp32"), ("fp16", "fp16"), ("fp32", "fp32")]
RANKS = (16, 384)
# the CI test's subset: bf16 activations with fp32 adapters (PEFT's default) at the high rank and
# all-bf16 at a common rank, every kernel and config, dropout on (the heavier variant)
SUBSET_WORDS = {"ci": "bf16 activations with fp32 adapters at r = 384 and all-bf16 at r = 16, dropout on",
                "bench": "bf16 activations with fp32 adapters at r = 16 (bench.py's cases), dropout off and on"}
SUBSETS = {
    "full": [(x, a, r, d) for x, a in DTYPE_PAIRS for r in RANKS for d in (False, True)],
    "ci": [("bf16", "fp32", 384, True), ("bf16", "bf16", 16, True)],
    "bench": [("bf16", "fp32", 16, False), ("bf16", "fp32", 16, True)],
}
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


class TargetDriver(DriverBase):
    """A compile-only stand-in for the CUDA driver: reports ``target``, launches nothing."""

    def __init__(self, target: GPUTarget):
        super().__init__()
        self.target = target

    @classmethod
    def is_active(cls):
        return False  # never chosen by Triton itself; installed with driver.set_active

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("meta")

    def map_python_to_cpp_type(self, ty):
        raise NotImplementedError("compile only")

    def get_benchmarker(self):
        raise NotImplementedError("compile only")


# ---------------------------------------------------------------- launches, captured on meta tensors

def _record(calls, name, *args, grid, warmup, **kwargs):
    calls.append((name, args, kwargs))


def captured_launches(x_dtype, adapter_dtype, r: int, dropout: bool, sms: int = 132):
    """[(kernel name, args, kwargs)] of every autotuned launch of one training step, on both routes.

    fused_dora's own drivers of the launchers (the norm, the 4-bit norm, the forward, the backward with every
    gradient; route "fused", then route "composed", whose torch.mm works on meta tensors too) runs
    on meta tensors; each kernel's launch is recorded instead of run.
    """
    M, Kd, N = SHAPE["M"], SHAPE["K"], SHAPE["N"]
    p, seed, s, meta = (0.1 if dropout else 0.0), 1234, 2.0, "meta"
    x = torch.empty(M, Kd, dtype=x_dtype, device=meta)
    w = torch.empty(N, Kd, dtype=x_dtype, device=meta)
    bias = torch.empty(N, dtype=x_dtype, device=meta)
    a = torch.empty(r, Kd, dtype=adapter_dtype, device=meta)
    b = torch.empty(N, r, dtype=adapter_dtype, device=meta)
    mag = torch.empty(N, dtype=adapter_dtype, device=meta)
    dy = torch.empty(M, N, dtype=x_dtype, device=meta)
    calls = []
    real_num_sms = tuning.num_sms
    tuning.num_sms = lambda device: sms
    for name, tuned in TUNED_KERNELS.items():
        tuned.kernel.run = lambda *args, _name=name, **kwargs: _record(calls, _name, *args, **kwargs)
    try:
        norm = drivers.row_norm(w, a, b, s)  # the norm pass finishing its rows itself, then (eval) cached
        # the row norm of a 4-bit weight (QDoRA, kernels/quant_norm.py): NF4 codes, double-quantized
        # absmax (what QLoRA uses), dequantized to the activation dtype
        blocks = -(-N * Kd // 64)
        dora_quant_row_norm(
            torch.empty((N * Kd + 1) // 2, dtype=torch.uint8, device=meta), torch.empty(16, device=meta),
            torch.empty(blocks, dtype=torch.uint8, device=meta), 64, (N, Kd), x_dtype, a, b, s,
            nested_absmax=torch.empty(-(-blocks // 256), device=meta), nested_code=torch.empty(256, device=meta),
            nested_offset=torch.empty(1, device=meta))
        for route in ("fused", "composed"):
            if not dropout:  # inference with the cached norm: no q stored
                drivers.fused_forward(x, w, bias, a, b, mag, norm, s, 0.0, seed, False, route=route)
            # training: the norm's partial sums, finished by the GEMM's epilogue
            _, su, q, norm = drivers.fused_forward(x, w, bias, a, b, mag, None, s, p, seed, True, route=route)
            drivers.fused_backward(dy, x, w, a, b, su, q, mag, norm, s, p, seed, need_dx=True, need_da=True,
                                   need_db=True, need_dmag=True, route=route)
        # a layer whose input needs no gradient (the first one, over frozen embeddings): lora_up_grad
        # forms v alone, e not stored
        drivers.fused_backward(dy, x, w, a, b, su, q, mag, norm, s, p, seed, need_dx=False, need_da=True,
                               need_db=True, need_dmag=True)
    finally:
        tuning.num_sms = real_num_sms
        for tuned in TUNED_KERNELS.values():
            del tuned.kernel.run
    return calls


def _plain(value):
    """An argument as the compile worker gets it: tensors become their dtype (a MockTensor)."""
    return value.dtype if isinstance(value, torch.Tensor) else value


def build_jobs(target_name: str, cases):
    """One row per (case, kernel, config); compile jobs deduplicated by what is compiled."""
    target, max_smem, _ = TARGETS[target_name]
    budget, arch = smem_budget(max_smem), target.arch
    driver.set_active(TargetDriver(target))  # launchers may choose arguments by the GPU's architecture
    rows, jobs, seen = [], {}, set()
    for xd, ad, r, dropout in cases:
        launches = [call for sms in (132, 1) for call in captured_launches(DTYPES[xd], DTYPES[ad], r, dropout, sms)]
        for name, args, kwargs in launches:
            tuned = TUNED_KERNELS[name]
            arg_map = {**dict(zip(tuned.kernel.arg_names, args)), **kwargs}
            # the forward epilogues finishing the norm's partial sums: one slice or several (the loads
            # are unrolled), compiled apart; the spill table keeps their union under one case
            splits = kwargs.get("NORM_SPLITS", 0)
            switch = case_variant(kwargs) + ("" if not splits else " 1-norm-split" if splits == 1 else " norm-splits")
            if (name, xd, ad, r, switch) in seen:
                continue
            seen.add((name, xd, ad, r, switch))
            plain_args = tuple(_plain(v) for v in args)
            spilling = tuned.spilling(arg_map, arch)
            pick = [pickable_configs(tuned.configs, arg_map, tuned.smem_bytes, budget, spilling=spilling, keep_all=keep)
                    for keep in (True, False)]
            for i, cfg in enumerate(tuned.configs):
                full = {**arg_map, **cfg.all_kwargs()}
                key = (name, repr(plain_args), repr(sorted(kwargs.items())), i)
                jobs[key] = (target_name, name, plain_args, kwargs, i)
                rows.append(dict(
                    kernel=name, x=xd, adapters=ad, r=r, variant=switch, precision=kwargs.get("PRECISION"),
                    config=i, blocks={k: v for k, v in cfg.kwargs.items() if k.startswith("BLOCK_")},
                    block_r=kwargs.get("BLOCK_R"), warps=cfg.num_warps, stages=cfg.num_stages,
                    estimate=tuned.smem_bytes(full), fits=tuned.smem_bytes(full) <= budget,
                    spill_pruned=config_name(cfg) in spilling, case=spill_case(arg_map, tuned.case_dtypes),
                    name=config_name(cfg),
                    pickable=cfg in pick[0], default=cfg is pick[1][0], key=key,
                ))
    return rows, jobs


# ---------------------------------------------------------------- compiling (in worker processes)

_WORKER_TARGET = None
_COMPILED_HERE = []  # the @triton.jit functions compile_for has compiled in this process


def compile_for(target_name: str, fn, args, kwargs):
    """``fn`` (a @triton.jit function) compiled for ``target_name`` through ``JITFunction.warmup``
    (tensor arguments given as their dtypes), in this process; raises what the compiler raises."""
    global _WORKER_TARGET
    if _WORKER_TARGET != target_name:  # a JITFunction caches its target per device: reset it
        driver.set_active(TargetDriver(TARGETS[target_name][0]))
        for f in [t.kernel.fn for t in TUNED_KERNELS.values()] + _COMPILED_HERE:
            f.device_caches.clear()
        _WORKER_TARGET = target_name
    if not any(f is fn for f in _COMPILED_HERE):
        _COMPILED_HERE.append(fn)
    return fn.warmup(*args, grid=(1,), **kwargs)


def _error_line(exc) -> str:
    """What a compiler error says went wrong: Triton's CompilationError ends with a source excerpt
    and a caret line, and chains the error that names the problem, so report the innermost cause's
    message beside the outer error's position."""
    inner = exc
    while (inner.__cause__ or inner.__context__) is not None:
        inner = inner.__cause__ or inner.__context__
    where = next((ln.strip() for ln in str(exc).strip().splitlines() if ln.strip().startswith("at ")), "")
    what = " ".join(str(inner).split())[-200:] if inner is not exc else ""
    text = f"{where} {type(inner).__name__}: {what}" if what else " ".join(str(exc).split())[-200:]
    return text.strip()


def compile_one(job):
    """{shared, regs, stack, mma, error, seconds} for one (target, kernel, args, config)."""
    target_name, name, args, kwargs, config_index = job
    tuned = TUNED_KERNELS[name]
    cfg = tuned.configs[config_index]
    start = time.perf_counter()
    try:
        compiled = compile_for(target_name, tuned.kernel.fn, args, {**kwargs, **cfg.all_kwargs()})
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return dict(error=f"{type(exc).__name__}: {_error_line(exc)}", seconds=time.perf_counter() - start)
    regs, stack = resource_usage(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    mma = "+".join(m for m, pat in (("tcgen05", "tcgen05.mma"), ("wgmma", "wgmma.mma_async"), ("mma", "mma.sync"))
                   if pat in ptx) or "none"
    return dict(shared=compiled.metadata.shared, regs=regs, stack=stack, mma=mma, error=None,
                seconds=time.perf_counter() - start)


def resource_usage(cubin: bytes):
    """(registers, stack bytes) per thread, from ``cuobjdump -res-usage``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(CUOBJDUMP), "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return int(match.group(1)), int(match.group(2))


def compile_all(jobs: dict, workers: int, progress=None, worker=compile_one):
    """key -> worker(job) (default compile_one), ``workers`` processes (forked: they inherit the kernels)."""
    results = {}
    items = list(jobs.items())
    if workers <= 1:
        for i, (key, job) in enumerate(items):
            results[key] = worker(job)
            if progress:
                progress(i + 1, len(items))
        return results
    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        futures = {pool.submit(worker, job): key for key, job in items}
        for i, fut in enumerate(concurrent.futures.as_completed(futures)):
            results[futures[fut]] = fut.result()
            if progress:
                progress(i + 1, len(items))
    return results


# ---------------------------------------------------------------- checks and the report

def problems(row, target_name: str):
    """What the CI test fails on, for one compiled row (an empty list when clean)."""
    found = []
    if row["error"]:
        return [f"compile error: {row['error']}"]
    if row["pickable"] and row["stack"] > 0:
        found.append(f"spills {row['stack']} B/thread in a pickable config")
    if row["estimate"] < row["shared"]:
        found.append(f"shared-memory estimate {row['estimate']} B < compiled {row['shared']} B")
    if (target_name == "sm_90" and row["kernel"] in GEMM_KERNELS and row["blocks"]["BLOCK_M"] >= 64
            and row["precision"] != "ieee" and "wgmma" not in row["mma"]):  # ieee: fp32 FMA, as F.linear without TF32
        found.append("BLOCK_M >= 64 GEMM tile without wgmma")
    return found


def _case(row):
    return f"{row['x']}/{row['adapters']}", str(row["r"]), row["variant"]


def _tile(row):
    return "x".join(str(v) for v in row["blocks"].values())


def markdown(target_name: str, rows, seconds: float, with_rows: bool = False, subset: str = "full") -> str:
    """The report: header, per-kernel summary and the problems; ``with_rows`` adds every row."""
    target, max_smem, gpus = TARGETS[target_name]
    budget = smem_budget(max_smem)
    out = [
        f"# Compile report: {target_name} ({gpus})",
        "",
        f"triton {triton.__version__}, torch {torch.__version__}, {datetime.date.today().isoformat()}, "
        f"git {_git_rev()}; {len(rows)} kernel x config x case rows, compiled in {seconds:.0f} s. "
        f"Generated by `python benchmarks/compile_report.py --target {target_name}"
        + ("`." if subset == "full" else f" --subset {subset}`: {SUBSET_WORDS[subset]}."),
        "",
        f"Shared memory: {max_smem:,} B per block. The autotuner prunes, before compiling, the configs whose "
        f"estimate exceeds {budget:,} B (90%) and those kernels/_spills.py lists for {target_name} "
        "(measured to spill); "
        "the rest are *pickable* (*dflt*: the one FUSED_DORA_AUTOTUNE=0 takes). *est.*: the launcher's "
        "estimate (`smem_bytes`), which must be an upper bound of *smem*, the compiled figure. *regs*, "
        "*spill*: registers and stack bytes per thread (spill 0: none). *mma*: tensor-core instructions in "
        "the PTX (tcgen05: Blackwell MMA; wgmma: Hopper warpgroup MMA; mma: mma.sync; none: FMA, as fp32 "
        "without TF32 is meant to).",
        "",
        "## Summary",
        "",
        "| kernel | rows | errors | pickable | pickable spilling | pruned spilling | max regs (pickable) "
        "| est. < smem | large tile w/o wgmma |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in TUNED_KERNELS:
        mine = [r for r in rows if r["kernel"] == name]
        ok = [r for r in mine if not r["error"]]
        pick = [r for r in ok if r["pickable"]]
        no_wgmma = [r for r in ok if "BLOCK_M >= 64 GEMM tile without wgmma" in problems(r, target_name)]
        out.append(
            f"| `{name}` | {len(mine)} | {len(mine) - len(ok)} | {len(pick)} "
            f"| {sum(r['stack'] > 0 for r in pick)} | {sum(r['stack'] > 0 for r in ok if not r['pickable'])} "
            f"| {max((r['regs'] for r in pick), default='-')} | {sum(r['estimate'] < r['shared'] for r in ok)} "
            f"| {len(no_wgmma) if target_name == 'sm_90' else '-'} |")
    failing = [(r, p) for r in rows for p in problems(r, target_name)]
    out += ["", f"## Problems ({len(failing)})", ""]
    out += [f"- `{r['kernel']}` {' '.join(_case(r))} tile {_tile(r)} w{r['warps']} s{r['stages']}: {p}"
            for r, p in failing] or ["None: no compile error, no spill in a pickable config, every estimate an "
                                     "upper bound" + (", wgmma in every large GEMM tile." if target_name == "sm_90"
                                                      else ".")]
    if not with_rows:
        out += ["",
                "The rows per kernel, config and case: add `--rows` (markdown) or `--json FILE` to the command above",
                "(Triton's cache makes a re-run quick once a target was compiled)."]
    for name in TUNED_KERNELS if with_rows else ():
        mine = [r for r in rows if r["kernel"] == name]
        if not mine:
            continue
        blocks = "x".join(k.replace("BLOCK_", "") for k in mine[0]["blocks"])
        out += ["", f"## `{name}`", "",
                f"| x/adapters | r | variant | {blocks} | R | warps | stages | est. | smem | pickable | regs "
                "| spill | mma |",
                "|---|---:|---|---|---:|---:|---:|---:|---:|---|---:|---:|---|"]
        for r in mine:
            pick = ("dflt" if r["default"] else "yes") if r["pickable"] else \
                "no: " + ", ".join(why for why, bad in (("smem", not r["fits"]), ("spills", r["spill_pruned"])) if bad)
            if r["error"]:
                tail = f"| - | {pick} | error: {r['error']} | | |"
            else:
                tail = f"| {r['shared']:,} | {pick} | {r['regs']} | {r['stack']} | {r['mma']} |"
            out.append(f"| {' | '.join(_case(r))} | {_tile(r)} | {r['block_r']} | {r['warps']} | {r['stages']} "
                       f"| {r['estimate']:,} {tail}")
    return "\n".join(out) + "\n"


SPILLS_FILE = ROOT / "kernels" / "_spills.py"


def write_spills(everything) -> None:
    """Rewrite _spills.SPILLS from ``{target: rows}``: every config that fits in shared memory and
    spills, per kernel, architecture and case. Entries of the cases and architectures the rows do
    not cover are kept (a ``--subset ci`` run rewrites only its own cases)."""
    from fused_dora.kernels._spills import SPILLS

    table = {k: dict(v) for k, v in SPILLS.items()}
    for target_name, rows in everything.items():
        arch = TARGETS[target_name][0].arch
        for kernel in {r["kernel"] for r in rows}:
            cases = dict(table.get(kernel, {}).get(arch, {}))
            for case in {r["case"] for r in rows if r["kernel"] == kernel}:
                cases.pop(case, None)
            for r in rows:
                if r["kernel"] == kernel and r["fits"] and not r["error"] and r["stack"] > 0:
                    cases.setdefault(r["case"], []).append(r["name"])
            table.setdefault(kernel, {})[arch] = {c: sorted(set(n)) for c, n in sorted(cases.items())}
    text = SPILLS_FILE.read_text()
    head = text[:text.index("SPILLS = ")]
    lines = ["SPILLS = {"]
    for kernel in sorted(table):
        lines.append(f"    {kernel!r}: {{")
        for arch in sorted(table[kernel]):
            lines.append(f"        {arch}: {{")
            for case, names in table[kernel][arch].items():
                lines.append(f"            {case!r}: {names!r},")
            lines.append("        },")
        lines.append("    },")
    lines.append("}")
    SPILLS_FILE.write_text(head + "\n".join(lines) + "\n")
    print(f"wrote {SPILLS_FILE}", file=sys.stderr)


def _git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def report(target_name: str, subset: str = "full", workers: int = 2, kernels=None, progress=None):
    """(rows, seconds): every row of ``subset`` for ``target_name``, compiled."""
    rows, jobs = build_jobs(target_name, SUBSETS[subset])
    if kernels:
        rows = [r for r in rows if r["kernel"] in kernels]
        jobs = {k: j for k, j in jobs.items() if j[1] in kernels}
    start = time.perf_counter()
    results = compile_all(jobs, workers, progress)
    for row in rows:
        row.update(results[row.pop("key")])
        row["problems"] = problems(row, target_name)
    return rows, time.perf_counter() - start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="sm_90", help=f"comma-separated, of {', '.join(TARGETS)}")
    ap.add_argument("--subset", choices=sorted(SUBSETS), default="full")
    ap.add_argument("--kernels", help="comma-separated kernel names (default: all)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    ap.add_argument("--out", help="also write the markdown here; {target} in the path is replaced by each target")
    ap.add_argument("--json", help="write the rows as JSON here ({target: rows})")
    ap.add_argument("--rows", action="store_true", help="add every kernel x config x case row to the markdown "
                    "(the committed reports hold the summary and problems only)")
    ap.add_argument("--check", action="store_true", help="exit 1 if a row has a problem (see problems())")
    ap.add_argument("--write-spills", action="store_true",
                    help=f"rewrite {SPILLS_FILE.relative_to(ROOT)} from these targets' spilling configs (full subset)")
    opts = ap.parse_args(argv)
    if tuning.INTERPRET:  # the kernels were decorated for Triton's interpreter when imported
        ap.error("TRITON_INTERPRET is set: unset it, the report compiles the kernels for GPUs")
    if opts.out and "," in opts.target and "{target}" not in opts.out:
        ap.error("--out needs {target} in the path for several targets")
    kernels = opts.kernels.split(",") if opts.kernels else None
    everything, bad = {}, 0
    for target_name in opts.target.split(","):
        def progress(done, total, target_name=target_name):
            if done % 20 == 0 or done == total:
                print(f"[{target_name}] compiled {done}/{total}", file=sys.stderr, flush=True)

        rows, seconds = report(target_name, opts.subset, opts.jobs, kernels, progress)
        text = markdown(target_name, rows, seconds, with_rows=opts.rows, subset=opts.subset)
        print(text)
        if opts.out:
            Path(opts.out.format(target=target_name.replace("_", ""))).write_text(text)
        everything[target_name] = rows
        bad += sum(bool(r["problems"]) for r in rows)
    if opts.json:
        Path(opts.json).write_text(json.dumps(everything, indent=1))
    if opts.write_spills:
        write_spills(everything)
    return 1 if (opts.check and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
