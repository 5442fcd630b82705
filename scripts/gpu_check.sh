#!/usr/bin/env bash
# The prepared GPU check: `python -m kernels_check --json --bench` on a CUDA machine with no network,
# then the serving sweep: bench/serve.py --rows on the 7B shape in bf16 (random weights built in
# place, no download), 1..64 concurrent greedy requests of 128 tokens through the batched scheduler,
# then bench/seven_b.py on the GPU: load, memory against the estimate, state size, decode at 1 and
# 4 requests against the HBM bandwidth bound, time to first token at turn 1 and turn 10.
#
#   bash scripts/gpu_check.sh [cap_seconds [serve_cap_seconds [seven_b_cap_seconds]]]
#       (from anywhere; default caps 280 s, 200 s, 150 s; a cap of 0 skips that bench)
#
# Packages the machine lacks (mamba-ssm, causal-conv1d, bitsandbytes), as wheels built for its
# Python/torch/CUDA, travel in .whl/ at the repository root; they are installed offline into a
# private folder first. Without them the check still runs: the reference-path checks, the CUDA
# graph check, and the 7B-shaped bf16 decode bench on the reference ops, and the report says
# which ops run where and why. Output: the JSON report on stdout (and in $OUT, or /tmp, with its
# text form), then the sweep's JSON (also in serve_7b.json there), then seven_b.json; exit status
# that of kernels_check (1 = a check failed, 124 = its cap was hit), else the first failing bench's.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CAP=${1:-280}
SERVE_CAP=${2:-200}
SEVEN_CAP=${3:-150}
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

serve_rc=0
if [ "$SERVE_CAP" -gt 0 ]; then
  # new N stop at 60% of the cap, so the document-read figures and the JSON still come out
  timeout --signal=INT --kill-after=15 "$SERVE_CAP" "$PY" bench/serve.py --rows --device cuda --dtype bf16 \
    --config kernels_check/falcon-mamba-7b.config.json --streams 1,2,4,8,16,32,64 --solo-check 8 \
    --deadline-s $((SERVE_CAP * 6 / 10)) --json >"$DEST/serve_7b.json"
  serve_rc=$?
  cat "$DEST/serve_7b.json"
  echo "serving sweep exit status: $serve_rc" >&2
fi
seven_rc=0
if [ "$SEVEN_CAP" -gt 0 ]; then
  timeout --signal=INT --kill-after=15 "$SEVEN_CAP" "$PY" bench/seven_b.py --device cuda --json >"$DEST/seven_b.json"
  seven_rc=$?
  cat "$DEST/seven_b.json"
  echo "seven_b exit status: $seven_rc" >&2
fi
[ "$rc" -ne 0 ] && exit $rc
[ "$serve_rc" -ne 0 ] && exit $serve_rc
exit $seven_rc
