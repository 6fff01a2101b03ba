"""GPU autotune search spaces, checked without a GPU: every config's shared-memory estimate can
be computed from the kernel's real argument names, and on an H100-sized budget each kernel keeps
configs for every dtype combination (the interpreter runs one fixed config and never prunes).
tests/test_compile_report.py checks the estimates against compiled kernels."""
import pytest
import torch

from fused_dora.kernels.tuning import fitting_configs, pickable_configs, tuned_kernels

TUNED_KERNELS = tuned_kernels()

H100_BUDGET = int(232448 * 0.9)


def _args(kernel, dtype, upcast, block_r, dropout=False):
    args = {name: (torch.empty(1, dtype=dtype) if name.endswith("_ptr") else 1) for name in kernel.arg_names}
    args.update(UPCAST=upcast, BLOCK_R=block_r, HAS_DROPOUT=dropout, STORE_Q=True)
    return args


@pytest.mark.parametrize("name", sorted(TUNED_KERNELS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("upcast", [False, True])
@pytest.mark.parametrize("dropout", [False, True])
def test_every_kernel_keeps_configs_that_fit(name, dtype, upcast, dropout):
    tuned = TUNED_KERNELS[name]
    kernel, configs, smem_bytes = tuned.kernel, tuned.configs, tuned.smem_bytes
    args = _args(kernel, dtype, upcast, block_r=64, dropout=dropout)
    needs = [smem_bytes({**args, **c.all_kwargs()}) for c in configs]
    assert all(n > 0 for n in needs)
    fit = fitting_configs(configs, args, smem_bytes, H100_BUDGET)
    assert fit and all(smem_bytes({**args, **c.all_kwargs()}) <= H100_BUDGET for c in fit), name
    for arch in (80, 90):  # configs measured to spill are pruned too, but never all of them
        assert pickable_configs(configs, args, smem_bytes, H100_BUDGET, spilling=tuned.spilling(args, arch)), arch


def test_default_gemm_config_fits_bf16():
    """FUSED_DORA_AUTOTUNE=0 takes the first fitting config: for bf16 that is the list's first."""
    for name in ("_dora_forward_kernel", "_dora_input_grad_kernel"):
        t = TUNED_KERNELS[name]
        kernel, configs, smem_bytes = t.kernel, t.configs, t.smem_bytes
        first = fitting_configs(configs, _args(kernel, torch.bfloat16, False, 64), smem_bytes, H100_BUDGET,
                                keep_all=False)
        assert first == configs[:1]


def test_fitting_configs_never_empty():
    t = TUNED_KERNELS["_dora_forward_kernel"]
    kernel, configs, smem_bytes = t.kernel, t.configs, t.smem_bytes
    tiny = fitting_configs(configs, _args(kernel, torch.float32, False, 16), smem_bytes, budget=1)
    assert len(tiny) == 1
