#!/usr/bin/env bash
# One call on a GPU machine (e.g. the device tool, from the repository root): the whole test suite on CUDA,
# then the benchmark; logs, versions and results land under $OUT (default /tmp/fusedformers-gpu).
#   bash bench/gpu_check.sh                  # tests + `python -m bench --quick`
#   BENCH_ARGS="--only attention" bash bench/gpu_check.sh
#   SKIP_TESTS=1 BENCH_ARGS="--only models" bash bench/gpu_check.sh
# Results are written to bench/results/<device>/ and copied to $OUT/bench-results/: commit them from there.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fusedformers-gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
status=0
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout "${TEST_TIMEOUT:-330}" python -m pytest tests -q -n "${PYTEST_WORKERS:-8}" --maxfail=30 \
    -p no:cacheprovider --durations=15 2>&1 | tee "$OUT/tests.log" || status=1
fi
# shellcheck disable=SC2086
timeout "${BENCH_TIMEOUT:-240}" python -m bench ${BENCH_ARGS:---quick} 2>&1 | tee "$OUT/bench.log" || status=1
exit $status
