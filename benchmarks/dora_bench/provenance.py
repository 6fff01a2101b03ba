"""Where a result comes from: device, package versions, git revision, the exact command, the
settings of the run (the report's `meta`)."""
from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from .targets import CHECKS

HERE = Path(__file__).resolve().parent


def versions() -> dict:
    v = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("triton", "peft", "transformers", "fused_dora"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception:
            v[mod] = None
    return v


def git_rev() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("+dirty" if dirty else "") if rev else "?"
    except Exception:
        return "?"


def device_info(dev: torch.device) -> dict:
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        return {"device": torch.cuda.get_device_name(dev), "capability": list(torch.cuda.get_device_capability(dev)),
                "sms": p.multi_processor_count, "memory_gib": round(p.total_memory / 2**30, 1),
                "l2_mib": round(getattr(p, "L2_cache_size", 0) / 2**20, 1), "cuda": torch.version.cuda}
    return {"device": f"CPU ({platform.processor() or platform.machine()}), Triton interpreter"}


def slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")[:48] or "device"


def run_meta(args, argv, dev: torch.device, bw: float, smoke: bool, budget_min: float, wall: float,
             skipped: list, parity_ok: bool) -> dict:
    """The report's header: device, date, command, versions, git, settings, the targets judged."""
    return {
        **device_info(dev),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + shlex.join([os.path.relpath(sys.argv[0]) if sys.argv and sys.argv[0] else "bench.py"]
                                           + (argv if argv is not None else sys.argv[1:])),
        "versions": versions(), "git": git_rev(), "bandwidth_gbs": bw / 1e9,
        "timing": ("CUDA events, median of adaptive repeats after warm-up, L2 flushed before each, "
                   f"rotating inputs; training norm: {args.train_norm}; autotune rep {args.autotune_rep_ms:g} ms"
                   if dev.type == "cuda" else "CPU smoke (perf_counter, one call; meaningless)"),
        "preset": "smoke" if smoke else ("grid" if args.grid else args.preset),
        "budget": f"{budget_min:g} min" if budget_min else "none", "wall_s": wall,
        "smoke": smoke, "skipped_cases": skipped,
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
        "env": {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "FUSED_DORA_AUTOTUNE", "CUDA_VISIBLE_DEVICES")},
        "checks": [dataclasses.asdict(c) for c in CHECKS],
        "parity_ok": parity_ok,
    }
