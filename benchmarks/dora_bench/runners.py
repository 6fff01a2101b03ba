"""Run one layer case or one whole-model case: every selected competitor in turn, each under one
error guard (a competitor that cannot run, runs out of memory or fails is recorded, and the run
goes on), then the row's metrics and verdicts."""
from __future__ import annotations

import dataclasses
import math
import traceback
from typing import Callable, Dict

import torch

from .cases import Case, ModelSpec
from .competitors import Unavailable, build_competitor, bump_versions, competitors_for, make_call
from .inputs import make_data, quant_bytes
from .instruments import Timer, cleanup, count_dense_temporaries, rel_err, saved_bytes, step_times, sync
from .metrics import finish_row
from .models import MODEL_COMPETITORS, fused_integrations, make_model_competitor


def guarded(measure: Callable[[], dict], dev: torch.device, verbose: bool) -> dict:
    """measure()'s results, or {'status': why} when it raised; memory is released after either."""
    try:
        return measure()
    except Unavailable as exc:
        return {"status": f"skipped: {exc}"}
    except torch.cuda.OutOfMemoryError:
        return {"status": "OOM"}
    except Exception as exc:  # recorded, the run goes on
        if verbose:
            traceback.print_exc()
        return {"status": f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
    finally:
        cleanup(dev)


def run_layer_case(case: Case, args, dev: torch.device, timer: Timer, bw: float, log) -> dict:
    """Every selected competitor of one case; returns {'case', 'results', 'metrics', 'checks'}."""
    data = make_data(case, dev, args.norm_fwd_tokens)
    results: Dict[str, dict] = {}
    y_ref = None
    if case.mode in ("infer", "merged", "train0"):  # a DoRA output to compare with (fp32 reference)
        from fused_dora import reference

        with torch.no_grad():
            y_ref = reference.dora_linear(data.xs[0].detach(), data.W, None, data.A.to(data.ad), data.B.to(data.ad),
                                          data.mag.to(data.ad), case.scaling)

    def measure(name: str) -> dict:
        res: dict = {"status": "ok"}
        comp = build_competitor(name, data, args.train_norm == "per-step")
        call, reset = make_call(data, comp)
        pool = len(data.xs)
        with comp.context():
            res.update(timer.measure(call, pool))
            if case.mode != "norm":  # host-clock throughput: shows launch-bound (CPU-bound) paths
                res["wall_ms"] = timer.wall(call, pool, n=int(min(30, max(3, 40.0 / max(res["ms"], 1e-3)))))
            res["peak_mib"] = timer.peak_mib(call, reset)
            exclude = comp.owned_storages()
            if case.training and comp.traceable:
                reset()
                res["saved_mib"] = saved_bytes(comp.fwd, data.xs[0], exclude, comp.kept) / 2**20
            dense_ok = case.M not in (case.N, case.K) and name != "linear_fwd"
            if comp.traceable and dense_ok and case.mode != "merged":
                reset()
                n, nb = count_dense_temporaries(lambda: call(0), case.N, case.K, exclude)
                res["dense_tmp"], res["dense_tmp_mib"] = n, nb / 2**20
            # (not for ref_compile in training: a no-grad call would compile one more graph)
            if y_ref is not None and comp.computes_dora and not (name == "ref_compile" and case.training):
                with torch.no_grad():
                    res["err"] = rel_err(comp.fwd(data.xs[0].detach()), y_ref)
            reset()
        res.update(comp.extra())
        return res

    names = [n for n in competitors_for(case) if n in args.competitor_set or n in ("floor", "linear_fwd")]
    for name in names:
        if name == "floor" and case.mode == "norm":
            if case.quant and data.qweight is None:
                results[name] = {"status": f"skipped: {data.quant_missing}"}
                continue
            w_bytes = quant_bytes(data.qweight) if case.quant else data.W.numel() * data.W.element_size()
            results[name] = {"status": "derived", "ms": w_bytes / bw * 1e3,
                             "note": "W (QDoRA: its 4-bit codes and quant state) read once at the measured bandwidth"}
            continue
        results[name] = guarded(lambda name=name: measure(name), dev, args.verbose)
    data = y_ref = None  # released before the cleanup
    cleanup(dev)
    return finish_row({"case": dataclasses.asdict(case), "key": case.key, "results": results}, case, bw)


def run_model_case(spec: ModelSpec, args, dev: torch.device, log, left: Callable[[], float] = lambda: math.inf) -> dict:
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    integ = fused_integrations()
    names = [n for n in MODEL_COMPETITORS
             if n in args.competitor_set or n.startswith("fused_") and "fused" in args.competitor_set]
    if spec.mode == "paper" and "fused_peft" in names and "enable_fused_dora" in integ:
        names = [n for n in names if n != "fused_replace"]  # one fused variant is enough for the 8B model
    warm, steps = (0, 1) if dev.type != "cuda" else (args.model_warmup, args.model_steps)

    def measure(name: str) -> dict:
        res: dict = {"status": "ok"}
        model, cfg = make_model_competitor(name, spec, dev, dtype, integ)
        params = [p for p in model.parameters() if p.requires_grad]
        res["trainable_params"] = sum(p.numel() for p in params)
        opt = torch.optim.AdamW(params, lr=1e-5) if spec.optimizer else None
        g = torch.Generator(device=dev).manual_seed(11)
        ids = torch.randint(0, cfg.vocab_size, (spec.batch, spec.seq), generator=g, device=dev)

        def step():
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
            else:
                for p in params:
                    p.grad = None
                bump_versions(params)

        for _ in range(warm):
            step()
        sync(dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        times = step_times(step, steps, dev)
        res.update(ms=times[len(times) // 2], p20=times[int(0.2 * (len(times) - 1))],
                   p80=times[int(0.8 * (len(times) - 1))], reps=len(times),
                   tokens_per_s=spec.batch * spec.seq / (times[len(times) // 2] * 1e-3))
        if dev.type == "cuda":
            res["peak_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
        return res

    results: Dict[str, dict] = {}
    for name in names:
        if left() < 0:
            results[name] = {"status": "skipped: time budget"}
            log(f"    {spec.mode} {name}: skipped (time budget)")
            continue
        res = results[name] = guarded(lambda name=name: measure(name), dev, args.verbose)
        log(f"    {spec.mode} {name}: " + (f"{res['ms']:.1f} ms/step" if "ms" in res else res["status"]))
    return finish_row({"case": dataclasses.asdict(spec), "key": spec.key, "results": results}, spec, 0.0)
