"""CPU smoke parity: the Triton path (under the interpreter), on both of its routes (fused and
composed), against a float64 reference, forward and every gradient, with and without dropout;
PEFT DoRA beside it for comparison. QDoRA (smoke_qdora_parity): fused_dora's 4-bit path against
float64 and PEFT QDoRA over a bitsandbytes NF4 weight (its CPU backend), and the dense [out, in]
temporaries of the norm from the packed codes."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .cases import DROPOUT, Case, torch_dtype
from .competitors import Unavailable, build_peft_layer, linear_sharing, set_param
from .inputs import CaseData
from .instruments import rel_err, storage_key

# the routes of the Triton path checked (fused_dora.routes), with their label in the table
PARITY_ROUTES = {"fused": "fused route (Triton GEMMs, interpreter)",
                 "composed": "composed route (torch.mm + Triton passes, interpreter)"}


def smoke_parity(dev: torch.device, log) -> bool:
    from fused_dora import FusedDoraLinear, reference
    from fused_dora.backend import triton_available_for
    from fused_dora.drivers import draw_dropout_seed

    why = triton_available_for(dev)
    if why:
        log(f"  parity: fused Triton path cannot run here ({why}); skipped")
        return True
    M, K, N, r = 33, 48, 40, 8
    s = 2.0
    ok = True
    log(f"  parity at M={M}, in={K}, out={N}, r={r}: relative error ||a - b|| / ||b|| against float64")
    log("  | dtype | dropout | path | y | dx | dA | dB | dmag | tol | ok |")
    log("  |---|---|---|---|---|---|---|---|---|---|---|")
    for act_name, tol in (("float32", 1e-4), ("float16", 2e-3)):
        act = torch_dtype(act_name)
        for p in (0.0, DROPOUT):
            g = torch.Generator().manual_seed(5)
            W = nn.Parameter((torch.randn(N, K, generator=g) / math.sqrt(K)).to(dev, act), requires_grad=False)
            A = torch.randn(r, K, generator=g) / math.sqrt(K)
            B = torch.randn(N, r, generator=g) * 0.2
            mag = torch.linalg.vector_norm(W.double() + s * B.double() @ A.double(), dim=1) * (
                1 + 0.1 * torch.randn(N, generator=g, dtype=torch.float64))
            x0 = torch.randn(M, K, generator=g).to(dev, act)
            gy = torch.randn(M, N, generator=g).to(dev, act)
            mask = state = None
            if p > 0:  # the seed each route's op will draw (the generator is rewound before each call)
                state = torch.get_rng_state()
                seed = draw_dropout_seed()
                try:
                    from fused_dora.kernels.dropout import dropout_mask

                    mask = dropout_mask(seed, M, K, p, dev)
                except Exception as exc:
                    log(f"  | {act_name} | {p} | fused | dropout mask not reproducible ({exc}); skipped |")
                    continue
            x64 = x0.double().requires_grad_(True)
            A64, B64, m64 = (t.double().clone().requires_grad_(True) for t in (A, B, mag))
            y64 = reference.dora_linear(x64, W.double(), None, A64, B64, m64, s, p, training=p > 0, dropout_mask=mask)
            y64.backward(gy.double())
            for route, path in PARITY_ROUTES.items():
                layer = FusedDoraLinear.from_linear(linear_sharing(W), r=r, lora_alpha=s * r, lora_dropout=p,
                                                    adapter_dtype=torch.float32, route=route)
                layer.backend = "triton"
                for prm, val in ((layer.lora_A, A), (layer.lora_B, B), (layer.magnitude, mag)):
                    set_param(prm, val, torch.float32)
                layer.clear_norm_cache()
                layer.train()
                x = x0.clone().requires_grad_(True)
                if state is not None:
                    torch.set_rng_state(state)
                y = layer(x)
                y.backward(gy)
                errs = [rel_err(y, y64), rel_err(x.grad, x64.grad), rel_err(layer.lora_A.grad, A64.grad),
                        rel_err(layer.lora_B.grad, B64.grad), rel_err(layer.magnitude.grad, m64.grad)]
                good = all(e <= tol for e in errs)
                ok &= good
                log(f"  | {act_name} | {p} | {path} | " + " | ".join(f"{e:.1e}" for e in errs)
                    + f" | {tol:g} | {'ok' if good else 'FAIL'} |")
            if p == 0:  # PEFT DoRA computes the same function without dropout
                try:
                    data = CaseData(Case("train0", "tiny", M, r), dev, act, torch.float32, W, A.float(), B.float(),
                                    mag.float(), [], [])
                    peft_layer, _ = build_peft_layer(data, True, W)
                    xp = x0.clone().requires_grad_(True)
                    yp = peft_layer(xp)
                    yp.backward(gy)
                    pa = peft_layer.lora_A["default"].weight.grad
                    pb = peft_layer.lora_B["default"].weight.grad
                    pm = peft_layer.lora_magnitude_vector["default"].weight.grad
                    perrs = [rel_err(yp, y64), rel_err(xp.grad, x64.grad), rel_err(pa, A64.grad),
                             rel_err(pb, B64.grad), rel_err(pm, m64.grad)]
                    log(f"  | {act_name} | {p} | PEFT DoRA (for comparison) | " + " | ".join(f"{e:.1e}" for e in perrs)
                        + " | - | info |")
                except Unavailable as exc:
                    log(f"  | {act_name} | {p} | PEFT DoRA | skipped: {exc} |")
    return ok


def _adapter_grads(comp) -> list:
    """[dA, dB, dmagnitude] of a QDoRA competitor (a PEFT lora.bnb.Linear4bit or FusedDoraLinear4bit)."""
    layer = comp.fwd
    if hasattr(layer, "lora_magnitude_vector"):
        return [layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad,
                layer.lora_magnitude_vector["default"].weight.grad]
    return [layer.lora_A.grad, layer.lora_B.grad, layer.magnitude.grad]


def smoke_qdora_parity(dev: torch.device, log) -> bool:
    """QDoRA (bitsandbytes NF4 + double quantization): fused_dora's 4-bit path (enable_fused_dora
    over PEFT QDoRA, and FusedDoraLinear4bit) against float64 over the dequantized weight and
    against PEFT QDoRA, forward and every gradient; the norm's dense [out, in] temporaries (0)."""
    from fused_dora import reference
    from fused_dora.backend import triton_available_for

    from .competitors import build_competitor
    from .inputs import make_data, quant_tensors
    from .instruments import count_dense_temporaries

    try:
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
    except ImportError as exc:
        log(f"  QDoRA cases skipped: bitsandbytes / peft not installed ({exc})")
        return True
    why = triton_available_for(dev)
    if why:
        log(f"  QDoRA parity: fused Triton path cannot run here ({why}); skipped")
        return True
    M, r = 33, 8
    ok = True
    log(f"  QDoRA parity (NF4 + double quant, blocksize 64) at M={M}, in=48, out=40, r={r}: relative error "
        "against float64 over the dequantized weight; 'vs PEFT': the output against PEFT QDoRA's")
    log("  | dtype | path | y | dx | dA | dB | dmag | vs PEFT | tol | ok |")
    log("  |---|---|---|---|---|---|---|---|---|---|")
    for dt, tol in (("fp32", 1e-4), ("fp16+fp32", 2e-3)):
        case = Case("train0", "tiny", M, r, dt, quant="nf4")
        data = make_data(case, dev)
        x0, gy = data.xs[0].detach(), data.dys[0]
        x64 = x0.double().requires_grad_(True)
        A64, B64, m64 = (t.double().clone().requires_grad_(True) for t in (data.A, data.B, data.mag))
        y64 = reference.dora_linear(x64, data.W.double(), None, A64, B64, m64, case.scaling)
        y64.backward(gy.double())
        y_peft = None
        for name, path in (("peft_dora", "PEFT QDoRA (for comparison)"), ("fused", "enable_fused_dora over PEFT QDoRA"),
                           ("fused_4bit", "FusedDoraLinear4bit")):
            comp = build_competitor(name, data)
            x = x0.clone().requires_grad_(True)
            y = comp.fwd(x)
            y.backward(gy)
            errs = [rel_err(y, y64), rel_err(x.grad, x64.grad)] + [
                rel_err(g, ref.grad) for g, ref in zip(_adapter_grads(comp), (A64, B64, m64))]
            if name == "peft_dora":
                y_peft = y.detach()
                log(f"  | {dt} | {path} | " + " | ".join(f"{e:.1e}" for e in errs) + " | - | - | info |")
                continue
            vs = rel_err(y, y_peft)
            good = all(e <= tol for e in errs + [vs])
            ok &= good
            log(f"  | {dt} | {path} | " + " | ".join(f"{e:.1e}" for e in errs + [vs])
                + f" | {tol:g} | {'ok' if good else 'FAIL'} |")
    # the norm from the packed codes: no dense [out, in] temporary (PEFT's for comparison)
    case = Case("norm", "tiny", 0, r, "fp32", quant="nf4")
    data = make_data(case, dev)
    counts = {}
    for name in ("peft_dora", "fused"):
        comp = build_competitor(name, data)
        exclude = comp.owned_storages() | {storage_key(t)[0] for t in quant_tensors(data.qweight)}
        with torch.no_grad():
            counts[name] = count_dense_temporaries(comp.fwd, case.N, case.K, exclude)[0]
    good = counts["fused"] == 0
    ok &= good
    log(f"  QDoRA norm: dense [out, in] temporaries: fused {counts['fused']} (must be 0: "
        f"{'ok' if good else 'FAIL'}), PEFT QDoRA {counts['peft_dora']}")
    return ok
