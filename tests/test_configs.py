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


def test_host_cdiv_and_next_power_of_2_match_triton():
    """The launchers' host integer helpers (triton's are constexpr functions, slow from host code)."""
    import triton

    from fused_dora.kernels.tuning import cdiv, next_power_of_2

    for a in range(0, 300):
        assert next_power_of_2(a) == triton.next_power_of_2(a), a
        for b in (1, 2, 7, 32, 64, 128):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)
    assert next_power_of_2(2**31 + 1) == 2**32


@pytest.mark.parametrize("name", sorted(TUNED_KERNELS))
def test_cached_launch_uses_tritons_config_for_the_key(name, monkeypatch):
    """CachedAutotuner.run: a key Triton has tuned launches that config directly, without
    Triton's run; its key is the one triton.runtime.Autotuner.run forms (Triton's run finds the
    config under it without pruning); an untuned key goes to Triton's run, which tunes it."""
    import inspect

    import triton
    import triton.language as tl

    tuned = TUNED_KERNELS[name].kernel
    configs = TUNED_KERNELS[name].configs[:2]
    if len(configs) < 2:
        configs = configs * 2
    # as the launchers pass them: the runtime arguments positionally, the constexprs a config
    # does not set by keyword; the kernel itself is not run
    params = inspect.signature(tuned.base_fn).parameters
    runtime = [n for n in tuned.arg_names if params[n].annotation is not tl.constexpr]
    constexprs = [n for n in tuned.arg_names if n not in runtime and n not in configs[0].kwargs]
    args = [torch.empty(1, dtype=torch.bfloat16 if i % 2 else torch.float32) if n.endswith("_ptr") else 3 + i
            for i, n in enumerate(runtime)]
    kwargs = {n: 7 + i for i, n in enumerate(constexprs)}
    names = runtime + constexprs
    launched = []
    monkeypatch.setattr(tuned, "configs", configs)
    monkeypatch.setattr(tuned, "cache", {})
    monkeypatch.setattr(tuned.fn, "run", lambda *a, **kw: launched.append(kw), raising=False)
    monkeypatch.setattr(tuned, "prune_configs", lambda *a, **kw: pytest.fail("pruned: the key was not found"))
    key = tuned.launch_key(args, kwargs)
    assert len(key) == len(tuned.keys) + sum(n.endswith("_ptr") for n in names)
    tuned.cache[key] = configs[1]
    triton.runtime.Autotuner.run(tuned, *args, grid=(1,), warmup=False, **kwargs)  # Triton's key finds it
    with monkeypatch.context() as m:
        m.setattr(triton.runtime.Autotuner, "run", lambda *a, **kw: pytest.fail("not the cached launch"))
        tuned.run(*args, grid=(1,), warmup=False, **kwargs)                       # the cached launch
    assert len(launched) == 2 and launched[0] == launched[1]
    assert all(launched[1][k] == v for k, v in configs[1].all_kwargs().items())
    assert tuned.best_config is configs[1]
    # an untuned key: Triton's run prunes and searches (timings stubbed: configs[0] wins)
    tuned.cache.clear()
    monkeypatch.setattr(tuned, "prune_configs", lambda *a, **kw: list(configs))
    monkeypatch.setattr(tuned, "_bench", lambda *a, config, **kw: [0.0 if config is configs[0] else 1.0] * 3)
    tuned.run(*args, grid=(1,), warmup=False, **kwargs)
    assert tuned.cache[key] is configs[0] and len(launched) == 3
    assert all(launched[2][k] == v for k, v in configs[0].all_kwargs().items())
