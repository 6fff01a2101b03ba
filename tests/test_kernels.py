"""Kernel-level checks: the row norm, reductions split over slices, zero rows, and that the
Triton path really runs (no silent fallback to the reference)."""
import pytest
import torch

import fused_dora
from fused_dora import reference
from fused_dora.kernels import adapter_grads, forward, input_grad
from fused_dora.kernels import norm as norm_kernels
from helpers import DEVICE, magnitude_grad_rescale, make_inputs, rel_err, run


@pytest.mark.parametrize("shape", [(53, 45, 1), (70, 40, 64), (33, 100, 12), (7, 300, 3)], ids=str)
@pytest.mark.parametrize("k_splits", [None, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_row_norm_matches_fp64(shape, k_splits, dtype):
    N, Kdim, r = shape
    t = make_inputs(1, Kdim, N, r, dtype=dtype, adapter_dtype=dtype, seed=N)
    norm = norm_kernels.dora_row_norm(t["weight"], t["lora_A"], t["lora_B"], 1.3, k_splits=k_splits)
    ref = reference.weight_norm(t["weight"].double(), t["lora_A"].double(), t["lora_B"].double(), 1.3)
    assert norm.dtype == torch.float32 and norm.shape == (N,)
    assert rel_err(norm, ref) < 1e-5  # products of fp16 values are exact in fp32


def test_row_norm_mixed_dtypes():
    t = make_inputs(1, 50, 40, 6, dtype=torch.float16, adapter_dtype=torch.float32, seed=2)
    norm = fused_dora.dora_weight_norm(t["weight"], t["lora_A"], t["lora_B"], 0.7, backend="triton")
    ref = reference.weight_norm(t["weight"].double(), t["lora_A"].double(), t["lora_B"].double(), 0.7)
    assert rel_err(norm, ref) < 1e-6


@pytest.mark.parametrize("shape", [(53, 45, 1), (70, 40, 16), (33, 100, 12), (7, 300, 3)], ids=str)
@pytest.mark.parametrize("down_splits,k_splits", [(1, None), (3, 2)])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                    (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                    (torch.float16, torch.float32)], ids=lambda d: "/".join(str(t)[6:] for t in d))
def test_factored_row_norm_matches_fp64(shape, down_splits, k_splits, dtypes):
    """The factored norm (kernels/norm.py; not yet the forward's, see NOTES attempt 11), r <= 64:
    lora_down adds up G = A @ A.T over its K slices, the norm pass (its own K slices) forms
    ||W||^2 + 2s (W @ A.T) . B + s^2 B G B^T; lora_down's su is bit for bit the plain launch's."""
    N, Kdim, r = shape
    t = make_inputs(9, Kdim, N, r, dtype=dtypes[0], adapter_dtype=dtypes[1], seed=N)
    su, gram = forward.lora_down_and_gram(t["x"], t["lora_A"], 1.3, splits=down_splits)
    assert gram.shape == (su.shape[0], r, r) and gram.dtype == torch.float32
    assert torch.equal(su, forward.lora_down(t["x"], t["lora_A"], 1.3, splits=down_splits))
    a64 = t["lora_A"].double()
    assert rel_err(gram.sum(0), a64 @ a64.T) < 1e-6
    norm = norm_kernels.finish_row_norm(norm_kernels.row_norm_partials(t["weight"], t["lora_A"], t["lora_B"], 1.3,
                                                                       k_splits=k_splits, gram=gram))
    ref = reference.weight_norm(t["weight"].double(), a64, t["lora_B"].double(), 1.3)
    assert norm.dtype == torch.float32 and norm.shape == (N,)
    assert rel_err(norm, ref) < 1e-5


@pytest.mark.parametrize("k_splits", [1, 3])
def test_factored_row_norm_near_cancellation_and_zero_rows(k_splits):
    """Rows that s * B @ A nearly cancels (n_j down to 1e-6 ||W_j||): the factored sum's error on
    n_j^2 stays within a few eps * (||W_j|| + s ||(BA)_j||)^2 (kernels/norm.py) and n_j is never
    negative or NaN; an all-zero row (W_j = 0, B_j = 0) is exactly 0, a zero W row with B_j != 0
    is s ||(BA)_j||; a NaN in W stays NaN (the clamp at 0 propagates it)."""
    g = torch.Generator().manual_seed(7)
    N, Kdim, r, s = 40, 200, 8, 2.0
    lora_A, lora_B = torch.randn(r, Kdim, generator=g), torch.randn(N, r, generator=g)
    ba = lora_B.double() @ lora_A.double()
    weight = torch.randn(N, Kdim, generator=g)
    for j, d in enumerate([1e-1, 1e-2, 1e-3, 1e-4, 1e-6]):
        weight[j] = (-s * ba[j] + d * torch.randn(Kdim, generator=g, dtype=torch.float64)).float()
    weight[10], lora_B[10] = 0.0, 0.0
    weight[11] = 0.0
    weight[12, 5] = float("nan")
    _, gram = forward.lora_down_and_gram(torch.randn(3, Kdim, generator=g), lora_A, s)
    norm = norm_kernels.finish_row_norm(norm_kernels.row_norm_partials(weight, lora_A, lora_B, s, k_splits=k_splits,
                                                                       gram=gram)).double()
    ref = reference.weight_norm(weight.double(), lora_A.double(), lora_B.double(), s)
    assert torch.isnan(norm[12]) and torch.isnan(ref[12])
    ok = torch.ones(N, dtype=torch.bool)
    ok[12] = False
    assert torch.isfinite(norm[ok]).all() and (norm[ok] >= 0).all()
    assert norm[10] == 0.0
    assert rel_err(norm[11], s * ba[11].norm()) < 1e-6
    scale = weight.double().norm(dim=1) + s * (lora_B.double() @ lora_A.double()).norm(dim=1)
    bound = 8 * 2.0**-24 * scale**2
    assert ((norm**2 - ref**2).abs()[ok] <= bound[ok]).all()
    assert rel_err(norm[13:], ref[13:]) < 1e-5  # rows not cancelled keep fp32 accuracy


@pytest.mark.parametrize("splits", [1, 2, 5])
@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_adapter_grad_reductions_any_split(splits, adapter_dtype):
    """The column passes' partial sums, and the launch that finishes them: dmag = sum(dy * q) / (t * n),
    dB = c * dy.T @ su, dA = s * v.T @ x, in the parameters' dtypes, however M is split."""
    g = torch.Generator().manual_seed(3)
    M, N, Kdim, r, s = 77, 30, 41, 20, 1.7
    dy, q = torch.randn(M, N, generator=g), torch.randn(M, N, generator=g)
    u, v, x = torch.randn(M, r, generator=g), torch.randn(M, r, generator=g), torch.randn(M, Kdim, generator=g)
    magnitude, norm = torch.rand(N, generator=g) + 0.5, torch.rand(N, generator=g) + 0.5
    if adapter_dtype == torch.float32:  # a zero row: clamped to eps (dmag ~1e13 here: fp16 would overflow)
        norm[3] = 0.0
    lora_A, lora_B = torch.empty(r, Kdim, dtype=adapter_dtype), torch.empty(N, r, dtype=adapter_dtype)
    dmag_part, db_part = adapter_grads.magnitude_and_B_grad_partials(dy, q, u, True, True, splits=splits)
    da_part = adapter_grads.lora_A_grad_partials(v, x, splits=splits)
    assert dmag_part.shape == (splits, N) and db_part.shape == (splits, N, r) and da_part.shape == (splits, r, Kdim)
    dmag, db, da = adapter_grads.finish_adapter_grads(dmag_part, db_part, da_part, magnitude.to(adapter_dtype), norm,
                                                      lora_A, lora_B, s, 1e-12)
    n = norm.double().clamp_min(1e-12)
    c = magnitude.to(adapter_dtype).double() / n
    t = magnitude_grad_rescale(c.float(), n.float()).double()
    assert dmag.dtype == db.dtype == da.dtype == adapter_dtype
    tol = 1e-6 if adapter_dtype == torch.float32 else 1e-3
    assert rel_err(dmag, (dy.double() * q.double()).sum(0) / (t * n)) < tol
    assert rel_err(db, c[:, None] * (dy.double().T @ u.double())) < tol
    assert rel_err(da, s * v.double().T @ x.double()) < tol


def test_zero_weight_rows_stay_finite():
    """An all-zero row (seen in Llama o_proj checkpoints) has norm 0: no NaN, no inf."""
    t = make_inputs(20, 24, 10, 4, seed=4)
    t["weight"][[2, 7]] = 0
    t["lora_B"][[2, 7]] = 0  # the adapted row W + s*B@A is all zero too
    t["magnitude"][7] = 0  # as magnitude initialised from that row would be
    out, grads = run(fused_dora.dora_linear, t, scaling=1.0, backend="triton")
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(gr).all() for gr in grads.values())
    ref_out, ref_grads = run(reference.dora_linear, t, scaling=1.0)
    assert rel_err(out, ref_out) < 1e-5
    for k in grads:
        assert rel_err(grads[k], ref_grads[k]) < 1e-5, k


def test_norm_clamp_leaves_other_rows_bit_identical():
    norm = torch.tensor([0.0, 1e-30, 3.0, 1e-6, 250.0])
    mag = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    c = reference.magnitude_scale(mag, norm)
    assert torch.isfinite(c).all()
    assert torch.equal(c[2:], mag[2:] / norm[2:])


@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_triton_path_really_runs(backend, monkeypatch):
    def no_reference(*a, **k):
        raise AssertionError("the reference path ran")

    monkeypatch.setattr(reference, "dora_linear", no_reference)
    monkeypatch.setattr(reference, "weight_norm", no_reference)
    calls = []
    families = {"row_norm_partials": norm_kernels, "lora_down": forward, "dora_forward": forward,
                "lora_up_grad": input_grad,
                "dora_input_grad": input_grad, "magnitude_and_B_grad_partials": adapter_grads,
                "lora_A_grad_partials": adapter_grads, "finish_adapter_grads": adapter_grads}
    names = tuple(families)
    for name, family in families.items():
        fn = getattr(family, name)
        monkeypatch.setattr(family, name, lambda *a, _fn=fn, _n=name, **kw: (calls.append(_n), _fn(*a, **kw))[1])
    t = make_inputs(9, 20, 12, 3, seed=5)
    run(fused_dora.dora_linear, t, scaling=1.0, dropout_p=0.2, training=True, backend=backend)
    assert sorted(calls) == sorted(names)


def test_reference_backend_handles_float64():
    t = make_inputs(9, 20, 12, 3, dtype=torch.float64, seed=6)
    y = fused_dora.dora_linear(**t, scaling=1.0, backend="reference")
    assert y.dtype == torch.float64
    y_auto = fused_dora.dora_linear(**t, scaling=1.0, backend="auto")  # auto sends fp64 to the reference
    assert torch.equal(y, y_auto)


def test_autocast_computes_in_autocast_dtype():
    t = make_inputs(10, 16, 8, 2, seed=7)
    with torch.autocast(DEVICE, dtype=torch.float16 if DEVICE == "cpu" else torch.bfloat16):
        y = fused_dora.dora_linear(**t, scaling=1.0)
        expect = torch.nn.functional.linear(t["x"], t["weight"], t["bias"]).dtype
    assert y.dtype == expect
    ref = fused_dora.dora_linear(**t, scaling=1.0, backend="reference")
    assert rel_err(y, ref) < 2e-2


def test_allocations_are_nan_poisoned_in_tests():
    """The conftest fixture is active: a kernel output that is never written reads as NaN."""
    assert torch.empty(3).isnan().all() and torch.empty_like(torch.ones(2)).isnan().all()
    assert torch.ones(1).new_empty(4).isnan().all()
    assert (torch.empty(2, dtype=torch.int32) != 0).all()


@pytest.mark.parametrize("dtype, adapter_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                                  (torch.float32, torch.float32), (torch.float16, torch.float16)],
                         ids=["bf16x3", "tf32x3", "fp32", "fp16"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_light_passes_match_fp64_in_each_precision(monkeypatch, dtype, adapter_dtype, p):
    """lora_down, lora_up_grad (and its e), lora_A_grad and the B / magnitude column pass against
    float64 of the same (rounded) inputs, in the precision each dtype pair takes
    (_launch.lora_precision); bf16 activations run only here under the interpreter (its bf16 tl.dot
    is wrong, _lora_dot multiplies the exact bf16 parts in fp32 there)."""
    from fused_dora.kernels import _launch
    from fused_dora.kernels._launch import lora_precision
    from fused_dora.kernels.dropout import dropout_mask

    g = torch.Generator().manual_seed(11)
    M, Kdim, N, r, s, seed = 70, 90, 95, 20, 0.7, 5  # K and N: three slices of 32, 32 and 26 or 31
    x = torch.randn(M, Kdim, generator=g).to(dtype)
    dy = torch.randn(M, N, generator=g).to(dtype)
    lora_A = (0.1 * torch.randn(r, Kdim, generator=g)).to(adapter_dtype)
    lora_B = (0.1 * torch.randn(N, r, generator=g)).to(adapter_dtype)
    mag, norm = torch.rand(N, generator=g) + 0.5, torch.rand(N, generator=g) + 1.0
    v = torch.randn(M, r, generator=g)
    su_in = torch.randn(M, r, generator=g).to(adapter_dtype)
    xd = x.double() * dropout_mask(seed, M, Kdim, p, "cpu").double() / (1 - p) if p else x.double()
    c = mag.double() / norm.double()
    # fp32 accuracy wherever an operand is fp32 (products exact, fp32 sums); 16-bit adapters round
    # their [M, r] and [N, r] operands to 16 bits
    tol = 1e-6 if adapter_dtype == torch.float32 else 3e-3
    assert lora_precision(dtype, adapter_dtype)[1] == {(torch.bfloat16, torch.float32): "bf16x3",
                                                       (torch.float16, torch.float32): "tf32x3"}.get(
        (dtype, adapter_dtype), lora_precision(dtype, adapter_dtype)[1])

    # K and N split in slices (partial sums): the grid fills the GPU at any M; slices of 24 start
    # inside the interpreter's 32-wide blocks (on a GPU, slices of 64k columns in 128-wide blocks)
    for splits, align in ((1, 32), (3, 32), (4, 8)):
        monkeypatch.setattr(_launch, "SLICE_ALIGN", align)
        su = forward.lora_down(x, lora_A, s, p, seed, splits=splits)
        assert su.shape == (splits, M, r) and su.dtype == torch.float32
        assert rel_err(su.sum(0), s * xd @ lora_A.double().T) < tol
        e = torch.empty(M, N, dtype=dtype)
        got_v = input_grad.lora_up_grad(dy, mag, norm, lora_B, 1e-12, e_out=e, splits=splits)
        assert got_v.shape == (splits, M, r)
        assert rel_err(got_v.sum(0), (dy.double() * c) @ lora_B.double()) < tol
    if dtype == torch.bfloat16:  # the interpreter rounds fp32 to bf16 toward zero (GPUs: to nearest)
        assert ((e.double() - dy.double() * c).abs() <= 2**-7 * (dy.double() * c).abs()).all()
    else:
        assert torch.equal(e, (dy.float() * (mag / norm)).to(dtype))
    da = adapter_grads.lora_A_grad_partials(v, x, p, seed, splits=2, adapter_dtype=adapter_dtype).sum(0)
    assert rel_err(da, v.double().T @ xd) < tol
    sliced = adapter_grads.lora_A_grad_partials(got_v, x, p, seed, splits=2, adapter_dtype=adapter_dtype).sum(0)
    assert rel_err(sliced, got_v.double().sum(0).T @ xd) < tol  # v's slices summed as it is read
    q = torch.randn(M, N, generator=g).to(dtype)
    dmag, db = adapter_grads.magnitude_and_B_grad_partials(dy, q, su_in, True, True, splits=3,
                                                           adapter_dtype=adapter_dtype)
    assert rel_err(db.sum(0), dy.double().T @ su_in.double()) < tol
    assert rel_err(dmag.sum(0), (dy.double() * q.double()).sum(0)) < 1e-6


@pytest.mark.parametrize("halves", [False, True], ids=["whole-tile", "halves"])
@pytest.mark.parametrize("store_q", [False, True], ids=["inference", "training"])
def test_forward_epilogue_in_column_halves_matches_fp64(monkeypatch, halves, store_q):
    """The forward GEMM's epilogue over the whole tile, or (Blackwell, _launch.epilogue_halves) over
    its two column halves in turn: y, q, su and the norm finished from partial sums, ragged N."""
    monkeypatch.setattr(forward, "epilogue_halves", lambda: halves)
    g = torch.Generator().manual_seed(13)
    M, Kdim, N, r, s = 37, 50, 75, 6, 0.5
    x, w = torch.randn(M, Kdim, generator=g), torch.randn(N, Kdim, generator=g)
    lora_A, lora_B = 0.1 * torch.randn(r, Kdim, generator=g), 0.1 * torch.randn(N, r, generator=g)
    mag, bias = torch.rand(N, generator=g) + 0.5, torch.randn(N, generator=g)
    norm_part = norm_kernels.row_norm_partials(w, lora_A, lora_B, s, k_splits=2)
    norm_out, su = torch.empty(N), torch.empty(M, r)
    y, q = forward.dora_forward(x, w, forward.lora_down(x, lora_A, s, splits=2), lora_B, mag, norm_part, bias, 1e-12,
                                store_q=store_q, norm_out=norm_out, su_out=su)
    n = reference.weight_norm(w.double(), lora_A.double(), lora_B.double(), s)
    su_ref = s * x.double() @ lora_A.double().T
    ypre = x.double() @ w.double().T + su_ref @ lora_B.double().T
    c = mag.double() / n
    assert rel_err(norm_out, n) < 1e-6 and rel_err(su, su_ref) < 1e-6
    assert rel_err(y, c * ypre + bias.double()) < 1e-5
    if store_q:
        assert rel_err(q, ypre * magnitude_grad_rescale(c.float(), norm_out).double()) < 1e-5


@pytest.mark.parametrize("length", [1, 31, 32, 90, 4096, 14336])
@pytest.mark.parametrize("splits", [None, 1, 3, 64])
def test_reduction_slices_tile_the_reduction(length, splits):
    """lora_down's K and lora_up_grad's N slices: aligned starts (the dropout mask's Philox groups),
    none empty, together exactly the reduction, at most the slices asked; unasked, at most
    length // SLICE_MIN of them."""
    from fused_dora.kernels._launch import SLICE_ALIGN, SLICE_MIN, reduction_slices

    count, per_slice = reduction_slices(length, 4, torch.device("cpu"), splits)
    assert per_slice % SLICE_ALIGN == 0 and count >= 1
    assert (count - 1) * per_slice < length <= count * per_slice
    if splits is not None:
        assert count <= splits
    else:
        assert count <= max(1, length // SLICE_MIN)


@pytest.mark.parametrize("length", [4096, 14336])
def test_reduction_slices_fill_an_h100_at_4096_tokens(monkeypatch, length):
    """Issue 19.3's grid target, with the GPU's slice sizes: lora_down / lora_up_grad at M = 4096
    (64 row blocks of 64) run at least two programs per SM of a 132-SM H100 (4 slices of 1024
    columns, 1.9 per SM, while slices were whole 256-column blocks)."""
    from fused_dora.kernels import _launch, tuning

    monkeypatch.setattr(_launch, "SLICE_ALIGN", 64)
    monkeypatch.setattr(_launch, "SLICE_MIN", 512)
    monkeypatch.setattr(tuning, "num_sms", lambda device: 132)
    count, per_slice = _launch.reduction_slices(length, 64, torch.device("cpu"))
    assert 64 * count >= 2 * 132 and per_slice % 64 == 0 and (count - 1) * per_slice < length
