"""Every kernel compiled for real GPUs (sm_90: H100/H200, sm_80: A100) on this machine, GPU or
not: benchmarks/compile_report.py's CI subset (bf16 activations with fp32 and bf16 adapters,
r = 16 and 384, dropout on, every config of every kernel of both routes, lora_up_grad with and
without e stored).

It runs in a subprocess without TRITON_INTERPRET (this session's kernels run in the interpreter;
compiling needs Triton's JIT) and needs only the ptxas and cuobjdump bundled with Triton. Fails
on a compile error, a spill in a config the autotuner can pick on that GPU, a shared-memory
estimate below the compiled figure, and a large GEMM tile (BLOCK_M >= 64) without wgmma on sm_90.
A cold run compiles 2 x 232 kernel configs, ~4 min on 2 cores; Triton's cache makes re-runs quick.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from fused_dora.kernels.tuning import tuned_kernels

ROOT = pathlib.Path(__file__).resolve().parents[1]
TARGETS = ("sm_90", "sm_80")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile_report") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "compile_report.py"), "--target", ",".join(TARGETS),
           "--subset", "ci", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text())


def _where(row):
    tile = "x".join(str(v) for v in row["blocks"].values())
    return (f"{row['kernel']} {row['x']}/{row['adapters']} r={row['r']} {row['variant']} "
            f"tile {tile} w{row['warps']} s{row['stages']}")


def _failing(report, target, word):
    return [f"{_where(r)}: {p}" for r in report[target] for p in r["problems"] if word in p]


@pytest.mark.parametrize("target", TARGETS)
def test_every_kernel_is_compiled(report, target):
    """Launches are captured on both routes: the composed route's passes and lora_up_grad storing e too."""
    assert {r["kernel"] for r in report[target]} == set(tuned_kernels())
    assert {r["variant"] for r in report[target] if r["kernel"] == "_lora_up_grad_kernel"} == {"-", "store-e"}


@pytest.mark.parametrize("target", TARGETS)
def test_every_config_compiles(report, target):
    assert report[target], "no rows"
    assert not _failing(report, target, "compile error")


@pytest.mark.parametrize("target", TARGETS)
def test_no_spill_in_a_pickable_config(report, target):
    assert not _failing(report, target, "spills")
    for kernel in {r["kernel"] for r in report[target]}:  # pruning leaves every case a config
        cases = {(r["x"], r["adapters"], r["r"], r["variant"]) for r in report[target] if r["kernel"] == kernel}
        for case in cases:
            rows = [r for r in report[target]
                    if r["kernel"] == kernel and (r["x"], r["adapters"], r["r"], r["variant"]) == case]
            assert any(r["pickable"] for r in rows), (kernel, case)


@pytest.mark.parametrize("target", TARGETS)
def test_shared_memory_estimates_are_upper_bounds(report, target):
    assert not _failing(report, target, "estimate")


def test_large_gemm_tiles_use_wgmma_on_sm90(report):
    assert not _failing(report, "sm_90", "wgmma")
    assert any(r["kernel"] == "_dora_input_grad_kernel" and "wgmma" in r["mma"] for r in report["sm_90"])
