#!/usr/bin/env bash
# Hardware counters (Nsight Compute) of one q/o training step's kernels on a GPU machine:
#
#   bash benchmarks/ncu_step.sh        # writes $OUT (or benchmarks/results)/<stamp>_<device>_ncu_step.csv
#
# One FusedDoraLinear step (M = 4096, in = out = 4096, r = 16, bf16 + fp32 adapters, dropout 0.05),
# autotuned first, then profiled inside the NVTX range 'fused_dora_step' (benchmarks/overhead_probe.py
# --ncu-step): per kernel, achieved DRAM and SM throughput, occupancy, launch configuration and warp
# stall reasons, to say why the light passes run 1.2-2.4x over the cost model (NOTES attempt 12).
# --clock-control none: the card's clocks are left as found. Time limit: NCU_TIMEOUT (default 240 s).
set -uo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
[ -n "$ncu" ] || { echo "ncu_step: no ncu found" >&2; exit 2; }
out=${OUT:-benchmarks/results}
mkdir -p "$out"
slug=$(python -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")
csv="$out/$(date -u +%Y-%m-%dT%H%M)_${slug}_ncu_step.csv"
timeout "${NCU_TIMEOUT:-240}" "$ncu" --clock-control none --nvtx --nvtx-include "fused_dora_step/" \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
    --section WarpStateStats --csv --page details \
    python benchmarks/overhead_probe.py --ncu-step --out "$(mktemp -d)" > "$csv"
rc=$?
echo "ncu_step: exit $rc, wrote $csv ($(wc -l < "$csv") lines)"
exit $rc
