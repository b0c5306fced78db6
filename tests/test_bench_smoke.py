"""The benchmark off the GPU: ``python -m fusedformers.bench`` runs its CPU smoke check and exits 0, and every case
of the GPU sweep builds at its real shape (on the meta device: no memory, nothing run)."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE_LINES = ("smoke attention fwd", "smoke attention bwd", "smoke decode", "smoke rms_norm fwd",
               "smoke rms_norm bwd")


@pytest.mark.slow
def test_bench_without_gpu_runs_the_smoke_check():
    """Without a GPU the benchmark runs the smoke check, and says so of the sweep's flags it ignores."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # a GPU machine too takes the CPU path
    proc = subprocess.run([sys.executable, "-m", "fusedformers.bench", "--quick", "--only", "attention"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "No CUDA GPU" in out
    assert "note: --quick, --only apply to the GPU sweep and --dry-run; the smoke check ignores them" in out
    for start in SMOKE_LINES:
        lines = [line for line in out.splitlines() if line.startswith(start)]
        assert len(lines) == 1 and "max error" in lines[0] and lines[0].rstrip().split(" [")[0].endswith("ok"), out
    assert "smoke: 5/5 kernels match their eager references" in out


class _MetaRunner:
    """Builds cases on the meta device; 79 GiB free, as on an H100 80GB."""
    device = torch.device("meta")
    dry_run = False

    def free_bytes(self):
        return 79 * 2**30

    def compile(self, fn):
        return fn


@pytest.mark.parametrize("part", ["attention", "decode", "rmsnorm"])
@pytest.mark.parametrize("sweep", ["quick", "full", "proof"])
def test_gpu_sweep_cases_build(part, sweep, monkeypatch):
    import importlib

    from fusedformers.bench import common
    module = importlib.import_module(f"fusedformers.bench.{part}")
    if part == "attention":  # create_block_mask evaluates the mask: not on meta tensors
        monkeypatch.setattr(module, "flex_block_mask", lambda mask, heads=None: None)
    runner = _MetaRunner()
    labels = []
    shapes = module.PROOF_SHAPES if sweep == "proof" else module.shapes(sweep == "quick")
    for shape in shapes:
        built = list(module.cases(shape, runner))
        assert [c.mode for c in built] == list(module.MODES)
        for case in built:
            labels.append(case.label)
            assert next(iter(case.impls)) == "ours" and set(case.impls) <= set(module.IMPLS)
            # the alternatives a proof shape names exist (run_part would refuse the shape otherwise)
            assert set(shape.get("impls", ())) <= set(case.impls), (shape, sorted(case.impls))
            assert case.amount > 0 and common.floor_ms(case.flops, case.nbytes) > 0
            if part == "attention":
                b, h, n, d = shape["B"], shape["H"], shape["L"], shape["D"]
                assert b * n == 16384 or sweep == "proof"
                assert case.flops == common.attention_flops(b, h, n, n, d, True, case.mode == "fwd+bwd")
                # HF eager's [B, H, L, L] intermediates: only fwd+bwd at L = 16k exceeds 79 GiB
                assert ("hf_eager" in case.skipped) == (case.mode == "fwd+bwd" and n == 16384), case.label
    assert len(labels) == len(set(labels)) == len(shapes) * len(module.MODES)


@pytest.mark.slow
def test_bench_dry_run_writes_results(tmp_path):
    """--dry-run: the sweep's own code (cases, timing loop, table, JSON) end to end at tiny shapes on CPU."""
    import json
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "fusedformers.bench", "--dry-run", "--only", "decode", "rmsnorm",
                           "--results-dir", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "== decode: figures in TB/s" in proc.stdout and "== rmsnorm: figures in TB/s" in proc.stdout
    for part, cases in (("decode", 1), ("rmsnorm", 2)):
        result = json.loads((tmp_path / "cpu" / f"{part}.json").read_text())
        assert result["dry_run"] and len(result["records"]) == cases
        for record in result["records"]:
            assert record["ms"]["ours"] is not None, record["notes"]
            assert list(record["ratio"]) == [n for n in record["ms"] if n != "ours"]


@pytest.mark.slow
def test_gpu_proof_dry_run(tmp_path):
    """``bash bench/gpu_check.sh proof --dry-run``: every step of the one-call GPU proof (test selection, fuzzer,
    kernel and model benchmarks at their proof shapes' code paths, the one summary table) runs on CPU."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OUT=str(tmp_path),
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), "proof", "--dry-run"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "proof: every step passed" in proc.stdout, proc.stdout[-5000:] + proc.stderr
    summary = (tmp_path / "proof-summary.md").read_text()
    assert "DRY RUN" in summary
    rows = [line.split(" | ") for line in summary.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert {row[0].strip("| ") for row in rows} == {"attention", "decode", "rmsnorm", "models"}, summary
    baselines = {row[3] for row in rows}
    assert {"sdpa_mask", "flex", "hf_repeat+sdpa_mask", "hf_eager", "hf_sdpa"} <= baselines, summary
    for step in ("tests", "fuzz", "kernels", "models"):
        assert (tmp_path / f"proof-{step}.log").stat().st_size > 0


def test_run_part_refuses_unknown_alternatives(tmp_path):
    """A shape naming an alternative its part does not have fails loudly instead of timing ours alone."""
    from fusedformers.bench import common

    class FakePart:
        MODES = ("fwd",)

        @staticmethod
        def cases(shape, runner):
            yield common.Case("fake", "fwd", "case", "g", None, {}, {"ours": lambda: None, "sdpa": lambda: None},
                              "tok/s", 1.0)

    runner = common.Runner("cpu", dry_run=True, wall_reps=1)
    writer = common.PartWriter(str(tmp_path), "fake", dict(quick=False, dry_run=True, proof=True))
    problems = common.run_part(FakePart, [dict(impls=("ours", "sdpa_typo"))], runner, writer)
    assert len(problems) == 1 and "sdpa_typo" in problems[0], problems
    assert common.run_part(FakePart, [dict(impls=("sdpa",))], runner, writer) == []
    assert list(writer.records[0]["ms"]) == ["ours", "sdpa"] and writer.json_path.endswith("fake-proof.json")


def test_run_part_isolates_failing_shapes_and_keeps_to_its_budget(tmp_path):
    """A shape whose cases cannot be built is reported and the next shape still runs; with a budget spent, no
    new shape starts; a warm-up failure marks the implementation skipped instead of timing it again."""
    from fusedformers.bench import common, models

    calls = []

    class FakePart:
        MODES = ("fwd",)

        @staticmethod
        def cases(shape, runner):
            if shape == "broken":
                raise RuntimeError("cannot build")
            case = common.Case("fake", "fwd", f"case {shape}", "g", None, {}, {}, "tok/s", 1.0, wall_clock=True)

            def failing():
                calls.append("failing")
                raise RuntimeError("compile failed")

            case.impls = {"ours": lambda: torch.zeros(1, 3, dtype=torch.long), "other": failing}
            case.check = models._token_check(case, case.impls, 0)
            yield case

    runner = common.Runner("cpu", dry_run=False, wall_reps=1)
    meta = dict(quick=False, dry_run=False)
    writer = common.PartWriter(str(tmp_path), "fake", meta)
    problems = common.run_part(FakePart, ["broken", "good"], runner, writer)
    assert len(problems) == 1 and "broken" in problems[0]
    assert [r["label"] for r in writer.records] == ["case good"]
    assert writer.records[0]["ms"]["other"] is None and calls.count("failing") == 1
    writer = common.PartWriter(str(tmp_path), "fake", meta)
    problems = common.run_part(FakePart, ["good"], runner, writer, budget_s=-1)
    assert problems == ["not started (budget): good"] and writer.records == []


@pytest.mark.slow
def test_host_overhead_script_runs():
    result = subprocess.run([sys.executable, "-m", "fusedformers.bench.host_overhead"], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = [float(line.split()[-4]) for line in result.stdout.splitlines()
               if line.endswith(("per call", "per step"))]
    assert len(figures) == 7 and all(f > 0 for f in figures), result.stdout


@pytest.mark.slow
def test_autotune_flag_names_its_results(tmp_path):
    """--autotune turns on kernels/autotune.py (in the process, before kernels is imported) and writes its own
    files with the tiles chosen (none on CPU: the interpreter keeps its small tiles)."""
    import json
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    env.pop("FUSEDFORMERS_AUTOTUNE", None)
    proc = subprocess.run([sys.executable, "-m", "fusedformers.bench", "--dry-run", "--autotune", "--only", "rmsnorm",
                           "--results-dir", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "autotune: on" in proc.stdout
    result = json.loads((tmp_path / "cpu" / "rmsnorm-autotune.json").read_text())
    assert result["autotune"] is True and result["autotune_choices"] == [] and len(result["records"]) == 2


def test_summarize_writes_the_readme_block(tmp_path):
    """fusedformers.bench.summarize turns result files into markdown tables and replaces the README's block (dry
    runs, which measure nothing, are left out)."""
    import json

    from fusedformers.bench import summarize
    device_dir = tmp_path / "results" / "nvidia-h100"
    device_dir.mkdir(parents=True)
    record = dict(part="decode", mode="decode", label="GQA 32/8 B=1 S=4096", unit="TB/s", ms={"ours": 0.01,
                  "sdpa": 0.03}, value={"ours": 1.6, "sdpa": 0.53}, ratio={"sdpa": 3.0}, notes={},
                  ours_fraction_of_floor=0.55)
    meta = dict(part="decode", device="NVIDIA H100 80GB HBM3", date="2026-12-01T10:00:00", quick=True,
                dry_run=False, versions={"torch": "2.11", "triton": "3.6.0", "transformers": "5.17.0"})
    (device_dir / "decode-quick.json").write_text(json.dumps(dict(meta, records=[record])))
    (device_dir / "rmsnorm.json").write_text(json.dumps(dict(meta, part="rmsnorm", dry_run=True, records=[record])))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{summarize.START}\nold\n{summarize.END}\noutro\n")
    assert summarize.main([str(tmp_path / "results"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old" not in text
    assert "**decode** on NVIDIA H100 80GB HBM3, 2026-12-01" in text and "quick" in text
    assert "| GQA 32/8 B=1 S=4096 | 0.01 | 1.6 | 55 | 0.53 (3.00x) |" in text
    assert "rmsnorm" not in text  # the dry run
    assert summarize.summarize(str(tmp_path / "nothing")) == "No GPU results recorded yet."
