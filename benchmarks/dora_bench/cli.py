"""The command line: flags, the plan (--list), the run, the summary on stdout, the files."""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from . import __doc__ as PACKAGE_DOC
from .cases import DTYPES, MODEL_CONFIGS, MODES, RANKS, SHAPES, TOKENS, select_cases
from .competitors import COMPETITORS
from .instruments import Timer, measure_bandwidth, set_autotune_timing
from .models import MODEL_COMPETITORS
from .predicted import load_predictions, predicted
from .provenance import device_info, run_meta
from .report import markdown_report, save_reports, summary_table
from .schedule import run_plan
from .smoke import smoke_parity, smoke_qdora_parity

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"  # benchmarks/results


def _csv(kind):
    def parse(s: str):
        items = [t.strip() for t in s.split(",") if t.strip()]
        return [kind(t) for t in items]
    return parse


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=PACKAGE_DOC.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Shapes: " + ", ".join(f"{k} = {v[0]}" for k, v in SHAPES.items())
                                 + "\nModes: " + "; ".join(f"{k}: {v}" for k, v in MODES.items())
                                 + "\nCompetitors: " + "; ".join(f"{k}: {v}" for k, v in COMPETITORS.items()))
    ap.add_argument("--preset", choices=("full", "quick"), default="full",
                    help="curated case list (default full: ~8 min budget on an H100)")
    ap.add_argument("--quick", action="store_const", const="quick", dest="preset", help="same as --preset quick")
    ap.add_argument("--grid", action="store_true",
                    help="run the full cross product of --cases/--tokens/--ranks/--dtypes/--modes instead of a preset")
    ap.add_argument("--cases", type=_csv(str), help=f"shape keys, comma separated: {','.join(SHAPES)}")
    ap.add_argument("--tokens", type=_csv(int),
                    help=f"token counts M (default for --grid: {','.join(map(str, TOKENS))})")
    ap.add_argument("--ranks", type=_csv(int),
                    help=f"ranks r (default for --grid: {','.join(map(str, RANKS))}; hr keeps 384)")
    ap.add_argument("--dtypes", type=_csv(str), help=f"dtype pairs: {','.join(DTYPES)} (activation+adapters)")
    ap.add_argument("--modes", type=_csv(str), help=f"modes: {','.join(MODES)}")
    ap.add_argument("--competitors", type=_csv(str),
                    help="competitors to run (floor always runs): "
                         + ",".join(k for k in COMPETITORS if k != "linear_fwd"))
    ap.add_argument("--model", action="store_true", help="add the whole-model case (in the full preset already)")
    ap.add_argument("--paper-protocol", action="store_true",
                    help="add the Scaling-DoRA protocol (in the full preset already)")
    ap.add_argument("--no-model", action="store_true", help="drop the whole-model and paper cases")
    ap.add_argument("--no-qdora", action="store_true",
                    help="drop the QDoRA cases (bitsandbytes 4-bit base weight, key suffix 'nf4+dq')")
    ap.add_argument("--model-config", choices=[k for k in MODEL_CONFIGS if k != "tiny"], default="llama-1b")
    ap.add_argument("--model-r", type=int, default=16)
    ap.add_argument("--model-dropout", type=float, default=0.0)
    ap.add_argument("--paper-config", choices=[k for k in MODEL_CONFIGS if k != "tiny"], default="llama-8b")
    ap.add_argument("--model-warmup", type=int, default=2)
    ap.add_argument("--model-steps", type=int, default=5)
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="wall-time budget; cases past it are listed as not run (default 8 full, 2 quick; 0 = none)")
    ap.add_argument("--target-ms", type=float, default=None, help="timed work per measurement (default 80, quick 50)")
    ap.add_argument("--min-reps", type=int, default=5)
    ap.add_argument("--no-flush", action="store_true", help="do not flush L2 before each timed repeat")
    ap.add_argument("--train-norm", choices=("per-step", "cached"), default="per-step",
                    help="training: fused/reference recompute the norm every step (as after an optimizer step; "
                         "default) or reuse it (gradient accumulation)")
    ap.add_argument("--norm-fwd-tokens", type=int, default=4096, help="M of the forward the norm is compared with")
    ap.add_argument("--autotune-rep-ms", type=float, default=25.0,
                    help="Triton autotune timing per config (ms; 0 = Triton's default 100 ms): keeps the run short")
    ap.add_argument("--smoke", action="store_true", help="tiny-shape smoke run (automatic without a GPU)")
    ap.add_argument("--out", type=Path, default=None,
                    help="results folder (default benchmarks/results; smoke: a temp dir)")
    ap.add_argument("--no-save", action="store_true", help="print only; write no files")
    ap.add_argument("--list", action="store_true", help="print the plan and exit")
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of failing competitors")
    args = ap.parse_args(argv)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    has_cuda = torch.cuda.is_available()
    smoke = args.smoke or (not has_cuda and not args.list)  # --list shows the GPU plan unless --smoke
    dev = torch.device("cuda") if has_cuda else torch.device("cpu")
    log = lambda s="": print(s, flush=True)  # noqa: E731

    known = set(COMPETITORS) | set(MODEL_COMPETITORS)
    comp = args.competitors or [k for k in known if not (args.preset == "quick" and k == "ref_compile")]
    bad = [c for c in comp if c not in known]
    if bad:
        raise SystemExit(f"unknown competitor(s) {bad}; known: {sorted(known)}")
    args.competitor_set = set(comp) | {"floor"}

    cases, specs = select_cases(args, smoke)
    budget_min = args.max_minutes if args.max_minutes is not None else (2.0 if args.preset == "quick" else 8.0)
    if smoke:
        budget_min = 0
    if args.list:
        for c in cases:
            log(f"tier {c.tier}  {c.key}")
        for s in specs:
            log(f"model   {s.key}")
        log(f"{len(cases)} layer cases, {len(specs)} whole-model cases; competitors: {sorted(args.competitor_set)}")
        return 0

    log(f"fused_dora bench: "
        f"{'SMOKE (CPU, Triton interpreter)' if smoke and not has_cuda else ('smoke' if smoke else args.preset)}"
        f" on {device_info(dev)['device']}")
    if smoke and not has_cuda:
        log("No CUDA device: running the smoke mode. Timings need a GPU; the figures below only show that "
            "every code path runs.")
        log(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}")
    if not smoke:
        set_autotune_timing(args.autotune_rep_ms)
    timer = Timer(dev, target_ms=args.target_ms or (50.0 if args.preset == "quick" else 80.0),
                  min_reps=args.min_reps, flush=not args.no_flush)
    bw = measure_bandwidth(dev)
    log(f"measured memory bandwidth: {bw / 1e9:.0f} GB/s"
        + (" (host memory; meaningless)" if dev.type != "cuda" else ""))

    parity_ok = True
    if smoke:
        log("")
        log("== parity (Triton path, fused and composed routes, vs float64 reference, forward and every "
            "gradient)")
        parity_ok = smoke_parity(dev, log)
        if not getattr(args, "no_qdora", False):
            log("")
            log("== QDoRA parity (fused_dora's 4-bit path vs float64 and PEFT QDoRA; bitsandbytes NF4)")
            parity_ok &= smoke_qdora_parity(dev, log)

    rows, skipped = run_plan(cases, specs, args, dev, timer, bw, log, t_start, budget_min, smoke)

    meta = run_meta(args, argv, dev, bw, smoke, budget_min, time.time() - t_start, skipped, parity_ok)
    predictions = {} if smoke else load_predictions(meta["device"])  # the static cost model's, for this GPU
    for row in rows:
        p = predicted(predictions, row["key"])
        if p is not None:
            row["metrics"]["predicted_ratio_floor"] = p
    log("")
    log("== summary" + (" (smoke run: CPU timings are meaningless; only the byte-count targets get verdicts)"
                        if smoke else ""))
    log(summary_table(rows, smoke))
    md = markdown_report(meta, rows, smoke)
    if not smoke:
        log("")
        log(md[md.index("## Targets"):md.index("## Every competitor")].rstrip())
    if skipped:
        log(f"\n{len(skipped)} case(s) not run: " + ", ".join(k for k, _ in skipped[:8])
            + (" ..." if len(skipped) > 8 else ""))

    if not args.no_save:
        out = args.out or (Path(tempfile.mkdtemp(prefix="fused_dora_smoke_")) if smoke else RESULTS_DIR)
        log(save_reports(out, meta, rows, md, smoke))

    if smoke:
        log("")
        if not has_cuda:
            log("SMOKE MODE: no CUDA device. Timings need a GPU: run `python benchmarks/bench.py` on an H100/H200.")
            log("Measured here: parity (both routes), and the byte-count targets T9 (bytes saved for backward) "
                "and T11 (no dense [out, in] temporary), which do not depend on the device (fp16 standing for bf16); "
                "QDoRA (bitsandbytes NF4 + double quant, its CPU backend): parity against PEFT QDoRA and Q1 (the norm "
                "from the packed weight makes no dense [out, in] temporary).")
            log("Skipped here: all timings and peak memory, torch.compile (ref_compile), bf16 (the interpreter "
                "has no bf16), the timing and peak-memory verdicts, the ~1B-model and Scaling-DoRA cases (a tiny "
                "model ran instead).")
        log("parity: " + ("ok" if parity_ok else "FAILED (see the table above)"))
    log(f"done in {time.time() - t_start:.0f}s")
    return 0 if parity_ok else 1
