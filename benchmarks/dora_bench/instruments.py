"""Instruments: the timer (CUDA events, L2 flush), bytes saved for backward, the dense [out, in]
temporary counter, memory bandwidth, relative error, and the autotuner's timing."""
from __future__ import annotations

import gc
import time
from typing import Callable, Dict, List, Optional

import torch


def sync(dev: torch.device) -> None:
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


def step_times(step: Callable[[], None], steps: int, dev: torch.device) -> List[float]:
    """ms of each of `steps` calls of step(), sorted: CUDA events on a GPU, else the host clock."""
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
    return times


def storage_key(t: torch.Tensor):
    """(data pointer, bytes) of t's storage; (None, 0) for tensors without one (meta, subclasses)."""
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
            ptr, nb = storage_key(t)
            if ptr and ptr not in exclude:
                seen[ptr] = max(seen.get(ptr, 0), nb)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fwd(x)
    for t in kept():  # while y holds what was saved: a tensor kept() makes cannot reuse a saved one's address
        seen.pop(storage_key(t)[0], None)
    del y
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
                    ptr, nb = storage_key(t)
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


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-300))


def set_autotune_timing(rep_ms: float) -> bool:
    """Time each config of the fused kernels' autotuners for about rep_ms (the choice stays
    Triton's); rep_ms <= 0 restores Triton's default benchmarker. False if the kernels cannot load.

    Goes through the ``do_bench=`` argument of ``triton.autotune`` the kernels are decorated with.
    """
    try:
        import triton.testing

        from fused_dora.kernels.tuning import set_autotune_do_bench
    except Exception:
        return False
    if rep_ms <= 0:
        set_autotune_do_bench(None)
        return True
    set_autotune_do_bench(lambda kernel_call, quantiles: triton.testing.do_bench(
        kernel_call, warmup=max(1, rep_ms / 5), rep=rep_ms, quantiles=quantiles))
    return True
