"""Dropout on the LoRA path: in-kernel Philox masks, regenerated (never stored) in backward."""
import pytest
import torch

import fused_dora
from fused_dora.drivers import draw_dropout_seed
from fused_dora.kernels.dropout import dropout_mask
from helpers import DEVICE, assert_close, make_inputs, reference_fp64, run


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_backward_uses_the_forward_mask_and_scale(p, dtype):
    M, Kdim, N, r = 45, 37, 29, 5
    inputs = make_inputs(M, Kdim, N, r, dtype=dtype, adapter_dtype=torch.float32, seed=21)
    torch.manual_seed(1234)
    out, grads = run(fused_dora.dora_linear, inputs, scaling=1.5, dropout_p=p, training=True, backend="triton")
    # replay the seed the op drew, and materialise the mask the kernels generated from it
    torch.manual_seed(1234)
    mask = dropout_mask(draw_dropout_seed(), M, Kdim, p, DEVICE)
    assert 0 < mask.sum() < mask.numel()
    ref_out, ref_grads = reference_fp64(inputs, scaling=1.5, dropout_p=p, training=True, dropout_mask=mask)
    assert_close(out, grads, ref_out, ref_grads, dtype, f"dropout p={p}")


def test_kept_fraction_is_one_minus_p():
    for p in (0.05, 0.3, 0.7):
        mask = dropout_mask(987, 300, 200, p, DEVICE)
        assert abs(mask.float().mean().item() - (1 - p)) < 0.01, p


def _philox4x32_10(counter, key):
    """Philox4x32-10 (Salmon et al., SC'11) in plain Python, independent of Triton's."""
    mask32 = 0xFFFFFFFF
    c0, c1, c2, c3 = counter
    k0, k1 = key & mask32, key >> 32
    for _ in range(10):
        p0, p2 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p2 >> 32) ^ c1 ^ k0, p2 & mask32, (p0 >> 32) ^ c3 ^ k1, p0 & mask32
        k0, k1 = (k0 + 0x9E3779B9) & mask32, (k1 + 0xBB67AE85) & mask32
    return c0, c1, c2, c3


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_mask_is_the_documented_philox_stream(p):
    """kernels/dropout.py's contract, element by element: column 8q + 2w + h of a row is dropped
    when half h of word w of Philox4x32-10((q, row, 0, 0), seed) is below round(p * 2**16)."""
    seed, M, K = 0x1234_5678_9ABC, 5, 40
    mask = dropout_mask(seed, M, K, p, DEVICE).cpu()
    t = int(p * 65536 + 0.5)
    for row in range(M):
        for col in range(K):
            word = _philox4x32_10((col // 8, row, 0, 0), seed)[(col % 8) // 2]
            draw = (word >> (16 * (col % 2))) & 0xFFFF
            assert bool(mask[row, col]) == (draw >= t), (row, col)


def test_masks_differ_between_calls_and_seeds():
    a = dropout_mask(1, 64, 64, 0.5, DEVICE)
    b = dropout_mask(2, 64, 64, 0.5, DEVICE)
    assert 0.3 < (a != b).float().mean().item() < 0.7
    # rows are not copies of each other (the offset is the element's full index)
    assert (a[0] != a[1]).any()

    inputs = make_inputs(16, 32, 8, 4, seed=22)
    y1 = fused_dora.dora_linear(**inputs, scaling=1.0, dropout_p=0.5, training=True, backend="triton")
    y2 = fused_dora.dora_linear(**inputs, scaling=1.0, dropout_p=0.5, training=True, backend="triton")
    assert not torch.equal(y1, y2)


def test_same_seed_same_output():
    """What torch.utils.checkpoint relies on: same RNG state, same mask."""
    inputs = make_inputs(16, 32, 8, 4, seed=23)
    torch.manual_seed(5)
    y1 = fused_dora.dora_linear(**inputs, scaling=1.0, dropout_p=0.5, training=True, backend="triton")
    torch.manual_seed(5)
    y2 = fused_dora.dora_linear(**inputs, scaling=1.0, dropout_p=0.5, training=True, backend="triton")
    assert torch.equal(y1, y2)


def test_no_dropout_outside_training():
    inputs = make_inputs(16, 32, 8, 4, seed=24)
    y = fused_dora.dora_linear(**inputs, scaling=1.0, dropout_p=0.5, training=False, backend="triton")
    y_ref = fused_dora.dora_linear(**inputs, scaling=1.0, backend="reference")
    assert torch.allclose(y, y_ref, rtol=1e-5, atol=1e-6)
