#!/usr/bin/env bash
# GPU checks, one device-tool command each (each must end within the tool's 10 minutes; a fresh machine has no
# compile caches). Logs, versions and results land under $OUT (default /tmp/fusedformers-gpu).
#   bash bench/gpu_check.sh tests                                         # the test suite on CUDA
#   bash bench/gpu_check.sh bench --quick --only attention decode rmsnorm  # ~5-8 min
#   bash bench/gpu_check.sh bench --quick --only models                    # ~5-8 min
#   bash bench/gpu_check.sh bench --only attention                         # full sweeps: one part per command
#   bash bench/gpu_check.sh bench --quick --only attention --autotune      # tiles measured per shape class
# Each bench command gets --budget-s (default 480 s per part), so it stops starting new shapes in time.
# Results are written to bench/results/<device>/ and copied to $OUT/bench-results/: commit them from there.
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-/tmp/fusedformers-gpu}
mkdir -p "$OUT"
# the checkout's folders as the installed package fusedformers.{kernels,models,bench} (as setup.py maps them), with
# no pip install: a namespace folder of links on PYTHONPATH
pkg_root=/tmp/fusedformers-pkg
mkdir -p "$pkg_root/fusedformers"
for folder in kernels models bench; do ln -sfn "$PWD/$folder" "$pkg_root/fusedformers/$folder"; done
export PYTHONPATH="$pkg_root:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
what=${1:-}
shift || true

{
  nvidia-smi
  gcc --version | head -1     # Triton builds its launcher with the host C compiler
  python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, torch.cuda.get_device_name())"
} > "$OUT/versions.txt" 2>&1
tail -2 "$OUT/versions.txt"

case "$what" in
  tests)
    workers=()
    if python -c "import xdist" 2>/dev/null; then workers=(-n "${PYTEST_WORKERS:-8}"); fi
    timeout "${TEST_TIMEOUT:-540}" python -m pytest tests -q "${workers[@]}" --maxfail=30 -p no:cacheprovider \
      --durations=15 2>&1 | tee "$OUT/tests.log"
    ;;
  bench)
    log="$OUT/bench-$(date +%H%M%S).log"
    timeout "${BENCH_TIMEOUT:-570}" python -m fusedformers.bench --budget-s "${BENCH_BUDGET_S:-480}" "$@" 2>&1 | tee "$log"
    ;;
  *)
    echo "usage: bash bench/gpu_check.sh tests | bench [python -m fusedformers.bench arguments]" >&2
    exit 2
    ;;
esac
