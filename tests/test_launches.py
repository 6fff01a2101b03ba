"""Launches per layer and step (issue 19.4), counted on meta tensors without a GPU
(benchmarks/dora_bench/launches.py): at most 8 for a training step (forward + backward, the norm
included) and at most 3 for an inference forward, on the fused route."""
import pytest
import torch

from dora_bench.launches import count_launches

TRAINING_STEP_MAX = 8
INFERENCE_MAX = 3


@pytest.fixture(autouse=True)
def nan_poisoned_allocations():
    """Overrides conftest's fixture of that name: its NaN fill of every torch.empty would be counted
    as a launch. (Nothing runs here: meta tensors hold no values to poison.)"""


@pytest.mark.parametrize("dropout", [0.0, 0.05], ids=["p0", "p0.05"])
@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16], ids=["fp32-adapters", "bf16-adapters"])
def test_training_step_launches(dropout, adapter_dtype):
    counts = count_launches(training=True, dropout=dropout, adapter_dtype=adapter_dtype)
    total = counts["forward"].total + counts["backward"].total
    assert counts["forward"].triton and counts["backward"].triton  # the kernels ran, not the reference
    assert total <= TRAINING_STEP_MAX, (f"forward {counts['forward'].describe()}; "
                                        f"backward {counts['backward'].describe()}")


@pytest.mark.parametrize("norm_cached", [True, False], ids=["layer-norm-cached", "function-computes-norm"])
def test_inference_forward_launches(norm_cached):
    counts = count_launches(training=False, norm_cached=norm_cached)["forward"]
    assert counts.triton and counts.total <= INFERENCE_MAX, counts.describe()
