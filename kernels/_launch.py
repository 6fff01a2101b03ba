"""Launch helpers shared by the kernel families: interpreter detection, configs, block sizes."""
import functools
import inspect
import os
from typing import Callable, List, NamedTuple

import torch
import triton

# Triton picks interpreted or compiled kernels when `@triton.jit` runs, i.e. when these modules
# are imported, so the mode is fixed here once.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# FUSED_DORA_AUTOTUNE=0 skips the search on a GPU (first config that fits): quicker test runs.
AUTOTUNE = os.environ.get("FUSED_DORA_AUTOTUNE", "1") not in ("", "0")

# How a GPU autotuner times each config: triton.autotune's `do_bench=` (honoured from triton 3.3;
# older ones keep their own timing). None: Triton's default; benchmarks/dora_bench sets a shorter one.
_autotune_do_bench = None
_TAKES_DO_BENCH = "do_bench" in inspect.signature(triton.autotune).parameters


def set_autotune_do_bench(do_bench=None) -> None:
    """Time autotune configs from now on with ``do_bench(kernel_call, quantiles)``; None: Triton's default."""
    global _autotune_do_bench
    _autotune_do_bench = do_bench


def _do_bench(kernel_call, quantiles):
    bench = _autotune_do_bench or triton.runtime.driver.active.get_benchmarker()
    return bench(kernel_call, quantiles=quantiles)


def smem_budget(max_shared_mem: int) -> int:
    """The shared memory that pruning lets a config's estimate use: 90% of a block's maximum."""
    return int(max_shared_mem * 0.9)


@functools.lru_cache(maxsize=None)
def _device_smem_budget(device_index: int) -> int:
    try:
        props = triton.runtime.driver.active.utils.get_device_properties(device_index)
        return smem_budget(props["max_shared_mem"])
    except Exception:  # unknown driver API: assume a Hopper-class 227 KB
        return 200 * 1024


def autotune(gpu_configs, interpreter_config, key, stage_bytes):
    """``triton.autotune`` over ``gpu_configs``; one fixed config under the interpreter.

    The interpreter cannot benchmark (no driver); autotune with one config never benchmarks.
    On a GPU, configs whose pipelined tiles cannot fit in shared memory are pruned before they
    are compiled: ``stage_bytes(args)`` estimates one pipeline stage's bytes from the kernel's
    arguments and the config's block sizes (args: a dict of both). FUSED_DORA_AUTOTUNE=0 keeps
    only the first config that fits.
    """
    def prune(configs, nargs, **kwargs):
        budget = _device_smem_budget(torch.cuda.current_device())
        return fitting_configs(configs, {**nargs, **kwargs}, stage_bytes, budget, keep_all=AUTOTUNE)

    def decorate(kernel):
        if INTERPRET:
            tuned = triton.autotune(configs=[interpreter_config], key=key)(kernel)
        else:
            tuned = triton.autotune(configs=gpu_configs, key=key, prune_configs_by={"early_config_prune": prune},
                                    **({"do_bench": _do_bench} if _TAKES_DO_BENCH else {}))(kernel)
        TUNED_KERNELS[kernel.fn.__name__] = TunedKernel(tuned, gpu_configs, stage_bytes)
        return tuned

    return decorate


class TunedKernel(NamedTuple):
    """A kernel decorated by `autotune`: for tests and benchmarks/compile_report.py."""
    kernel: "triton.runtime.Autotuner"  # .fn is the @triton.jit function, .arg_names its arguments
    configs: List[triton.Config]        # the GPU search space
    stage_bytes: Callable[[dict], int]  # one pipeline stage's shared bytes, from arguments + config


# kernel name -> TunedKernel, for every kernel decorated by `autotune`
TUNED_KERNELS = {}


def fitting_configs(configs, args, stage_bytes, budget: int, keep_all: bool = True):
    """The configs whose pipelined tiles fit in ``budget`` bytes of shared memory.

    Never empty: if none fits, the one needing least. ``keep_all=False``: the first only.
    """
    def need(cfg):
        return stage_bytes({**args, **cfg.kwargs}) * cfg.num_stages

    fit = [c for c in configs if need(c) <= budget] or [min(configs, key=need)]
    return fit if keep_all else fit[:1]


def block_r(r: int) -> int:
    """Chunk size along the LoRA rank: a power of two >= 16 (tl.dot's minimum), at most 64.

    Kernels loop over r in chunks of this size with masked loads, so any r >= 1 works and a
    large r (e.g. 384) never needs an [M, r] tile in registers. The interpreter uses 16 so the
    tests exercise the chunk loop with small ranks.
    """
    if INTERPRET:
        return 16
    return min(64, max(16, triton.next_power_of_2(r)))


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: fp32 inputs follow torch's TF32 switch, like F.linear does."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # Triton's default; ignored for 16-bit inputs


def lora_precision(x_dtype: torch.dtype, adapter_dtype: torch.dtype):
    """(upcast, input_precision) for the small LoRA GEMMs (x@A.T, e@B, v.T@x, dy.T@u).

    fp32 adapters over a 16-bit base (PEFT's default) keep fp32 accuracy there, as PEFT's own
    fp32 LoRA path does: tiles are upcast and multiplied with 3xTF32 on tensor cores. These GEMMs
    are memory-bound, so the extra passes cost little. Otherwise the activation dtype is used.
    The LoRA steps fused into the two big GEMMs (s*u @ B.T in the forward, v @ A in dx) run in
    the activation dtype, like the base product they are added to.
    """
    if adapter_dtype == torch.float32 and x_dtype != torch.float32:
        return True, "tf32x3"
    return False, dot_precision(x_dtype)


def m_bucket(m: int) -> int:
    """Autotune key for the token count: powers of two, so new sequence lengths do not retune."""
    return triton.next_power_of_2(max(int(m), 1))


def num_sms(device: torch.device) -> int:
    if INTERPRET or device.type != "cuda":
        return 4
    return _multi_processor_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _multi_processor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def split_count(base_programs: int, rows: int, device: torch.device, rows_per_split_min: int = 64) -> int:
    """How many slices to split a reduction over `rows` into, so the grid fills the GPU.

    Each slice writes its own fp32 partial result that the launcher sums afterwards: the
    reduction stays deterministic (no atomics).
    """
    want = triton.cdiv(2 * num_sms(device), max(base_programs, 1))
    return max(1, min(want, triton.cdiv(max(rows, 1), rows_per_split_min)))
