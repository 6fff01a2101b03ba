"""DDP and FSDP2 over FusedDoraLinear on CPU (2 processes, gloo): gradients and AdamW steps
equal a single-process run on the whole batch."""
import os
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from fused_dora import FusedDoraLinear

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

WORLD = 2
STEPS = 2  # the second step's gradients see the norm and adapters updated by the first
TIMEOUT_S = 120


def build_model():
    """Two FusedDoraLinear layers (backend "auto": the interpreter's kernels under TRITON_INTERPRET=1)."""
    torch.manual_seed(0)
    model = nn.Sequential(FusedDoraLinear(10, 16, r=3, lora_alpha=6), nn.Tanh(),
                          FusedDoraLinear(16, 6, r=2, lora_alpha=2))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.lora_B.normal_(0, 0.3)
            layer.magnitude.mul_(1.2)
    return model


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 10, generator=g), torch.randn(8, 6, generator=g)) for _ in range(STEPS)]


def full(t):
    """A DTensor's full value (FSDP2 shards parameters and gradients), else the tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def train(model, params, data, loss_scale=1.0):
    """STEPS AdamW steps on mean squared error; returns ([grads per step], final params), by name."""
    opt = torch.optim.AdamW([p for _, p in params], lr=0.05)
    grads = []
    for x, target in data:
        opt.zero_grad()
        (((model(x) - target) ** 2).mean() * loss_scale).backward()
        grads.append({n: full(p.grad).detach().clone() for n, p in params})
        opt.step()
    return grads, {n: full(p).detach().clone() for n, p in params}


def _gloo_average_sums() -> bool:
    """Whether gloo's reduce-scatter computes ReduceOp.AVG as a sum (torch 2.7 and 2.8 do), which
    makes FSDP2's gradients WORLD times too large: torch's bug, not fused_dora's."""
    out = torch.empty(1)
    dist.reduce_scatter_tensor(out, torch.ones(WORLD), op=dist.ReduceOp.AVG)
    return out.item() == WORLD


def _worker(rank, mode, store_path, out_path):
    # a file store, not a TCP port picked in advance: no race with other processes for the port
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD)
    try:
        model = build_model()
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            wrapped, loss_scale = DistributedDataParallel(model), 1.0
        else:
            from torch.distributed.fsdp import fully_shard

            for layer in (model[0], model[2]):
                fully_shard(layer)
            wrapped = fully_shard(model)
            loss_scale = 1 / WORLD if _gloo_average_sums() else 1.0
            params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # now DTensors
        data = [(x.chunk(WORLD)[rank], t.chunk(WORLD)[rank]) for x, t in batches()]
        result = train(wrapped, params, data, loss_scale)
        if rank == 0:
            torch.save(result, out_path)
    finally:
        dist.destroy_process_group()
    # The work is done and saved. Leave without running C++ static destructors: in about one run
    # in twenty a gloo thread still joinable at interpreter exit called std::terminate ("terminate
    # called without an active exception", SIGABRT, no Python frame), failing the spawn.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(mode, tmp_path):
    out_path = str(tmp_path / f"{mode}.pt")
    ctx = mp.spawn(_worker, args=(mode, str(tmp_path / f"{mode}.store"), out_path), nprocs=WORLD, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{mode} workers did not finish within {TIMEOUT_S} s")
    return torch.load(out_path)


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_matches_single_process(mode, tmp_path):
    if mode == "fsdp2":
        assert hasattr(pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch >= 2.6"), "fully_shard")
    grads, params = run_distributed(mode, tmp_path)

    model = build_model()
    ref_grads, ref_params = train(model, [(n, p) for n, p in model.named_parameters() if p.requires_grad], batches())
    assert len(grads) == STEPS and set(params) == set(ref_params) and len(params) == 6
    for step in range(STEPS):
        for name, g in ref_grads[step].items():
            err = ((grads[step][name] - g).norm() / g.norm()).item()
            assert err < 1e-5, f"step {step} grad {name}: {err:.2e}"
    for name, p in ref_params.items():
        assert torch.allclose(params[name], p, rtol=1e-5, atol=1e-6), name
    initial = dict(build_model().named_parameters())
    assert all(not torch.equal(p, initial[n]) for n, p in ref_params.items()), "the optimizer steps changed nothing"
