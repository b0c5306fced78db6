"""Markdown summary of recorded benchmark results, for the README::

    python -m fusedformers.bench.summarize [RESULTS_DIR] [--readme README.md]
    python -m fusedformers.bench.summarize [RESULTS_DIR] --proof    # the GPU proof's one table

RESULTS_DIR (default ``bench/results``) holds one folder per device with the ``<part>[-quick][-autotune].json``
files that ``python -m fusedformers.bench`` writes.
For each file: the device, date and versions, then a table of every case
(our time, our figure, the share of the roofline floor, each alternative's figure and its ratio to ours). With
``--readme``, the text between ``<!-- bench-summary:start -->`` and ``<!-- bench-summary:end -->`` in that file
is replaced by the summary; otherwise it is printed.
"""
import argparse
import glob
import json
import os
import re
import sys

from fusedformers.bench.common import format_figure, table_rows

START, END = "<!-- bench-summary:start -->", "<!-- bench-summary:end -->"
PART_ORDER = ("attention", "decode", "rmsnorm", "models")


def _part_rank(path):
    name = os.path.basename(path).split("-")[0].removesuffix(".json")
    return (PART_ORDER.index(name) if name in PART_ORDER else len(PART_ORDER), path)


def summarize(results_dir):
    """The markdown summary of every results file under ``results_dir/<device>/``."""
    sections = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*", "*.json")), key=_part_rank):
        with open(path) as f:
            result = json.load(f)
        records = result.get("records") or []
        if not records or result.get("dry_run"):
            continue
        versions = result.get("versions", {})
        flags = [flag for flag in ("quick", "autotune") if result.get(flag)]
        title = (f"**{result['part']}** on {result['device']}, {result['date'][:10]} (torch {versions.get('torch')}, "
                 f"triton {versions.get('triton')}, transformers {versions.get('transformers')}"
                 + (f"; {', '.join(flags)}" if flags else "") + f") — `{os.path.relpath(path, results_dir)}`")
        header, rows = table_rows(records)
        lines = [title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
        sections.append("\n".join(lines))
    if not sections:
        return "No GPU results recorded yet."
    legend = ("Figures: TFLOP/s (attention; causal counted as half), TB/s (decode, RMSNorm) or tok/s (models); "
              "(N.NNx) = alternative's time / ours: above 1, ours is faster; % floor = roofline floor / our time. "
              "Medians (do_bench for kernels, wall clock for whole models).")
    return "\n\n".join([legend] + sections)


def proof_table(results_dir, include_dry_run=False):
    """One markdown table of every ``<part>-proof.json`` under ``results_dir/<device>/`` (what
    ``bash bench/gpu_check.sh proof`` measured): a row per case and alternative with our time and figure, the
    alternative's, and the ratio (alternative ms / our ms: above 1, ours is faster)."""
    rows, devices = [], set()
    for path in sorted(glob.glob(os.path.join(results_dir, "*", "*-proof.json")), key=_part_rank):
        with open(path) as f:
            result = json.load(f)
        if result.get("dry_run") and not include_dry_run:
            continue
        devices.add(f"{result['device']}, {result['date'][:10]}, torch {result['versions'].get('torch')}, "
                    f"triton {result['versions'].get('triton')}" + (" (DRY RUN: not measurements)"
                                                                     if result.get("dry_run") else ""))
        for record in result.get("records") or []:
            ours_ms, unit = record["ms"].get("ours"), record["unit"]
            ours = f"{ours_ms:.4g} ms, {format_figure(record['value'].get('ours'))} {unit}" if ours_ms else "failed"
            for name, ms in record["ms"].items():
                if name == "ours":
                    continue
                if ms is None:
                    theirs, ratio = record["notes"].get(name, "-").split(":")[0], "-"
                else:
                    theirs = f"{ms:.4g} ms, {format_figure(record['value'][name])} {unit}"
                    ratio = f"{record['ratio'][name]:.2f}x" if record["ratio"].get(name) else "-"
                rows.append([record["part"], record["label"], ours, name, theirs, ratio])
    if not rows:
        return "No proof results found."
    header = ["part", "case", "ours", "baseline", "baseline result", "ratio (baseline ms / ours)"]
    lines = ["; ".join(sorted(devices)), "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def replace_block(text, summary):
    """``text`` with the block between the START and END markers replaced by ``summary``."""
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise ValueError(f"no {START} ... {END} block to replace")
    return pattern.sub(lambda _: f"{START}\n{summary}\n{END}", text)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fusedformers.bench.summarize",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("results_dir", nargs="?",
                        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--readme", default=None, help="replace the summary block of this file instead of printing")
    parser.add_argument("--proof", action="store_true", help="print the one table of the GPU proof's results")
    parser.add_argument("--include-dry-run", action="store_true", help="with --proof: dry-run results too")
    args = parser.parse_args(argv)
    if args.proof:
        print(proof_table(args.results_dir, args.include_dry_run))
        return 0
    summary = summarize(args.results_dir)
    if args.readme is None:
        print(summary)
        return 0
    with open(args.readme) as f:
        text = f.read()
    with open(args.readme, "w") as f:
        f.write(replace_block(text, summary))
    print(f"updated {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
