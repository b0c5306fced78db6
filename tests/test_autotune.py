"""The opt-in tile measurement (kernels/autotune.py): picks the fastest candidate once per key, skips candidates
that fail, and every candidate tile is one the offline compile report covers (bench/static.py)."""
import pytest

from fusedformers.kernels import autotune
from fusedformers.kernels.tiles import _GPU_TILE_CANDIDATES, _GPU_TILES, tile_candidates


@pytest.fixture(autouse=True)
def _empty_memory(monkeypatch):
    monkeypatch.setattr(autotune, "_best", {})


def test_picks_the_fastest_once_per_key():
    times = {"a": 3.0, "b": 1.0, "c": 2.0}
    runs = []

    def run(tile):
        runs.append(tile)

    def timer(fn):
        fn()
        return times[runs[-1]]

    assert autotune.choose("fwd", ("k", 1), ["a", "b", "c"], run, timer) == "b"
    assert runs == ["a", "b", "c"]
    assert autotune.choose("fwd", ("k", 1), ["a", "b", "c"], run, timer) == "b"  # remembered: no new runs
    assert runs == ["a", "b", "c"]
    times["a"] = 0.5
    assert autotune.choose("fwd", ("k", 2), ["a", "b", "c"], run, timer) == "a"  # another key is measured
    assert autotune.chosen() == {("fwd", ("k", 1)): "b", ("fwd", ("k", 2)): "a"}


def test_candidates_that_fail_are_skipped():
    def run(tile):
        if tile == "big":
            raise RuntimeError("out of resources: shared memory")

    def timer(fn):
        fn()
        return 1.0

    assert autotune.choose("dq", "key", ["big", "small"], run, timer) == "small"
    assert autotune.choose("dkdv", "key", ["big"], run, timer) == "big"  # nothing ran: the default stays


@pytest.mark.parametrize("kernel", ["fwd", "dkdv", "dq"])
def test_candidate_lists_hold_the_defaults_and_fit_the_head_dims(kernel):
    for head_dim in (16, 64, 80, 128, 256):
        candidates = tile_candidates(kernel, head_dim)
        assert len(set(candidates)) == len(candidates) >= 2
        for block_m, block_n, warps, stages in candidates:
            assert block_m & (block_m - 1) == 0 and block_n & (block_n - 1) == 0 and warps in (4, 8)
    for head_dim_class, default in _GPU_TILES[kernel].items():
        assert default in _GPU_TILE_CANDIDATES[kernel][head_dim_class]
