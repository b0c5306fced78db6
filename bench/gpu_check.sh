#!/usr/bin/env bash
# GPU checks, one device-tool command each (each must end within the tool's 10 minutes; a fresh machine has no
# compile caches). Logs, versions and results land under $OUT (default /tmp/fusedformers-gpu).
#   bash bench/gpu_check.sh proof             # the one-call proof, < 9 min on a fresh H100/H200: run it first
#   bash bench/gpu_check.sh proof --dry-run   # the same steps on CPU at tiny sizes (CI runs it)
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

# one step of the proof: its own time limit (a step that overruns is cut, the next still runs), a log under $OUT
proof_step() {
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "=== proof step $name (limit ${limit} s)"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/proof-$name.log" 2>&1
  local rc=$?
  tail -n "${PROOF_TAIL:-15}" "$OUT/proof-$name.log"
  echo "=== proof step $name: exit $rc after $((SECONDS - start)) s"
  [ "$rc" -eq 0 ] || failed_steps+=("$name (exit $rc)")
}

case "$what" in
  proof)
    # (a) GPU-only tests and the kernel test files, (b) the kernel fuzzer, (c) kernel benchmarks against SDPA and
    # FlexAttention, (d) the Llama-1B- and BART-large-shaped model benchmark, then one table. Limits:
    # 180 + 60 + 170 + 130 s.
    dry=()
    workers=()
    if [ "${1:-}" = "--dry-run" ]; then dry=(--dry-run); fi
    if python -c "import xdist" 2>/dev/null; then workers=(-n "${PYTEST_WORKERS:-8}"); fi
    failed_steps=()
    results=${PROOF_RESULTS:-$PWD/bench/results}
    [ ${#dry[@]} -eq 0 ] || results="$OUT/proof-dry-run-results"
    kernel_tests=(tests/test_attention.py tests/test_attention_dropout.py tests/test_decode_attention.py
                  tests/test_rms_norm.py tests/test_layer_norm.py tests/test_rope.py tests/test_silu_mul.py
                  tests/test_beam_search.py tests/test_launch_budget.py tests/llama/test_generate.py
                  tests/test_bart.py::test_static_cache_matches_default_loop_and_hf
                  tests/test_bart.py::test_static_beam_step_fused_matches_hf)
    if [ ${#dry[@]} -eq 0 ]; then
      proof_step tests 180 python -m pytest "${kernel_tests[@]}" -q "${workers[@]}" --maxfail=30 -p no:cacheprovider \
        --durations=10
      proof_step fuzz 60 python -m tests.fuzz --cases "${PROOF_FUZZ_CASES:-150}" --seed "${PROOF_FUZZ_SEED:-$RANDOM}"
    else  # on CPU: the selection exists and imports; a few fuzz cases
      proof_step tests 120 python -m pytest "${kernel_tests[@]}" -q --collect-only -p no:cacheprovider
      proof_step fuzz 120 python -m tests.fuzz --cases 3 --seed 1
    fi
    proof_step kernels 170 python -m fusedformers.bench --proof --only attention decode rmsnorm --budget-s 130 \
      --results-dir "$results" "${dry[@]}"
    proof_step models 130 python -m fusedformers.bench --proof --only models --budget-s 90 --results-dir "$results" \
      "${dry[@]}"
    summary_flags=()
    [ ${#dry[@]} -eq 0 ] || summary_flags=(--include-dry-run)
    python -m fusedformers.bench.summarize "$results" --proof "${summary_flags[@]}" | tee "$OUT/proof-summary.md"
    if [ ${#failed_steps[@]} -gt 0 ]; then
      echo "proof: steps not clean: ${failed_steps[*]}"
      exit 1
    fi
    echo "proof: every step passed"
    ;;
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
    echo "usage: bash bench/gpu_check.sh proof [--dry-run] | tests | bench [python -m fusedformers.bench arguments]" >&2
    exit 2
    ;;
esac
