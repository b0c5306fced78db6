"""Opt-in measurement of tile candidates on the GPU (``FUSEDFORMERS_AUTOTUNE=1``).

Each launcher has fixed default tiles, chosen offline so that nothing spills (``python -m fusedformers.bench.static``,
gated by ``tests/test_static_report.py``).
With autotuning on, the first call of a kernel for a given key (kernel, head dim, dtype, masks, length bucket)
times every candidate tile on that call's own arguments (``triton.testing.do_bench``, median) and keeps the
fastest for later calls with the same key. The candidates are the tiles that compile for sm_90 without register
spills; the report compiles every one of them. Off by default: the first call per key then costs one launch per
candidate and a compile for each new tile, which a benchmark can afford and a short script may not want.
"""
import os

ENABLED = os.environ.get("FUSEDFORMERS_AUTOTUNE") == "1"

_best = {}  # (kernel name, key) -> the tile chosen


def choose(kernel, key, candidates, run, timer=None):
    """The fastest of ``candidates`` for ``(kernel, key)``, measured once and remembered.

    ``run(tile)`` launches the kernel with that tile (it may overwrite the call's outputs: the caller launches
    again with the chosen tile); ``timer(fn)`` returns milliseconds (default: do_bench's median). A candidate
    that fails to launch is skipped; if all fail, the first is returned and its error shows in the real launch.
    """
    memo = (kernel, key)
    if memo not in _best:
        if timer is None:
            from triton.testing import do_bench

            def timer(fn):
                return do_bench(fn, warmup=5, rep=20, return_mode="median")

        timings = []
        for tile in candidates:
            try:
                timings.append((timer(lambda tile=tile: run(tile)), tile))
            except Exception:  # e.g. out of shared memory on a smaller GPU: not a candidate here
                continue
        _best[memo] = min(timings)[1] if timings else candidates[0]
    return _best[memo]


def chosen():
    """``{(kernel, key): tile}`` measured so far in this process (for the benchmark's records)."""
    return dict(_best)
