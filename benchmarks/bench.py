#!/usr/bin/env python
"""Benchmark fused_dora's DoRA layers against cuBLAS, PEFT LoRA / DoRA and eager baselines.

    python benchmarks/bench.py                 full preset (~8 min budget on an H100)
    python benchmarks/bench.py --quick         a handful of key cases (~2 min)
    python benchmarks/bench.py --list          print the case plan and exit
    python benchmarks/bench.py --grid --cases qo --tokens 1,4096 --modes infer,train05

Without a GPU it runs a smoke mode (Triton's interpreter, parity, one pass of the harness).
The harness is the package dora_bench beside this file; its docstring maps the modules.
"""
import sys
from pathlib import Path

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:  # dora_bench, whatever the working directory
    sys.path.insert(0, HERE)

from dora_bench.environment import prepare_environment  # noqa: E402

if __name__ == "__main__":
    prepare_environment()  # before anything imports triton

    from dora_bench.cli import main

    sys.exit(main())
