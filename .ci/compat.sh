#!/usr/bin/env bash
# The oldest torch and triton that pyproject.toml declares, on a machine without a GPU: a fresh
# virtual environment with exactly those versions (PyPI's torch is a CUDA build; its CPU side is
# all the tests use), numpy < 2.4 (older triton's interpreter needs it, see fused_dora/backend.py),
# then a quick subset of the tests and the compile report's CI subset.
#   bash .ci/compat.sh          (FUSED_DORA_COMPAT_KEEP=1 keeps the environment and prints where)
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1

bound() {  # the lower bound pyproject.toml declares for a dependency: bound torch -> 2.7.1
    sed -n "s/^ *\"$1>=\([0-9][0-9.]*\)[,\";].*/\1/p" pyproject.toml
}
TORCH=$(bound torch)
TRITON=$(bound triton)
if [[ -z "$TORCH" || -z "$TRITON" ]]; then
    echo "compat.sh: no lower bound for torch or triton found in pyproject.toml" >&2
    exit 1
fi

VENV=$(mktemp -d "${TMPDIR:-/tmp}/fused_dora_compat.XXXXXX")
if [[ "${FUSED_DORA_COMPAT_KEEP:-0}" == 1 ]]; then
    echo "compat.sh: environment kept in $VENV"
else
    trap 'rm -rf "$VENV"' EXIT
fi

start=$SECONDS
echo "compat.sh: torch==$TORCH triton==$TRITON numpy<2.4 in $VENV"
python -m venv "$VENV"
PINS=("torch==$TORCH" "triton==$TRITON" "numpy<2.4")
"$VENV/bin/python" -m pip install -q "${PINS[@]}"
"$VENV/bin/python" -m pip install -q -e ".[test,peft,trl]" "${PINS[@]}"
"$VENV/bin/python" -c "import torch, triton, numpy; print('compat.sh: installed torch', torch.__version__, \
'triton', triton.__version__, 'numpy', numpy.__version__)"
echo "compat.sh: installed in $((SECONDS - start)) s"

"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_parity.py tests/test_module.py tests/test_kernels.py \
    tests/test_routes.py tests/test_peft.py tests/test_backend.py tests/test_packaging.py
# the compile report on the oldest triton: every kernel and config compiles (wgmma where due). Spills
# and shared-memory figures are the compiler's own: kernels/_spills.py and the estimates are
# measured with the newest triton (.ci/run), and this one's ptxas differs (on a GPU, a config that
# then does not fit fails to launch and the autotuner passes over it)
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_compile_report.py -k "every_kernel or every_config or wgmma"
echo "compat.sh: done in $((SECONDS - start)) s"
