"""The case space: projection shapes, token counts, ranks, dtypes, modes; a layer `Case`, a
whole-model `ModelSpec`; the presets and the selection a command line makes from them."""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Tuple

import torch

# key: (label, in_features K, out_features N, rank fixed by the case or None)
SHAPES = {
    "qo": ("q/o_proj 4096->4096", 4096, 4096, None),
    "kv": ("k/v_proj 4096->1024", 4096, 1024, None),
    "up": ("gate/up_proj 4096->14336", 4096, 14336, None),
    "down": ("down_proj 14336->4096", 14336, 4096, None),
    "hr": ("high-rank 8192->8192", 8192, 8192, 384),
    "tiny": ("smoke 48->40", 48, 40, 8),
    # CPU smoke shapes for the byte-count targets (T9, T11): big enough that no dimension coincides
    "cpu": ("smoke 96->80", 96, 80, None),
    "cpuhr": ("smoke high-rank 72->56", 72, 56, 384),  # r above in and out: a dense B@A would still be [56, 72]
}
LLAMA_SHAPES = ("qo", "kv", "up", "down")
TOKENS = (1, 16, 512, 4096, 16384)
RANKS = (16, 64)
DROPOUT = 0.05
# activation dtype, adapter dtype. fp32 / fp16 only for the CPU smoke (the interpreter has no bf16)
DTYPES = {
    "bf16+fp32": ("bfloat16", "float32"),  # PEFT's default over a bf16 base: adapters upcast to fp32
    "bf16": ("bfloat16", "bfloat16"),
    "fp16+fp32": ("float16", "float32"),
    "fp16": ("float16", "float16"),
    "fp32": ("float32", "float32"),
}
MODES = {
    "norm": "row norm ||W + s*B@A|| alone",
    "infer": "inference: eval, no grad, unmerged",
    "merged": "inference with the adapter merged into W",
    "train0": "training forward+backward, dropout 0",
    "train05": f"training forward+backward, dropout {DROPOUT}",
    "model": "whole model: ~1B Llama, all projections, batch x seq = 4 x 2048, step incl. AdamW",
    "paper": "Scaling-DoRA protocol (arXiv 2603.22276): r=384, alpha=2r, all linear, 1 x 4096, "
             "grad. checkpointing, optimizer step excluded",
}
LAYER_MODES = ("norm", "infer", "merged", "train0", "train05")
# QDoRA cases (Case.quant = "nf4"): the base weight a bitsandbytes Linear4bit, NF4 with double
# quantization (compress_statistics), blocksize 64, compute dtype = the activation dtype (bf16 on
# a GPU); the layer competitors there are PEFT QLoRA / QDoRA and fused_dora's 4-bit path
QUANT_TYPES = {"nf4": dict(quant_type="nf4", compress_statistics=True, blocksize=64)}
QUANT_MODES = ("norm", "infer", "train0", "train05")
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODEL_CONFIGS = {
    # Llama-3.2-1B dimensions (1.24B parameters), random weights
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True,
                     max_position_embeddings=8192),
    # Llama-3-8B dimensions (8.0B parameters), random weights
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=False,
                     max_position_embeddings=8192),
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, max_position_embeddings=256),
}


def torch_dtype(name: str) -> torch.dtype:
    """A torch dtype from its name in DTYPES ("bfloat16", "float32", ...)."""
    return getattr(torch, name)


@dataclasses.dataclass(frozen=True)
class Case:
    """One layer case: a mode, a projection shape, M tokens, rank r, a dtype pair."""

    mode: str
    shape: str
    M: int
    r: int
    dtype: str = "bf16+fp32"
    tier: int = 1  # run order: 1 (targets) before the whole-model cases before 3 (coverage)
    quant: str = ""  # "" (dense base weight) or a key of QUANT_TYPES (a bitsandbytes 4-bit base)

    @property
    def K(self) -> int:
        return SHAPES[self.shape][1]

    @property
    def N(self) -> int:
        return SHAPES[self.shape][2]

    @property
    def torch_dtypes(self) -> Tuple[torch.dtype, torch.dtype]:
        """(activation dtype, adapter dtype)."""
        act, ad = DTYPES[self.dtype]
        return torch_dtype(act), torch_dtype(ad)

    @property
    def alpha(self) -> float:
        return 2.0 * self.r  # alpha = 2r: scaling 2, as in the Scaling-DoRA protocol

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @property
    def p(self) -> float:
        return DROPOUT if self.mode == "train05" else 0.0

    @property
    def training(self) -> bool:
        return self.mode in ("train0", "train05")

    @property
    def key(self) -> str:
        m = "" if self.mode == "norm" else f" M={self.M}"
        q = f" {self.quant}+dq" if self.quant else ""
        return f"{self.mode} {self.shape}{m} r={self.r} {self.dtype}{q}"

    def flops(self, competitor: str) -> float:
        """Useful flops: the floor's own GEMMs for the floor, the DoRA layer's for the others.

        Training: forward GEMM + LoRA down/up, dx GEMM + its LoRA terms, dA and dB.
        The norm (one pass over W) is not counted: it is memory traffic, not GEMM work.
        """
        M, N, K, r = self.M, self.N, self.K, self.r
        base = 2.0 * M * N * K
        if self.mode == "norm":
            return 2.0 * N * K * r  # B @ A formed (implicitly or not) once
        if competitor == "floor" or self.mode == "merged":
            return base * (2 if self.training else 1)
        lora = 2.0 * M * r * (N + K)
        if self.training:
            return 2 * base + 3 * lora
        return base + lora


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    mode: str  # "model" or "paper"
    config: str
    batch: int
    seq: int
    r: int
    alpha: float
    dropout: float
    grad_ckpt: bool
    optimizer: bool
    targets: tuple = tuple(PROJECTIONS)

    @property
    def key(self) -> str:
        return (f"{self.mode} {self.config} {self.batch}x{self.seq} r={self.r} "
                f"{'ckpt ' if self.grad_ckpt else ''}{'+opt' if self.optimizer else 'no-opt'}")


def preset_cases(preset: str) -> List[Case]:
    """The curated case list of a preset (tier 1 first: the ones the targets are about)."""
    cases: List[Case] = []
    add = cases.append
    if preset == "smoke":
        add(Case("norm", "tiny", 0, 8, "fp32"))
        add(Case("infer", "tiny", 33, 8, "fp32"))
        add(Case("merged", "tiny", 33, 8, "fp32"))
        add(Case("train05", "tiny", 33, 8, "fp32"))
        # the byte-count targets, which a CPU measures as a GPU would: fp16 stands for bf16 (same
        # element size), with fp32 adapters (PEFT's default over a 16-bit base) and all-16-bit
        for mode in ("train0", "train05"):
            for dt in ("fp16+fp32", "fp16"):
                add(Case(mode, "cpu", 40, 16, dt))
        add(Case("train0", "cpuhr", 24, 384, "fp16+fp32"))
        add(Case("norm", "cpuhr", 0, 384, "fp16+fp32"))
        # QDoRA (bitsandbytes' CPU backend): parity against PEFT QDoRA, the norm's dense temporaries
        for mode in ("norm", "infer", "train0"):
            add(Case(mode, "tiny", 0 if mode == "norm" else 33, 8, "fp32", quant="nf4"))
        return cases  # parity of fp16 and dropout 0 is covered by smoke.smoke_parity
    if preset == "quick":
        # in the order of what a short budget should measure first: the first GPU run (2 minutes)
        # reached only the norm and three training cases, and no inference case
        add(Case("norm", "up", 0, 16))
        add(Case("train05", "qo", 4096, 16))
        add(Case("infer", "qo", 4096, 16))
        add(Case("infer", "qo", 16, 16))
        add(Case("train0", "qo", 4096, 16))
        for mode in ("train05", "train0"):
            add(Case(mode, "up", 4096, 16))
        add(Case("merged", "qo", 4096, 16))
        add(Case("train0", "qo", 4096, 16, quant="nf4"))
        return cases
    if preset != "full":
        raise ValueError(f"unknown preset {preset!r}")
    # tier 1: every target has at least one case here
    for s in LLAMA_SHAPES:
        add(Case("norm", s, 0, 16))
    add(Case("norm", "hr", 0, 384))
    for mode in ("train05", "train0"):
        for s in LLAMA_SHAPES:
            for r in RANKS:
                add(Case(mode, s, 4096, r))
        add(Case(mode, "hr", 4096, 384))
    for s in LLAMA_SHAPES:
        for m in (1, 16, 512, 4096):
            add(Case("infer", s, m, 16))
    for m in (16, 4096):
        add(Case("infer", "hr", m, 384))
    for s in LLAMA_SHAPES:
        for m in (16, 4096):
            add(Case("merged", s, m, 16))
    # tier 3: coverage (M = 16384, r = 64 inference, all-bf16 adapters, small-M training)
    for mode in ("train05", "train0"):
        for s in LLAMA_SHAPES:
            for r in RANKS:
                add(Case(mode, s, 16384, r, tier=3))
    for s in LLAMA_SHAPES:
        add(Case("infer", s, 16384, 16, tier=3))
        for m in (1, 16, 512, 4096):
            add(Case("infer", s, m, 64, tier=3))
    for s in LLAMA_SHAPES:
        for mode in ("train05", "train0"):
            add(Case(mode, s, 4096, 16, "bf16", tier=3))
        for m in (16, 4096):
            add(Case("infer", s, m, 16, "bf16", tier=3))
    for s in LLAMA_SHAPES:
        add(Case("train05", s, 512, 16, tier=3))
        add(Case("norm", s, 0, 64, tier=3))
    for m in (1, 512):
        add(Case("infer", "hr", m, 384, tier=3))
    # tier 3: QDoRA over the Llama-3-8B projections, NF4 + double quantization, bf16 compute
    for s in LLAMA_SHAPES:
        for r in RANKS:
            add(Case("norm", s, 0, r, quant="nf4", tier=3))
            add(Case("train0", s, 4096, r, quant="nf4", tier=3))
        for m in (16, 4096):
            add(Case("infer", s, m, 16, quant="nf4", tier=3))
    return cases


def grid_cases(shapes, tokens, ranks, dtypes, modes) -> List[Case]:
    """The full cross product of the filters (the high-rank shape keeps its r = 384)."""
    out = []
    for mode in modes:
        if mode not in LAYER_MODES:
            continue
        for s in shapes:
            rs = [SHAPES[s][3]] if SHAPES[s][3] else ranks
            for r in rs:
                for d in dtypes:
                    for m in ([0] if mode == "norm" else tokens):
                        out.append(Case(mode, s, m, r, d))
    return out


def model_specs(smoke: bool, args) -> Dict[str, ModelSpec]:
    if smoke:
        # two projections only: the interpreter is slow, and one of each kind (attention, MLP) shows the path
        return {"model": ModelSpec("model", "tiny", 2, 16, 8, 16.0, 0.0, False, True, ("q_proj", "down_proj"))}
    return {
        "model": ModelSpec("model", args.model_config, 4, 2048, args.model_r, 2.0 * args.model_r,
                           args.model_dropout, False, True),
        "paper": ModelSpec("paper", args.paper_config, 1, 4096, 384, 768.0, 0.0, True, False),
    }


def select_cases(args, smoke: bool):
    """(layer cases in run order, whole-model specs in run order) for the command line's filters."""
    if smoke:
        cases = preset_cases("smoke")
    elif args.grid:
        cases = grid_cases(args.cases or list(LLAMA_SHAPES) + ["hr"], args.tokens or list(TOKENS),
                           args.ranks or list(RANKS), args.dtypes or ["bf16+fp32"], args.modes or list(LAYER_MODES))
    else:
        cases = preset_cases(args.preset)
    if not args.grid:
        if args.cases:
            cases = [c for c in cases if c.shape in args.cases]
        if args.tokens:
            cases = [c for c in cases if c.mode == "norm" or c.M in args.tokens]
        if args.ranks:
            cases = [c for c in cases if c.r in args.ranks]
        if args.dtypes and not smoke:
            cases = [c for c in cases if c.dtype in args.dtypes]
        if args.modes:
            cases = [c for c in cases if c.mode in args.modes]
    if getattr(args, "no_qdora", False):
        cases = [c for c in cases if not c.quant]
    for c in cases:
        if c.shape not in SHAPES or c.dtype not in DTYPES:
            raise SystemExit(f"unknown shape or dtype in {c.key}")
    cases = sorted(dict.fromkeys(cases), key=lambda c: c.tier)  # stable: preset order inside a tier
    specs = model_specs(smoke, args)
    if smoke:
        want = ["model"] if (not args.modes or "model" in args.modes) else []
    else:
        want = []
        default_on = args.preset == "full" and not args.grid
        for mode in ("model", "paper"):
            flag = args.model if mode == "model" else args.paper_protocol
            if flag or (args.modes and mode in args.modes) or (default_on and not args.modes):
                want.append(mode)
        if args.no_model:
            want = []
    return cases, [specs[m] for m in want]
