"""``spikeprune bench``: methods × target densities × seeds over one model/dataset recipe, on one harness.

A bench YAML (schema :class:`BenchConfig`, validated like the run configs) names a base run recipe, the target
densities, the seeds and the methods; each method maps the target to its own option (``target``, e.g.
``method.target_density``; ``transform: sparsity`` passes ``1 − d``, e.g. DynSNN's ``target_compression``). Every
cell is an ordinary run in ``OUT/runs/<method>_d<pct>_s<seed>``; a cell is finished when its run directory holds
``results.json``, so a second invocation skips it (a cell with checkpoints but no results resumes). Cells run seed
by seed (``order: seed``: every method's seed 0, then seed 1, ...), so a grid stopped halfway already holds complete
seeds, the pairs a paired comparison needs (``tier: 2`` on a method puts all its seeds after every seed of tier 1);
``--only`` and ``--shard K/N`` run a slice (several processes or days),
and every invocation's report reads every finished cell of the whole grid.

All numbers come from each run's own final measurement (connectivity from the weights, effective SOPs). A cell is
*on target* when its measured connectivity (or, for ``measure: channels``, its fraction of channels kept) is within
``min(tolerance, relative_tolerance · target)`` of the target: 2 points, and 20% of the target below 10% (2% means
1.6–2.4%). Cells off target are listed apart and take part in no mean or comparison. Outputs in the report
directory: ``results.csv`` (one row per cell, ``on_target`` included), ``results.md`` (mean ± std over the seeds on
target, Δ vs dense; the paired comparison of each core method against the best baseline at each target: mean of the
per-seed differences with a 95% t interval, *real* only when the interval excludes 0), ``acc_vs_connectivity.png``
and ``acc_vs_sops.png`` (mean ± std error bars in both axes, the dense baseline as a star and a dashed line),
``layer_density.png`` (per-layer connectivity of every method at the densities in ``layer_plots``, first seed) and,
for methods with ``compact: true``, the compacted network's MACs, parameters and measured CPU time per batch
(``compact.json`` in each cell, written once after its training).
"""

from __future__ import annotations

import copy
import csv
import json
import math
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .config import ConfigError, RunConfig, apply_overrides, from_dict, to_dict
from .measure import rule_note
from .schema import check as _check

CORE_METHODS = ("dynsnn", "pq_rewire", "sca")
TARGET_TOLERANCE = 0.02  # a cell is on target within 2 points of the requested connectivity ...
RELATIVE_TOLERANCE = 0.2  # ... and within 20% of it (what binds below 10%)


@dataclass
class BenchMethod:
    """One line of the bench: a run ``method:`` mapping and where the target density goes."""

    name: str  # label: run names, tables, plots (may repeat with other settings at other densities)
    method: dict | None = None  # the run's method mapping ({name: ..., options}); null trains densely
    target: str | None = "method.target_density"  # dotted key that takes the target (null: not set)
    transform: Literal["density", "sparsity"] = "density"  # pass d, or 1 - d
    offset: float = 0.0  # added to the passed value (e.g. SCA keep = d - regrow)
    set: list[str] = field(default_factory=list)  # KEY=VALUE overrides of this method's runs
    densities: list[float] | None = None  # only these targets (null: all of the bench's)
    measure: Literal["connectivity", "channels"] = "connectivity"  # what the target is checked against
    compact: bool = False  # after training, compact the network and time it (structured methods)
    tier: int = 1  # order: seed runs tier by tier (every seed of tier 1, then of tier 2 ...); dense is in the first

    def validate(self, key: str) -> None:
        _check(bool(re.fullmatch(r"[A-Za-z0-9_.+-]+", self.name)), f"{key}.name",
               f"must be a plain name (letters, digits, _ . + -), got {self.name!r}")
        _check(self.method is None or "name" in self.method, f"{key}.method", "needs a 'name' (or null: dense)")
        _check(self.method is not None or self.target is None, f"{key}.target", "must be null when method is null")
        for d in self.densities or []:
            _check(0 < d <= 1, f"{key}.densities", f"must be in (0, 1], got {d}")


@dataclass
class BenchConfig:
    name: str = "bench"
    base: str | None = None  # run recipe (relative to the bench file, else to the working directory)
    recipe: dict = field(default_factory=dict)  # run-config mapping merged over ``base``
    set: list[str] = field(default_factory=list)  # KEY=VALUE overrides of every run
    out_dir: str = "runs/bench"
    report_dir: str | None = None  # where results.{md,csv} and the plots go (null: out_dir); the runs stay in out_dir
    densities: list[float] = field(default_factory=lambda: [0.5, 0.25, 0.1])
    seeds: list[int] = field(default_factory=lambda: [0])
    dense: bool = True  # also train the dense baseline, once per seed
    methods: list[BenchMethod] = field(default_factory=list)
    layer_plots: list[float] | None = None  # targets shown in layer_density.png (null: the smallest)
    order: Literal["seed", "method"] = "seed"  # seed: seed 0 of every method first, then seed 1 ...
    tolerance: float = 0.02  # on target: |measured - target| <= min(tolerance, relative_tolerance * target)
    relative_tolerance: float = 0.2
    min_seeds: int = 3  # a paired difference is called real only with at least this many seed pairs
    core: list[str] = field(default_factory=lambda: list(CORE_METHODS))  # method names compared with baselines

    def validate(self, key: str) -> None:
        k = f"{key}." if key else ""
        _check(bool(self.densities), f"{k}densities", "must not be empty")
        for d in self.densities:
            _check(0 < d <= 1, f"{k}densities", f"must be in (0, 1], got {d}")
        _check(bool(self.seeds), f"{k}seeds", "must not be empty")
        _check(len(set(self.seeds)) == len(self.seeds), f"{k}seeds", "must not repeat a seed")
        _check(0 < self.tolerance < 1, f"{k}tolerance", f"must be in (0, 1), got {self.tolerance}")
        _check(0 < self.relative_tolerance <= 1, f"{k}relative_tolerance",
               f"must be in (0, 1], got {self.relative_tolerance}")
        _check(bool(self.methods) or self.dense, f"{k}methods", "must not be empty")
        seen: set = set()  # a label may repeat with other settings at other densities
        for i, m in enumerate(self.methods):
            _check(m.name != "dense", f"{k}methods[{i}].name", "must not be 'dense' (the baseline's label)")
            for d in m.densities or self.densities:
                _check(d in self.densities, f"{k}methods[{i}].densities", f"{d} is not one of densities")
                _check((m.name, d) not in seen, f"{k}methods[{i}]", f"repeats {m.name!r} at density {d}")
                seen.add((m.name, d))


@dataclass
class Cell:
    method: str  # bench label
    density: float | None  # target (None: dense)
    seed: int
    cfg: RunConfig
    spec: BenchMethod | None = None

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir

    @property
    def finished(self) -> bool:
        return (self.run_dir / "results.json").is_file()


# ------------------------------------------------------------------------------------------ loading
def load_bench(path: str | Path) -> tuple[BenchConfig, Path]:
    """Read and validate a bench YAML; returns the config and the directory relative paths start from."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"bench file not found: {p}")
    from .config import read_yaml

    return from_dict(BenchConfig, read_yaml(p, "bench file")), p.parent


def _merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _base_recipe(bench: BenchConfig, root: Path) -> dict:
    data: dict = {}
    if bench.base:
        p = Path(bench.base)
        p = p if p.is_absolute() or not (root / p).is_file() else root / p
        if not p.is_file():
            raise ConfigError(f"config key 'base': recipe {bench.base} not found (looked in {root} and .)")
        from .config import read_yaml

        data = read_yaml(p, "base recipe")
    return _merge(data, bench.recipe)


def _label(d: float) -> str:
    return f"d{100 * d:.4g}"


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"K/N"`` (1 <= K <= N) -> ``(K, N)``; ``None`` passes through."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise ConfigError(f"--shard must be K/N with 1 <= K <= N, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def cells(bench: BenchConfig, root: Path = Path("."), overrides: list[str] | None = None,
          only: list[str] | None = None, shard: tuple[int, int] | None = None) -> list[Cell]:
    """Every cell of the grid with its validated run config. ``order: seed`` (default): tier by tier (methods'
    ``tier``, 1 by default), for each seed, the dense cell (first tier) then every method of the tier (in the bench's
    order) at every target, so the first tier's paired comparison is complete before the others start; ``order:
    method``: dense cells first, then method by method. ``only`` keeps the named labels; ``shard=(K, N)`` then keeps
    cells ``i`` with ``i % N == K - 1``."""
    base = _base_recipe(bench, root)
    out_dir = Path(bench.out_dir) / "runs"

    def per_method(m: BenchMethod, seeds: list[int]) -> list:
        return [(m, d, s) for d in bench.densities if m.densities is None or d in m.densities for s in seeds]

    plan: list[tuple[BenchMethod | None, float | None, int]] = []
    use_dense = bench.dense and (not only or "dense" in only)
    methods = [m for m in bench.methods if not only or m.name in only]
    if bench.order == "seed":
        tiers = sorted({m.tier for m in methods}) or [1]
        for tier in tiers:
            for seed in bench.seeds:
                plan += [(None, None, seed)] if use_dense and tier == tiers[0] else []
                for m in methods:
                    plan += per_method(m, [seed]) if m.tier == tier else []
    else:
        plan += [(None, None, s) for s in bench.seeds] if use_dense else []
        for m in methods:
            plan += per_method(m, bench.seeds)
    if shard is not None:
        k, n = shard
        plan = [c for i, c in enumerate(plan) if i % n == k - 1]
    result = []
    for m, d, seed in plan:
        data = apply_overrides(copy.deepcopy(base), bench.set)
        name = f"dense_s{seed}" if m is None else f"{m.name}_{_label(d)}_s{seed}"
        data["method"] = None if m is None else copy.deepcopy(m.method)
        if m is not None:
            apply_overrides(data, m.set)
            if m.target:
                value = round((d if m.transform == "density" else 1 - d) + m.offset, 6)
                apply_overrides(data, [f"{m.target}={json.dumps(value)}"])
        apply_overrides(data, [f"seed={seed}", *(overrides or [])])
        data["name"], data["out_dir"] = name, str(out_dir)
        try:
            cfg = from_dict(RunConfig, data)
        except ConfigError as e:
            raise ConfigError(f"bench cell {name}: {e}") from None
        result.append(Cell(m.name if m else "dense", d, seed, cfg, m))
    return result


# ------------------------------------------------------------------------------------------ running
def _fmt_time(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def run_bench(bench: BenchConfig, root: Path = Path("."), overrides: list[str] | None = None,
              only: list[str] | None = None, dry_run: bool = False, log=print, shard: tuple[int, int] | None = None,
              report_only: bool = False, copy_to: str | Path | None = None, header: str | None = None) -> dict:
    """Train every unfinished cell of the slice (``only``, ``shard``), then write the tables and plots of every
    finished cell of the whole grid. ``report_only`` trains nothing; ``copy_to`` copies each finished cell's small
    files (``results.json``, ``config.json``, ``metrics.csv``, ``compact.json``) to ``copy_to/runs/<cell>/``.
    Returns counts and the output paths."""
    full = cells(bench, root, overrides)
    grid = cells(bench, root, overrides, only, shard) if (only or shard) else full
    out = Path(bench.report_dir or bench.out_dir)
    todo = [c for c in grid if not c.finished]
    if dry_run:
        from .checkpoint import list_checkpoints

        for i, c in enumerate(grid, 1):
            status = "done" if c.finished else ("partial" if list_checkpoints(c.run_dir) else "todo")
            opts = {k: v for k, v in (c.cfg.method or {}).items() if k != "name"}
            log(f"[{i}/{len(grid)}] {c.name:<28} {status:<8} method={(c.cfg.method or {}).get('name', 'dense')} "
                f"{json.dumps(opts)} epochs={c.cfg.train.epochs} -> {c.run_dir}")
        log(f"{len(grid)} cells: {len(grid) - len(todo)} done, {len(todo)} to train")
        return {"cells": len(grid), "trained": 0, "todo": len(todo)}
    times: list[float] = []
    for i, c in enumerate(grid, 1):
        if c.finished:
            _warn_if_changed(c, log)
            if not report_only:
                log(f"cell {i}/{len(grid)} done ({c.name}, finished earlier)")
                _compact_cell(c, log)
            continue
        if report_only:
            continue
        from .checkpoint import list_checkpoints
        from .train import Trainer

        log(f"== cell {i}/{len(grid)}: {c.name}")
        t0 = time.perf_counter()
        # a cell with checkpoints continues; one without (never started, or stopped before its first checkpoint)
        # starts afresh in its own directory, which only the bench writes
        partial = bool(list_checkpoints(c.run_dir))
        Trainer(c.cfg, log=log).fit(resume=partial, overwrite=not partial)
        times.append(time.perf_counter() - t0)
        _compact_cell(c, log)
        left = len(todo) - len(times)
        res = json.loads((c.run_dir / "results.json").read_text())
        log(f"cell {i}/{len(grid)} done ({c.name}: acc {100 * res['accuracy']:.2f}%, conn "
            f"{100 * res['connectivity']:.2f}%, {_fmt_time(times[-1])}), ETA {_fmt_time(statistics.mean(times) * left)}"
            f" for {left} more")
    if header is None:
        from .runs import provenance

        header = provenance() + _cpu_line()
    paths = write_report(bench, full, out, header)
    if copy_to is not None:
        paths["copied"] = copy_cells(full, Path(copy_to) / "runs")
    log(f"bench {bench.name}: {len(times)} cells trained, {sum(c.finished for c in full)} of {len(full)} finished; "
        f"results in {out}")
    return {"cells": len(grid), "trained": len(times), "todo": len(todo) - len(times), **paths}


def _cpu_line() -> str:
    """The CPU model as ``lscpu`` names it (Linux), for the report header."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"- cpu: {line.split(':', 1)[1].strip()} ({__import__('os').cpu_count()} cores)\n"
    except OSError:
        pass
    return ""


SMALL_FILES = ("results.json", "config.json", "metrics.csv", "compact.json")


def copy_cells(grid: list[Cell], dest: Path) -> int:
    """Copy the small files of every finished cell to ``dest/<cell>/`` (never model.pt or checkpoints)."""
    import shutil

    n = 0
    for c in grid:
        if not c.finished:
            continue
        d = dest / c.name
        if d.resolve() == c.run_dir.resolve():
            n += 1
            continue
        d.mkdir(parents=True, exist_ok=True)
        for f in SMALL_FILES:
            if (c.run_dir / f).is_file():
                shutil.copyfile(c.run_dir / f, d / f)
        n += 1
    return n


def _warn_if_changed(c: Cell, log) -> None:
    p = c.run_dir / "config.json"
    if not p.is_file():
        return
    old = json.loads(p.read_text())
    new = json.loads(json.dumps(to_dict(c.cfg), default=str))
    for d in (old, new):  # where a cell lives, where its data is read from, how it logs: the same run
        d.pop("out_dir", None)
        for section, key in (("data", "root"), ("train", "progress"), ("train", "log_every")):
            (d.get(section) or {}).pop(key, None)
    if old != new:
        log(f"warning: {c.name} finished with a different config; delete {c.run_dir} to train it again")


def _compact_cell(c: Cell, log, timing_batches: int = 5, repeats: int = 3) -> None:
    """For ``compact: true`` methods: compact the finished run's network and write ``compact.json`` (parameters,
    dense MACs per sample and CPU seconds per test batch of the masked, folded and compacted networks; the
    compacted network's accuracy). Skipped when it exists or the run has no ``model.pt``."""
    if c.spec is None or not c.spec.compact or (c.run_dir / "compact.json").is_file():
        return
    if not (c.run_dir / "model.pt").is_file():
        return
    import itertools

    import torch

    from .checkpoint import atomic_write
    from .compact import compact, timed_inference
    from .measure import measure
    from .runs import load_run, run_model

    cfg, model, test = load_run(c.run_dir)
    batches = [b[0] for b in itertools.islice(test, timing_batches)]
    small = compact(model, batches[0][:2])
    folded = run_model(c.run_dir, cfg, fold=True)
    m = measure(small, test, max_batches=cfg.measure.max_batches)
    dense = measure(folded, test, max_batches=1)
    with torch.no_grad():
        out = {"params_before": sum(p.numel() for p in folded.parameters()),
               "params_after": sum(p.numel() for p in small.parameters()),
               "dense_macs_before": dense.dense_macs, "dense_macs_after": m.dense_macs,
               "accuracy_after": m.accuracy, "batch_size": int(batches[0].shape[0]),
               "threads": torch.get_num_threads(),
               "time_masked_s": timed_inference(model, batches, repeats),
               "time_folded_s": timed_inference(folded, batches, repeats),
               "time_compact_s": timed_inference(small, batches, repeats)}
    atomic_write(c.run_dir / "compact.json", json.dumps(out, indent=2).encode())
    log(f"  compacted {c.name}: {out['dense_macs_before']:,.0f} -> {out['dense_macs_after']:,.0f} MACs/sample, "
        f"{out['time_folded_s'] / max(out['time_compact_s'], 1e-12):.2f}x faster per batch")


# ------------------------------------------------------------------------------------------ statistics
def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (p in (0.5, 1)): bisection on the CDF, the
    density integrated by Simpson's rule (|error| < 1e-6 for the quantiles used here)."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(x: float) -> float:  # 0.5 + integral of the density over [0, x], x >= 0
        n = 2000
        h = x / n
        total = 0.0
        for i in range(n + 1):
            f = c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2)
            total += f * (1 if i in (0, n) else (4 if i % 2 else 2))
        return 0.5 + total * h / 3

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        lo, hi = hi, 2 * hi
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def paired_interval(diffs: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean of paired differences and its two-sided ``level`` t interval ``(mean, lo, hi)`` (nan bounds for one
    pair)."""
    n = len(diffs)
    mean = statistics.mean(diffs)
    if n < 2:
        return mean, math.nan, math.nan
    half = t_quantile(0.5 + level / 2, n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    return mean, mean - half, mean + half


# ------------------------------------------------------------------------------------------ reporting
COLUMNS = ["method", "method_name", "target_density", "seed", "accuracy", "connectivity", "measured", "on_target",
           "params", "sops", "dense_sops", "macs", "energy_uj", "firing_rate", "neurons_alive", "neurons",
           "train_time_s", "epochs", "compact_dense_macs", "compact_params", "compact_time_s", "folded_time_s",
           "pooled_spikes", "run"]


def tolerance(target: float, absolute: float = TARGET_TOLERANCE, relative: float = RELATIVE_TOLERANCE) -> float:
    """How far a cell may land from its target: ``min(absolute, relative · target)`` (2 points; 20% below 10%)."""
    return min(absolute, relative * target)


def on_target(measured: float | None, target: float | None, absolute: float = TARGET_TOLERANCE,
              relative: float = RELATIVE_TOLERANCE) -> bool:
    if target is None:
        return True
    return measured is not None and abs(measured - target) <= tolerance(target, absolute, relative) + 1e-9


def collect(grid: list[Cell], absolute: float = TARGET_TOLERANCE, relative: float = RELATIVE_TOLERANCE) -> list[dict]:
    rows = []
    for c in grid:
        if not c.finished:
            continue
        r = json.loads((c.run_dir / "results.json").read_text())
        row = {**{k: r.get(k) for k in COLUMNS}, "method": c.method, "method_name": r.get("method"),
               "target_density": c.density, "seed": c.seed, "run": c.name, "layers": r.get("layers", []),
               "other_rule": r.get("other_rule")}
        kind = c.spec.measure if c.spec is not None else "connectivity"
        row["measured"] = (r.get("method_summary") or {}).get("channel_fraction") if kind == "channels" \
            else r.get("connectivity")
        row["on_target"] = on_target(row["measured"], c.density, absolute, relative)
        cp = c.run_dir / "compact.json"
        if cp.is_file():
            comp = json.loads(cp.read_text())
            row.update(compact_dense_macs=comp.get("dense_macs_after"), compact_params=comp.get("params_after"),
                       compact_time_s=comp.get("time_compact_s"), folded_time_s=comp.get("time_folded_s"))
        rows.append(row)
    return rows


def _groups(rows: list[dict]) -> dict[tuple[str, float | None], list[dict]]:
    g: dict[tuple[str, float | None], list[dict]] = {}
    for r in rows:
        g.setdefault((r["method"], r["target_density"]), []).append(r)
    return g


def _mean_std(vals: list[float]) -> tuple[float, float]:
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _pm(vals: list[float], scale: float = 100, digits: int = 2) -> str:
    m, sd = _mean_std([scale * v for v in vals])
    return f"{m:.{digits}f} ± {sd:.{digits}f}" if len(vals) > 1 else f"{m:.{digits}f}"


def markdown(rows: list[dict]) -> str:
    """Mean ± std over the seeds on target, per method and target, with Δ accuracy against the dense runs and the
    measured connectivity's distance to the target (✓: every seed on target; ✗: the seeds off it are listed
    below the table and left out of every mean)."""
    dense = [r["accuracy"] for r in rows if r["method"] == "dense"]
    base = statistics.mean(dense) if dense else None
    compacted = any(r.get("compact_dense_macs") is not None for r in rows)
    lines = ["| method | target % | seeds | acc. % (mean ± std) | Δ acc. | conn. % | on target | "
             "eff. SOPs/sample | energy µJ | firing rate | time s |"
             + (" MACs after compact | CPU s/batch folded → compact |" if compacted else ""),
             "|---|---:|---:|---:|---:|---:|:---:|---:|---:|---:|---:|" + ("---:|---:|" if compacted else "")]
    missed = []
    for (m, d), all_rs in _groups(rows).items():
        rs = [r for r in all_rs if r["on_target"]]
        missed += [r for r in all_rs if not r["on_target"]]
        if not rs:
            lines.append(f"| {m} | {100 * d:g} | 0 of {len(all_rs)} | — | | "
                         f"{_pm([r['connectivity'] for r in all_rs])} | ✗ | | | | |" + (" | |" if compacted else ""))
            continue
        acc = statistics.mean(r["accuracy"] for r in rs)
        delta = "" if base is None or m == "dense" else f"{100 * (acc - base):+.2f}"
        meas = statistics.mean(r["measured"] for r in rs) if d is not None else None
        on = "" if d is None else (f"✓ {100 * (meas - d):+.2f}" if len(rs) == len(all_rs)
                                   else f"✗ {len(rs)}/{len(all_rs)}")
        extra = ""
        if compacted:
            cm = [r["compact_dense_macs"] for r in rs if r.get("compact_dense_macs") is not None]
            tf = [(r["folded_time_s"], r["compact_time_s"]) for r in rs if r.get("compact_time_s") is not None]
            extra = (f" {statistics.mean(cm):,.0f} |" if cm else " |") + (
                f" {statistics.mean(a for a, _ in tf):.4f} → {statistics.mean(b for _, b in tf):.4f} |" if tf else " |")
        lines.append(
            f"| {m} | {'' if d is None else f'{100 * d:g}'} | {len(rs)} | {_pm([r['accuracy'] for r in rs])} | "
            f"{delta} | {_pm([r['connectivity'] for r in rs])} | {on} | "
            f"{statistics.mean(r['sops'] for r in rs):,.0f} | {statistics.mean(r['energy_uj'] for r in rs):.3f} | "
            f"{statistics.mean(r['firing_rate'] for r in rs):.4f} | "
            f"{statistics.mean(r['train_time_s'] or 0 for r in rs):.0f} |" + extra)
    text = "\n".join(lines)
    if missed:
        text += ("\n\nOff target (left out of every mean and comparison): "
                 + "; ".join(f"{r['run']} measured {100 * r['measured']:.2f}% for {100 * r['target_density']:g}% "
                             f"(acc. {100 * r['accuracy']:.2f}%)" if r["measured"] is not None
                             else f"{r['run']} (nothing measured)" for r in missed) + ".")
    return text


def _core_labels(rows: list[dict], core: tuple[str, ...]) -> list[str]:
    return list(dict.fromkeys(r["method"] for r in rows if r.get("method_name") in core))


def best_baselines(rows: list[dict], core: tuple[str, ...] = CORE_METHODS,
                   min_seeds: int = 1) -> dict[float, tuple[str, float]]:
    """Per target: the non-core, non-dense label with the highest mean accuracy over its seeds on target, among the
    labels with at least ``min_seeds`` such seeds (or, where none has, among those with the most): a baseline with
    one lucky seed in a partial grid must not displace one measured on every seed."""
    cores = set(_core_labels(rows, core))
    cand: dict[float, list[tuple[int, float, str]]] = {}
    for (m, d), rs in _groups(rows).items():
        rs = [r for r in rs if r["on_target"]]
        if d is None or m == "dense" or m in cores or not rs:
            continue
        cand.setdefault(d, []).append((len(rs), statistics.mean(r["accuracy"] for r in rs), m))
    best: dict[float, tuple[str, float]] = {}
    for d, cs in cand.items():
        floor = min(min_seeds, max(n for n, _, _ in cs))
        _, acc, m = max(((n, a, m) for n, a, m in cs if n >= floor), key=lambda c: c[1])
        best[d] = (m, acc)
    return best


def standing(rows: list[dict], core: tuple[str, ...] = CORE_METHODS, min_seeds: int = 1) -> str:
    """Each core method against the most accurate baseline at the same target: Δ accuracy of the means in points and
    the ratio of effective SOPs (< 1: the core method spikes through fewer synapses). Only cells on target count,
    so a baseline that stayed denser cannot win by it."""
    by = {k: (statistics.mean(r["accuracy"] for r in rs), statistics.mean(r["connectivity"] for r in rs),
              statistics.mean(r["sops"] for r in rs))
          for k, all_rs in _groups(rows).items() if (rs := [r for r in all_rs if r["on_target"]])}
    best = best_baselines(rows, core, min_seeds)
    cores = _core_labels(rows, core)
    lines = ["| target % | best baseline | its acc. % | its conn. % | its SOPs | core method | acc. % | conn. % | "
             "Δ acc. vs best (pts) | SOPs vs best |", "|---:|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for d in sorted(best, reverse=True):
        bm = best[d][0]
        bacc, bconn, bsops = by[(bm, d)]
        for m in cores:
            if (m, d) not in by:
                continue
            acc, conn, sops = by[(m, d)]
            lines.append(f"| {100 * d:g} | {bm} | {100 * bacc:.2f} | {100 * bconn:.2f} | {bsops:,.0f} | {m} | "
                         f"{100 * acc:.2f} | {100 * conn:.2f} | {100 * (acc - bacc):+.2f} | "
                         f"{f'{sops / bsops:.2f}x' if bsops else '-'} |")
    return "\n".join(lines)


def paired(rows: list[dict], core: tuple[str, ...] = CORE_METHODS, level: float = 0.95,
           min_seeds: int = 3) -> list[dict]:
    """Each core method against the best baseline at each target, paired by seed: the per-seed accuracy differences
    (core − baseline, both cells on target), their mean and ``level`` t interval, and whether it excludes 0 (a
    difference is only called real with at least ``min_seeds`` pairs; with fewer the interval is shown, not
    claimed)."""
    best = best_baselines(rows, core, min_seeds)
    acc = {(r["method"], r["target_density"], r["seed"]): r["accuracy"] for r in rows if r["on_target"]}
    out = []
    for d in sorted(best, reverse=True):
        bm = best[d][0]
        for m in _core_labels(rows, core):
            seeds = sorted(s for (mm, dd, s) in acc if mm == m and dd == d and (bm, d, s) in acc)
            if not seeds:
                continue
            diffs = [acc[(m, d, s)] - acc[(bm, d, s)] for s in seeds]
            mean, lo, hi = paired_interval(diffs, level)
            excludes = not math.isnan(lo) and (lo > 0 or hi < 0)
            real = excludes and len(seeds) >= min_seeds
            out.append({"target": d, "method": m, "baseline": bm, "seeds": seeds, "diffs": diffs, "mean": mean,
                        "lo": lo, "hi": hi, "real": real,
                        "verdict": ("n/a (one seed)" if math.isnan(lo) else
                                    ("real: core better" if lo > 0 else "real: core worse") if real else
                                    f"not claimed: {len(seeds)} seeds < {min_seeds}" if excludes else
                                    "not resolved (interval holds 0)")})
    return out


def paired_markdown(rows: list[dict], core: tuple[str, ...] = CORE_METHODS, min_seeds: int = 3) -> str:
    lines = ["| target % | core method | best baseline | seeds paired | Δ acc. per seed (pts) | mean Δ (pts) | "
             "95% interval (pts) | difference |", "|---:|---|---|---:|---|---:|---:|---|"]
    for p in paired(rows, core, min_seeds=min_seeds):
        ci = "—" if math.isnan(p["lo"]) else f"[{100 * p['lo']:+.2f}, {100 * p['hi']:+.2f}]"
        lines.append(f"| {100 * p['target']:g} | {p['method']} | {p['baseline']} | {len(p['seeds'])} | "
                     f"{', '.join(f'{100 * x:+.2f}' for x in p['diffs'])} | {100 * p['mean']:+.2f} | {ci} | "
                     f"{'**' + p['verdict'] + '**' if p['real'] else p['verdict']} |")
    return "\n".join(lines)


def write_report(bench: BenchConfig, grid: list[Cell], out: Path, header: str = "") -> dict:
    out.mkdir(parents=True, exist_ok=True)
    rows = collect(grid, bench.tolerance, bench.relative_tolerance)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    done, total = len(rows), len(grid)
    status = (f"**PARTIAL: {done} of {total} cells finished** (the grid is still running or was stopped; every "
              "number below is from the finished cells only)\n\n" if done < total else
              f"All {total} cells finished.\n\n")
    tol = (f"On target: measured connectivity (channel fraction for `measure: channels`) within "
           f"min({100 * bench.tolerance:g} points, {100 * bench.relative_tolerance:g}% of the target). Means ± "
           "sample standard deviations over the seeds on target.\n\n")
    text = f"# bench {bench.name}\n\n{header}- {rule_note(rows, label='run')}\n\n{status}{tol}{markdown(rows)}\n"
    core = tuple(bench.core)
    baselines = any(r.get("method_name") not in (*core, "dense", None) for r in rows)
    if any(r.get("method_name") in core for r in rows) and baselines:
        text += ("\n## Core methods against the best baseline at each target\n\n"
                 "Best baseline: the non-core method with the highest mean accuracy over its seeds on target, "
                 f"among those with at least {bench.min_seeds} seeds on target (where none has, those with the most). "
                 "Paired by seed: Δ = core − baseline accuracy of the same seed; the interval is the mean Δ ± "
                 "t(0.975, n−1) · sd/√n over the n paired seeds. A difference is **real** only when the interval "
                 f"excludes 0 and at least {bench.min_seeds} seeds are paired. (The best baseline is picked on "
                 "the same runs, which favours it: a real win of a core "
                 "method is conservative, a real loss slightly overstated.)\n\n"
                 f"{paired_markdown(rows, core, bench.min_seeds)}\n\n"
                 "Means (SOPs vs best: the core method's effective SOPs over the baseline's):\n\n"
                 f"{standing(rows, core, bench.min_seeds)}\n")
    (out / "results.md").write_text(text)
    plots = plot(rows, out, bench.layer_plots, core)
    return {"csv": str(out / "results.csv"), "md": str(out / "results.md"), "plots": plots}


def plot(rows: list[dict], out: Path, layer_plots: list[float] | None = None,
         core_names: tuple[str, ...] = CORE_METHODS) -> list[str]:
    """Accuracy vs connectivity and vs effective SOPs (mean ± std over the seeds on target, both axes), and
    per-layer connectivity bars (Agg canvas, no pyplot)."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows_on = [r for r in rows if r["on_target"]]
    groups = _groups(rows_on)
    dense = [r for r in rows_on if r["method"] == "dense"]
    methods = list(dict.fromkeys(r["method"] for r in rows_on if r["method"] != "dense"))
    paths = []
    for key, fname, xlabel, scale in (("connectivity", "acc_vs_connectivity.png", "connectivity %", 100),
                                      ("sops", "acc_vs_sops.png", "effective SOPs / sample", 1)):
        fig = Figure(figsize=(7.2, 4.8))
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        core = {r["method"] for r in rows_on if r.get("method_name") in core_names}
        colors = matplotlib.colormaps["tab20"].colors  # more methods than tab10 has colours
        for i, m in enumerate(methods):
            pts = sorted((*_mean_std([r[key] * scale for r in rs]), *_mean_std([100 * r["accuracy"] for r in rs]))
                         for (mm, _), rs in groups.items() if mm == m)
            xs, xe, ys, es = zip(*pts)
            ax.errorbar(xs, ys, xerr=xe, yerr=es, capsize=3, label=m,
                        color=colors[(2 * i) % 20 + (2 * i) // 20 % 2],
                        marker="D" if m in core else "o", lw=2.2 if m in core else 1.0,
                        ms=7 if m in core else 4, zorder=3 if m in core else 2)
        if dense:
            acc, sd = _mean_std([100 * r["accuracy"] for r in dense])
            ax.axhline(acc, color="k", ls="--", lw=1)
            if sd:
                ax.axhspan(acc - sd, acc + sd, color="k", alpha=0.08)
            ax.plot([statistics.mean(r[key] for r in dense) * scale], [acc], "k*", ms=14, label="dense")
        if rows_on and all(r[key] > 0 for r in rows_on):
            ax.set_xscale("log")
        ax.set_xlabel(xlabel + " (log)" if ax.get_xscale() == "log" else xlabel)
        ax.set_ylabel("test accuracy % (mean ± std over seeds)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        paths.append(str(out / fname))
    targets = sorted({r["target_density"] for r in rows_on if r["target_density"] is not None})
    chosen = [t for t in (layer_plots if layer_plots is not None else targets[:1]) if t in targets]
    if chosen:
        seed = min(r["seed"] for r in rows_on)
        runs_at = {t: [r for r in rows_on if r["target_density"] == t and r["seed"] == seed] for t in chosen}
        chosen = [t for t in chosen if runs_at[t]]
    if chosen:
        fig = Figure(figsize=(max(6.4, 1.2 * len(rows_on[0]["layers"])), 3.2 * len(chosen)))
        FigureCanvasAgg(fig)
        axes = fig.subplots(len(chosen), 1, squeeze=False)[:, 0]
        for ax, t in zip(axes, chosen):
            runs = runs_at[t]
            layers = [lay["name"] for lay in runs[0]["layers"]]
            width = 0.8 / max(1, len(runs))
            for j, r in enumerate(runs):
                conn = {lay["name"]: 100 * lay["connectivity"] for lay in r["layers"]}
                ax.bar([i + j * width for i in range(len(layers))], [conn.get(n, math.nan) for n in layers], width,
                       label=r["method"])
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(layers))], layers, rotation=30, fontsize=7)
            ax.set_ylabel("connectivity %")
            ax.set_title(f"per-layer connectivity at target {100 * t:g}% (seed {seed})", fontsize=9)
            ax.legend(fontsize=7, ncol=3)
        fig.tight_layout()
        fig.savefig(out / "layer_density.png", dpi=120)
        paths.append(str(out / "layer_density.png"))
    return paths


# ------------------------------------------------------------------------------------------ command line
def add_arguments(p) -> None:
    p.add_argument("--config", "-c", required=True, help="bench YAML (see configs/bench/)")
    p.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of every run, e.g. --set train.epochs=2 (applied last)")
    p.add_argument("--only", help="comma-separated method labels to run (dense included as 'dense')")
    p.add_argument("--shard", metavar="K/N", help="run only cells i (0-based, grid order) with i %% N == K-1")
    p.add_argument("--dry-run", action="store_true", help="list the cells and their status, train nothing")
    p.add_argument("--report-only", action="store_true", help="train nothing; write the report of the finished cells")
    p.add_argument("--out-dir", help="where the cells live (OUT/runs/<cell>), instead of the bench's out_dir")
    p.add_argument("--report-dir", help="where the tables and plots go, instead of the bench's report_dir")
    p.add_argument("--copy-to", metavar="DIR",
                   help="copy each finished cell's results.json, config.json, metrics.csv to DIR/runs/<cell>/")
    p.add_argument("--data-root", help="directory holding the dataset files")
    p.add_argument("--note", action="append", default=[], metavar="TEXT",
                   help="a line added to the report's header (e.g. the command that trained the cells)")


def main(args: Any) -> int:
    bench, root = load_bench(args.config)
    if getattr(args, "out_dir", None):
        bench.out_dir = args.out_dir
    if getattr(args, "report_dir", None):
        bench.report_dir = args.report_dir
    overrides = list(args.set) + ([f"data.root={json.dumps(str(args.data_root))}"] if args.data_root else [])
    only = [s.strip() for s in args.only.split(",")] if args.only else None
    header = None
    if getattr(args, "note", None):
        from .runs import provenance

        header = provenance() + _cpu_line() + "".join(f"- {n}\n" for n in args.note)
    run_bench(bench, root, overrides, only, dry_run=args.dry_run, shard=parse_shard(getattr(args, "shard", None)),
              report_only=getattr(args, "report_only", False), copy_to=getattr(args, "copy_to", None), header=header)
    return 0
