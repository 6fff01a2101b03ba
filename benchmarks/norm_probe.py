#!/usr/bin/env python
"""GPU probe for NOTES attempt 11/12: the direct row norm against the factored one, measured.

    python benchmarks/norm_probe.py [--json FILE]

GPU time per call (autotuned kernels, replayed from a CUDA graph by
triton.testing.do_bench_cudagraph, so the host's launch path is not timed: on 2026-12-04 a plain
do_bench of these calls measured the host, NOTES attempt 12) on W [N, K] bf16, fp32 adapters:
  direct      norm.row_norm_partials(W, A, B, s) + finish
  factored    norm.row_norm_partials(W, A, B, s, gram=G) + finish, G from lora_down_and_gram
  down        forward.lora_down(x, A, s)               (x [M, K] bf16)
  down+gram   forward.lora_down_and_gram(x, A, s)      (the extra cost of G)
and checks both norms against float64. W's bytes over the measured copy bandwidth give the floor.
"""
import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton.testing  # noqa: E402

from fused_dora.kernels import forward, norm  # noqa: E402


def copy_bandwidth() -> float:
    """Bytes read + written per second of a 2 GiB device-to-device copy."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def device_ms(fn) -> float:
    """Median GPU milliseconds of ``fn`` (already tuned) replayed from a CUDA graph."""
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")


def measure(N: int, K: int, r: int, bw: float, M: int = 4096, s: float = 2.0) -> dict:
    W = torch.randn(N, K, device="cuda").mul_(0.02).to(torch.bfloat16)
    A = torch.randn(r, K, device="cuda").mul_(0.05)
    B = torch.randn(N, r, device="cuda").mul_(0.05)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    ref = (W.double() + s * B.double() @ A.double()).norm(dim=1)
    _, G = forward.lora_down_and_gram(x, A, s)

    def finished(p):
        return p[0] if p.shape[0] == 1 else norm.finish_row_norm(p)

    fns = {"direct": lambda: finished(norm.row_norm_partials(W, A, B, s, finish=True)),
           "factored": lambda: finished(norm.row_norm_partials(W, A, B, s, finish=True, gram=G)),
           "down": lambda: forward.lora_down(x, A, s),
           "down_gram": lambda: forward.lora_down_and_gram(x, A, s)}
    err = {f"err_{k}": ((fns[k]().double() - ref).norm() / ref.norm()).item() for k in ("direct", "factored")}
    t = {k: 1e3 * device_ms(fn) for k, fn in fns.items()}
    floor = W.numel() * W.element_size() / bw * 1e6  # one read of W at the copy rate
    return dict(N=N, K=K, r=r, M=M, floor_us=floor, **err, **t)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    bw = copy_bandwidth()
    rows = []
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s (read+write)")
    print(f"{'N':>6} {'K':>5} {'r':>3} {'M':>5} | {'floor us':>8} {'direct':>8} {'factored':>8} "
          f"{'down':>8} {'down+G':>8} | {'err dir':>8} {'err fac':>8}")
    for N, K in ((4096, 4096), (14336, 4096), (4096, 14336)):
        for r in (16, 64):
            row = measure(N, K, r, bw)
            rows.append(row)
            print(f"{N:>6} {K:>5} {r:>3} {row['M']:>5} | {row['floor_us']:8.1f} {row['direct']:8.1f} "
                  f"{row['factored']:8.1f} {row['down']:8.1f} {row['down_gram']:8.1f} | "
                  f"{row['err_direct']:8.1e} {row['err_factored']:8.1e}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), copy_bw=bw,
                                                   autotune=os.environ.get("FUSED_DORA_AUTOTUNE", "1"),
                                                   rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
