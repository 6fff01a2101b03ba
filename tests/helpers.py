"""Shared test helpers: random DoRA inputs and float64 truth."""
import torch

from fused_dora import FusedDoraLinear, reference

# relative error bounds by activation dtype, vs the float64 reference (README, 'Testing without a GPU')
TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_inputs(M, K, N, r, dtype=torch.float32, adapter_dtype=None, bias=True, seed=0, device=DEVICE, lead=None):
    """Fresh random (never zero) DoRA inputs; x has shape lead + (K,) if lead is given."""
    g = torch.Generator().manual_seed(seed)
    adapter_dtype = adapter_dtype or dtype
    shape = tuple(lead) + (K,) if lead is not None else (M, K)

    def rnd(*s, scale=1.0, dt=dtype):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dt)

    weight = rnd(N, K, scale=K ** -0.5)
    return dict(
        x=rnd(*shape),
        weight=weight,
        bias=rnd(N, scale=0.1) if bias else None,
        lora_A=rnd(r, K, scale=K ** -0.5, dt=adapter_dtype),
        lora_B=rnd(N, r, scale=0.5 / r ** 0.5, dt=adapter_dtype),
        # magnitude near the row norms, but not equal to them, so c != 1
        magnitude=(torch.rand(N, generator=g, dtype=torch.float64) + 0.5).to(device=device, dtype=adapter_dtype),
    )


TRAINABLE = ("x", "lora_A", "lora_B", "magnitude")


def run(fn, inputs, grad_out_seed=1, grad_out_dtype=None, **kwargs):
    """Call fn(**inputs, **kwargs) with grads on x and the adapters; returns (y, {name: grad}).

    The output gradient is random, rounded to grad_out_dtype (default: y's dtype), so a float64
    reference run can see the very values a 16-bit run saw.
    """
    leaves = {k: (v.detach().clone().requires_grad_(k in TRAINABLE) if v is not None else None)
              for k, v in inputs.items()}
    y = fn(**leaves, **kwargs)
    g = torch.Generator().manual_seed(grad_out_seed)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(grad_out_dtype or y.dtype)
    dy = dy.to(device=y.device, dtype=y.dtype)
    y.backward(dy)
    return y.detach(), {k: leaves[k].grad for k in TRAINABLE}


def fp64(inputs):
    return {k: (v.detach().double() if v is not None else None) for k, v in inputs.items()}


def reference_fp64(inputs, scaling, **kwargs):
    """float64 truth: output and gradients of the math (fused_dora.autograd's docstring) on the same
    (rounded) inputs."""
    return run(reference.dora_linear, fp64(inputs), grad_out_dtype=inputs["x"].dtype, scaling=scaling, **kwargs)


def assert_close(out, grads, ref_out, ref_grads, dtype, what=""):
    tol = TOL[dtype]
    errs = {"y": rel_err(out, ref_out)}
    errs.update({k: rel_err(grads[k], ref_grads[k]) for k in grads})
    bad = {k: e for k, e in errs.items() if not e <= tol}
    assert not bad, f"{what}: relative errors above {tol}: {bad} (all: {errs})"


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed=0, device=DEVICE):
    """A 2-layer transformers Llama with random weights (nothing downloaded), in eval mode."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg).to(device).eval()


def randomize_adapters(model, seed=1):
    """lora_B = 0 makes DoRA the identity: give lora_B and the magnitudes random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif "magnitude" in name:
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g).to(p.device))


def trainer_data(n=10, t=12, seed=3):
    """n rows of t token ids (no padding) for the tiny Llama's vocabulary of 64."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, 64, (n, t), generator=g)


def trainer_args(config_cls, output_dir, **overrides):
    """5 fp32 CPU steps of 2 rows, a loss logged every step, nothing saved or reported; the
    optimizer is adamw_torch_fused (the trainer's default in recent transformers, named here for
    older ones, whose default was adamw_torch): its steps bump no version counters."""
    kwargs = dict(output_dir=str(output_dir), per_device_train_batch_size=2, max_steps=5, learning_rate=1e-2,
                  logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
                  bf16=False, optim="adamw_torch_fused")
    kwargs.update(overrides)
    return config_cls(**kwargs)


def logged_losses(trainer):
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


def randomize_layer(layer, seed=0):
    """A random lora_B and a magnitude off the row norms for one FusedDoraLinear (randomize_adapters: a model's)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)
        layer.magnitude.mul_(1 + 0.2 * torch.rand(layer.magnitude.shape, generator=g).to(layer.magnitude))


def trained_layer(seed, **kwargs):
    """A 24 -> 16 FusedDoraLinear (r = 3) in eval mode, lora_B random and the magnitude off the row norms."""
    torch.manual_seed(seed)
    layer = FusedDoraLinear(24, 16, r=3, lora_alpha=6, device=DEVICE, **kwargs).eval()
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
        layer.magnitude.mul_(1.2)
    return layer


def layer_reference(layer, x):
    """The layer's output for x by the float64 reference, from its current parameters."""
    with torch.no_grad():
        return reference.dora_linear(x.double(), layer.weight.double(), layer.bias.double(), layer.lora_A.double(),
                                     layer.lora_B.double(), layer.magnitude.double(), layer.scaling)


def pow2_floor(v: torch.Tensor) -> torch.Tensor:
    """2**floor(log2|v|) of fp32 v, elementwise (0 for 0 and subnormals): v's exponent bits alone."""
    return (v.view(torch.int32) & 0x7F800000).view(torch.float32)


def magnitude_grad_rescale(mag_scale: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """t [N] fp32 = pow2_floor(c), or pow2_floor(1 / n) where c is 0; mag_scale = c, n = max(norm, eps).

    The forward saves q = ypre * t for the magnitude gradient rather than ypre: multiplying by a
    power of two is exact, and |q| <= |c * ypre| = |y - bias|, so q is finite in 16 bits wherever
    y is, while ypre = (y - bias) / c overflows fp16 for a small c. The forward's epilogue forms t
    with the same bits (kernels.epilogue.magnitude_grad_rescale); this is its plain statement.
    """
    t = pow2_floor(mag_scale)
    return torch.where(t > 0, t, pow2_floor(1.0 / n))
