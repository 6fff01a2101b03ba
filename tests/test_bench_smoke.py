"""The README's main command on a machine without a GPU: bench.py's smoke mode runs every code
path of the harness, passes parity, judges the byte-count targets, says what it skipped, exits 0."""
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU bench.py times the full preset instead")
def test_bench_smoke_runs_and_judges_byte_counts(tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # bench.py must set it itself
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--out", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "parity: ok" in out and "Timings need a GPU" in out
    written = {p.suffix: p for p in tmp_path.iterdir()}
    assert {".json", ".md"} <= set(written)
    rows = json.loads(written[".json"].read_text())["rows"]
    judged = [c for row in rows for c in row["checks"] if c["id"] in ("T9", "T11")]
    assert {c["id"] for c in judged} == {"T9", "T11"}
    assert all(c["met"] is True for c in judged), [c["verdict"] for c in judged]
