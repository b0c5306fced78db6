"""Gates over the offline compile report (``bench/static.py``): the kernels, compiled ahead of time for the GPUs
we support, with the launchers' own arguments and the JIT's specialisation.

For a representative subset per architecture (``static.ci_variants``), every variant must compile, must not
spill registers, must fit the architecture's shared memory per block, and on sm_90a must not serialize wgmma
(ptxas C7515), and every 16-bit attention dot with at least 64 rows per warpgroup must lower to wgmma
(``static.gate_failures``). ``python -m fusedformers.bench.static`` compiles the full set and writes the report.

The interpreter's ``@triton.jit`` objects cannot be compiled, so the compile runs once per test session in a
subprocess without TRITON_INTERPRET (shared by pytest-xdist workers through a file lock); the cheap tests below
check the report's parsing on hand-written inputs.
"""
import fcntl
import importlib
import json
import os
import subprocess
import sys
import tempfile

import pytest

static = importlib.import_module("fusedformers.bench.static")

GATED_ARCHS = ("sm_90a", "sm_89", "sm_86", "sm_80")

# Variants that fail a gate today, (arch, variant key) -> what fails. Each is xfail(strict=True): when a fix makes
# one pass, its test fails as XPASS, and the entry must go.
KNOWN_FAILURES = {
    # RMSNorm backward at N = 16384 (above LLaMA-70B's 8192): a whole row in registers per program spills (52 B);
    # bench/NOTES.md step 11. Every attention and decode variant of the CI subset passes every gate.
    **{(arch, "rms_norm_bwd/bf16/N16384/residual/default"): "spills 52 B stores / 52 B loads (128 registers)"
       for arch in ("sm_90a", "sm_89", "sm_86", "sm_80")},
}


# ----------------------------------------------------------------------------------------------------------------
# The gates, over one compile of the CI subset per test session
# ----------------------------------------------------------------------------------------------------------------
def _compile_ci_subset(out_dir):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "fusedformers.bench.static", "--subset", "ci", "--arch",
                             ",".join(GATED_ARCHS), "--out", out_dir, "--jobs", "2"],
                            env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, f"bench/static.py failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"


@pytest.fixture(scope="session")
def records(request, tmp_path_factory):
    """``{arch: {variant key: record}}`` of the CI subset. Under pytest-xdist the workers share one compile
    (per test run, through a lock file); otherwise it goes to this session's temporary directory."""
    worker_input = getattr(request.config, "workerinput", None)
    if worker_input is None:
        out_dir = str(tmp_path_factory.mktemp("static"))
        _compile_ci_subset(out_dir)
    else:
        out_dir = os.path.join(tempfile.gettempdir(), f"fusedformers-static-{worker_input['testrunuid']}")
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if not os.path.exists(os.path.join(out_dir, "report.md")):
                    _compile_ci_subset(out_dir)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    result = {}
    for arch in GATED_ARCHS:
        with open(os.path.join(out_dir, f"{arch}.json")) as f:
            result[arch] = {record["key"]: record for record in json.load(f)["records"]}
    return result


def _gate_cases():
    for arch in GATED_ARCHS:
        for variant in static.ci_variants(arch):
            reason = KNOWN_FAILURES.get((arch, variant.key))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            yield pytest.param(arch, variant.key, id=f"{arch}:{variant.key}", marks=marks)


@pytest.mark.slow
@pytest.mark.parametrize("arch,key", list(_gate_cases()))
def test_variant_passes_the_gates(records, arch, key):
    record = records[arch][key]
    failures = static.gate_failures(record, arch)
    assert not failures, f"{arch} {key}: " + "; ".join(failures)


@pytest.mark.slow
def test_the_jit_specialisation_is_reproduced(records):
    """Unit strides are the constant 1, pointers and strides divisible by 16 carry the hint, the length
    arguments (do_not_specialize) do not, and the padding mask is read as one byte per key whatever HF passes (an
    int64 mask is compared with 0 once on the host side; a bool one is viewed as u8)."""
    record = records["sm_90a"][static.Variant("fwd", "bf16", 128, True, "int64").key]
    spec = record["specialisation"]
    assert {"stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_mask_n"} <= set(spec["ones"])
    assert {"q_len", "k_len", "past_len"} <= set(spec["plain_ints"])
    assert "stride_qm" not in spec["plain_ints"] and "num_heads" not in spec["plain_ints"]  # 32: divisible by 16
    assert spec["pointers"]["mask_ptr"] == "*u8" and spec["pointers"]["q_ptr"] == "*bf16"
    assert set(spec["pointers"]) == set(spec["aligned_pointers"])
    record = records["sm_90a"][static.Variant("fwd", "bf16", 128, True, "bool").key]
    assert record["specialisation"]["pointers"]["mask_ptr"] == "*u8"


@pytest.mark.slow
def test_known_failures_are_ci_variants():
    """An entry of KNOWN_FAILURES that names no CI variant is stale (a renamed variant): it would never run."""
    keys = {(arch, variant.key) for arch in GATED_ARCHS for variant in static.ci_variants(arch)}
    assert set(KNOWN_FAILURES) <= keys, sorted(set(KNOWN_FAILURES) - keys)


# ----------------------------------------------------------------------------------------------------------------
# The report's parsing, on hand-written inputs (no compile)
# ----------------------------------------------------------------------------------------------------------------
def _listing(lines):
    return [(16 * i, text) for i, text in enumerate(lines)]


def test_loops_are_found_between_a_branch_target_and_its_backward_branch():
    body = ["FFMA R1, R2, R3, R4"] * 20
    listing = _listing(
        ["MOV R0, 0x1"]                                   # 0
        + body                                            # 1..20: loop 1 (conditional back branch)
        + ["@!P1 BRA 0x10"]                               # 21
        + ["IADD3 R0, R0, 1, RZ"]                         # 22
        + body                                            # 23..42: loop 2 (sm_80 style: unconditional)
        + ["@!P1 CALL.REL.NOINC 0x2c0", "BRA 0x170"]      # 43, 44
        + ["SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [R1]", "@!P0 BRA 0x2d0"]  # 45, 46: a spin-wait, not a loop
        + ["EXIT"]                                        # 47
        + ["BRA 0x20"])                                   # 48: an out-of-line stub jumping back over EXIT
    assert static.sass_loops(listing) == [(1, 21), (23, 44)]


def test_an_outer_loop_is_not_innermost():
    inner = ["HMMA.16816.F32.BF16 R4, R8, R12, R4"] * 20 + ["@P0 BRA 0x20"]
    listing = _listing(["MOV R0, 0x1", "MOV R1, 0x1"] + inner + ["IADD3 R0, R0, 1, RZ", "@P1 BRA 0x10"])
    assert static.sass_loops(listing) == [(2, 22)]


def test_dots_and_their_lowering_are_read_from_the_ttgir():
    ttgir = """
    %scores_334 = ttng.warp_group_dot %q_71, %k_t_333, %cst_7 {inputPrecision = 0 : i32, isAsync = true} : !ttg.memdesc<128x128xbf16, #shared, #smem> * !ttg.memdesc<128x64xbf16, #shared1, #smem, mutable> -> tensor<128x64xf32, #mma>
    %scores_335:4 = ttng.warp_group_dot_wait %scores_334, %q_71 {pendings = 0 : i32} : tensor<128x64xf32, #mma>
    %acc_353 = tt.dot %acc_352, %v_347, %acc_350, inputPrecision = tf32 : tensor<64x64xf16, #ttg.dot_op<{opIdx = 0, parent = #mma, kWidth = 2}>> * tensor<64x128xf16, #ttg.dot_op<{opIdx = 1, parent = #mma, kWidth = 2}>> -> tensor<64x128xf32, #mma>
    """  # noqa: E501
    assert static.dots(ttgir) == [dict(op="ttng.warp_group_dot", rows=128, k=128, dtype="bf16"),
                                  dict(op="tt.dot", rows=64, k=64, dtype="f16")]


def _record(**overrides):
    record = dict(key="fwd/bf16/D128/causal+pad_int64/default", variant=dict(kernel="fwd"), num_warps=8,
                  registers=200, spill_stores=0, spill_loads=0, shared=100000, shared_limit=232448,
                  serialized_wgmma=False, dots=[dict(op="ttng.warp_group_dot", rows=128, k=128, dtype="bf16")])
    record.update(overrides)
    return record


def test_gates_catch_each_failure():
    assert static.gate_failures(_record(), "sm_90a") == []
    assert "spills" in static.gate_failures(_record(spill_stores=8, spill_loads=8), "sm_80")[0]
    assert "shared" in static.gate_failures(_record(shared=118784, shared_limit=101376), "sm_86")[0]
    assert "serialized" in static.gate_failures(_record(serialized_wgmma=True), "sm_90a")[0]
    assert static.gate_failures(_record(serialized_wgmma=True), "sm_80") == []  # no wgmma there
    # 128 rows on 8 warps = 64 per warpgroup: must be wgmma on sm_90a; 64 rows on 8 warps need not be
    mma_sync = [dict(op="tt.dot", rows=128, k=64, dtype="bf16")]
    assert "not wgmma" in static.gate_failures(_record(dots=mma_sync), "sm_90a")[0]
    assert static.gate_failures(_record(dots=[dict(op="tt.dot", rows=64, k=64, dtype="bf16")]), "sm_90a") == []
    assert static.gate_failures(_record(dots=[dict(op="tt.dot", rows=128, k=64, dtype="f32")]), "sm_90a") == []
    assert static.gate_failures(_record(dots=mma_sync, variant=dict(kernel="rms_norm_fwd")), "sm_90a") == []
    assert "does not compile" in static.gate_failures(dict(error="PTXASError: ..."), "sm_90a")[0]


def test_ci_subset_covers_every_kernel_and_is_part_of_the_full_set():
    for arch in GATED_ARCHS:
        every = set(static.all_variants(arch))
        subset = static.ci_variants(arch)
        assert set(subset) <= every
        assert {v.kernel for v in subset} == {v.kernel for v in every}
        paddings = {"none", "bool", "int64"} if arch == "sm_90a" else {"none", "int64"}
        assert {v.padding for v in subset if v.kernel == "fwd"} == paddings
        keys = [v.key for v in every]
        assert len(keys) == len(set(keys))
