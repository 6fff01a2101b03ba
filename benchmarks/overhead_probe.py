#!/usr/bin/env python
"""GPU probe: where a FusedDoraLinear training step spends its time, host against device.

    python benchmarks/overhead_probe.py [--out DIR] [--tokens 4096] [--features 4096] [--rank 16]

The first GPU run (benchmarks/results/2026-12-04T1616_nvidia-h200.md) measured the qo training
step at 5-6x the F.linear floor where the static model predicted 1.3-1.5x, and the norm at 8x its
bytes. This probe separates the two possible causes for one layer (bf16 base, fp32 adapters):

  host      wall time per step with no synchronisation inside the loop (the Python + launch path)
  device    the sum of the step's GPU kernel times (torch.profiler), per kernel
  step      wall time per step with a synchronisation at the end (what bench.py sees)
  graph     GPU time per step replayed from a CUDA graph (dropout 0: no host work in between)

and writes cProfile's top functions (by own time) for 20 steps. Runs on CPU too (tiny shape,
Triton's interpreter) as a smoke test of the script itself.
"""
import argparse
import contextlib
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton.testing  # noqa: E402

from fused_dora import FusedDoraLinear, reference  # noqa: E402


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, steps: int):
    """(host seconds per step without sync, wall seconds per step with one final sync)."""
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    t_host = time.perf_counter() - t0
    sync()
    return t_host / steps, (time.perf_counter() - t0) / steps


def graph_replay_us(step) -> str:
    """GPU time per training step replayed from a CUDA graph (triton.testing.do_bench_cudagraph: no
    host work between launches): what the step's kernels cost without the launch path. Dropout-free
    steps only (the seed is drawn on the host and would be frozen in the graph). A failure to
    capture is reported, not raised."""
    try:
        return f"{1e3 * triton.testing.do_bench_cudagraph(step, rep=20, return_mode='median'):.0f} us"
    except Exception as exc:  # noqa: BLE001 - a probe: say why capture failed and go on
        return f"capture failed: {type(exc).__name__}: {str(exc)[:200]}"


def parity(layer, x, dy) -> str:
    """Relative errors of y and every gradient of a warmed-up (already tuned: the cached launch
    path) dropout-free layer against the float64 reference."""
    params = [layer.lora_A, layer.lora_B, layer.magnitude]
    y = layer(x)
    got = [y] + list(torch.autograd.grad(y, [x] + params, dy))
    x64 = x.detach().double().requires_grad_()
    p64 = [p.detach().double().requires_grad_() for p in params]
    y64 = reference.dora_linear(x64, layer.weight.double(), None, *p64[:2], p64[2], layer.scaling)
    want = [y64] + list(torch.autograd.grad(y64, [x64] + p64, dy.double()))
    errs = [((g.double() - w).norm() / w.norm()).item() for g, w in zip(got, want)]
    return " ".join(f"{n} {e:.1e}" for n, e in zip(("y", "dx", "dA", "dB", "dmag"), errs))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--features", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--ncu-step", action="store_true",
                    help="only: 3 warm-up steps (dropout 0.05), then one step inside the NVTX range "
                         "'fused_dora_step' for ncu's --nvtx-include (benchmarks/ncu_step.sh)")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    M, N, r = args.tokens, args.features, args.rank
    torch.manual_seed(0)
    report = []

    def say(line=""):
        print(line, flush=True)
        report.append(line)

    for dropout in ((0.05,) if args.ncu_step else (0.05, 0.0)):
        base = torch.nn.Linear(N, N, bias=False, device=dev, dtype=torch.bfloat16)
        layer = FusedDoraLinear.from_linear(base, r=r, lora_alpha=2 * r, lora_dropout=dropout, route="fused")
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.02)
        x = torch.randn(M, N, device=dev, dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(M, N, device=dev, dtype=torch.bfloat16)

        def step(layer=layer, x=x, dy=dy):
            layer(x).backward(dy)

        def floor(base=base, x=x, dy=dy):
            F.linear(x, base.weight).backward(dy)

        for _ in range(3):  # autotune + compile
            step()
            floor()
        if args.ncu_step:
            sync()
            with torch.cuda.nvtx.range("fused_dora_step") if dev == "cuda" else contextlib.nullcontext():
                step()
            sync()
            return 0
        host, wall = timed(step, args.steps)
        fhost, fwall = timed(floor, args.steps)
        say(f"## dropout {dropout}: M={M} N=K={N} r={r} bf16 + fp32 adapters, route fused")
        say(f"fused step: host {host * 1e6:.0f} us (no sync), wall {wall * 1e6:.0f} us (synced)")
        say(f"floor step: host {fhost * 1e6:.0f} us, wall {fwall * 1e6:.0f} us")
        if dropout == 0.0:
            say(f"parity vs float64 after tuning: {parity(layer, x, dy)}")
            if dev == "cuda":
                say(f"fused step replayed from a CUDA graph: {graph_replay_us(step)}; "
                    f"floor: {graph_replay_us(floor)}")

        acts = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if dev == "cuda" else [])
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(5):
                step()
            sync()
        if dev == "cuda":
            kern = {}
            for ev in prof.events():
                if ev.device_type == torch.autograd.DeviceType.CUDA:
                    kern[ev.name] = kern.get(ev.name, 0.0) + ev.device_time / 5
            total = sum(kern.values())
            say(f"device: {total:.0f} us of kernels per step ({len(kern)} distinct kernels)")
            for name, us in sorted(kern.items(), key=lambda kv: -kv[1])[:16]:
                say(f"  {us:8.1f} us  {name[:110]}")
        (out / f"overhead_profile_p{dropout}.txt").write_text(
            prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))

        pr = cProfile.Profile()
        pr.enable()
        for _ in range(args.steps):
            step()
        sync()
        pr.disable()
        buf = io.StringIO()
        pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(25)
        (out / f"overhead_cprofile_p{dropout}.txt").write_text(buf.getvalue())
        say("")
        (out / "overhead_probe.txt").write_text("\n".join(report) + "\n")  # after each case: a cut run keeps it
    return 0


if __name__ == "__main__":
    sys.exit(main())
