#!/usr/bin/env bash
# First run on a GPU machine, one command in under 10 minutes:
#
#   bash benchmarks/first_gpu_run.sh
#
#   1. the GPU tests with compiled kernels (tests/test_gpu.py: bf16, LLM-sized shapes, r = 384),
#      each kernel on its first config that fits (FUSED_DORA_AUTOTUNE=0, so no search: quick),
#      in 8 processes when pytest-xdist is installed (a bare machine spends the time compiling:
#      one process ran 28 of the 71 tests in 220 s on an H200)
#   2. python benchmarks/bench.py --quick --max-minutes 3.3 (autotuned), which writes
#      benchmarks/results/<UTC date>T<HHMM>_<device>.{json,md,png}
#   3. python benchmarks/overhead_probe.py: one q/o layer's training step, host time against the
#      GPU kernels' time (NOTES attempts 12-13); its summary, a cProfile and a torch.profiler table
#      are kept as <stamp>_<device>_overhead_*.txt
#
# The test log goes to benchmarks/results/<UTC date>T<HHMM>_<device>_gpu_tests.txt. When $OUT is
# set (a device call returns only the files under it), every new result file is copied there too.
# The last lines printed say what to commit. Exit status: 0 if all steps passed.
# Time limits (seconds) per step: TEST_TIMEOUT (default 170 with xdist, else 240), BENCH_TIMEOUT
# (default 280), PROBE_TIMEOUT (default 100); with xdist 550 s at most, inside a 600 s device call.
set -uo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET  # compiled kernels, not the interpreter
export PYTHONUNBUFFERED=1

if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "first_gpu_run: no CUDA device visible to torch; nothing to do" >&2
    exit 2
fi
# the checkout itself, installed or not (fused_dora finds its kernels/ folder in a checkout)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -c "import fused_dora.kernels.tuning" || { echo "first_gpu_run: cannot import fused_dora.kernels" >&2; exit 2; }

results=benchmarks/results
mkdir -p "$results"
marker=$(mktemp)  # files newer than this one are this run's
slug=$(python -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")
stamp=$(date -u +%Y-%m-%dT%H%M)
tests_log="$results/${stamp}_${slug}_gpu_tests.txt"
# several processes compile at once where pytest-xdist is there (each test compiles its kernels)
xdist=$(python -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
test_limit=$([ -n "$xdist" ] && echo 170 || echo 240)  # serial: as long as the budget allows

{
    echo "# first_gpu_run: $stamp UTC, git $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
    python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__)"
    echo "\$ FUSED_DORA_AUTOTUNE=0 python -m pytest -q $xdist tests/test_gpu.py"
} > "$tests_log"
FUSED_DORA_AUTOTUNE=0 timeout "${TEST_TIMEOUT:-$test_limit}" python -m pytest -q $xdist tests/test_gpu.py 2>&1 | tee -a "$tests_log"
tests_rc=${PIPESTATUS[0]}
echo "exit status: $tests_rc" >> "$tests_log"

timeout "${BENCH_TIMEOUT:-280}" python benchmarks/bench.py --quick --max-minutes 3.3
bench_rc=$?

probe_dir=$(mktemp -d)
timeout "${PROBE_TIMEOUT:-100}" python benchmarks/overhead_probe.py --out "$probe_dir"
probe_rc=$?
# the summary, one cProfile and one torch.profiler table: with the test log and bench.py's three
# files, 7 files (a device call returns at most 8)
for f in overhead_probe.txt overhead_cprofile_p0.0.txt overhead_profile_p0.05.txt; do
    [ -f "$probe_dir/$f" ] && cp "$probe_dir/$f" "$results/${stamp}_${slug}_$f"
done
rm -rf "$probe_dir"

new_files=$(find "$results" -maxdepth 1 -type f -newer "$marker" | sort)
rm -f "$marker"
if [ -n "${OUT:-}" ] && [ -n "$new_files" ]; then
    mkdir -p "$OUT/$results"
    # shellcheck disable=SC2086
    cp $new_files "$OUT/$results/"
fi

echo
echo "== first_gpu_run: tests exit $tests_rc (0 = passed), bench exit $bench_rc (0 = ran; 124 = timed out), overhead probe exit $probe_rc"
if [ -n "$new_files" ]; then
    echo "== commit these files (copied under \$OUT/$results too when OUT is set):"
    echo "$new_files" | sed 's/^/   /'
    echo "   git add $(echo $new_files) && git commit -m \"GPU results: $slug, $stamp\" -- $(echo $new_files)"
else
    echo "== no result files were written"
fi
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$probe_rc" -eq 0 ]
