"""The two GEMM routes (issue 12): "composed" (torch.mm + light Triton passes, kernels/composed.py)
passes the same float64 parity tests as "fused", and "auto" picks by a timer (stubbed here: there
is nothing to time on a CPU), caches the choice, logs it, and can keep it on disk."""
import json
import logging

import pytest
import torch

import fused_dora
from fused_dora import FusedDoraLinear, routes
from fused_dora.drivers import draw_dropout_seed
from fused_dora.kernels import composed, forward, input_grad
from fused_dora.kernels.dropout import dropout_mask
from helpers import DEVICE, TOL, assert_close, magnitude_grad_rescale, make_inputs, reference_fp64, rel_err, run

SHAPES = [(1, 45, 53, 1), (37, 45, 53, 3), (50, 70, 33, 21), (29, 40, 70, 64)]  # ragged; r over one rank chunk


@pytest.fixture(autouse=True)
def _fresh_choices(monkeypatch):
    """Each test starts with no cached choice, the default timer, and no route settings."""
    monkeypatch.delenv(routes.ROUTE_ENV, raising=False)
    monkeypatch.delenv(routes.ROUTE_CACHE_ENV, raising=False)
    routes.set_route_timer(None)
    yield
    routes.set_route_timer(None)


def _composed(**kw):
    return fused_dora.dora_linear(backend="triton", route="composed", **kw)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype, adapter_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float32),
                                                  (torch.float16, torch.float16)], ids=["fp32", "fp16+fp32", "fp16"])
def test_composed_forward_and_grads_match_fp64(shape, dtype, adapter_dtype):
    M, Kdim, N, r = shape
    inputs = make_inputs(M, Kdim, N, r, dtype=dtype, adapter_dtype=adapter_dtype, seed=M + N)
    out, grads = run(_composed, inputs, scaling=1.7)
    ref_out, ref_grads = reference_fp64(inputs, scaling=1.7)
    assert out.dtype == dtype and grads["lora_A"].dtype == adapter_dtype
    assert_close(out, grads, ref_out, ref_grads, dtype, f"composed {shape} {dtype}/{adapter_dtype}")


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_composed_dropout_uses_the_forward_mask(p, dtype):
    M, Kdim, N, r = 45, 37, 29, 5
    inputs = make_inputs(M, Kdim, N, r, dtype=dtype, adapter_dtype=torch.float32, seed=21)
    torch.manual_seed(1234)
    out, grads = run(_composed, inputs, scaling=1.5, dropout_p=p, training=True)
    torch.manual_seed(1234)  # replay the seed the op drew
    mask = dropout_mask(draw_dropout_seed(), M, Kdim, p, DEVICE)
    assert 0 < mask.sum() < mask.numel()
    ref_out, ref_grads = reference_fp64(inputs, scaling=1.5, dropout_p=p, training=True, dropout_mask=mask)
    assert_close(out, grads, ref_out, ref_grads, dtype, f"composed dropout p={p}")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("trainable", [("x",), ("lora_A",), ("lora_B",), ("magnitude",), ("x", "magnitude")],
                         ids=["x", "A", "B", "magnitude", "x+magnitude"])
def test_composed_leading_dims_and_gradient_subsets(bias, trainable):
    inputs = make_inputs(None, 24, 19, 5, bias=bias, lead=(3, 11), seed=3)
    leaves = {k: (v.clone().requires_grad_(k in trainable) if v is not None else None) for k, v in inputs.items()}
    y = _composed(**leaves, scaling=0.5)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [leaves[k] for k in trainable], dy)
    ref = {k: (v.double().requires_grad_(k in trainable) if v is not None else None) for k, v in inputs.items()}
    y64 = fused_dora.reference.dora_linear(**ref, scaling=0.5)
    ref_grads = torch.autograd.grad(y64, [ref[k] for k in trainable], dy.double())
    assert y.shape == (3, 11, 19) and rel_err(y, y64) < TOL[torch.float32]
    for name, g, g64 in zip(trainable, grads, ref_grads):
        assert rel_err(g, g64) < TOL[torch.float32], name


def test_composed_non_contiguous_input_inference_and_in_place():
    inputs = make_inputs(30, 26, 21, 4, seed=9)
    inputs["x"] = torch.randn(26, 60)[:, ::2].T  # [30, 26] with strides (2, 60)
    y64 = fused_dora.reference.dora_linear(**{k: v.double() for k, v in inputs.items()}, scaling=1.3)
    with torch.inference_mode():
        y = _composed(**inputs, scaling=1.3)
    assert rel_err(y, y64) < TOL[torch.float32]
    x = inputs["x"].clone().requires_grad_()
    y = _composed(**(inputs | {"x": x}), scaling=1.3)
    y.relu_()  # a tensor of its own, as on the fused route
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_launchers_of_the_composed_passes_vs_fp64():
    """Each new pass on its own: lora_up_grad's e output, the forward epilogue pass, the dx LoRA pass."""
    M, Kdim, N, r, s, p = 33, 40, 45, 6, 1.3, 0.25  # N: two slices of v
    t = make_inputs(M, Kdim, N, r, seed=4)
    dy, norm = torch.randn(M, N), torch.rand(N) + 0.5
    scale = t["magnitude"] / norm
    e = torch.empty(M, N)
    v = input_grad.lora_up_grad(dy, t["magnitude"], norm, t["lora_B"], 1e-12, e_out=e, splits=2)
    torch.testing.assert_close(e, dy * scale)
    assert v.shape[0] == 2  # partial sums over slices of N, summed by the passes that read them
    assert rel_err(v.sum(0), (dy.double() * scale.double()) @ t["lora_B"].double()) < 1e-5

    su = torch.randn(M, r)
    y = (t["x"] @ t["weight"].T).contiguous()
    ypre = t["x"].double() @ t["weight"].double().T + su.double() @ t["lora_B"].double().T
    q = composed.dora_compose_epilogue(y, su, t["lora_B"], t["magnitude"], norm, t["bias"], 1e-12, store_q=True)
    c = t["magnitude"].double() / norm.double()
    assert rel_err(y, c * ypre + t["bias"].double()) < 1e-5
    assert rel_err(q, ypre * magnitude_grad_rescale(c.float(), norm).double()) < 1e-5

    base = torch.randn(M, Kdim)
    dx = base.clone()
    composed.add_lora_input_grad(dx, v, t["lora_A"], s, p, seed=77)
    mask = dropout_mask(77, M, Kdim, p, DEVICE).double()
    want = base.double() + s * mask * (v.double().sum(0) @ t["lora_A"].double()) / (1 - p)
    assert rel_err(dx, want) < 1e-5


# ---- choosing: the argument, the attribute, the environment ------------------------------------
def test_bad_routes_are_refused_by_name(monkeypatch):
    t = make_inputs(4, 8, 6, 2)
    with pytest.raises(ValueError, match="route must be one of"):
        fused_dora.dora_linear(**t, scaling=1.0, backend="triton", route="cublas")
    with pytest.raises(ValueError, match="route must be one of"):
        FusedDoraLinear(8, 6, route="fast")
    monkeypatch.setenv(routes.ROUTE_ENV, "quick")
    with pytest.raises(ValueError, match="FUSED_DORA_ROUTE must be one of"):
        fused_dora.dora_linear(**t, scaling=1.0, backend="triton")


def _count_launches(monkeypatch):
    """Counts of the launches that tell the routes apart."""
    families = {"dora_forward": forward, "dora_compose_epilogue": composed, "dora_input_grad": input_grad,
                "add_lora_input_grad": composed}
    calls = dict.fromkeys(families, 0)
    for name, family in families.items():
        real = getattr(family, name)

        def counted(*a, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(*a, **kw)
        monkeypatch.setattr(family, name, counted)
    return calls


def test_environment_attribute_and_argument_pick_the_route(monkeypatch):
    calls = _count_launches(monkeypatch)
    layer = FusedDoraLinear(16, 12, r=4, backend="triton")
    x = torch.randn(5, 16, requires_grad=True)
    monkeypatch.setenv(routes.ROUTE_ENV, "composed")
    layer(x).sum().backward()
    assert calls == {"dora_forward": 0, "dora_compose_epilogue": 1, "dora_input_grad": 0, "add_lora_input_grad": 1}
    layer.route = "fused"  # the attribute wins over the environment
    layer(x).sum().backward()
    assert calls["dora_forward"] == 1 and calls["dora_input_grad"] == 1
    assert "route='fused'" in repr(layer)
    monkeypatch.delenv(routes.ROUTE_ENV)
    layer.route = None  # "auto": nothing to time on a CPU, so fused
    assert "route='auto'" in repr(layer)
    layer(x).sum().backward()
    assert calls["dora_forward"] == 2 and calls["dora_compose_epilogue"] == 1


# ---- auto, with a stub timer ---------------------------------------------------------------------
class StubTimer:
    """Says ``prefer[direction]`` is faster; records which candidates it was asked to time."""

    def __init__(self, forward="composed", backward="composed"):
        self.prefer = {"forward": forward, "backward": backward}
        self.asked = []

    def __call__(self, candidates, device):
        outputs = {name: run() for name, run in candidates.items()}  # each candidate really runs
        direction = "forward" if all(not isinstance(o, tuple) for o in outputs.values()) else "backward"
        self.asked.append((direction, sorted(candidates)))
        return {name: (1.0 if name == self.prefer[direction] else 2.0) for name in candidates}


@pytest.mark.parametrize("forward, backward", [("composed", "composed"), ("fused", "fused"),
                                               ("composed", "fused"), ("fused", "composed")])
def test_auto_takes_what_the_timer_prefers_and_stays_correct(monkeypatch, forward, backward):
    calls = _count_launches(monkeypatch)
    timer = StubTimer(forward, backward)
    routes.set_route_timer(timer)
    inputs = make_inputs(37, 45, 53, 3, seed=8)
    out, grads = run(fused_dora.dora_linear, inputs, scaling=1.7, backend="triton", route="auto")
    ref_out, ref_grads = reference_fp64(inputs, scaling=1.7)
    assert_close(out, grads, ref_out, ref_grads, torch.float32, f"auto {forward}/{backward}")
    assert timer.asked == [("forward", ["composed", "fused"]), ("backward", ["composed", "fused"])]
    # the timing ran each candidate once; then the chosen route ran for real
    assert calls["dora_forward"] == 1 + (forward == "fused")
    assert calls["dora_compose_epilogue"] == 1 + (forward == "composed")
    assert calls["add_lora_input_grad"] == 1 + (backward == "composed")
    chosen = routes.route_choices()
    assert sorted(chosen.values()) == sorted([forward, backward])
    tf32 = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    assert f"forward cpu float32-{tf32}/float32 M64 N53 K45 r3 no-dropout training" in chosen


def test_auto_times_once_per_bucket_and_logs_the_choice(caplog):
    timer = StubTimer("composed", "fused")
    routes.set_route_timer(timer)
    layer = FusedDoraLinear(20, 14, r=4, backend="triton", route="auto")
    with caplog.at_level(logging.INFO, logger="fused_dora"):
        for M in (33, 40, 64):  # one M bucket (64): timed once
            layer(torch.randn(M, 20, requires_grad=True)).sum().backward()
        with torch.no_grad():
            layer(torch.randn(40, 20))  # inference is its own case (no q stored)
        layer(torch.randn(65, 20))  # next bucket, no grad needed for dx: forward only
    assert [d for d, _ in timer.asked] == ["forward", "backward", "forward", "forward"]
    lines = [r.getMessage() for r in caplog.records if r.name == "fused_dora.routes"]
    assert len(lines) == 4
    assert "route for forward cpu float32-ieee/float32 M64 N14 K20 r4 no-dropout training: composed" in lines[0]
    assert "composed 1000.000 ms, fused 2000.000 ms" in lines[0]


def test_auto_takes_composed_only_by_a_margin():
    class Close(StubTimer):
        def __call__(self, candidates, device):
            super().__call__(candidates, device)
            return {"fused": 1.0, "composed": 0.97}  # 3% faster: within the noise margin

    routes.set_route_timer(Close())
    t = make_inputs(6, 8, 7, 2)
    fused_dora.dora_linear(**t, scaling=1.0, backend="triton", route="auto")
    assert set(routes.route_choices().values()) == {"fused"}


def test_auto_skips_a_failing_composed_route_and_warns(monkeypatch, caplog):
    routes.set_route_timer(StubTimer("composed", "composed"))

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("out of memory (simulated)")
    monkeypatch.setattr(composed, "dora_compose_epilogue", out_of_memory)
    inputs = make_inputs(9, 8, 7, 2, seed=3)
    with caplog.at_level(logging.WARNING, logger="fused_dora"):
        out, grads = run(fused_dora.dora_linear, inputs, scaling=1.2, backend="triton", route="auto")
    assert_close(out, grads, *reference_fp64(inputs, scaling=1.2), torch.float32, "auto after a failure")
    assert "composed failed while being timed (out of memory (simulated)); not taken" in caplog.text
    forward = [r for k, r in routes.route_choices().items() if k.startswith("forward")]
    assert forward == ["fused"]


def test_auto_is_fused_for_fp16_and_deterministic_runs_without_timing(monkeypatch):
    def no_timing(candidates, device):
        raise AssertionError("nothing should be timed")

    routes.set_route_timer(no_timing)
    calls = _count_launches(monkeypatch)
    t16 = make_inputs(6, 8, 7, 2, dtype=torch.float16, adapter_dtype=torch.float32)
    fused_dora.dora_linear(**t16, scaling=1.0, backend="triton", route="auto")
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    fused_dora.dora_linear(**make_inputs(6, 8, 7, 2), scaling=1.0, backend="triton", route="auto")
    assert calls["dora_forward"] == 2 and calls["dora_compose_epilogue"] == 0
    assert routes.route_choices() == {}  # not cached: the reason may not hold next time


def test_bad_environment_route_does_not_break_the_reference_backend(monkeypatch):
    monkeypatch.setenv(routes.ROUTE_ENV, "quick")
    t = make_inputs(4, 8, 6, 2)
    fused_dora.dora_linear(**t, scaling=1.0, backend="reference")


def test_composed_backward_under_autocast_keeps_the_saved_dtype():
    """A backward run inside torch.autocast (which it inherits from the forward's context)
    computes dx in x's dtype on the composed route too, not in the autocast dtype."""
    inputs = make_inputs(12, 16, 10, 3, seed=6)
    leaves = {k: (v.clone().requires_grad_(k == "x") if v is not None else None) for k, v in inputs.items()}
    y = _composed(**leaves, scaling=0.8)
    dy = torch.randn_like(y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (dx,) = torch.autograd.grad(y, leaves["x"], dy)
    x64 = inputs["x"].double().requires_grad_()
    y64 = fused_dora.reference.dora_linear(x=x64, **{k: v.double() for k, v in inputs.items() if k != "x"},
                                           scaling=0.8)
    (dx64,) = torch.autograd.grad(y64, x64, dy.double())
    assert dx.dtype == torch.float32 and rel_err(dx, dx64) < TOL[torch.float32]


def test_auto_without_a_timer_is_fused_off_cuda(monkeypatch):
    calls = _count_launches(monkeypatch)
    t = make_inputs(6, 8, 7, 2)
    fused_dora.dora_linear(**t, scaling=1.0, backend="triton", route="auto")
    assert calls["dora_forward"] == 1 and calls["dora_compose_epilogue"] == 0
    assert set(routes.route_choices().values()) == {"fused"}


def test_auto_choices_persist_in_the_cache_file(monkeypatch, tmp_path):
    path = tmp_path / "routes.json"
    monkeypatch.setenv(routes.ROUTE_CACHE_ENV, str(path))
    routes.set_route_timer(StubTimer("composed", "composed"))
    t = make_inputs(6, 8, 7, 2)
    fused_dora.dora_linear(**t, scaling=1.0, backend="triton", route="auto")
    saved = json.loads(path.read_text())
    assert list(saved["choices"].values()) == ["composed"] and "torch" in saved["versions"]

    def no_timing(candidates, device):
        raise AssertionError("the cached choice should have been used")

    routes.set_route_timer(no_timing)  # forgets the in-process choices; the file is read again
    calls = _count_launches(monkeypatch)
    fused_dora.dora_linear(**t, scaling=1.0, backend="triton", route="auto")
    assert calls["dora_compose_epilogue"] == 1 and calls["dora_forward"] == 0


@pytest.mark.parametrize("content", ['{"versions": "%s", "choices": null}', '{"versions": "%s", "choices": []}',
                                     '{"versions": "%s", "choices": {"k": 3}}', "[1, 2]", "{not json"],
                         ids=["null", "list", "bad-route", "list-file", "not-json"])
def test_a_damaged_cache_file_is_ignored(monkeypatch, tmp_path, content):
    path = tmp_path / "routes.json"
    path.write_text(content % routes._versions() if "%s" in content else content)
    monkeypatch.setenv(routes.ROUTE_CACHE_ENV, str(path))
    routes.set_route_timer(StubTimer("composed", "composed"))
    t = make_inputs(6, 8, 7, 2)
    out = fused_dora.dora_linear(**t, scaling=1.0, backend="triton", route="auto")
    assert torch.isfinite(out).all() and set(routes.route_choices().values()) == {"composed"}


def test_a_foreign_json_file_is_not_overwritten(monkeypatch, tmp_path, caplog):
    path = tmp_path / "settings.json"
    path.write_text('{"theme": "dark"}')
    monkeypatch.setenv(routes.ROUTE_CACHE_ENV, str(path))
    routes.set_route_timer(StubTimer("composed", "composed"))
    with caplog.at_level(logging.WARNING, logger="fused_dora.routes"):
        fused_dora.dora_linear(**make_inputs(6, 8, 7, 2), scaling=1.0, backend="triton", route="auto")
    assert path.read_text() == '{"theme": "dark"}'
    assert "not a fused_dora route cache" in caplog.text


def test_a_cache_file_that_cannot_be_replaced_leaves_no_temp_file(monkeypatch, tmp_path, caplog):
    path = tmp_path / "routes.json"

    def failing_replace(src, dst):
        raise PermissionError(13, "Permission denied", dst)

    monkeypatch.setattr(routes.os, "replace", failing_replace)
    monkeypatch.setenv(routes.ROUTE_CACHE_ENV, str(path))
    routes.set_route_timer(StubTimer("composed", "composed"))
    with caplog.at_level(logging.WARNING, logger="fused_dora.routes"):
        fused_dora.dora_linear(**make_inputs(6, 8, 7, 2), scaling=1.0, backend="triton", route="auto")
    assert list(tmp_path.iterdir()) == [] and "could not write the route cache" in caplog.text


@pytest.mark.parametrize("route", ["composed", "auto"])
def test_compiled_model_on_each_route_matches_eager(route):
    torch._dynamo.reset()
    routes.set_route_timer(StubTimer("composed", "fused"))
    torch.manual_seed(0)
    model = torch.nn.Sequential(FusedDoraLinear(24, 32, r=4, lora_alpha=8, route=route), torch.nn.GELU(),
                                FusedDoraLinear(32, 16, r=3, lora_alpha=3, route=route)).to(DEVICE)
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.lora_B.normal_(0, 0.3)
    x = torch.randn(2, 5, 24, device=DEVICE)
    model(x).square().sum().backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    y = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    y.square().sum().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert rel_err(p.grad, eager[n]) < 1e-5, n


def test_peft_model_on_the_composed_route_matches_peft(monkeypatch):
    """enable_fused_dora(route="composed"): logits, loss and every adapter gradient as PEFT's own."""
    peft = pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from fused_dora.integrations.peft import enable_fused_dora
    from helpers import LLAMA_TARGETS, randomize_adapters, tiny_llama

    calls = _count_launches(monkeypatch)
    model = peft.get_peft_model(tiny_llama(0), peft.LoraConfig(use_dora=True, r=4, lora_alpha=8,
                                                               target_modules=LLAMA_TARGETS))
    randomize_adapters(model)
    model.train()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(2)).to(DEVICE)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ref_loss, ref_grads = loss_and_grads()
    assert enable_fused_dora(model, route="composed") == 2 * len(LLAMA_TARGETS)
    loss, grads = loss_and_grads()
    assert calls["dora_compose_epilogue"] == 2 * len(LLAMA_TARGETS) and calls["dora_forward"] == 0
    assert rel_err(loss, ref_loss) < 1e-5
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name]) < 1e-5, name
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert "fused_dora='fused', route='composed'" in repr(q_proj)
    with pytest.raises(ValueError, match="route must be one of"):
        enable_fused_dora(model, route="cuBLAS")


@pytest.mark.parametrize("name", ["_dora_compose_epilogue_kernel", "_add_lora_input_grad_kernel"])
def test_in_place_passes_survive_an_autotune_search(name):
    """These passes read their output buffer, then rewrite it. A GPU autotune search runs every
    config on the real buffers several times: with the kernel's declared restore_value the first
    call's result is still right (without it, the update was applied once per benchmark run)."""
    import triton

    from fused_dora.kernels.tuning import TUNED_KERNELS

    tuned_kernel = TUNED_KERNELS[name]
    assert tuned_kernel.restore_value == ("out_ptr",)

    def bench(kernel_call, quantiles):  # a GPU benchmarker's repeated runs, on the interpreter
        for _ in range(3):
            kernel_call()
        return [1.0, 1.0, 1.0]

    configs = [triton.Config({"BLOCK_M": 16, "BLOCK_C": 16}), triton.Config({"BLOCK_M": 32, "BLOCK_C": 32})]
    search = triton.autotune(configs, key=["M"], restore_value=list(tuned_kernel.restore_value),
                             do_bench=bench)(tuned_kernel.kernel.fn)
    M, C, R, s = 20, 24, 3, 1.5
    base, v, lora = torch.randn(M, C), torch.randn(M, R), torch.randn(R, C)
    out = base.clone()
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(C, meta["BLOCK_C"]))
    if name == "_add_lora_input_grad_kernel":
        search[grid](out, v, lora, M, C, R, 32, lora.stride(0), lora.stride(1), s, 0, 0.0,
                     HAS_DROPOUT=False, V_SLICES=1, BLOCK_R=16, PRECISION="ieee")
        want = base + s * v @ lora
    else:
        lora_B, mag, norm = lora.T, torch.rand(C) + 0.5, torch.rand(C) + 0.5
        search[grid](out, v, lora_B, lora_B, mag, norm, norm, norm, out, M, C, R, 32, lora_B.stride(0),
                     lora_B.stride(1), 1e-12, HAS_BIAS=False, STORE_Q=False, NORM_SPLITS=0, SU_SLICES=1,
                     STORE_SU=False, BLOCK_R=16, PRECISION="ieee")
        want = mag / norm * (base + v @ lora_B.T)
    assert rel_err(out, want) < 1e-5
