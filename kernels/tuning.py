"""Autotuning for every kernel family, and the sizes its grids are built for.

    INTERPRET, AUTOTUNE           how kernels run here (Triton's interpreter; the search on or off)
    autotune(...)                 triton.autotune with shared-memory and spill pruning (see below)
    TUNED_KERNELS, tuned_kernels()  every autotuned kernel by name (the compile report, tests)
    pickable_configs, spill_case, case_variant, config_name, smem_budget: the pruning's parts
    set_autotune_do_bench(...)    how a GPU search times configs
    num_sms, split_count, m_bucket  grid sizes and autotune keys that depend on the GPU or on M

Public for tests and benchmarks (compile report, launch counter, cost model); the launch-argument
helpers the launchers share (block sizes, precisions) are in _launch.py.
"""
import functools
import importlib
import inspect
import os
from typing import Callable, List, NamedTuple, Optional, Tuple

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


_DO_BENCH = {"do_bench": _do_bench} if _TAKES_DO_BENCH else {}  # triton.autotune's keyword, where it takes it


def smem_budget(max_shared_mem: int) -> int:
    """The shared memory that pruning lets a config's estimate use: 90% of a block's maximum."""
    return int(max_shared_mem * 0.9)


@functools.lru_cache(maxsize=None)
def _device_smem_budget(device_index: int) -> int:
    try:
        props = triton.runtime.driver.active.utils.get_device_properties(device_index)
        return smem_budget(props["max_shared_mem"])
    except Exception:  # noqa: BLE001 - unknown driver API: assume a Hopper-class 227 KB
        return 200 * 1024


# Shared memory a kernel needs beside its tiles: the mbarriers of pipelined MMAs (16 B measured on
# sm_100), with room to spare.
BARRIER_BYTES = 1024


def autotune(gpu_configs, interpreter_config, key, smem_bytes, case_dtypes, restore_value=()):
    """``triton.autotune`` over ``gpu_configs``; one fixed config under the interpreter.

    The interpreter cannot benchmark (no driver); autotune with one config never benchmarks.
    On a GPU, configs are pruned before they are compiled (see `pickable_configs`):
    ``smem_bytes(args)`` bounds the shared memory a config's tiles need, from the kernel's
    arguments and the config (args: a dict of both, with num_warps and num_stages; BARRIER_BYTES
    is added to it); and the configs measured to spill registers on this GPU's architecture for
    this case (_spills.SPILLS, written by benchmarks/compile_report.py) are left out.
    ``case_dtypes``: the names of the pointer
    arguments that carry the activation and the adapter dtypes (None: no such argument), part of
    the case key (see `spill_case`). FUSED_DORA_AUTOTUNE=0 keeps only the first config left.
    ``restore_value``: the pointer arguments a kernel updates in place (read, then written): the
    search runs every config on the real buffers many times, so Triton saves and restores them.
    """
    def prune(configs, nargs, **kwargs):
        device = torch.cuda.current_device()
        args = {**nargs, **kwargs}
        return pickable_configs(configs, args, need, _device_smem_budget(device),
                                spilling=tuned_kernel.spilling(args, current_arch()), keep_all=AUTOTUNE)

    def need(args) -> int:
        return smem_bytes(args) + BARRIER_BYTES

    def decorate(kernel):
        nonlocal tuned_kernel
        if INTERPRET:
            # do_bench is never called with one config, but without one triton 3.3's Autotuner asks the
            # driver for its benchmarker when decorating: "0 active drivers" on a machine without a GPU
            # (triton 3.2 drops the argument and still asks).
            tuned = triton.autotune(configs=[interpreter_config], key=key, **_DO_BENCH)(kernel)
        else:
            tuned = triton.autotune(configs=gpu_configs, key=key, prune_configs_by={"early_config_prune": prune},
                                    restore_value=list(restore_value) or None, **_DO_BENCH)(kernel)
        tuned.__class__ = CachedAutotuner  # same object and state, a cheaper launch once tuned
        tuned_kernel = TUNED_KERNELS[kernel.fn.__name__] = TunedKernel(tuned, gpu_configs, need, case_dtypes,
                                                                       tuple(restore_value))
        return tuned

    tuned_kernel = None
    return decorate


class CachedAutotuner(triton.runtime.Autotuner):
    """triton's Autotuner, launching a tuned key's config directly.

    Triton's ``run`` builds three dicts over all of a kernel's ~30 arguments on every launch to
    find its key (ours take ~30 us of host time each on an H200's host, NOTES attempt 12). Here
    the key is computed the same way (the ``key`` arguments' values, then the dtype of each tensor
    argument in order) from precomputed positions, and looked up in Triton's own ``cache``; a miss
    (first call of a key: pruning and the search) or a config with a pre-hook goes to Triton's
    ``run``. A key computed differently by some Triton version only costs the fast path, never
    picks another config: a hit is the config Triton chose for that key.
    """

    def run(self, *args, **kwargs):
        if len(self.configs) > 1 and self.cache:
            config = self.cache.get(self.launch_key(args, kwargs))
            if config is not None and config.pre_hook is None:
                self.best_config = config
                return self.fn.run(*args, **kwargs, **config.all_kwargs())
        return super().run(*args, **kwargs)

    def launch_key(self, args, kwargs) -> tuple:
        """The autotune key of a launch, as triton.runtime.Autotuner.run forms it: the ``key``
        arguments' values, then str(dtype) of every argument that has a dtype, in order."""
        try:
            positions = self._key_positions
        except AttributeError:
            positions = self._key_positions = [(name, self.arg_names.index(name)) for name in self.keys]
        n = len(args)
        key = [args[i] if i < n else kwargs[name] for name, i in positions if i < n or name in kwargs]
        key += [_dtype_name(a) for a in args if type(a) not in _NO_DTYPE and hasattr(a, "dtype")]
        if kwargs:
            key += [_dtype_name(v) for k, v in kwargs.items()
                    if type(v) not in _NO_DTYPE and hasattr(v, "dtype") and k in self.arg_names]
        return tuple(key)


# launch arguments that have no dtype (skipped without a hasattr lookup, which fails slowly)
_NO_DTYPE = frozenset({int, float, bool, str, type(None)})
_DTYPE_STR = {}


def _dtype_name(a) -> str:
    """str(a.dtype), memoised (str of a torch.dtype builds a new string on every call)."""
    dt = a.dtype
    name = _DTYPE_STR.get(dt)
    if name is None:
        name = _DTYPE_STR[dt] = str(dt)
    return name


class TunedKernel(NamedTuple):
    """A kernel decorated by `autotune`: for the pruning, tests and benchmarks/compile_report.py."""
    kernel: "triton.runtime.Autotuner"  # .fn is the @triton.jit function, .arg_names its arguments
    configs: List[triton.Config]        # the GPU search space
    smem_bytes: Callable[[dict], int]   # a config's shared bytes (an upper bound), from arguments + config
    case_dtypes: Tuple[str, Optional[str]]  # see `autotune`
    restore_value: Tuple[str, ...] = ()     # see `autotune`

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    def spilling(self, args, arch: Optional[int]) -> frozenset:
        """Names (`config_name`) of the configs measured to spill registers for ``args`` on ``arch``."""
        from ._spills import SPILLS

        return frozenset(SPILLS.get(self.name, {}).get(arch, {}).get(spill_case(args, self.case_dtypes), ()))


# kernel name -> TunedKernel, for every kernel decorated by `autotune`
TUNED_KERNELS = {}

_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def spill_case(args, case_dtypes) -> str:
    """The case key of _spills.SPILLS for a kernel's arguments, e.g. "bf16/fp32 R64 dropout tf32x3":
    activation / adapter dtypes, BLOCK_R (32 counts as 64: the report measures 16 and 64), the
    switch (`case_variant`), and PRECISION."""
    x, adapters = (_DTYPE_NAMES.get(args[n].dtype, str(args[n].dtype)) if n else "-" for n in case_dtypes)
    block_r = 16 if args.get("BLOCK_R", 16) <= 16 else 64
    return f"{x}/{adapters} R{block_r} {case_variant(args)} {args.get('PRECISION', '-')}"


def case_variant(args) -> str:
    """The switch a case is about: dropout on / off (and lora_down adding up G for the factored
    norm: " gram"), the forward epilogue's training (q stored) / inference, the norm's factored
    sum / direct ("-"), or lora_up_grad's e = dy * c stored (the composed route) / not ("-")."""
    if "HAS_DROPOUT" in args:
        return ("dropout" if args["HAS_DROPOUT"] else "no-dropout") + (" gram" if args.get("STORE_GRAM") else "")
    if args.get("GRAM_SLICES"):
        return "factored"
    if "STORE_Q" in args:
        return "training" if args["STORE_Q"] else "inference"
    return "store-e" if args.get("STORE_E") else "-"


def config_name(cfg: triton.Config) -> str:
    """'128x256x64 w8 s3': the block sizes (in the config's order), warps and stages."""
    blocks = "x".join(str(v) for k, v in cfg.kwargs.items() if k.startswith("BLOCK_"))
    return f"{blocks} w{cfg.num_warps} s{cfg.num_stages}"


def pickable_configs(configs, args, smem_bytes, budget: int, spilling=frozenset(), keep_all: bool = True):
    """The configs the autotuner may pick: ``smem_bytes`` says they fit in ``budget`` bytes of
    shared memory, and their `config_name` is not in ``spilling``.

    Never empty: if none is left, the fitting ones, else the one needing least shared memory.
    ``keep_all=False``: the first only.
    """
    def need(cfg):
        return smem_bytes({**args, **cfg.all_kwargs()})

    fit = [c for c in configs if need(c) <= budget]
    left = [c for c in fit if config_name(c) not in spilling] or fit or [min(configs, key=need)]
    return left if keep_all else left[:1]


def fitting_configs(configs, args, smem_bytes, budget: int, keep_all: bool = True):
    """`pickable_configs` by shared memory alone."""
    return pickable_configs(configs, args, smem_bytes, budget, keep_all=keep_all)


_ARCH = {}  # (active Triton driver, device) -> arch; the key holds the driver (no id reuse)


def current_arch() -> int:
    """The architecture Triton compiles for now, 10 * major + minor (90 for Hopper): Triton's
    driver.active.get_current_target().arch, cached per active driver and device (it queries the
    driver on every call). Per driver, not torch.cuda's device: benchmarks/compile_report.py and
    cost_model.py make a driver for sm_80 / sm_90 / sm_100 active on any machine."""
    drv = triton.runtime.driver.active
    key = (drv, drv.get_current_device())
    arch = _ARCH.get(key)
    if arch is None:
        arch = _ARCH[key] = drv.get_current_target().arch
    return arch


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints on the host. triton.cdiv and triton.next_power_of_2 became
    constexpr functions (triton >= 3.5), whose wrapper costs ~10 us a call from host code: about
    50 calls per training step, a quarter of the host time measured on an H200 (NOTES attempt 12)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (0 for n = 0, as triton's), on the host: see `cdiv`."""
    return 1 << (int(n) - 1).bit_length() if n > 0 else 0


def m_bucket(m: int) -> int:
    """Autotune key for the token count: powers of two, so new sequence lengths do not retune."""
    return next_power_of_2(max(int(m), 1))


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
    want = cdiv(2 * num_sms(device), max(base_programs, 1))
    return max(1, min(want, cdiv(max(rows, 1), rows_per_split_min)))


# The kernel families (modules of this package) whose kernels `autotune` registers.
FAMILIES = ("norm", "dropout", "forward", "input_grad", "adapter_grads", "composed", "quant_norm")


def tuned_kernels() -> dict:
    """TUNED_KERNELS once every kernel family is imported (importing a family registers its kernels)."""
    for family in FAMILIES:
        importlib.import_module(f"{__package__}.{family}")
    return TUNED_KERNELS
