#!/usr/bin/env bash
# The oldest PEFT, transformers and TRL that pyproject.toml declares, against the tests that touch
# them, in a fresh venv on a machine without a GPU (tests/conftest.py sets TRITON_INTERPRET=1).
# The newest versions are what .ci/run installs. Bounds are read from pyproject.toml, so the
# script and the declared bounds cannot drift apart. Measured: 16-17 min of wall time, 6.5 min of CPU
# time (installs included), on a shared 2-core machine under heavy load.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1

bound() {  # bound NAME: the version in the first '"NAME>=VERSION' of pyproject.toml
    local v
    v="$(sed -n "s/.*\"$1>=\([0-9][0-9.]*\).*/\1/p" pyproject.toml | head -n 1)"
    [[ -n "$v" ]] || { echo "compat_peft.sh: no '$1>=' bound in pyproject.toml" >&2; exit 1; }
    echo "$v"
}
PEFT="$(bound peft)" TRANSFORMERS="$(bound transformers)" TRL="$(bound trl)"
TRL_TRANSFORMERS=4.53.2  # TRL 0.20's own floor for transformers, above ours: TRL runs in a second step

venv="$(mktemp -d "${TMPDIR:-/tmp}/fused_dora_compat_peft.XXXXXX")"
trap 'rm -rf "$venv"' EXIT
python3 -m venv "$venv"
pip() { "$venv/bin/python" -m pip install -q "$@"; }
pytest() { "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"; }

# the PEFT- and transformers-facing tests (whole files, and the PEFT / Trainer tests of the others)
TESTS=(
    tests/test_peft.py tests/test_trainer_callback.py tests/test_replace_linear.py tests/test_typing.py
    tests/test_checkpointing.py::test_transformers_gradient_checkpointing
    tests/test_backend.py::test_broken_kernels_import_warns_and_status_tells
    tests/test_validation.py::test_integration_functions_check_model_type
)

echo "== peft==$PEFT transformers==$TRANSFORMERS"
pip torch==2.13.0
pip -e ".[test]" "peft==$PEFT" "transformers==$TRANSFORMERS"
pytest "${TESTS[@]}"

echo "== trl==$TRL transformers==$TRL_TRANSFORMERS peft==$PEFT"
pip "trl==$TRL" "transformers==$TRL_TRANSFORMERS" datasets
pytest tests/test_trainer_callback.py::test_sft_trainer_with_callback_matches_peft
