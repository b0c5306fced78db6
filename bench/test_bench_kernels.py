"""The benchmark's kernel cases (``--quick`` shapes of attention, decode, rmsnorm; all shapes with BENCH_FULL=1)
as pytest-benchmark tests.

GPU only, and not part of the default test run (the README's test command runs ``tests/``)::

    python -m pytest bench/test_bench_kernels.py --benchmark-only [--benchmark-json bench.json] [-k decode]

pytest-benchmark times each call with the host clock around ``fn(); torch.cuda.synchronize()`` (launch overhead
included); ``extra_info`` also holds the do_bench median and the figure (TFLOP/s or TB/s) that
``python -m fusedformers.bench`` reports, for comparison with its tables.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("GPU benchmarks: CUDA is not available (the CPU smoke check is `python -m fusedformers.bench`)",
                allow_module_level=True)

from fusedformers.bench import attention, common, decode, rmsnorm  # noqa: E402

PARTS = {"attention": attention, "decode": decode, "rmsnorm": rmsnorm}
RUNNER = common.Runner("cuda")
common.raise_compile_limits()


def _shape_id(shape):
    return "-".join(f"{k}{v}" for k, v in shape.items())


def _params():
    for part, module in PARTS.items():
        for shape in module.shapes(quick=os.environ.get("BENCH_FULL") != "1"):
            for mode in module.MODES:
                for impl in module.IMPLS:
                    yield pytest.param(part, shape, mode, impl, id=f"{part}-{mode}-{_shape_id(shape)}-{impl}")


@pytest.mark.parametrize("part, shape, mode, impl", list(_params()))
def test_kernel(benchmark, part, shape, mode, impl):
    case = next(c for c in PARTS[part].cases(shape, RUNNER) if c.mode == mode)
    if impl not in case.impls:
        pytest.skip(f"{impl} does not apply to {case.label}")
    if impl in case.skipped:
        pytest.skip(f"{impl}: {case.skipped[impl]}")
    fn = case.impls[impl]

    def call():
        for t in case.grad_to_none or ():
            t.grad = None
        fn()
        torch.cuda.synchronize()

    call()  # compiles (Triton, torch.compile) outside the timing
    benchmark.pedantic(call, rounds=30, warmup_rounds=3, iterations=1)
    ms = RUNNER.time_ms(case, impl)
    benchmark.extra_info.update(label=case.label, do_bench_median_ms=ms, unit=case.unit,
                                figure=common.UNITS[case.unit](case.amount, ms))
