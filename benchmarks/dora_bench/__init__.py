"""Benchmark fused_dora's DoRA layers against cuBLAS, PEFT LoRA / DoRA and eager baselines.

The harness behind ``python benchmarks/bench.py``; one role per module, imports one way
(a module imports only those listed above it):

    environment   TRITON_INTERPRET without a GPU, set before anything imports triton
    cases         the case space: shapes, tokens, ranks, dtypes, modes, Case, ModelSpec, presets
    targets       the project's targets as data (CHECKS) and the verdict of one on a row
    instruments   timer (CUDA events, L2 flush), saved-for-backward bytes, dense-temporary
                  counter, bandwidth, relative error, the autotuner's timing
    inputs        one case's weights, adapters and rotating inputs (CaseData)
    competitors   the layer competitors' registry: what each builds and the call that is timed
    models        the whole-model competitors (a random-weight Llama adapted four ways)
    metrics       ratios, speedups, TFLOP/s, bytes over LoRA from a row's results; its verdicts
    runners       one layer case / one whole-model case, every competitor under one error guard
    provenance    device, versions, git revision, command: the report's header
    report        markdown report, stdout summary, chart, the files written
    schedule      run order and the wall-time budget
    smoke         CPU parity of the Triton path's routes (interpreter) against float64 and PEFT
    cli           flags and the run from start to end

Every competitor of a case runs in the same process, on the same weights and inputs (see
competitors.COMPETITORS). Figures: median time (CUDA events, warm-up, many repeats, L2 flushed
before each repeat, rotating inputs), ratio to the floor, speedups over PEFT DoRA / PEFT LoRA /
eager, TFLOP/s, peak extra memory, bytes saved for backward (torch.autograd.graph.
saved_tensors_hooks, unique non-parameter storages), dense [out, in] temporaries (a
TorchDispatchMode watching every aten op's outputs). Verdicts come from targets.CHECKS.

Without a GPU the run is a smoke mode: tiny shapes, the Triton kernels under the interpreter,
parity of the Triton path (both routes) against a float64 reference and PEFT, and one pass of
the whole harness; timings need a GPU.
"""
