"""Shared machinery: FLOP/byte formulas and floors, a Case (one shape, one mode, ours beside the alternatives),
timing, the record of a measured case, the progress line, the table, the JSON file and the plot of a part.

Every implementation of a case is timed in the same process, the same way: kernels with
``triton.testing.do_bench`` (median; L2 cleared before each call; gradients reset to None before each call of a
forward+backward, so no case pays for gradient accumulation), whole-model work (``generate``) with wall-clock
time around the call after a warm-up call (CUDA synchronised), median of a few calls.

ratio[alternative] = alternative's ms / our ms = our throughput / alternative's throughput: > 1 means ours is
faster. A failed or skipped implementation is recorded as null with a note; the sweep goes on.
"""
import datetime
import json
import math
import os
import re
import shutil
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch

# Measured on one H100 80GB HBM3 by shared/anchors/anchor_bench.py (2026-11-22): bf16 matmul 8192^3 and a 2 GiB
# device-to-device copy (read + write). The floors below are worked out from them.
PEAK_TFLOPS = 791.0
PEAK_TBPS = 3.02

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ---------------------------------------------------------------------------------------------------- formulas
def attention_flops(batch, heads, q_len, k_len, head_dim, causal=True, backward=False):
    """4·B·H·Lq·Lk·D (QK^T and PV) for the forward; causal counted as half; forward+backward as 3.5 x the
    forward (the anchors' convention). Padding is not subtracted: every implementation is credited the same."""
    flops = 4.0 * batch * heads * q_len * k_len * head_dim
    if causal:
        flops /= 2
    return flops * (3.5 if backward else 1.0)


def attention_bytes(batch, heads, q_len, kv_heads, k_len, head_dim, element_size, backward=False):
    """Minimum HBM traffic: read Q, K, V and write O; the backward also reads Q, K, V, O, dO and writes dQ, dK, dV
    (the fp32 row statistics are negligible)."""
    q_like = batch * heads * q_len * head_dim * element_size
    kv_like = batch * kv_heads * k_len * head_dim * element_size
    forward = 2 * q_like + 2 * kv_like
    return forward + (4 * q_like + 4 * kv_like if backward else 0)


def floor_ms(flops=None, nbytes=None):
    """The roofline floor: the longer of the FLOPs at PEAK_TFLOPS and the bytes at PEAK_TBPS, in ms."""
    compute = (flops or 0) / (PEAK_TFLOPS * 1e12)
    memory = (nbytes or 0) / (PEAK_TBPS * 1e12)
    return max(compute, memory) * 1e3


UNITS = {  # unit -> (amount per call -> figure per ms)
    "TFLOP/s": lambda amount, ms: amount / ms / 1e9,
    "TB/s": lambda amount, ms: amount / ms / 1e9,
    "tok/s": lambda amount, ms: amount / ms * 1e3,
}


# ---------------------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    """One shape in one mode: ``impls`` maps a name to a no-argument callable; "ours" comes first."""
    part: str
    mode: str                        # "fwd", "fwd+bwd", "decode", "generate", ...
    label: str                       # one line for the table
    group: str                       # the plot panel
    x: float | None                  # the plot's x (None: bar chart)
    shape: dict
    impls: dict
    unit: str                        # "TFLOP/s", "TB/s" or "tok/s"
    amount: float                    # FLOPs, bytes or tokens of one call
    flops: float | None = None       # for the floor
    nbytes: float | None = None      # for the floor
    skipped: dict = field(default_factory=dict)     # name -> why it is not run
    grad_to_none: list | None = None
    check: Callable | None = None    # run once before timing; returns a dict recorded under "checks"
    wall_clock: bool = False         # time whole calls (generate) instead of do_bench
    rep_ms: int = 100                # do_bench's repetition time (longer for whole-model steps)
    warm: set = field(default_factory=set)          # names that check() already ran once (no extra warm-up)


class Runner:
    """How cases are timed: on a GPU with do_bench; with ``dry_run`` every implementation is called once
    (the figures mean nothing: it only checks that the code paths run)."""

    def __init__(self, device, dry_run=False, wall_reps=3):
        self.device = torch.device(device)
        self.dry_run = dry_run
        self.wall_reps = 1 if dry_run else wall_reps
        self._compiled = {}

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def compile(self, fn):
        """torch.compile specialised to each shape (dynamic=False), as a user tuning for speed would; one
        compiled wrapper per function (its graphs are cached per shape)."""
        if fn not in self._compiled:
            self._compiled[fn] = torch.compile(fn, dynamic=False)
        return self._compiled[fn]

    def time_ms(self, case, name):
        fn = case.impls[name]
        if self.dry_run:
            start = time.perf_counter()
            fn()
            self.sync()
            return (time.perf_counter() - start) * 1e3
        if case.wall_clock:
            if name not in case.warm:
                fn()
            times = []
            for _ in range(self.wall_reps):
                self.sync()
                start = time.perf_counter()
                fn()
                self.sync()
                times.append((time.perf_counter() - start) * 1e3)
            return statistics.median(times)
        from triton.testing import do_bench
        return do_bench(fn, warmup=max(25, case.rep_ms // 4), rep=case.rep_ms, grad_to_none=case.grad_to_none,
                        return_mode="median")

    def back_to_back_ms(self, case, name, gpu_ms):
        """Mean time of ``name`` called back to back for ~100 ms, synchronised once at the end: unlike do_bench
        (which clears L2 between calls, so the host gets ahead), this includes the Python and launch work of each
        call wherever that, not the GPU, is the bottleneck (small decode and RMSNorm shapes)."""
        fn = case.impls[name]
        calls = max(3, min(200, int(100.0 / max(gpu_ms, 1e-3))))
        self.sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        self.sync()
        return (time.perf_counter() - start) * 1e3 / calls

    def free_memory(self):
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def free_bytes(self):
        """Free device memory (infinite off the GPU)."""
        return torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else float("inf")


def raise_compile_limits():
    """Each shape compiles its own graph (dynamic=False): lift dynamo's recompile limits above the sweep size."""
    import torch._dynamo
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 4096))


def describe_error(error):
    text = f"{type(error).__name__}: {error}".replace("\n", " ")
    return text[:300]


def print_error(case, name, error):
    print(f"    ! {case.part} {case.label}: {name} failed: {describe_error(error)}", flush=True)
    frames = traceback.format_tb(error.__traceback__)[-3:]
    print("".join(f"      {line}\n" for chunk in frames for line in chunk.rstrip("\n").splitlines()), end="",
          flush=True)


def run_case(case, runner):
    """Time every implementation of the case; returns the record (a JSON-ready dict)."""
    checks = {}
    if case.check is not None:
        try:
            checks = case.check() or {}
        except Exception as error:  # a failed check is recorded; the timings still run
            print_error(case, "check", error)
            checks = {"check_error": describe_error(error)}
            runner.free_memory()
    ms, notes = {}, {}
    for name in case.impls:
        if name in case.skipped:
            ms[name] = None
            notes[name] = f"skipped: {case.skipped[name]}"
            continue
        try:
            ms[name] = runner.time_ms(case, name)
        except Exception as error:
            ms[name] = None
            notes[name] = f"error: {describe_error(error)}"
            print_error(case, name, error)
            runner.free_memory()
    if ms.get("ours") and not case.wall_clock and not runner.dry_run:
        try:
            checks["ours_back_to_back_ms"] = runner.back_to_back_ms(case, "ours", ms["ours"])
        except Exception as error:
            print_error(case, "ours (back to back)", error)
    return make_record(case, ms, notes, checks)


def make_record(case, ms, notes, checks):
    to_value = UNITS[case.unit]
    value = {name: (to_value(case.amount, t) if t else None) for name, t in ms.items()}
    ours = ms.get("ours")
    ratio = {name: (t / ours if t and ours else None) for name, t in ms.items() if name != "ours"}
    floor = floor_ms(case.flops, case.nbytes) if (case.flops or case.nbytes) else None
    checks = {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in checks.items()}
    return dict(part=case.part, mode=case.mode, label=case.label, group=case.group, x=case.x, shape=case.shape,
                unit=case.unit, amount=case.amount, flops=case.flops, bytes=case.nbytes, floor_ms=floor,
                ours_fraction_of_floor=(floor / ours if floor and ours else None),
                ms=ms, value=value, ratio=ratio, notes=notes, checks=checks)


# ---------------------------------------------------------------------------------------------------- printing
def format_figure(v):
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}"


def progress_line(record, index, total):
    ms, value, ratio = record["ms"], record["value"], record["ratio"]
    parts = [f"[{record['part']} {index}/{total}] {record['label']}"]
    ours = ms.get("ours")
    head = f"ours {ours:.4g} ms {format_figure(value['ours'])} {record['unit']}" if ours else \
        f"ours {record['notes'].get('ours', 'failed')}"
    if record["ours_fraction_of_floor"]:
        head += f" ({100 * record['ours_fraction_of_floor']:.0f}% of floor)"
    parts.append(head)
    for name, t in ms.items():
        if name == "ours":
            continue
        if t is None:
            parts.append(f"{name} {record['notes'].get(name, '-')[:60]}")
        else:
            r = f" (ours x{ratio[name]:.2f})" if ratio[name] else ""
            parts.append(f"{name} {t:.4g} ms {format_figure(value[name])}{r}")
    if record["checks"]:
        parts.append(" ".join(f"{k}={_check_value(v)}" for k, v in record["checks"].items()))
    return " | ".join(parts)


def _check_value(v):
    return f"{v:.2e}" if isinstance(v, float) else str(v)


def table_rows(records):
    """(header, rows) of a part's table: the case, ours (ms, figure, % of the floor) and each alternative's figure
    with the ratio; shared by the printed table and ``python -m fusedformers.bench.summarize``'s markdown."""
    names = []
    for record in records:
        names += [n for n in record["ms"] if n != "ours" and n not in names]
    unit = records[0]["unit"] if len({r["unit"] for r in records}) == 1 else "see unit"
    header = ["case", "ours ms", f"ours {unit}", "% floor"] + names
    rows = []
    for record in records:
        ours = record["ms"].get("ours")
        row = [record["label"], f"{ours:.4g}" if ours else "failed", format_figure(record["value"].get("ours")),
               f"{100 * record['ours_fraction_of_floor']:.0f}" if record["ours_fraction_of_floor"] else "-"]
        for name in names:
            if name not in record["ms"]:
                row.append("")
            elif record["ms"][name] is None:
                row.append(record["notes"].get(name, "-").split(":")[0])
            else:
                r = record["ratio"][name]
                figure = format_figure(record["value"][name])
                row.append(f"{figure} ({r:.2f}x)" if r else figure)
        rows.append(row)
    return header, rows


def format_table(records):
    """One table per part: ours (ms, figure, % of the floor) and each alternative's figure with the ratio."""
    if not records:
        return ""
    header, rows = table_rows(records)
    unit = header[2].removeprefix("ours ")
    rows = [header] + rows
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    part = records[0]["part"]
    title = (f"== {part}: figures in {unit}; (Nx) = ours/alternative throughput (= alternative ms / our ms, "
             f"> 1: ours faster); % floor = roofline floor / our time")
    return "\n".join([title] + lines)


# ---------------------------------------------------------------------------------------------------- output
def device_name(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def environment(device, quick, dry_run, autotune=False):
    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    for module in ("triton", "transformers"):
        try:
            versions[module] = __import__(module).__version__
        except Exception:  # reported as missing, the sweep does not need it
            versions[module] = None
    return dict(device=device_name(device), date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                versions=versions, quick=quick, dry_run=dry_run, autotune=autotune, argv=sys.argv[1:],
                peaks=dict(tflops_bf16_matmul=PEAK_TFLOPS, tbps_copy=PEAK_TBPS,
                           source="shared/anchors (H100 80GB HBM3, 2026-11-22)"),
                conventions=dict(ratio="alternative ms / our ms (> 1: ours faster)",
                                 attention_flops="causal = half of 4*B*H*Lq*Lk*D; fwd+bwd = 3.5 x fwd",
                                 timing="triton.testing.do_bench median (kernels); wall clock median (generate)"))


class PartWriter:
    """Writes ``<dir>/<part>[-proof][-quick][-autotune].json`` after every case (a run cut short keeps what it
    measured) and the plot at the end. When $OUT is set (the GPU device tool brings back only $OUT), both are
    also written to ``$OUT/bench-results/<device-slug>/`` as they are made."""

    def __init__(self, out_dir, part, meta):
        self.stem = (part + ("-proof" if meta.get("proof") else "") + ("-quick" if meta["quick"] else "")
                     + ("-autotune" if meta.get("autotune") else ""))
        self.meta = dict(meta, part=part)
        self.records = []
        self.dirs = [out_dir]
        mirror = os.environ.get("OUT")
        if mirror and os.path.isdir(mirror) and not meta["dry_run"]:
            self.dirs.append(os.path.join(mirror, "bench-results", os.path.basename(os.path.normpath(out_dir))))
        for d in self.dirs:
            os.makedirs(d, exist_ok=True)

    @property
    def json_path(self):
        return os.path.join(self.dirs[0], self.stem + ".json")

    def add(self, record=None):
        """Append a record (None: only rewrite the file, e.g. after a change to the metadata)."""
        if record is not None:
            self.records.append(record)
        for d in self.dirs:
            path = os.path.join(d, self.stem + ".json")
            with open(path + ".tmp", "w") as f:
                json.dump(dict(self.meta, records=self.records), f, indent=1)
            os.replace(path + ".tmp", path)

    def finish(self):
        """Write the plot; returns the paths written in the results directory."""
        written = [self.json_path] if self.records else []
        png = os.path.join(self.dirs[0], self.stem + ".png")
        if plot_records(self.records, png, title=f"{self.meta['part']} on {self.meta['device']}"):
            written.append(png)
            for d in self.dirs[1:]:
                shutil.copy(png, d)
        return written


_warned_no_matplotlib = False


def plot_records(records, path, title):
    """Lines of each implementation's figure against x, one panel per group (bars where x is None).
    Returns False (and says so once) when matplotlib is missing."""
    global _warned_no_matplotlib
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not _warned_no_matplotlib:
            print("matplotlib is not installed: no plots (pip install matplotlib)", flush=True)
            _warned_no_matplotlib = True
        return False
    if not records:
        return False
    groups = list(dict.fromkeys(r["group"] for r in records))
    cols = min(3, len(groups))
    rows = (len(groups) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.8 * rows), squeeze=False)
    colors = {name: f"C{i}" for i, name in enumerate(dict.fromkeys(n for r in records for n in r["value"]))}
    for ax, group in zip(axes.flat, groups):
        members = [r for r in records if r["group"] == group]
        names = list(dict.fromkeys(n for r in members for n in r["value"]))
        if all(r["x"] is not None for r in members):
            for name in names:
                pts = [(r["x"], r["value"].get(name)) for r in members if r["value"].get(name)]
                if pts:
                    xs, ys = zip(*sorted(pts))
                    ax.plot(xs, ys, marker="o", label=name, color=colors[name],
                            linewidth=2.5 if name == "ours" else 1.2)
            roof = sorted((r["x"], r["amount"] / r["floor_ms"] / 1e9) for r in members
                          if r["floor_ms"] and r["unit"] != "tok/s")
            if roof:
                ax.plot(*zip(*roof), linestyle="--", color="grey", linewidth=1, label="roofline floor")
            ax.set_xscale("log", base=2)
            ax.set_xlabel(members[0]["shape"].get("x_name", "x"))
        elif len(members) == 1:
            values = [members[0]["value"].get(name) or 0 for name in names]
            bars = ax.bar(names, values, color=[colors[name] for name in names])
            ax.bar_label(bars, labels=[format_figure(v) if v else "n/a" for v in values], fontsize=8)
            ax.tick_params(axis="x", labelsize=8)
        else:
            width = 0.8 / max(1, len(names))
            for i, name in enumerate(names):
                ys = [r["value"].get(name) or 0 for r in members]
                ax.bar([j + i * width for j in range(len(members))], ys, width, label=name, color=colors[name])
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(members))])
            ax.set_xticklabels([r["label"] for r in members], rotation=15, fontsize=7)
        ax.set_title(group, fontsize=9)
        ax.set_ylabel(members[0]["unit"])
        ax.grid(alpha=0.3)
        if len(members) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def dry_run_size(module, shape):
    """``shape`` with the sizes (its int fields) of the part's first dry-run shape of the same kind (the same
    string fields: dtype, model, task, cache): a GPU shape's code paths at a size the CPU can run."""
    def kind(s):
        return {k: v for k, v in s.items() if isinstance(v, str)}
    for small in module.DRY_RUN_SHAPES:
        if kind(small) == kind(shape):
            return dict(shape, **{k: v for k, v in small.items() if isinstance(v, int)})
    raise ValueError(f"{module.NAME}: no dry-run shape of the kind of {shape}")


def run_part(module, shapes, runner, writer, budget_s=None):
    """Build and run every case of a part, printing a line per case. A shape whose cases cannot be built (say,
    a model that fails to load) is reported and the next one runs; with ``budget_s``, no new shape starts once
    the part has run that long (one device command must end within its time limit). Returns the list of
    problems (shapes that failed or were not started), empty when every case ran."""
    cases_total = len(shapes) * len(module.MODES)
    index = 0
    problems = []
    start = time.perf_counter()
    for shape in shapes:
        if budget_s is not None and time.perf_counter() - start > budget_s:
            print(f"    budget of {budget_s:.0f} s spent: not starting {shape}", flush=True)
            problems.append(f"not started (budget): {shape}")
            continue
        try:
            for case in module.cases(shape, runner):
                if "impls" in shape:  # the shape names the alternatives to time (ours always)
                    unknown = set(shape["impls"]) - set(case.impls)
                    if unknown:
                        raise ValueError(f"impls {sorted(unknown)} are not alternatives of {case.label}: "
                                         f"{sorted(case.impls)}")
                    case.impls = {name: fn for name, fn in case.impls.items()
                                  if name == "ours" or name in shape["impls"]}
                index += 1
                record = run_case(case, runner)
                writer.add(record)
                print(progress_line(record, index, cases_total), flush=True)
                del case  # its closures hold the shape's tensors
        except Exception as error:  # building the cases failed: the other shapes still run
            print(f"    ! {shape}: building the cases failed: {describe_error(error)}", flush=True)
            traceback.print_exc()
            problems.append(f"failed: {shape}: {describe_error(error)}")
        runner.free_memory()
    if hasattr(module, "finish"):
        module.finish()
    return problems
