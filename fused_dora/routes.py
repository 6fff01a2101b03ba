"""Which route runs the two big GEMMs: the fused Triton GEMMs, or cuBLAS with light Triton passes.

    "fused"     the forward GEMM x @ W.T + su @ B.T and the input-gradient GEMM (dy * c) @ W
                + s * dropout_bwd(v @ A) are Triton kernels with the DoRA work in their
                prologues / epilogues (kernels/forward.py, kernels/input_grad.py)
    "composed"  torch.mm (cuBLAS) does x @ W.T and e @ W, reading W in place; Triton passes
                around it add the LoRA terms, scale, add the bias (kernels/composed.py)
    "auto"      the faster of the two, timed on first use per GPU, dtypes, shape bucket and
                dropout on/off, separately for the forward and the backward; cached for the
                process (and in FUSED_DORA_ROUTE_CACHE, a JSON file, when that is set).
                "composed" must win by COMPOSED_MARGIN, and is not considered for fp16
                activations (it rounds x @ W.T to fp16 before the scale c, so where c is small
                it overflows where the fused route does not), under
                torch.use_deterministic_algorithms (cuBLAS needs a workspace setting there), or
                when it fails (an out-of-memory error, say): "fused" then. Off CUDA there is
                nothing to time: "fused" (unless set_route_timer installed a timer, which the
                tests do).

Both routes compute the same math and save the same tensors (fused_dora.autograd), so the forward
and the backward of one call may take different routes. Default: the FUSED_DORA_ROUTE
environment variable, else "auto". Each choice "auto" makes is logged once on the
"fused_dora.routes" logger (INFO) with both timings.
"""
import contextlib
import json
import logging
import os
import threading
from typing import Callable, Dict, NamedTuple, Optional

import torch

ROUTES = ("fused", "composed")
ROUTE_CHOICES = ROUTES + ("auto",)
ROUTE_ENV = "FUSED_DORA_ROUTE"
ROUTE_CACHE_ENV = "FUSED_DORA_ROUTE_CACHE"
COMPOSED_MARGIN = 0.95  # "auto" takes "composed" only below this fraction of the fused time

logger = logging.getLogger("fused_dora.routes")

# timer(candidates, device) -> {route: seconds} or None (None: cannot time here, take "fused")
RouteTimer = Callable[[Dict[str, Callable[[], object]], torch.device], Optional[Dict[str, float]]]

_choices: Dict[str, str] = {}  # key -> route, this process's (and the disk cache's) choices
_disk_loaded: Optional[str] = None  # the cache file read into _choices
_keys: Dict[tuple, str] = {}  # (case with M bucketed, TF32 switch) -> case.key(): formatted once per case
_lock = threading.Lock()
_timer: Optional[RouteTimer] = None


class RouteCase(NamedTuple):
    """What one choice of "auto" depends on: a forward or a backward (dx) call of these dtypes and
    sizes. (A NamedTuple rather than a dataclass: one is built on every call, and tuples build
    and hash at C speed.)"""
    direction: str                # "forward" (x @ W.T and the epilogue) or "backward" (dx)
    device: torch.device
    x_dtype: torch.dtype          # the activations'
    adapter_dtype: torch.dtype
    M: int                        # tokens (bucketed to a power of two in the key)
    N: int                        # out_features
    K: int                        # in_features
    R: int                        # rank
    dropout: bool                 # dropout active on the LoRA path
    store_q: bool = False         # forward: training (q stored for dmagnitude) or inference

    def key(self) -> str:
        """The cache key, e.g. "forward NVIDIA_H100 bfloat16/float32 M4096 N4096 K4096 r16 dropout
        training". fp32 activations also record torch's TF32 switch, which changes both routes' GEMMs."""
        kind = ("training" if self.store_q else "inference") if self.direction == "forward" else "dx"
        x_name = _dtype_name(self.x_dtype)
        if self.x_dtype == torch.float32:
            x_name += "-tf32" if torch.backends.cuda.matmul.allow_tf32 else "-ieee"
        return (f"{self.direction} {_device_name(self.device)} {x_name}/{_dtype_name(self.adapter_dtype)} "
                f"M{_bucket(self.M)} N{self.N} K{self.K} r{self.R} {'dropout' if self.dropout else 'no-dropout'} "
                f"{kind}")

    def untimed_reason(self) -> Optional[str]:
        """Why "auto" takes "fused" for this case without timing (and without caching), or None."""
        if self.x_dtype == torch.float16:
            return "fp16 activations (the composed route would round x @ W.T to fp16 before the scale)"
        if torch.are_deterministic_algorithms_enabled():
            return "torch.use_deterministic_algorithms is on"
        return None


def default_route() -> str:
    """FUSED_DORA_ROUTE if set (checked), else "auto"."""
    route = os.environ.get(ROUTE_ENV, "") or "auto"
    if route not in ROUTE_CHOICES:
        raise ValueError(f"{ROUTE_ENV} must be one of {ROUTE_CHOICES}, got {route!r}")
    return route


def route_name(route: Optional[str]) -> str:
    """What a layer's repr shows for its ``route`` setting: the setting, or the default it stands for
    (FUSED_DORA_ROUTE as set, unchecked, else "auto")."""
    return route if route is not None else (os.environ.get(ROUTE_ENV, "") or "auto")


def check_route(route: Optional[str]) -> str:
    """``route`` checked (None: `default_route`)."""
    if route is None:
        return default_route()
    if not isinstance(route, str) or route not in ROUTE_CHOICES:
        raise ValueError(f"route must be one of {ROUTE_CHOICES} or None, got {route!r}")
    return route


def set_route_timer(timer: Optional[RouteTimer] = None) -> None:
    """Time routes with ``timer(candidates, device) -> {route: seconds}`` (None: CUDA events,
    on CUDA devices only). Clears the choices made so far."""
    global _timer
    _timer = timer
    clear_route_choices()


def clear_route_choices() -> None:
    """Forget every choice "auto" made in this process; the next "auto" call reads
    FUSED_DORA_ROUTE_CACHE again if it is set (delete that file to time everything anew)."""
    global _disk_loaded
    with _lock:
        _choices.clear()
        _disk_loaded = None


def route_choices() -> Dict[str, str]:
    """A copy of the choices "auto" made: key -> route."""
    with _lock:
        return dict(_choices)


def _bucket(m: int) -> int:
    """Powers of two, so new sequence lengths reuse a choice (as the kernels' autotune keys do)."""
    return 1 << max(int(m) - 1, 0).bit_length()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "_")
    return device.type


def _capturing(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


def _key(case: RouteCase) -> str:
    """case.key(), formatted once per case rather than on every call."""
    memo = case._replace(M=_bucket(case.M)) + (torch.backends.cuda.matmul.allow_tf32,)
    key = _keys.get(memo)
    if key is None:
        key = _keys[memo] = case.key()
    return key


def known_route(route: str, case: RouteCase) -> Optional[str]:
    """The route a call of ``case`` takes: ``route`` itself if it is "fused" or "composed"; for
    "auto", the choice made for this case (in this process or the cache file), or "fused" where
    "auto" does not time (`RouteCase.untimed_reason`, or inside a CUDA-graph capture). None: "auto"
    must time this case first (`timed_route`). The per-call path: one key lookup."""
    if route != "auto":
        return route
    if case.untimed_reason() is not None:  # not cached: the reason may not hold for the next call
        return "fused"
    key = _key(case)
    chosen = _choices.get(key)
    if chosen is None:
        _load_disk_cache()
        chosen = _choices.get(key)
    if chosen is None and _capturing(case.device):  # no timing inside a CUDA graph capture: later
        return "fused"
    return chosen


def timed_route(case: RouteCase, candidates: Dict[str, Callable[[], object]]) -> str:
    """Time ``candidates`` ({route: a call of that route on the real inputs, writing to scratch
    outputs}) with the timer, choose, cache and log the choice for ``case``, and return it.

    A candidate that raises (out of memory, a cuBLAS or compile error) is not taken, with a
    warning; "composed" must beat "fused" by COMPOSED_MARGIN. Off CUDA (no timer): "fused".
    """
    key = _key(case)
    failed: Dict[str, BaseException] = {}

    def guarded(name: str, call: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            if name in failed:
                return None
            try:
                return call()
            except Exception as err:  # noqa: BLE001 - out of memory, a cuBLAS or compile error: not this route
                failed[name] = err
                return None
        return run

    times = (_timer or cuda_event_timer)({name: guarded(name, call) for name, call in candidates.items()},
                                         case.device)
    if "fused" in failed:  # the route that runs anyway: let its error surface there
        times = None
    for name, err in failed.items():
        logger.warning("route for %s: %s failed while being timed (%s); not taken", key, name, err)
    if not times:
        chosen = "fused"
        logger.debug("route for %s: fused (nothing to time on %s)", key, case.device.type)
    else:
        fused, composed = times.get("fused"), times.get("composed")
        chosen = "composed" if "composed" not in failed and composed < COMPOSED_MARGIN * fused else "fused"
        logger.info("route for %s: %s (%s)", key, chosen,
                    ", ".join(f"{r} {1e3 * t:.3f} ms" for r, t in sorted(times.items()) if r not in failed))
    with _lock:
        _choices[key] = chosen
    if times:
        _save_disk_cache(key, chosen)
    return chosen


def cuda_event_timer(candidates: Dict[str, Callable[[], object]], device: torch.device,
                     reps: int = 10) -> Optional[Dict[str, float]]:
    """Seconds per call of each candidate: the median of ``reps`` calls timed with CUDA events,
    the candidates alternating (so a clock or a neighbour's load drifts over both alike), after
    one warm-up call each, which also compiles and autotunes their kernels. None off CUDA."""
    if device.type != "cuda":
        return None
    with torch.cuda.device(device):
        for run in candidates.values():
            run()
        events = {name: [] for name in candidates}
        for _ in range(reps):
            for name, run in candidates.items():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                run()
                end.record()
                events[name].append((start, end))
        torch.cuda.synchronize()
    times = {}
    for name, pairs in events.items():
        ms = sorted(start.elapsed_time(end) for start, end in pairs)
        times[name] = ms[len(ms) // 2] * 1e-3
    return times


def _versions() -> str:
    """What a cached choice depends on besides its key: the kernels' and the libraries' versions."""
    import importlib.metadata

    import triton

    try:
        ours = importlib.metadata.version("fused_dora")
    except importlib.metadata.PackageNotFoundError:
        ours = "source"
    return f"fused_dora {ours}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}"


def _read_cache_file(path: str):
    """(choices, ours): the file's {key: route} when it is a route cache of these versions, and
    whether it is a route cache at all (a missing file counts as ours: it may be created). An
    unreadable, damaged or foreign file gives no choices."""
    try:
        with open(path) as f:
            saved = json.load(f)
    except FileNotFoundError:
        return {}, True
    except (OSError, ValueError):  # unreadable, or not JSON
        return {}, False
    if not isinstance(saved, dict) or set(saved) != {"versions", "choices"} or not isinstance(saved["choices"], dict):
        return {}, False
    if saved["versions"] != _versions():
        return {}, True
    return {k: r for k, r in saved["choices"].items() if isinstance(k, str) and r in ROUTES}, True


def _load_disk_cache() -> None:
    """Read FUSED_DORA_ROUTE_CACHE into the choices once per file name (a missing, unreadable,
    damaged or other-version file is ignored)."""
    global _disk_loaded
    path = os.environ.get(ROUTE_CACHE_ENV, "")
    with _lock:
        if path == _disk_loaded:
            return
        if path:
            for key, route in _read_cache_file(path)[0].items():
                _choices.setdefault(key, route)
        _disk_loaded = path


def _save_disk_cache(key: str, route: str) -> None:
    """Add one choice to FUSED_DORA_ROUTE_CACHE (rewritten whole, atomically; processes sharing the
    file may drop each other's newest entries, which are then timed again). A file that is not a
    route cache (someone else's JSON, say) is left alone; that and a write error are logged, not
    raised."""
    path = os.environ.get(ROUTE_CACHE_ENV, "")
    if not path:
        return
    with _lock:
        choices, ours = _read_cache_file(path)
        if not ours:
            logger.warning("%s=%s is not a fused_dora route cache; it is left as it is and nothing is cached there",
                           ROUTE_CACHE_ENV, path)
            return
        choices[key] = route
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump({"versions": _versions(), "choices": choices}, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except OSError as err:
            logger.warning("could not write the route cache %s: %s", path, err)
            with contextlib.suppress(OSError):
                os.remove(tmp)
