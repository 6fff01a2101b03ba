"""bench.py's QDoRA cases on CPU (bitsandbytes' CPU backend, Triton's interpreter): the smoke's
QDoRA parity (fused_dora's 4-bit path against float64 and PEFT QDoRA, forward and every
gradient; the norm from the packed codes makes no dense [out, in] temporary), and one pass of the
harness over the smoke preset's QDoRA cases (every competitor runs; the fused ones match the
reference; target Q1 is met)."""
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, sys, torch
from dora_bench.environment import prepare_environment
prepare_environment()
from dora_bench.cases import preset_cases
from dora_bench.cli import parse_args
from dora_bench.competitors import COMPETITORS
from dora_bench.instruments import Timer
from dora_bench.runners import run_layer_case
from dora_bench.smoke import smoke_qdora_parity

dev = torch.device("cpu")
ok = smoke_qdora_parity(dev, lambda s="": print(s, flush=True))
args = parse_args(["--smoke"])
args.competitor_set = set(COMPETITORS)
rows = [run_layer_case(c, args, dev, Timer(dev), 1e10, print) for c in preset_cases("smoke") if c.quant]
print("JSON" + json.dumps({"ok": ok, "rows": rows}))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU bench.py times the QDoRA cases instead")
def test_bench_qdora_smoke_cases():
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    lines = out.splitlines()
    # parity of both fused 4-bit paths, fp32 and fp16 activations, within the smoke tolerances
    for path in ("enable_fused_dora over PEFT QDoRA", "FusedDoraLinear4bit"):
        got = [ln for ln in lines if f"| {path} |" in ln]
        assert len(got) == 2 and all(ln.endswith("| ok |") for ln in got), got
    assert "fused 0 (must be 0: ok)" in out
    res = json.loads(next(ln for ln in lines if ln.startswith("JSON"))[4:])
    assert res["ok"] is True
    rows = {row["case"]["mode"]: row for row in res["rows"]}
    assert set(rows) == {"norm", "infer", "train0"}
    for mode, row in rows.items():
        assert row["case"]["quant"] == "nf4" and row["key"].endswith("nf4+dq")
        results = row["results"]
        names = ["floor", "peft_dora", "fused"] + ([] if mode == "norm" else ["peft_lora", "fused_4bit"])
        for name in names:
            want = "derived" if (mode == "norm" and name == "floor") else "ok"
            assert results[name]["status"] == want, (row["key"], name, results[name])
        if mode == "norm":
            assert results["fused"]["dense_tmp"] == 0 and results["peft_dora"]["dense_tmp"] > 0
            assert [c["id"] for c in row["checks"]] == ["Q1"] and row["checks"][0]["met"] is True
        else:
            assert row["checks"] == []  # the dense layer's targets do not judge QDoRA rows
            for name in ("peft_dora", "fused", "fused_4bit"):
                assert results[name]["err"] <= 1e-4, (row["key"], name, results[name]["err"])
        if mode == "train0":
            for name in ("peft_lora", "peft_dora", "fused", "fused_4bit"):
                assert results[name]["saved_mib"] > 0, (name, results[name])
