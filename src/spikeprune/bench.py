"""``spikeprune bench``: methods × target densities × seeds over one model/dataset recipe, on one harness.

A bench YAML (schema :class:`BenchConfig`, validated like the run configs) names a base run recipe, the target
densities, the seeds and the methods; each method maps the target to its own option (``target``, e.g.
``method.target_density``; ``transform: sparsity`` passes ``1 − d``, e.g. DynSNN's ``target_compression``). Every
cell is an ordinary run in ``OUT/runs/<method>_d<pct>_s<seed>``; a cell is finished when its run directory holds
``results.json``, so a second invocation skips it (a cell with checkpoints but no results resumes). All numbers come
from each run's own final measurement (connectivity from the weights, effective SOPs). Outputs in ``OUT``:
``results.csv`` (one row per cell), ``results.md`` (mean ± std over seeds, Δ vs dense), ``acc_vs_connectivity.png``,
``acc_vs_sops.png`` (one line per method, the dense baseline as a star and a dashed line) and ``layer_density.png``
(per-layer connectivity of every method at the densities in ``layer_plots``, first seed).
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

    def validate(self, key: str) -> None:
        k = f"{key}." if key else ""
        _check(bool(self.densities), f"{k}densities", "must not be empty")
        for d in self.densities:
            _check(0 < d <= 1, f"{k}densities", f"must be in (0, 1], got {d}")
        _check(bool(self.seeds), f"{k}seeds", "must not be empty")
        _check(bool(self.methods) or self.dense, f"{k}methods", "must not be empty")
        seen: set = set()  # a label may repeat with other settings at other densities
        for i, m in enumerate(self.methods):
            _check(m.name != "dense", f"{k}methods[{i}].name", "must not be 'dense' (the baseline's label)")
            for d in m.densities or self.densities:
                _check(d in self.densities, f"{k}methods[{i}].densities", f"{d} is not one of densities")
                _check((m.name, d) not in seen, f"{k}methods[{i}]", f"repeats {m.name!r} at density {d}")
                seen.add((m.name, d))


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' {msg}")


@dataclass
class Cell:
    method: str  # bench label
    density: float | None  # target (None: dense)
    seed: int
    cfg: RunConfig

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


def cells(bench: BenchConfig, root: Path = Path("."), overrides: list[str] | None = None,
          only: list[str] | None = None) -> list[Cell]:
    """Every cell of the grid with its validated run config (dense cells first, then method by method)."""
    base = _base_recipe(bench, root)
    out_dir = Path(bench.out_dir) / "runs"
    plan: list[tuple[BenchMethod | None, float | None, int]] = []
    if bench.dense and (not only or "dense" in only):
        plan += [(None, None, s) for s in bench.seeds]
    for m in bench.methods:
        if only and m.name not in only:
            continue
        plan += [(m, d, s) for d in bench.densities if m.densities is None or d in m.densities for s in bench.seeds]
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
        result.append(Cell(m.name if m else "dense", d, seed, cfg))
    return result


# ------------------------------------------------------------------------------------------ running
def _fmt_time(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def run_bench(bench: BenchConfig, root: Path = Path("."), overrides: list[str] | None = None,
              only: list[str] | None = None, dry_run: bool = False, log=print) -> dict:
    """Train every unfinished cell, then write the tables and plots. Returns counts and the output paths."""
    grid = cells(bench, root, overrides, only)
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
    from .train import Trainer

    times: list[float] = []
    for i, c in enumerate(grid, 1):
        if c.finished:
            _warn_if_changed(c, log)
            log(f"cell {i}/{len(grid)} done ({c.name}, finished earlier)")
            continue
        log(f"== cell {i}/{len(grid)}: {c.name}")
        t0 = time.perf_counter()
        # a cell with checkpoints continues; one without (never started, or stopped before its first checkpoint)
        # starts afresh in its own directory, which only the bench writes
        from .checkpoint import list_checkpoints

        partial = bool(list_checkpoints(c.run_dir))
        Trainer(c.cfg, log=log).fit(resume=partial, overwrite=not partial)
        times.append(time.perf_counter() - t0)
        left = len(todo) - len(times)
        res = json.loads((c.run_dir / "results.json").read_text())
        log(f"cell {i}/{len(grid)} done ({c.name}: acc {100 * res['accuracy']:.2f}%, conn "
            f"{100 * res['connectivity']:.2f}%, {_fmt_time(times[-1])}), ETA {_fmt_time(statistics.mean(times) * left)}"
            f" for {left} more")
    from .runs import provenance

    paths = write_report(bench, grid, out, provenance())
    log(f"bench {bench.name}: {len(times)} cells trained, {len(grid) - len(times)} skipped; results in {out}")
    return {"cells": len(grid), "trained": len(times), "todo": 0, **paths}


def _warn_if_changed(c: Cell, log) -> None:
    p = c.run_dir / "config.json"
    if p.is_file() and json.loads(p.read_text()) != json.loads(json.dumps(to_dict(c.cfg), default=str)):
        log(f"warning: {c.name} finished with a different config; delete {c.run_dir} to train it again")


# ------------------------------------------------------------------------------------------ reporting
COLUMNS = ["method", "method_name", "target_density", "seed", "accuracy", "connectivity", "params", "sops",
           "dense_sops", "macs", "energy_uj", "firing_rate", "neurons_alive", "neurons", "train_time_s", "epochs",
           "run"]


def collect(grid: list[Cell]) -> list[dict]:
    rows = []
    for c in grid:
        if not c.finished:
            continue
        r = json.loads((c.run_dir / "results.json").read_text())
        rows.append({**{k: r.get(k) for k in COLUMNS}, "method": c.method, "method_name": r.get("method"),
                     "target_density": c.density, "seed": c.seed, "run": c.name, "layers": r.get("layers", [])})
    return rows


def _groups(rows: list[dict]) -> dict[tuple[str, float | None], list[dict]]:
    g: dict[tuple[str, float | None], list[dict]] = {}
    for r in rows:
        g.setdefault((r["method"], r["target_density"]), []).append(r)
    return g


def _mean_std(vals: list[float]) -> tuple[float, float]:
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


TARGET_TOLERANCE = 0.02  # a run is on target when its measured connectivity is within 2 points of the requested one
CORE_METHODS = ("dynsnn", "pq_rewire", "sca")


def markdown(rows: list[dict]) -> str:
    """Mean ± std over seeds per method and target, with Δ accuracy against the dense runs and the measured
    connectivity's distance to the requested one (✓ within ±2 points)."""
    dense = [r["accuracy"] for r in rows if r["method"] == "dense"]
    base = statistics.mean(dense) if dense else None
    lines = ["| method | target % | seeds | acc. % | Δ acc. | conn. % | on target | eff. SOPs/sample | energy µJ | "
             "firing rate | time s |", "|---|---:|---:|---:|---:|---:|:---:|---:|---:|---:|---:|"]
    for (m, d), rs in _groups(rows).items():
        acc, sd = _mean_std([r["accuracy"] for r in rs])
        delta = "" if base is None or m == "dense" else f"{100 * (acc - base):+.2f}"
        conn = statistics.mean(r["connectivity"] for r in rs)
        on = "" if d is None else (f"✓ {100 * (conn - d):+.2f}" if abs(conn - d) <= TARGET_TOLERANCE + 1e-9
                                   else f"✗ {100 * (conn - d):+.2f}")
        lines.append(
            f"| {m} | {'' if d is None else f'{100 * d:g}'} | {len(rs)} | {100 * acc:.2f}"
            f"{f' ± {100 * sd:.2f}' if len(rs) > 1 else ''} | {delta} | "
            f"{100 * conn:.2f} | {on} | "
            f"{statistics.mean(r['sops'] for r in rs):,.0f} | {statistics.mean(r['energy_uj'] for r in rs):.3f} | "
            f"{statistics.mean(r['firing_rate'] for r in rs):.4f} | "
            f"{statistics.mean(r['train_time_s'] or 0 for r in rs):.0f} |")
    return "\n".join(lines)


def standing(rows: list[dict], core: tuple[str, ...] = CORE_METHODS) -> str:
    """Each core method against the most accurate baseline at the same target: Δ accuracy in points and the ratio
    of effective SOPs (< 1: the core method spikes through fewer synapses). Baselines count only where they
    reached their target (±2 points), so a baseline that stayed denser cannot win by it."""
    by = {k: (statistics.mean(r["accuracy"] for r in rs), statistics.mean(r["connectivity"] for r in rs),
              statistics.mean(r["sops"] for r in rs)) for k, rs in _groups(rows).items()}
    targets = sorted({d for (_, d) in by if d is not None}, reverse=True)
    cores = list(dict.fromkeys(r["method"] for r in rows if r.get("method_name") in core))
    lines = ["| target % | best baseline | its acc. % | its conn. % | its SOPs | core method | acc. % | conn. % | "
             "Δ acc. vs best (pts) | SOPs vs best |", "|---:|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for d in targets:
        base = [(m, *v) for (m, dd), v in by.items() if dd == d and m != "dense" and m not in cores
                and abs(v[1] - d) <= TARGET_TOLERANCE + 1e-9]
        if not base:
            continue
        bm, bacc, bconn, bsops = max(base, key=lambda t: t[1])
        for m in cores:
            if (m, d) not in by:
                continue
            acc, conn, sops = by[(m, d)]
            lines.append(f"| {100 * d:g} | {bm} | {100 * bacc:.2f} | {100 * bconn:.2f} | {bsops:,.0f} | {m} | "
                         f"{100 * acc:.2f} | {100 * conn:.2f} | {100 * (acc - bacc):+.2f} | "
                         f"{f'{sops / bsops:.2f}x' if bsops else '-'} |")
    return "\n".join(lines)


def write_report(bench: BenchConfig, grid: list[Cell], out: Path, header: str = "") -> dict:
    out.mkdir(parents=True, exist_ok=True)
    rows = collect(grid)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    text = f"# bench {bench.name}\n\n{header}\n{markdown(rows)}\n"
    if any(r.get("method_name") in CORE_METHODS for r in rows):
        text += ("\n## Core methods against the best baseline at each target\n\n"
                 "Best baseline: the most accurate non-core method whose connectivity is within ±2 points of the "
                 "target. SOPs vs best: the core method's effective SOPs over the baseline's.\n\n"
                 f"{standing(rows)}\n")
    (out / "results.md").write_text(text)
    plots = plot(rows, out, bench.layer_plots)
    return {"csv": str(out / "results.csv"), "md": str(out / "results.md"), "plots": plots}


def plot(rows: list[dict], out: Path, layer_plots: list[float] | None = None) -> list[str]:
    """Accuracy vs connectivity and vs effective SOPs, and per-layer connectivity bars (Agg canvas, no pyplot)."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = _groups(rows)
    dense = [r for r in rows if r["method"] == "dense"]
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"))
    paths = []
    for key, fname, xlabel, scale in (("connectivity", "acc_vs_connectivity.png", "connectivity %", 100),
                                      ("sops", "acc_vs_sops.png", "effective SOPs / sample", 1)):
        fig = Figure(figsize=(6.4, 4.4))
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        core = {r["method"] for r in rows if r.get("method_name") in CORE_METHODS}
        colors = matplotlib.colormaps["tab20"].colors  # more methods than tab10 has colours
        for i, m in enumerate(methods):
            pts = sorted((statistics.mean(r[key] for r in rs) * scale, *_mean_std([100 * r["accuracy"] for r in rs]))
                         for (mm, _), rs in groups.items() if mm == m)
            xs, ys, es = zip(*pts)
            ax.errorbar(xs, ys, yerr=es, capsize=3, label=m, color=colors[(2 * i) % 20 + (2 * i) // 20 % 2],
                        marker="D" if m in core else "o", lw=2.2 if m in core else 1.0,
                        ms=7 if m in core else 4, zorder=3 if m in core else 2)
        if dense:
            acc = statistics.mean(100 * r["accuracy"] for r in dense)
            ax.axhline(acc, color="k", ls="--", lw=1)
            ax.plot([statistics.mean(r[key] for r in dense) * scale], [acc], "k*", ms=14, label="dense")
        if key == "sops" and rows and all(r["sops"] > 0 for r in rows):
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy %")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        paths.append(str(out / fname))
    targets = sorted({r["target_density"] for r in rows if r["target_density"] is not None})
    chosen = [t for t in (layer_plots if layer_plots is not None else targets[:1]) if t in targets]
    if chosen:
        seed = min(r["seed"] for r in rows)
        fig = Figure(figsize=(max(6.4, 1.2 * len(rows[0]["layers"])), 3.2 * len(chosen)))
        FigureCanvasAgg(fig)
        axes = fig.subplots(len(chosen), 1, squeeze=False)[:, 0]
        for ax, t in zip(axes, chosen):
            runs = [r for r in rows if r["target_density"] == t and r["seed"] == seed]
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
    p.add_argument("--dry-run", action="store_true", help="list the cells and their status, train nothing")
    p.add_argument("--data-root", help="directory holding the dataset files")


def main(args: Any) -> int:
    bench, root = load_bench(args.config)
    overrides = list(args.set) + ([f"data.root={json.dumps(str(args.data_root))}"] if args.data_root else [])
    only = [s.strip() for s in args.only.split(",")] if args.only else None
    run_bench(bench, root, overrides, only, dry_run=args.dry_run)
    return 0
