"""pytest-benchmark suite: the key cases of bench.py, one benchmark per (case, competitor).

    pytest benchmarks --benchmark-only                     all of them (GPU only)
    pytest benchmarks --benchmark-only -k "train05 and fused"
    pytest benchmarks --benchmark-only --benchmark-compare  against a saved run

Each benchmarked call ends with torch.cuda.synchronize(), so pytest-benchmark's host clock times
the GPU work (synchronised timing). Inputs rotate through bench.py's pool, weights and adapters
are bench.py's (its package, dora_bench). Without a CUDA device every test is skipped (the CPU
smoke mode is `python benchmarks/bench.py`). Not part of CI's test run (pyproject testpaths =
["tests"]). bench.py is the source of the published figures (CUDA events, L2 flush, the
targets); this suite is for quick A/B comparisons while tuning a kernel.
"""
import itertools

import pytest
import torch

from dora_bench.cases import Case  # benchmarks/dora_bench (conftest puts benchmarks/ on sys.path)
from dora_bench.competitors import Unavailable, prepare
from dora_bench.instruments import cleanup, set_autotune_timing

HAS_CUDA = torch.cuda.is_available()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not HAS_CUDA, reason="GPU benchmark: no CUDA device here (timings need a GPU; "
                                            "`python benchmarks/bench.py` runs the CPU smoke mode)"),
]

# (mode, shape, M, r): Llama-3-8B projections, bf16 activations with fp32 adapters
KEY_CASES = [
    ("train05", "qo", 4096, 16),
    ("train0", "qo", 4096, 16),
    ("train05", "up", 4096, 64),
    ("train0", "hr", 4096, 384),
    ("infer", "qo", 16, 16),
    ("infer", "qo", 4096, 16),
    ("infer", "down", 1, 16),
    ("norm", "up", 0, 16),
]
COMPETITORS = ["floor", "peft_lora", "peft_dora", "eager_dense", "fused", "fused_composed", "fused_auto"]
NORM_COMPETITORS = ["peft_dora", "eager_dense", "fused"]


def _params():
    for mode, shape, M, r in KEY_CASES:
        for comp in (NORM_COMPETITORS if mode == "norm" else COMPETITORS):
            m = "" if mode == "norm" else f"-M{M}"
            yield pytest.param(mode, shape, M, r, comp, id=f"{mode}-{shape}{m}-r{r}-{comp}")


@pytest.mark.parametrize("mode,shape,M,r,comp", list(_params()))
def test_layer(benchmark, mode, shape, M, r, comp):
    dev = torch.device("cuda")
    case = Case(mode, shape, M, r, "bf16+fp32")
    set_autotune_timing(25.0)
    try:
        prepared = prepare(case, comp, dev)
    except Unavailable as exc:
        pytest.skip(str(exc))
    try:
        _benchmark(benchmark, case, comp, dev, *prepared)
    except torch.cuda.OutOfMemoryError:
        pytest.skip("OOM")
    finally:
        prepared = None
        cleanup(dev)


def _benchmark(benchmark, case, comp, dev, call, pool, competitor, data):
    counter = itertools.count()

    def run():
        call(next(counter) % pool)
        torch.cuda.synchronize()

    for _ in range(3):  # compile / autotune outside the timed rounds
        run()
    benchmark.extra_info.update(case=case.key, competitor=comp, flops=case.flops(comp),
                                device=torch.cuda.get_device_name(dev))
    benchmark.pedantic(run, rounds=30, iterations=1, warmup_rounds=5)
