#!/usr/bin/env bash
# The prepared GPU check: `python -m kernels_check --json --bench` on a CUDA machine with no network.
#
#   bash scripts/gpu_check.sh [cap_seconds]        (from anywhere; default cap 280 s)
#
# Packages the machine lacks (mamba-ssm, causal-conv1d, bitsandbytes), as wheels built for its
# Python/torch/CUDA, travel in .whl/ at the repository root; they are installed offline into a
# private folder first. Without them the check still runs: the reference-path checks, the CUDA
# graph check, and the 7B-shaped bf16 decode bench on the reference ops, and the report says
# which ops run where and why. Output: the JSON report on stdout (and in $OUT, or /tmp, with its
# text form); exit status that of kernels_check (1 = a check failed), 124 if the cap was hit.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CAP=${1:-280}
DEST=${OUT:-/tmp}
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
       --target /tmp/fm_site .whl/*.whl; then
    export PYTHONPATH=/tmp/fm_site${PYTHONPATH:+:$PYTHONPATH}
    echo "installed offline: $(ls .whl | tr '\n' ' ')" >&2
  else
    echo "installing .whl/ failed; continuing with the packages already here" >&2
  fi
else
  echo "no .whl/ folder: running with the packages already here" >&2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true

timeout --signal=INT --kill-after=15 "$CAP" "$PY" -m kernels_check --json --bench >"$DEST/kernels_check.json"
rc=$?
cat "$DEST/kernels_check.json"
"$PY" - "$DEST/kernels_check.json" >"$DEST/kernels_check.txt" 2>&1 <<'PYEOF'
import json, sys
from kernels_check import format_text
print(format_text(json.load(open(sys.argv[1]))))
PYEOF
echo "----- summary -----" >&2
cat "$DEST/kernels_check.txt" >&2
echo "kernels_check exit status: $rc" >&2
exit $rc
