#!/usr/bin/env python
"""A static cost model of fused_dora's kernels: predicted GPU times from compiled code, no GPU.

    python benchmarks/cost_model.py --target sm_90 --out benchmarks/results/cost_model_sm90.md
        --predictions benchmarks/results/cost_model_sm90.json     (--rows: full tables; --json: every row)
    python benchmarks/cost_model.py --target sm_90 --loops-only --configs 0 --check-dx     (the CI check)

What it reads (built on benchmarks/compile_report.py: launches captured on meta tensors, compiled
for a named GPU through ``JITFunction.warmup``):

1. The launch sequence of each bench.py case (dora_bench.cases; default r = 16, bf16 activations,
   fp32 adapters), per competitor, by running bench.py's own competitor on meta tensors: every
   Triton launch is recorded (kernel, arguments, grid) instead of run, and every eager torch op
   (a TorchDispatchMode) with its bytes and flops: fused (route="fused"), fused_composed, the
   floor (F.linear), PEFT LoRA and PEFT DoRA (uncached and under DoraCaching).
2. Per Triton kernel, case and pickable config, the compiled SASS (sass_loops.py, the bundled
   nvdisasm): the main loop (innermost loop with the tensor-core instructions), its instructions
   per iteration (one warp, longest path), its MMAs, k-steps per iteration (MMA multiply-adds
   against the tile's BLOCK_M x BLOCK_N x BLOCK_K, times 3 for 3xTF32), the other loops (the LoRA
   rank steps) and the instructions outside loops; registers (cuobjdump) and shared memory.
3. The anchor: benchmarks/tutorial_matmul.py (the Triton tutorial's matmul loop) compiled with
   every GEMM tile in the forward's and the input gradient's operand layouts. ``vs anchor`` =
   a GEMM's main-loop instructions per k-step over the anchor's, same tile and layout.

Definitions (per program = one CTA; S SMs; clock f; FMA/clk/SM by input type, table below):

    tensor cycles per iteration  t = sum over the loop's MMAs of (multiply-adds / FMA per clk per SM)
    issue cycles per iteration   i = (num_warps / 4) * instructions per warp / ipc
                                 (the warps of a CTA spread over the 4 sub-partitions, each issuing
                                  one instruction per cycle; ipc = min(1, resident warps per
                                  sub-partition * WARP_IPC))
    issue share                  (num_warps / 4) * instructions / t   (ipc = 1; above 1 the tensor
                                 cores wait for instructions)
    cycles per program           sum over loops of trips * max(t, i) + (num_warps / 4) * outside / ipc
    programs per SM  O           min(regs, shared memory, warps, 32 CTAs); waves = ceil(P / (S * O))
    compute time                 ceil(P / S) * cycles per program / (f * ETA_GEMM)
                                 + ceil(ceil(P / S) / O) * MEM_LATENCY_US   (each wave fills its pipeline)
    memory time                  bytes / min(BW * ETA_BW, concurrent programs * bytes in flight / latency)
                                 (bytes in flight per program: the pipeline's stages in shared memory
                                  but one, at least max(1, stages - 1) iterations' share of the bytes;
                                  Little's law: a small grid cannot pull full bandwidth)
    launch time                  max(compute, memory) + LAUNCH_US
    eager torch op               bytes / (BW * ETA_BW) + LAUNCH_US; a GEMM (cuBLAS):
                                 max(2mnk / (peak * ETA_GEMM), bytes / (BW * ETA_BW)) + LAUNCH_US
                                 (fp32 GEMMs at the CUDA-core fp32 peak: bench.py leaves TF32 off)

Bytes: every tensor argument of a launch read or written once from HBM (operands re-read through
L2, not HBM: the GEMMs' grouped tile order), in-place ones twice; an eager op's inputs and outputs
once. The Triton kernel's config is the pickable one with the least predicted time (what a
perfect autotuner would take). ETA_GEMM scales the Triton loops and cuBLAS alike, so a Triton
main loop with a low issue share is predicted at cuBLAS speed: the model sees instructions,
occupancy and grid shape, not latency hiding (no TMA, no warp specialisation in the Triton
loops): the first GPU run calibrates it (bench.py prints these predictions beside its timings).
Every figure here is a PREDICTION.
"""
from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # compiling needs Triton's real JIT

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Dict, List, Optional  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

HERE = Path(__file__).resolve().parent
for _path in (HERE, HERE.parent):  # benchmarks/ (its modules) and this checkout's fused_dora
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import compile_report as cr  # noqa: E402
import sass_loops  # noqa: E402
import tutorial_matmul  # noqa: E402

from dora_bench import competitors as bench_competitors  # noqa: E402
from dora_bench import launches as bench_launches  # noqa: E402
from dora_bench.cases import LLAMA_SHAPES, Case  # noqa: E402
from dora_bench.inputs import CaseData  # noqa: E402
from fused_dora.kernels import tuning  # noqa: E402
from fused_dora.kernels._gemm import GEMM_TILES, gemm_configs  # noqa: E402

ROOT = cr.ROOT

# ---------------------------------------------------------------- assumptions (one table)


@dataclasses.dataclass(frozen=True)
class Gpu:
    name: str
    target: str              # compile target (compile_report.TARGETS)
    sms: int
    clock_ghz: float         # the clock the vendor's dense tensor peak is quoted at
    fma_per_clk_sm: dict     # dense tensor-core multiply-adds per clock per SM, by input type
    fp32_fma_per_clk_sm: int  # CUDA-core fp32 (F.linear / torch.mm on fp32 with TF32 off)
    hbm_tbs: float           # peak HBM bandwidth, TB/s
    smem_per_sm: int         # shared memory per SM (bytes); 1 KB more is reserved per CTA
    eta_gemm: float          # fraction of the tensor peak cuBLAS reaches on large bf16 GEMMs
    eta_bw: float            # fraction of peak HBM bandwidth a streaming kernel reaches
    regs_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_ctas_per_sm: int = 32

    def tensor_tflops(self, kind="BF16") -> float:
        return 2 * self.fma_per_clk_sm[kind] * self.sms * self.clock_ghz * 1e-3

    def fp32_tflops(self) -> float:
        return 2 * self.fp32_fma_per_clk_sm * self.sms * self.clock_ghz * 1e-3


_HOPPER = {"BF16": 2048, "F16": 2048, "TF32": 1024}
GPUS = {
    # 989 TFLOP/s dense bf16 = 132 SMs * 2048 FMA/clk * 2 * 1.83 GHz; HBM3 3.35 TB/s
    "H100": Gpu("H100 SXM", "sm_90", 132, 1.83, _HOPPER, 128, 3.35, 233472, 0.72, 0.87),
    # the same chip with HBM3e 4.8 TB/s
    "H200": Gpu("H200 SXM", "sm_90", 132, 1.83, _HOPPER, 128, 4.8, 233472, 0.72, 0.87),
    # 2.25 PFLOP/s dense bf16 = 148 SMs * 4096 FMA/clk * 2 * 1.855 GHz; HBM3e 8 TB/s
    "B200": Gpu("B200", "sm_100", 148, 1.855, {"BF16": 4096, "F16": 4096, "TF32": 2048}, 128, 8.0, 233472, 0.70, 0.87),
    # 312 TFLOP/s dense bf16 = 108 SMs * 1024 FMA/clk * 2 * 1.41 GHz; HBM2e 2.04 TB/s
    "A100": Gpu("A100 SXM 80GB", "sm_80", 108, 1.41, {"BF16": 1024, "F16": 1024, "TF32": 512}, 64, 2.04, 167936,
                0.85, 0.87),
}
TARGET_GPUS = {"sm_80": ["A100"], "sm_90": ["H100", "H200"], "sm_100": ["B200"]}
LAUNCH_US = 2.0        # GPU time of a launch beyond its work: start-up, tail, the gap to the next kernel
MEM_LATENCY_US = 0.8   # loaded HBM latency: Little's law for small grids, one pipeline fill per wave
WARP_IPC = 0.5         # instructions per cycle one warp alone issues (dependency stalls); 2+ warps fill a sub-partition
DX_ANCHOR_LIMIT = 1.15  # issue 19: the dx main loop within 15% of the anchor's instructions per k-step
DX_MIN_ROWS = 64       # ... at every pickable tile of this many rows or more (and issue share <= 1)
HEADLINE_TILE = "128x256x64 w8 s3"

ASSUMPTIONS = [
    ("tensor peak", "dense FMA/clk/SM x SMs x clock: H100/H200 2048 (bf16) x 132 x 1.83 GHz = 989 TFLOP/s, "
                    "B200 4096 x 148 x 1.855 GHz = 2.25 PFLOP/s, A100 1024 x 108 x 1.41 GHz = 312 TFLOP/s; "
                    "TF32 at half the bf16 rate"),
    ("fp32 (CUDA cores)", "128 FMA/clk/SM (A100 64): torch.mm on fp32 with TF32 off, as bench.py runs PEFT's "
                          "fp32 adapters"),
    ("HBM", "H100 3.35, H200 4.8, B200 8.0, A100 2.04 TB/s peak; ETA_BW = 0.87 of it reached "
            "(NOTES: ~2.9 TB/s on H100)"),
    ("ETA_GEMM", "H100/H200 0.72 (~710 TFLOP/s, NOTES' 700), B200 0.70, A100 0.85: cuBLAS on large bf16 GEMMs, "
                 "and the sustained fraction of the tensor and issue rates any main loop gets"),
    ("issue", f"1 instruction/clk per SM sub-partition; one warp alone issues {WARP_IPC}/clk"),
    ("launch", f"{LAUNCH_US} us of GPU time per launch beyond its work, Triton and eager alike. GPU time only: "
               "the host's launch path is not modelled, and on an H200 it was measured at 1.4-1.6 ms per q/o "
               "training step (NOTES attempts 12-13), so a case whose predicted GPU time is below the host's "
               "runs at the host's pace"),
    ("memory latency", f"{MEM_LATENCY_US} us (Little's law for small grids; one pipeline fill per wave of programs)"),
    ("bytes", "each tensor argument once from HBM (operand re-reads hit L2), in-place ones twice"),
    ("autotuner", "picks the pickable config with the least predicted time"),
]

# ---------------------------------------------------------------- per-kernel loop structure

cdiv = lambda a, b: -(-int(a) // int(b))  # noqa: E731


@dataclasses.dataclass(frozen=True)
class LoopModel:
    """How a kernel's loops map to its arguments: the main loop's trip count and the tile one
    iteration multiplies (tensor-core work per iteration = product of ``tile`` x precision passes);
    ``rank``: the trip count of the other MMA loop(s) (the LoRA rank steps); ``nested``: the rank
    loop runs inside the main loop (the norm's W tile times each rank chunk of B @ A)."""
    main: object
    tile: tuple
    rank: object = None
    nested: bool = False


LOOPS = {
    "_row_sumsq_kernel": LoopModel(lambda a: cdiv(cdiv(a["K"], a["BLOCK_K"]), a["k_splits"]),
                                   ("BLOCK_N", "BLOCK_K", "BLOCK_R"), lambda a: cdiv(a["R"], a["BLOCK_R"]), True),
    "_quant_row_sumsq_kernel": LoopModel(lambda a: cdiv(cdiv(a["K"], a["BLOCK_K"]), a["k_splits"]),
                                         ("BLOCK_N", "BLOCK_K", "BLOCK_R"), lambda a: cdiv(a["R"], a["BLOCK_R"]), True),
    "_lora_down_kernel": LoopModel(lambda a: cdiv(a["k_per_split"], a["BLOCK_K"]), ("BLOCK_M", "BLOCK_R", "BLOCK_K")),
    "_dora_forward_kernel": LoopModel(lambda a: cdiv(a["K"], a["BLOCK_K"]), ("BLOCK_M", "BLOCK_N", "BLOCK_K"),
                                      lambda a: cdiv(a["R"], a["BLOCK_R"])),
    "_lora_up_grad_kernel": LoopModel(lambda a: cdiv(a["n_per_split"], a["BLOCK_N"]),
                                      ("BLOCK_M", "BLOCK_R", "BLOCK_N")),
    "_dora_input_grad_kernel": LoopModel(lambda a: cdiv(a["N"], a["BLOCK_N"]), ("BLOCK_M", "BLOCK_K", "BLOCK_N"),
                                         lambda a: cdiv(a["R"], a["BLOCK_R"])),
    "_magnitude_and_B_grad_kernel": LoopModel(lambda a: cdiv(cdiv(a["M"], a["m_splits"]), a["BLOCK_M"]),
                                              ("BLOCK_C", "BLOCK_R", "BLOCK_M")),
    "_lora_A_grad_kernel": LoopModel(lambda a: cdiv(cdiv(a["M"], a["m_splits"]), a["BLOCK_M"]),
                                     ("BLOCK_R", "BLOCK_C", "BLOCK_M")),
    "_dora_compose_epilogue_kernel": LoopModel(lambda a: cdiv(a["R"], a["BLOCK_R"]), ("BLOCK_M", "BLOCK_C", "BLOCK_R")),
    "_add_lora_input_grad_kernel": LoopModel(lambda a: cdiv(a["R"], a["BLOCK_R"]), ("BLOCK_M", "BLOCK_C", "BLOCK_R")),
    # no tensor-core loop: the finishing passes add partial sums (their time is their bytes and launch)
    "_finish_row_norm_kernel": LoopModel(lambda a: 1, ("BLOCK",)),
    "_finish_adapter_grads_kernel": LoopModel(lambda a: 1, ("BLOCK",)),
    tutorial_matmul.NAME: LoopModel(lambda a: cdiv(a["K"], a["BLOCK_K"]), ("BLOCK_M", "BLOCK_N", "BLOCK_K")),
}
GEMM_LAYOUTS = {"_dora_forward_kernel": "forward", "_dora_input_grad_kernel": "dx"}  # anchor layout of each GEMM
ANCHOR_CONFIGS = gemm_configs(GEMM_TILES, out_cols="BLOCK_N", reduction="BLOCK_K")  # index i: the GEMMs' tile i


def configs_of(name: str):
    return ANCHOR_CONFIGS if name == tutorial_matmul.NAME else cr.TUNED_KERNELS[name].configs


def fn_of(name: str):
    return tutorial_matmul.kernel if name == tutorial_matmul.NAME else cr.TUNED_KERNELS[name].kernel.fn


def arg_names(name: str):
    return fn_of(name).arg_names


# ---------------------------------------------------------------- capture: launches and eager ops on meta tensors

@dataclasses.dataclass
class Launch:
    kernel: str
    args: tuple
    kwargs: dict
    grid: object

    def arg_map(self) -> dict:
        return {**dict(zip(arg_names(self.kernel), self.args)), **self.kwargs}


@dataclasses.dataclass
class EagerOp:
    op: str
    bytes: int
    flops: float = 0.0   # GEMMs only
    dtype: str = ""      # a GEMM's input type
    shapes: str = ""


GEMM_OPS = {"mm", "addmm", "bmm", "baddbmm"}
_KIND = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def _tensors(tree):
    out = []
    for v in tree:
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out.extend(_tensors(v))
    return out


class OpRecorder(TorchDispatchMode):
    """Records every aten op on meta tensors that launches a GPU kernel, into ``events``."""

    def __init__(self, events: list):
        super().__init__()
        self.events = events

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        ins = _tensors(list(args) + list((kwargs or {}).values()))
        outs = _tensors(out if isinstance(out, (list, tuple)) else [out])
        if not bench_launches.puts_work_on_stream(func, args, kwargs or {}, out):  # views, allocations, CPU ops
            return out
        seen, nbytes = set(), 0
        for t in ins + outs:  # an in-place op's self is read and written: counted twice
            if id(t) not in seen or name.endswith("_"):
                nbytes += t.numel() * t.element_size()
            seen.add(id(t))
        flops, kind = 0.0, ""
        if name in GEMM_OPS:  # mm(a, b), addmm(bias, a, b), bmm, baddbmm: the last two positional operands
            a, b = [t for t in args if isinstance(t, torch.Tensor)][-2:]
            flops = 2.0 * a.numel() * b.shape[-1]
            kind = _KIND.get(a.dtype, str(a.dtype))
        shapes = " ".join("x".join(map(str, t.shape)) + ":" + _KIND.get(t.dtype, str(t.dtype)[6:]) for t in ins)
        self.events.append(EagerOp(name, nbytes, flops, kind, shapes))
        return out


def meta_case_data(case: Case) -> CaseData:
    """bench.py's CaseData for ``case``, on the meta device (shapes and dtypes only)."""
    dev = torch.device("meta")
    act, ad = case.torch_dtypes
    W = nn.Parameter(torch.empty(case.N, case.K, dtype=act, device=dev), requires_grad=False)
    A, B = torch.empty(case.r, case.K, device=dev), torch.empty(case.N, case.r, device=dev)
    mag = torch.empty(case.N, device=dev)
    xs = [torch.empty(case.M, case.K, dtype=act, device=dev).requires_grad_(case.training)]
    dys = [torch.empty(case.M, case.N, dtype=act, device=dev)] if case.training else []
    return CaseData(case, dev, act, ad, W, A, B, mag, xs, dys)


@contextlib.contextmanager
def _capturing(target_name: str, sms: int, events: list):
    """Triton launches recorded into ``events`` (not run; dora_bench.launches' recorder), split
    counts sized for ``sms`` SMs, the driver reporting ``target_name``."""
    cr.driver.set_active(cr.TargetDriver(cr.TARGETS[target_name][0]))

    def record(name, *args, grid, warmup, **kwargs):
        # meta stand-ins, not the tensors themselves: a launch holding the gradients it wrote would
        # keep autograd from taking them as .grad (it would copy them: eager copy_ ops a real step
        # does not run); one stand-in per tensor, so a tensor passed twice is counted once
        twins = {}

        def twin(v):
            if isinstance(v, torch.Tensor) and id(v) not in twins:
                twins[id(v)] = torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="meta")
            return twins.get(id(v), v) if isinstance(v, torch.Tensor) else v

        events.append(Launch(name, tuple(twin(v) for v in args), {k: twin(v) for k, v in kwargs.items()}, grid))

    require_triton = bench_competitors._require_triton  # bench.py's own check: meta tensors are no GPU
    bench_competitors._require_triton = lambda dev: None
    try:
        with bench_launches.triton_recorded(record, sms=sms):
            yield
    finally:
        bench_competitors._require_triton = require_triton


def capture(case: Case, competitor: str, target_name: str, sms: int) -> list:
    """The GPU work of one timed call of bench.py's ``competitor`` on ``case`` (after one warm-up
    call, so caches are as in a timed repeat): Launch and EagerOp events in order."""
    events: list = []
    with _capturing(target_name, sms, events):
        data = meta_case_data(case)
        comp = bench_competitors.build_competitor(competitor, data)
        call, _ = bench_competitors.make_call(data, comp)
        with comp.context():
            call(0)  # warm-up: fills the inference norm caches
            events.clear()
            with OpRecorder(events):
                call(0)
    return events


COMPETITORS = ("fused", "fused_composed", "floor", "peft_lora", "peft_dora", "peft_dora_cached")


def default_cases(ranks=(16,), tokens=(512, 4096, 16384), modes=("infer", "train0", "train05")) -> List[Case]:
    return [Case(mode, shape, m, r) for mode in modes for shape in LLAMA_SHAPES for m in tokens for r in ranks]


# ---------------------------------------------------------------- compile jobs and the SASS worker

QDORA_RANKS = (16, 64)  # issue 20: the 4-bit norm at these ranks, each Llama shape


def capture_quant_norms(target_name: str, sms: int, ranks=QDORA_RANKS) -> list:
    """[(shape, r, base, launches)]: the norm launches of one QDoRA layer's training forward
    (bitsandbytes NF4, blocksize 64, double quantization, bf16 compute, fp32 adapters; base
    "4-bit": kernels/quant_norm.py from the packed codes) and of the same layer over a bf16 weight
    (base "bf16": kernels/norm.py), captured on meta tensors for ``sms`` SMs."""
    from fused_dora.kernels import norm as norm_kernels
    from fused_dora.kernels import quant_norm

    out, meta = [], torch.device("meta")
    for shape in LLAMA_SHAPES:
        N, K = Case("norm", shape, 0, 16).N, Case("norm", shape, 0, 16).K
        blocks = math.ceil(N * K / 64)
        for r in ranks:
            A = torch.empty(r, K, dtype=torch.float32, device=meta)
            B = torch.empty(N, r, dtype=torch.float32, device=meta)
            for base in ("4-bit", "bf16"):
                events: list = []
                with _capturing(target_name, sms, events):
                    if base == "4-bit":
                        f32 = dict(dtype=torch.float32, device=meta)
                        quant_norm.dora_quant_row_norm(
                            torch.empty((N * K + 1) // 2, dtype=torch.uint8, device=meta), torch.empty(16, **f32),
                            torch.empty(blocks, dtype=torch.uint8, device=meta), 64, (N, K), torch.bfloat16, A, B,
                            2.0, nested_absmax=torch.empty(math.ceil(blocks / 256), **f32),
                            nested_code=torch.empty(256, **f32), nested_offset=torch.empty(1, **f32))
                    else:
                        norm_kernels.dora_row_norm(torch.empty(N, K, dtype=torch.bfloat16, device=meta), A, B, 2.0)
                out.append((shape, r, base, [e for e in events if isinstance(e, Launch)]))
    return out


def _spec(v):
    """An argument as far as Triton's specialisation sees it (1, multiple of 16, other; dtypes)."""
    if isinstance(v, torch.Tensor):
        return str(v.dtype)
    if isinstance(v, bool) or not isinstance(v, int):
        return repr(v) if not isinstance(v, float) else "float"
    return "1" if v == 1 else ("d16" if v % 16 == 0 else "int")


def job_key(name, args, kwargs, config_index):
    """What decides the compiled code: the kernel, its arguments as Triton specialises them (not the
    values; arguments declared do_not_specialize, such as the dropout seed, not at all), the
    constexprs and the config."""
    params = fn_of(name).params
    spec = tuple("any" if i < len(params) and params[i].do_not_specialize else _spec(a) for i, a in enumerate(args))
    return (name, spec, repr(sorted(kwargs.items())), config_index)


def anchor_launch(layout: str, config_index: int, M=4096, N=4096, K=4096) -> Launch:
    args, kwargs = tutorial_matmul.anchor_launch(layout, M, N, K)
    return Launch(tutorial_matmul.NAME, args, {**kwargs, "_layout": layout}, None)


def analyse_job(job) -> dict:
    """Compile one (target, kernel, args, kwargs, config) and read its SASS (in a worker process)."""
    target_name, name, args, kwargs, config_index = job
    cfg = configs_of(name)[config_index]
    kwargs = {k: v for k, v in kwargs.items() if not k.startswith("_")}
    start = time.perf_counter()
    try:
        compiled = cr.compile_for(target_name, fn_of(name), args, {**kwargs, **cfg.all_kwargs()})
        cubin = compiled.asm["cubin"]
        regs, stack = cr.resource_usage(cubin)
        sass = sass_loops.analyse(sass_loops.disassemble(cubin), compiled.metadata.name)
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return dict(error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200]}")
    main = sass.main_loop()
    loops = []
    for i in sass.mma_loops():
        lp = sass.loops[i]
        by_type: Dict[str, int] = {}
        per = {"warp": cfg.num_warps, "warpgroup": max(cfg.num_warps // 4, 1), "cta": 1}
        for m in lp.mmas:
            by_type[m.dtype] = by_type.get(m.dtype, 0) + m.fma * per[m.scope]
        parent = sass.loops[lp.parent] if lp.parent is not None else None
        loops.append(dict(main=i == main, instr=lp.path, static=lp.static, mmas=lp.mma_names(),
                          n_mma=len(lp.mmas) + lp.unknown_mmas, unknown_mma=lp.unknown_mmas, fma=by_type,
                          async_copies=lp.async_copies, barriers=lp.barriers,
                          parent_instr=parent.path if parent else None, addr=f"{lp.first_addr:x}-{lp.last_addr:x}"))
    return dict(error=None, regs=regs, stack=stack, shared=compiled.metadata.shared, outside=sass.outside,
                loops=loops, seconds=time.perf_counter() - start)


# ---------------------------------------------------------------- the model

def _fma_rate(gpu: Gpu, kind: str) -> float:
    return gpu.fma_per_clk_sm.get(kind, gpu.fma_per_clk_sm["BF16"])


def occupancy(gpu: Gpu, regs: int, shared: int, num_warps: int) -> int:
    """Programs (CTAs) resident per SM: registers (allocated per warp in 256s), shared memory
    (+1 KB reserved per CTA), warps, CTAs."""
    per_warp = cdiv(max(regs, 1) * 32, 256) * 256
    by_regs = gpu.regs_per_sm // (per_warp * num_warps)
    by_smem = gpu.smem_per_sm // (shared + 1024)
    return max(1, min(by_regs, by_smem, gpu.max_warps_per_sm // num_warps, gpu.max_ctas_per_sm))


def loop_figures(name: str, a: dict, sass: dict) -> dict:
    """The main loop's per-iteration figures (one warp's instructions, the program's tensor work
    by input type) and the other MMA loops', with trip counts from the arguments ``a``."""
    model = LOOPS[name]
    main = next((lp for lp in sass["loops"] if lp["main"]), None)
    others = [lp for lp in sass["loops"] if not lp["main"]]
    trips = model.main(a)
    rank_trips = model.rank(a) if model.rank else 1
    passes = 3 if a.get("PRECISION") in ("tf32x3", "bf16x3") else 1
    tile = math.prod(a[k] for k in model.tile) * passes
    if main is None:
        return dict(trips=trips, instr=0, fma={}, loops=[], kstep=None, tile=tile)
    if model.nested:  # the norm: per main iteration, the W tile and rank_trips passes of the rank loop
        instr = (main["parent_instr"] or main["instr"]) + (rank_trips - 1) * main["instr"]
        fma = {k: v * rank_trips for k, v in main["fma"].items()}
        loops = [(trips, instr, fma)]
    else:
        instr, fma = main["instr"], main["fma"]
        loops = [(trips, instr, fma)] + [(rank_trips, lp["instr"], lp["fma"]) for lp in others]
    kstep = sum(main["fma"].values()) / tile if tile else None  # per iteration of the innermost MMA loop
    return dict(trips=trips, instr=instr, fma=fma, loops=loops, kstep=kstep, tile=tile)


def tensor_cycles(gpu: Gpu, fma: dict) -> float:
    return sum(v / _fma_rate(gpu, k) for k, v in fma.items())


def issue_share(gpu: Gpu, num_warps: int, instr: int, fma: dict) -> Optional[float]:
    t = tensor_cycles(gpu, fma)
    return (num_warps / 4) * instr / t if t else None


def launch_bytes(launch: Launch) -> int:
    """Every tensor argument once (read or written), in-place ones (restore_value) twice."""
    in_place = set(cr.TUNED_KERNELS[launch.kernel].restore_value) if launch.kernel in cr.TUNED_KERNELS else set()
    seen, total = set(), 0
    for k, v in launch.arg_map().items():
        if isinstance(v, torch.Tensor) and id(v) not in seen:
            seen.add(id(v))
            total += v.numel() * v.element_size() * (2 if k in in_place else 1)
    return total


def predict_launch(gpu: Gpu, name: str, a: dict, cfg, sass: dict, programs: int, nbytes: int) -> dict:
    """Predicted time (us) of one launch with config ``cfg`` (``a``: arguments + config)."""
    figs = loop_figures(name, a, sass)
    S, w = gpu.sms, cfg.num_warps
    occ = occupancy(gpu, sass["regs"], sass["shared"], w)
    per_sm = cdiv(programs, S)
    ipc = min(1.0, (w / 4) * min(occ, per_sm) * WARP_IPC)
    cycles, t_total, i_total = 0.0, 0.0, 0.0
    for trips, instr, fma in figs["loops"]:
        t, i = tensor_cycles(gpu, fma), (w / 4) * instr / ipc
        cycles += trips * max(t, i)
        t_total, i_total = t_total + trips * t, i_total + trips * i
    outside = (w / 4) * sass["outside"] / ipc
    cycles += outside
    compute_us = per_sm * cycles / (gpu.clock_ghz * 1e3 * gpu.eta_gemm) + cdiv(per_sm, occ) * MEM_LATENCY_US
    concurrent = min(programs, S * occ)
    # bytes one program has in flight: the pipeline's stages in shared memory but the one computed on
    # (GEMMs: loads mostly served by L2, at L2 latency or more), at least its share of HBM bytes
    inflight = max(sass["shared"] * (cfg.num_stages - 1) / cfg.num_stages,
                   nbytes / max(programs * max(figs["trips"], 1), 1) * max(1, cfg.num_stages - 1))
    bw = min(gpu.hbm_tbs * 1e6 * gpu.eta_bw, concurrent * inflight / MEM_LATENCY_US)  # bytes per us
    memory_us = nbytes / bw
    bound = "memory" if memory_us > compute_us else ("tensor" if t_total >= i_total + outside else "issue")
    return dict(us=max(compute_us, memory_us) + LAUNCH_US, compute_us=compute_us, memory_us=memory_us, bound=bound,
                programs=programs, per_sm=per_sm, occupancy=occ, waves=cdiv(programs, S * occ), bytes=nbytes)


def predict_eager(gpu: Gpu, op: EagerOp) -> float:
    work = op.bytes / (gpu.hbm_tbs * 1e6 * gpu.eta_bw)
    if op.flops:
        peak = gpu.fp32_tflops() if op.dtype == "F32" else gpu.tensor_tflops(op.dtype if op.dtype in ("BF16", "F16")
                                                                             else "BF16")
        work = max(work, op.flops / (peak * 1e6 * gpu.eta_gemm))
    return work + LAUNCH_US


# ---------------------------------------------------------------- running it

def _jobs_for(target_name: str, launches, configs=None):
    """{key: job} for every pickable config of each launch (``configs``: only those indices)."""
    _, max_smem, _ = cr.TARGETS[target_name]
    arch = cr.TARGETS[target_name][0].arch
    budget = tuning.smem_budget(max_smem)
    jobs, picks = {}, {}
    for ln in launches:
        a = ln.arg_map()
        if ln.kernel == tutorial_matmul.NAME:
            pick = list(range(len(ANCHOR_CONFIGS)))
            default = 0
        else:
            tuned = cr.TUNED_KERNELS[ln.kernel]
            spilling = tuned.spilling(a, arch)
            ok = tuning.pickable_configs(tuned.configs, a, tuned.smem_bytes, budget, spilling=spilling)
            pick = [i for i, c in enumerate(tuned.configs) if c in ok]
            default = pick[0]
        if configs is not None:
            pick = [i for i in pick if i in configs]
        plain = tuple(cr._plain(v) for v in ln.args)
        for i in pick:
            jobs[job_key(ln.kernel, ln.args, ln.kwargs, i)] = (target_name, ln.kernel, plain, ln.kwargs, i)
        picks[id(ln)] = (pick, default)
    return jobs, picks


_SHORT_DTYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def variant_of(ln: Launch) -> str:
    """The case switch (dropout, q stored, ...), the MMA precision, and for the two GEMMs the
    adapters' dtype (their LoRA steps read A or B: 'fp32 adapters')."""
    if ln.kernel == tutorial_matmul.NAME:
        return ln.kwargs["_layout"] + " layout"
    out = tuning.case_variant(ln.kwargs) + (f" {ln.kwargs['PRECISION']}" if ln.kwargs.get("PRECISION") else "")
    if ln.kernel in GEMM_LAYOUTS:
        adapter = next((v for k, v in ln.arg_map().items() if k.startswith("lora_") and isinstance(v, torch.Tensor)),
                       None)
        if adapter is not None:
            out += f" {_SHORT_DTYPE.get(adapter.dtype, str(adapter.dtype))} adapters"
    return out


def run(target_name: str, cases: List[Case], workers: int, configs=None, loops_only=False, progress=None):
    """Everything the report needs for one target: kernel rows (SASS figures per kernel, variant,
    config), anchor rows, and per case and GPU the predicted competitors."""
    gpus = [GPUS[g] for g in TARGET_GPUS[target_name]]
    captured = {}  # (case key, competitor, sms) -> events
    for case in cases:
        for sms in sorted({g.sms for g in gpus}):
            for comp in (("fused",) if loops_only else COMPETITORS):
                if comp == "peft_dora_cached" and case.training:
                    continue
                try:
                    captured[(case.key, comp, sms)] = capture(case, comp, target_name, sms)
                except bench_competitors.Unavailable as exc:
                    print(f"[{target_name}] {case.key} {comp}: {exc}", file=sys.stderr)
    launches = [e for evs in captured.values() for e in evs if isinstance(e, Launch)]
    quant = {} if loops_only else {gpu.name: capture_quant_norms(target_name, gpu.sms) for gpu in gpus}
    launches += [ln for rows in quant.values() for *_, lns in rows for ln in lns]
    if loops_only:
        launches = [ln for ln in launches if ln.kernel in GEMM_LAYOUTS]
    anchors = [anchor_launch(layout, 0) for layout in tutorial_matmul.LAYOUTS]
    jobs, picks = _jobs_for(target_name, launches + anchors, configs)
    start = time.perf_counter()
    results = cr.compile_all(jobs, workers, progress, worker=analyse_job)
    seconds = time.perf_counter() - start

    def sass_of(ln, i):
        return results.get(job_key(ln.kernel, ln.args, ln.kwargs, i))

    # kernel rows: one per (kernel, variant, config), figures from the SASS (arguments of the first launch seen)
    kernel_rows, seen = [], set()
    anchor_instr = {}
    for ln in anchors + launches:
        pick, default = picks[id(ln)]
        for i in pick:
            key = job_key(ln.kernel, ln.args, ln.kwargs, i)
            if key in seen:
                continue
            seen.add(key)
            sass = results[key]
            cfg = configs_of(ln.kernel)[i]
            row = dict(kernel=ln.kernel, variant=variant_of(ln), config=i, name=tuning.config_name(cfg),
                       block_m=cfg.kwargs.get("BLOCK_M"), default=i == default, warps=cfg.num_warps,
                       stages=cfg.num_stages, error=sass["error"])
            if not sass["error"]:
                a = {**ln.arg_map(), **cfg.all_kwargs()}
                figs = loop_figures(ln.kernel, a, sass)
                main = next((lp for lp in sass["loops"] if lp["main"]), None)
                row.update(regs=sass["regs"], stack=sass["stack"], shared=sass["shared"], outside=sass["outside"],
                           instr=figs["instr"], static=main["static"] if main else None,
                           mmas=main["mmas"] if main else "none", kstep=figs["kstep"],
                           barriers=main["barriers"] if main else None,
                           async_copies=main["async_copies"] if main else None,
                           rank_loops=[dict(instr=lp["instr"], mmas=lp["mmas"]) for lp in sass["loops"]
                                       if not lp["main"]],
                           occupancy={g.name: occupancy(g, sass["regs"], sass["shared"], cfg.num_warps) for g in gpus},
                           tensor_cycles=tensor_cycles(gpus[0], figs["fma"]),
                           issue_share=issue_share(gpus[0], cfg.num_warps, figs["instr"], figs["fma"]))
                if ln.kernel == tutorial_matmul.NAME:
                    anchor_instr[(ln.kwargs["_layout"], i)] = figs["instr"]
            kernel_rows.append(row)
    for row in kernel_rows:  # against the anchor of the same tile and layout
        layout = GEMM_LAYOUTS.get(row["kernel"])
        base = anchor_instr.get((layout, row["config"])) if layout else None
        row["anchor_instr"] = base
        row["vs_anchor"] = row["instr"] / base if (base and row.get("instr")) else None
    if loops_only:
        return dict(target=target_name, kernels=kernel_rows, cases=[], seconds=seconds)

    case_rows = []
    for case in cases:
        per_gpu = {}
        for gpu in gpus:
            comps = {}
            for comp in COMPETITORS:
                events = captured.get((case.key, comp, gpu.sms))
                if events is None:
                    continue
                items, total = [], 0.0
                for ev in events:
                    if isinstance(ev, EagerOp):
                        us = predict_eager(gpu, ev)
                        items.append(dict(what=ev.op, kind="gemm" if ev.flops else "eager", us=us, shapes=ev.shapes))
                    else:
                        us, item = _best_config(gpu, ev, picks[id(ev)], sass_of)
                        items.append(item)
                    total += us
                comps[comp] = dict(us=total, items=items,
                                   launches=sum(1 for it in items if it["kind"] != "free"),
                                   triton=sum(1 for it in items if it["kind"] == "triton"),
                                   eager=sum(1 for it in items if it["kind"] == "eager"))
            per_gpu[gpu.name] = _ratios(case, comps)
        case_rows.append(dict(case=case.key, mode=case.mode, shape=case.shape, M=case.M, r=case.r, gpus=per_gpu))
    quant_rows = []
    for gpu in gpus:
        for shape, r, base, lns in quant[gpu.name]:
            items = [_best_config(gpu, ln, picks[id(ln)], sass_of)[1] for ln in lns]
            quant_rows.append(dict(gpu=gpu.name, shape=shape, r=r, base=base, items=items,
                                   us=sum(it["us"] for it in items)))
    return dict(target=target_name, kernels=kernel_rows, cases=case_rows, quant_norms=quant_rows, seconds=seconds)


def _best_config(gpu: Gpu, ln: Launch, pick_default, sass_of):
    pick, default = pick_default
    a0 = ln.arg_map()
    nbytes = launch_bytes(ln)
    best = None
    for i in pick:
        sass = sass_of(ln, i)
        if not sass or sass["error"]:
            continue
        cfg = configs_of(ln.kernel)[i]
        a = {**a0, **cfg.all_kwargs()}
        programs = math.prod(ln.grid(a) if callable(ln.grid) else ln.grid)
        p = predict_launch(gpu, ln.kernel, a, cfg, sass, programs, nbytes)
        if best is None or p["us"] < best[0]["us"]:
            best = (p, i)
    if best is None:
        return LAUNCH_US, dict(what=ln.kernel, kind="triton", us=LAUNCH_US, error="no compiled config")
    p, i = best
    return p["us"], dict(what=ln.kernel, kind="triton", variant=variant_of(ln), config=tuning.config_name(
        configs_of(ln.kernel)[i]), **p)


def _ratios(case: Case, comps: dict) -> dict:
    t = {k: v["us"] for k, v in comps.items()}
    fl, fu = t.get("floor"), t.get("fused")
    peft_dora = min(v for k, v in t.items() if k.startswith("peft_dora")) if any(
        k.startswith("peft_dora") for k in t) else None
    out = dict(us=t, fused_floor=fu / fl if fu and fl else None,
               composed_floor=t["fused_composed"] / fl if t.get("fused_composed") and fl else None,
               x_peft_dora=peft_dora / fu if peft_dora and fu else None,
               x_peft_lora=t["peft_lora"] / fu if t.get("peft_lora") and fu else None,
               fused=comps.get("fused"))
    fused = comps.get("fused")
    if fused:
        split = {"gemm": 0.0, "light": 0.0, "eager": 0.0}
        for it in fused["items"]:
            if it["kind"] == "triton":
                split["gemm" if it["what"] in GEMM_LAYOUTS else "light"] += it["us"]
            else:
                split["eager"] += it["us"]
        out["split"] = split
    return out


def dx_loop_check(kernel_rows, limit: float = DX_ANCHOR_LIMIT, min_rows: int = DX_MIN_ROWS) -> List[str]:
    """Issue 19.2: at every compiled (pickable) tile of ``min_rows`` rows or more, the input
    gradient's main loop within ``limit`` x the anchor's instructions per k-step (same tile, same
    operand layout) and an issue share of at most 1. The failures, as sentences."""
    rows = [r for r in kernel_rows if r["kernel"] == "_dora_input_grad_kernel" and not r["error"]
            and r["block_m"] >= min_rows]
    if not rows:
        return [f"no compiled _dora_input_grad_kernel row with {min_rows} rows or more"]
    out = []
    for r in rows:
        if r["vs_anchor"] is None or r["vs_anchor"] > limit:
            out.append(f"_dora_input_grad_kernel {r['variant']} {r['name']}: {r['instr']} instructions per k-step, "
                       f"{_f(r['vs_anchor'])}x the anchor's {r['anchor_instr']} (limit {limit}x)")
        if r["issue_share"] is None or r["issue_share"] > 1.0:
            out.append(f"_dora_input_grad_kernel {r['variant']} {r['name']}: issue share {_f(r['issue_share'])} "
                       "(limit 1.0)")
    return out


# ---------------------------------------------------------------- the report

def _f(v, fmt="{:.2f}", none="-"):
    return none if v is None else fmt.format(v)


def _short(kernel: str) -> str:
    return kernel.strip("_").replace("_kernel", "")


def gemm_summary(rows, gpu: Gpu) -> List[str]:
    """Per GEMM and variant: the headline tile against the anchor, and the range over every
    compiled tile of DX_MIN_ROWS rows or more (vs anchor, issue share)."""
    L = ["| kernel | variant | tiles | vs anchor at " + HEADLINE_TILE + " | vs anchor, tiles of >= "
         f"{DX_MIN_ROWS} rows | issue share, same tiles |", "|---|---|---:|---|---|---|"]
    groups: Dict[tuple, list] = {}
    for r in rows:
        if r["kernel"] in GEMM_LAYOUTS and not r["error"]:
            groups.setdefault((r["kernel"], r["variant"]), []).append(r)
    for (kernel, variant), rs in groups.items():
        head = next((r for r in rs if r["name"] == HEADLINE_TILE), None)
        big = [r for r in rs if (r["block_m"] or 0) >= DX_MIN_ROWS and r["vs_anchor"] is not None]
        def span(vals, fmt):
            lo, hi = (fmt.format(min(vals)), fmt.format(max(vals))) if vals else ("-", "-")
            return lo if lo == hi else f"{lo}-{hi}"

        L.append(f"| {_short(kernel)} | {variant} | {len(rs)} | "
                 + (f"{head['instr']} vs {head['anchor_instr']} ({_f(head['vs_anchor'])}x)" if head else "not pickable")
                 + f" | {span([r['vs_anchor'] for r in big], '{:.2f}x')} "
                 f"| {span([r['issue_share'] for r in big if r['issue_share'] is not None], '{:.2f}')} |")
    return L


LIGHT_TOKENS = (512, 4096)    # issue 19.3: the light passes at these M
LIGHT_MIN_PER_SM = 2          # programs per SM of the GPU, every light launch
LIGHT_BYTES_LIMIT = 1.3       # predicted time (launch overhead aside) over bytes at peak bandwidth


def light_pass_check(cases, gpu: Gpu):
    """Markdown lines: issue 19.3 for the q/o cases at LIGHT_TOKENS on ``gpu``: every Triton launch
    but the two GEMMs, its programs per SM and its predicted time without the fixed launch cost over
    its bytes at peak bandwidth."""
    L = ["", f"## Light passes (issue 19.3), q/o cases at M = {', '.join(map(str, LIGHT_TOKENS))}, {gpu.name}", "",
         f"Every Triton launch but the two GEMMs, route fused: `programs/SM` = grid / {gpu.sms} SMs (target >= "
         f"{LIGHT_MIN_PER_SM}); `work us` = predicted time less the {LAUNCH_US} us launch cost; `bytes us` = its "
         f"bytes at the {gpu.hbm_tbs} TB/s peak; `work/bytes` target <= {LIGHT_BYTES_LIMIT}.", "",
         "| case | launch | config | programs/SM | work us | bytes us | work/bytes | bound |",
         "|---|---|---|---:|---:|---:|---:|---|"]
    for c in cases:
        fused = c["gpus"][gpu.name].get("fused")
        if c["shape"] != "qo" or c["M"] not in LIGHT_TOKENS or not fused:
            continue
        for it in fused["items"]:
            if it["kind"] != "triton" or it["what"] in GEMM_LAYOUTS or "programs" not in it:
                continue
            per_sm = it["programs"] / gpu.sms
            work = it["us"] - LAUNCH_US
            nbytes = it["bytes"] / (gpu.hbm_tbs * 1e6)
            ratio = work / nbytes if nbytes else None
            flags = "" if per_sm >= LIGHT_MIN_PER_SM else " (few)"
            L.append(f"| {c['case']} | {_short(it['what'])} {it.get('variant', '')} | {it.get('config', '')} "
                     f"| {per_sm:.1f}{flags} | {work:.1f} | {nbytes:.1f} | {_f(ratio)}x | {it.get('bound', '-')} |")
    return L


def quant_norm_table(rows, gpu: Gpu):
    """Markdown lines: issue 20's norm of a QDoRA layer (from the packed 4-bit codes) beside the
    same layer's norm over a bf16 weight, per Llama shape and rank, on ``gpu``."""
    L = ["", f"## QDoRA: the norm from 4-bit codes (issue 20), {gpu.name}", "",
         "A training forward's norm of one layer: `kernels/quant_norm.py` reading bitsandbytes' packed NF4 codes "
         "(blocksize 64, double quantization: 0.53 bytes a weight), against `kernels/norm.py` over the same layer "
         "in bf16 (2 bytes a weight). `launches`: the norm pass and, with K split, the finishing launch; `bytes us`: "
         f"the launches' bytes at the {gpu.hbm_tbs} TB/s peak; `bound`: the norm pass's.", "",
         "| shape | r | 4-bit us | config | bound | bytes us | bf16 norm us | 4-bit / bf16 |",
         "|---|---:|---:|---|---|---:|---:|---:|"]
    by_key = {(q["shape"], q["r"], q["base"]): q for q in rows if q["gpu"] == gpu.name}
    for (shape, r, base), q in by_key.items():
        if base != "4-bit":
            continue
        dense = by_key.get((shape, r, "bf16"))
        main = q["items"][0]
        nbytes = sum(it.get("bytes", 0) for it in q["items"]) / (gpu.hbm_tbs * 1e6)
        L.append(f"| {shape} | {r} | {q['us']:.1f} ({len(q['items'])}) | {main.get('config', '')} "
                 f"| {main.get('bound', '-')} | {nbytes:.1f} | {_f(dense and dense['us'], '{:.1f}')} "
                 f"| {_f(dense and q['us'] / dense['us'])}x |")
    return L


def markdown(result: dict, argv: str, full: bool = False) -> str:
    """The report: assumptions, predicted ratios per case, the GEMMs against the anchor (summary),
    the fused launches of the q/o cases at M=4096; ``full``: every kernel row and every case's
    launches (--rows)."""
    target = result["target"]
    gpus = [GPUS[g] for g in TARGET_GPUS[target]]
    rows, cases = result["kernels"], result["cases"]
    L = [f"# Static cost model: {target} ({', '.join(g.name for g in gpus)}) — PREDICTION",
         "",
         f"triton {cr.triton.__version__}, torch {torch.__version__}, {datetime.date.today().isoformat()}, "
         f"git {cr._git_rev()}. Generated by `python benchmarks/cost_model.py {argv}` without a GPU: every figure is "
         "a prediction from the compiled SASS and the assumptions below (benchmarks/cost_model.py's docstring has the "
         "formulas). bench.py prints the prediction for its GPU beside each measured `fused/floor`.",
         "", "## Assumptions", "", "| | |", "|---|---|"]
    L += [f"| {k} | {v} |" for k, v in ASSUMPTIONS]
    L += ["", "| GPU | SMs | clock GHz | bf16 TFLOP/s | fp32 TFLOP/s | HBM TB/s | ETA_GEMM | ETA_BW |",
          "|---|---:|---:|---:|---:|---:|---:|---:|"]
    L += [f"| {g.name} | {g.sms} | {g.clock_ghz} | {g.tensor_tflops():.0f} | {g.fp32_tflops():.0f} | {g.hbm_tbs} "
          f"| {g.eta_gemm} | {g.eta_bw} |" for g in gpus]
    if cases:
        for g in gpus:
            L += ["", f"## Predicted per bench.py case, {g.name} (r=16, bf16 activations, fp32 adapters)", "",
                  "`fused/floor`: fused_dora (route fused) over F.linear (training: forward + input gradient); "
                  "`composed/floor`: route composed; `xPEFT`: PEFT time / fused time (inference: the faster of PEFT "
                  "DoRA with and without DoraCaching); launches: Triton + eager torch ops of one fused call; "
                  "where fused time goes: the two GEMMs, the other Triton kernels, eager ops.", "",
                  "| case | floor us | fused us | fused/floor | composed/floor | xPEFT DoRA | xPEFT LoRA "
                  "| launches (Triton + eager) | GEMMs / light / eager us |",
                  "|---|---:|---:|---:|---:|---:|---:|---|---|"]
            for c in cases:
                p = c["gpus"][g.name]
                fu = p.get("fused") or {}
                s = p.get("split", {})
                L.append(f"| {c['case']} | {_f(p['us'].get('floor'), '{:.0f}')} | {_f(p['us'].get('fused'), '{:.0f}')} "
                         f"| {_f(p['fused_floor'])}x | {_f(p['composed_floor'])}x | {_f(p['x_peft_dora'])}x "
                         f"| {_f(p['x_peft_lora'])}x | {fu.get('triton', 0)} + {fu.get('eager', 0)} "
                         f"| {s.get('gemm', 0):.0f} / {s.get('light', 0):.0f} / {s.get('eager', 0):.0f} |")
    gemm_rows = [r for r in rows if r["kernel"] in GEMM_LAYOUTS and not r["error"]]
    if gemm_rows:
        failures = dx_loop_check(rows)
        L += ["", "## The two GEMMs against the anchor: summary", "",
              f"Instructions per k-step of the main loop over the anchor's (Triton's tutorial loop, same tile and "
              f"operand layout); issue share on {gpus[0].name} (above 1 the tensor cores wait for instructions). "
              f"Issue 19.2 (`--check-dx`): dx within {DX_ANCHOR_LIMIT}x and at most 1.0 issue share at every "
              f"pickable tile of {DX_MIN_ROWS} rows or more: "
              + ("met." if not failures else f"missed at {len(failures)} tile(s)."), ""]
        L += gemm_summary(rows, gpus[0])
    if gemm_rows and full:
        L += ["", "## The two GEMMs against the anchor (Triton's tutorial loop, same tile and operand layout)", "",
              f"Instructions per k-step: one warp's, main loop, from the SASS. Issue share: (warps / 4) x instructions "
              f"per k-step / tensor-core cycles per k-step on one SM ({gpus[0].name} rates); above 1 the tensor cores "
              f"wait for instructions. Issue 19.2 (`--check-dx`, tests/test_cost_model.py): dx "
              f"within {DX_ANCHOR_LIMIT}x the anchor and at most 1.0 issue share at every pickable tile of "
              f"{DX_MIN_ROWS} rows or more.", "",
              "| kernel | variant | tile | dflt | instr / k-step | anchor | vs anchor | MMAs / k-step "
              "| issue share | barriers | regs | programs/SM |",
              "|---|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|"]
        for r in gemm_rows:
            L.append(f"| {_short(r['kernel'])} | {r['variant']} | {r['name']} | {'yes' if r['default'] else ''} "
                     f"| {r['instr']} | {_f(r['anchor_instr'], '{}')} | {_f(r['vs_anchor'])}x | {r['mmas']} "
                     f"| {_f(r['issue_share'])} | {r['barriers']} | {r['regs']} | {r['occupancy'][gpus[0].name]} |")
        anchors = [r for r in rows if r["kernel"] == tutorial_matmul.NAME and not r["error"]]
        L += ["", "Anchor alone:", "", "| layout | tile | instr / k-step | MMAs / k-step | issue share | regs |",
              "|---|---|---:|---|---:|---:|"]
        L += [f"| {r['variant']} | {r['name']} | {r['instr']} | {r['mmas']} | {_f(r['issue_share'])} | {r['regs']} |"
              for r in anchors]
    light = [r for r in rows if r["kernel"] not in GEMM_LAYOUTS and r["kernel"] != tutorial_matmul.NAME
             and not r["error"]]
    if light and full:
        L += ["", "## The other kernels (main loop per iteration)", "",
              "`k-steps/iter`: the main loop's MMA work over the tile BLOCK x BLOCK x BLOCK (x3 for 3xTF32) of one "
              "iteration; 1.00 means one reduction step per iteration as the source says.", "",
              "| kernel | variant | config | instr / iter | MMAs / iter | k-steps/iter | issue share | outside loops "
              "| regs | smem | programs/SM |",
              "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
        for r in light:
            L.append(f"| {_short(r['kernel'])} | {r['variant']} | {r['name']}{' (dflt)' if r['default'] else ''} "
                     f"| {r['instr']} | {r['mmas']} | {_f(r['kstep'])} | {_f(r['issue_share'])} | {r['outside']} "
                     f"| {r['regs']} | {r['shared']:,} | {r['occupancy'][gpus[0].name]} |")
    if cases:
        L += light_pass_check(cases, gpus[0])
    if result.get("quant_norms"):
        L += quant_norm_table(result["quant_norms"], gpus[0])
    if cases:
        L += ["", "## Per launch at M=4096 (the config a perfect autotuner takes)" + ("" if full else ", q/o cases"),
              "",
              "Triton launches one by one, the fused call's eager torch ops summed in one row; `programs/SM`: "
              "resident at once (registers, shared memory); bound: what the predicted time is (tensor cores, "
              "instruction issue, memory).", ""]
        cols = " | ".join(f"{g.name} us (bound)" for g in gpus)
        L += [f"| case | launch | config | programs | programs/SM | waves | MB | {cols} |",
              "|---|---|---|---:|---:|---:|---:|" + "---:|" * len(gpus)]
        for c in cases:
            if c["M"] != 4096 or not c["gpus"][gpus[0].name].get("fused") or (not full and c["shape"] != "qo"):
                continue
            fused = {g.name: c["gpus"][g.name]["fused"]["items"] for g in gpus}
            for j, it in enumerate(fused[gpus[0].name]):
                if it["kind"] != "triton":
                    continue
                times = [f"{fused[g.name][j]['us']:.1f} ({fused[g.name][j].get('bound', '-')})" for g in gpus]
                L.append(f"| {c['case']} | {_short(it['what'])} {it.get('variant', '')} | {it.get('config', '')} "
                         f"| {it.get('programs', '')} | {it.get('occupancy', '')} | {it.get('waves', '')} "
                         f"| {_f(it.get('bytes') and it['bytes'] / 1e6, '{:.1f}', '')} | {' | '.join(times)} |")
            eager = [[it for it in fused[g.name] if it["kind"] != "triton"] for g in gpus]
            if eager[0]:
                ops = ", ".join(sorted({it["what"] for it in eager[0]}))
                sums = " | ".join(f"{sum(it['us'] for it in e):.1f}" for e in eager)
                L.append(f"| {c['case']} | {len(eager[0])} eager torch ops ({ops}) | | | | | | {sums} |")
    return "\n".join(L) + "\n"


def summary_json(result: dict) -> dict:
    """What bench.py reads: per GPU and case key, the predicted ratios and the fused and floor times."""
    tags = {g.name: tag for tag, g in GPUS.items()}
    rnd = lambda v, n=3: None if v is None else round(v, n)  # noqa: E731
    out = {}
    for c in result["cases"]:
        for gpu, p in c["gpus"].items():
            figures = {k: rnd(p[k]) for k in ("fused_floor", "composed_floor", "x_peft_dora", "x_peft_lora")}
            us = {k: rnd(p["us"].get(k), 1) for k in ("fused", "floor")}
            out.setdefault(tags[gpu], {})[c["case"]] = {**figures, "fused_us": us["fused"], "floor_us": us["floor"]}
    return out


def predictions_json(target: str, predictions: dict, argv: str) -> str:
    """The committed file: one line per GPU and case (issue 18: generated files stay small)."""
    head = dict(target=target, note="PREDICTION (static cost model, no GPU): benchmarks/cost_model.py "
                + argv + f"; triton {cr.triton.__version__}, git {cr._git_rev()}")
    lines = ["{", *(f" {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()), ' "predictions": {']
    gpus = list(predictions.items())
    for gi, (gpu, cases) in enumerate(gpus):
        lines.append(f"  {json.dumps(gpu)}: {{")
        items = list(cases.items())
        lines += [f"   {json.dumps(k)}: {json.dumps(v)}" + ("," if i < len(items) - 1 else "")
                  for i, (k, v) in enumerate(items)]
        lines.append("  }" + ("," if gi < len(gpus) - 1 else ""))
    return "\n".join(lines + [" }", "}"]) + "\n"


def _slim_cases(cases):
    """The cases for the JSON file: per GPU the competitors' times and ratios, the fused call's
    Triton launches one by one and its eager ops summed."""
    out = []
    for c in cases:
        gpus = {}
        for gpu, p in c["gpus"].items():
            q = {k: v for k, v in p.items() if k != "fused"}
            fused = p.get("fused")
            if fused:
                q["fused_launches"] = [{k: v for k, v in it.items() if k != "shapes"} for it in fused["items"]
                                       if it["kind"] == "triton"]
                eager = [it for it in fused["items"] if it["kind"] != "triton"]
                q["fused_eager"] = dict(ops=len(eager), us=sum(it["us"] for it in eager))
            gpus[gpu] = q
        out.append({**c, "gpus": gpus})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="sm_90", help=f"one of {', '.join(TARGET_GPUS)}")
    ap.add_argument("--tokens", default="512,4096,16384", help="token counts M of the cases")
    ap.add_argument("--shapes", default=",".join(LLAMA_SHAPES))
    ap.add_argument("--modes", default="infer,train0,train05")
    ap.add_argument("--ranks", default="16")
    ap.add_argument("--configs", help="only these config indices (comma-separated; 0 = the largest GEMM tile)")
    ap.add_argument("--loops-only", action="store_true",
                    help="the two GEMMs and the anchor only (main-loop figures), from the train0 and train05 qo cases")
    ap.add_argument("--check-dx", action="store_true",
                    help=f"exit 1 if the dx main loop at a compiled tile of {DX_MIN_ROWS} rows or more is above "
                         f"{DX_ANCHOR_LIMIT}x the anchor's instructions per k-step or above 1.0 issue share")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", help="write the markdown here (a summary; --rows: every kernel row and launch)")
    ap.add_argument("--rows", action="store_true",
                    help="the markdown's full tables: every GEMM and light-kernel row, every case's launches")
    ap.add_argument("--predictions", help="write the compact JSON bench.py reads (predicted ratios per GPU and "
                                          "case): benchmarks/results/cost_model_<target>.json")
    ap.add_argument("--json", help="write every result as JSON here (kernel rows, each case's launches; large, "
                                   "not committed)")
    opts = ap.parse_args(argv)
    ints = lambda s: [int(t) for t in s.split(",") if t]  # noqa: E731
    if opts.loops_only:  # the input gradient with and without dropout, fp32 and bf16 adapters (issue 19.2)
        cases = [Case(m, "qo", 4096, 16, dtype=d) for m in ("train0", "train05") for d in ("bf16+fp32", "bf16")]
    else:
        cases = [Case(m, s, t, r) for m in opts.modes.split(",") for s in opts.shapes.split(",")
                 for t in ints(opts.tokens) for r in ints(opts.ranks)]

    def progress(done, total):
        if done % 20 == 0 or done == total:
            print(f"[{opts.target}] analysed {done}/{total}", file=sys.stderr, flush=True)

    result = run(opts.target, cases, opts.jobs, ints(opts.configs) if opts.configs else None, opts.loops_only,
                 progress)
    args_text = " ".join(a for a in (argv if argv is not None else sys.argv[1:]))
    text = markdown(result, args_text, full=opts.rows)
    if opts.out:
        Path(opts.out).write_text(text)
    else:
        print(text)
    if opts.predictions:
        Path(opts.predictions).write_text(predictions_json(opts.target, summary_json(result), args_text))
    if opts.json:
        Path(opts.json).write_text(json.dumps(dict(target=opts.target, predictions=summary_json(result),
                                                   kernels=result["kernels"], cases=_slim_cases(result["cases"]),
                                                   quant_norms=result.get("quant_norms", [])),
                                              indent=1, default=str))
    failures = dx_loop_check(result["kernels"]) if opts.check_dx else []
    for f in failures:
        print(f"dx check: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
