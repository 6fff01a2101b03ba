"""pytest configuration for the benchmark suite (not part of the test run: testpaths = ["tests"]).

Run:  pytest benchmarks --benchmark-only     (needs a CUDA GPU; skips cleanly without one)
"""
import sys
from pathlib import Path

# benchmarks/ holds dora_bench (bench.py's package), whose cases and competitors the suite reuses
HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
