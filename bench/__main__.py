"""python -m fusedformers.bench: our Triton kernels and models beside the PyTorch / Hugging Face alternatives, on a GPU.

Without a GPU it runs the CPU smoke check instead (each kernel once at a tiny shape through Triton's interpreter,
against its eager reference) and exits 0 when they match.
"""
import argparse
import importlib
import os
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("attention", "decode", "rmsnorm", "models")

EPILOG = """\
parts:
  attention  prefill attention, causal + left padding, bf16/fp16, D 64/128, L 512..16k, fwd and fwd+bwd:
             vs SDPA with HF's 4-D mask, SDPA flash is_causal without padding, compiled FlexAttention, HF eager
  decode     Lq=1 against a KV cache, GQA 32/8 and MHA 32/32, cache 1k..32k, B 1..64: vs SDPA with the mask
             after repeat-KV (HF's path) and SDPA enable_gqa without mask; TB/s of K/V read
  rmsnorm    hidden 1k..8k, rows 4k/16k, fp16/bf16, fwd and fwd+bwd: vs HF eager, torch.compile, F.rms_norm
  models     Llama-3.2-1B- and BART-large-shaped random bf16 models vs transformers (sdpa; static cache)

Results: <results-dir>/<device-slug>/<part>[-quick].json (rewritten after every case) and <part>[-quick].png;
also copied to $OUT/bench-results/<device-slug>/ when $OUT is set (the GPU device tool brings $OUT back).
"""


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m fusedformers.bench", description=__doc__.split("\n\n")[0], epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few shapes per part")
    parser.add_argument("--only", nargs="+", choices=PARTS, metavar="PART",
                        help="run only these parts: attention, decode, rmsnorm, models (default: all)")
    parser.add_argument("--results-dir", default=None,
                        help="where results go (default: bench/results; a temporary directory with --dry-run)")
    parser.add_argument("--budget-s", type=float, default=None, metavar="SECONDS",
                        help="per part: start no new shape after this many seconds (a GPU command has a time "
                             "limit; the shapes not started are listed at the end)")
    parser.add_argument("--autotune", action="store_true",
                        help="measure the spill-free tile candidates of the attention kernels on the first call of "
                             "each shape class and keep the fastest (FUSEDFORMERS_AUTOTUNE=1); results are "
                             "written as <part>[-quick]-autotune.json with the tiles chosen")
    parser.add_argument("--proof", action="store_true",
                        help="the fixed shapes of the one-call GPU proof (bash bench/gpu_check.sh proof) instead of "
                             "the sweep; results as <part>-proof.json")
    parser.add_argument("--dry-run", action="store_true",
                        help="run every part's code paths once at tiny shapes and print meaningless timings "
                             "(without a GPU: on CPU through Triton's interpreter); checks the sweep itself")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.autotune:
        os.environ["FUSEDFORMERS_AUTOTUNE"] = "1"  # read when kernels is imported, which happens later
    import torch
    has_gpu = torch.cuda.is_available()
    if not has_gpu:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            print("warning: triton was imported before TRITON_INTERPRET could be set", flush=True)
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    if not has_gpu and not args.dry_run:
        print("No CUDA GPU: no timings. Running the CPU smoke check (Triton interpreter, tiny shapes); "
              "the sweep needs a GPU (or try --dry-run to exercise its code paths on CPU).", flush=True)
        ignored = [flag for flag, value in (("--quick", args.quick), ("--only", args.only),
                                             ("--autotune", args.autotune), ("--budget-s", args.budget_s),
                                             ("--proof", args.proof),
                                             ("--results-dir", args.results_dir)) if value]
        if ignored:
            print(f"note: {', '.join(ignored)} apply to the GPU sweep and --dry-run; the smoke check ignores them",
                  flush=True)
        from fusedformers.bench import smoke
        return 0 if smoke.run() else 1
    return sweep(args, "cuda" if has_gpu else "cpu")


def sweep(args, device):
    from fusedformers.bench import common
    common.raise_compile_limits()
    runner = common.Runner(device, dry_run=args.dry_run, wall_reps=3)
    meta = dict(common.environment(device, args.quick, args.dry_run, args.autotune), proof=args.proof)
    results_dir = args.results_dir or (tempfile.mkdtemp(prefix="bench-dry-run-") if args.dry_run
                                       else os.path.join(ROOT, "bench", "results"))
    out_dir = os.path.join(results_dir, common.slug(meta["device"]))
    print(f"device: {meta['device']}  versions: {meta['versions']}", flush=True)
    if args.autotune:
        from fusedformers.kernels import autotune
        print(f"autotune: {'on' if autotune.ENABLED else 'OFF (kernels was imported before the flag was set)'}",
              flush=True)
    print(f"results: {out_dir}" + ("  (dry run: timings are single calls, not measurements)" if args.dry_run
                                    else ""), flush=True)
    failed, tables = [], []
    for part in args.only or PARTS:
        module = importlib.import_module(f"fusedformers.bench.{part}")
        if args.proof:
            shapes = [common.dry_run_size(module, s) if args.dry_run else s for s in module.PROOF_SHAPES]
        else:
            shapes = module.DRY_RUN_SHAPES if args.dry_run else module.shapes(args.quick)
        writer = common.PartWriter(out_dir, part, meta)
        start = time.perf_counter()
        print(f"\n=== {part}: {len(shapes) * len(module.MODES)} cases", flush=True)
        try:
            problems = common.run_part(module, shapes, runner, writer, budget_s=args.budget_s)
        except Exception:  # a part that cannot go on; the others still run
            traceback.print_exc()
            problems = ["stopped early: the cases above are recorded"]
            if hasattr(module, "finish"):
                module.finish()
        if problems:
            failed.append(f"{part} ({'; '.join(problems)})")
        if args.autotune:
            from fusedformers.kernels import autotune
            writer.meta["autotune_choices"] = [dict(kernel=kernel, key=[str(x) for x in key], tile=list(tile))
                                               for (kernel, key), tile in autotune.chosen().items()]
            writer.add()
        try:
            written = writer.finish()
        except Exception:  # the JSON is already written after every case; only the plot is lost
            traceback.print_exc()
            written = [writer.json_path]
        tables.append(common.format_table(writer.records))
        print(f"=== {part} took {time.perf_counter() - start:.0f} s; wrote {', '.join(written)}", flush=True)
    print()
    print("\n\n".join(t for t in tables if t), flush=True)
    if failed:
        print("\nparts not complete:\n  " + "\n  ".join(failed), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
