"""Reports of finished runs and benchmarks: one self-contained HTML page and a Markdown file.

``spikeprune report RUN_DIR`` (or :func:`write_report`) reads what training wrote and draws:

* **a run** (``results.json``, ``metrics.jsonl``, ``config.json``): accuracy and connectivity over training;
  per-layer connectivity and alive neurons/channels; firing-rate histograms per spiking layer (per-unit rates from
  ``results.json``'s ``spiking[].unit_rates``); effective vs dense SOPs and the energy per layer;
* **a benchmark** (a directory with ``results.csv``, one row per cell, or a CSV file): accuracy against
  connectivity and against effective SOPs, one colour per method, with the Pareto front (best accuracy for the
  cost) drawn through the non-dominated cells.

The HTML embeds its images (base64 PNG) and needs nothing else; the Markdown links the same PNGs, written to
``report_files/`` beside it. Plots use matplotlib's Agg canvas directly (no pyplot state, no backend change).
TensorBoard logging during training is not part of this module.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .measure import rule_note

__all__ = ["write_report", "run_report", "bench_report", "Report", "pareto_front"]

_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]


@dataclass
class Report:
    """A report being built: a title, sections of Markdown-ish blocks, and named figures (PNG bytes)."""

    title: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)  # ("h2"|"p"|"table"|"img"|"pre", payload)
    images: dict[str, bytes] = field(default_factory=dict)

    def h2(self, text: str) -> None:
        self.blocks.append(("h2", text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def pre(self, text: str) -> None:
        self.blocks.append(("pre", text))

    def table(self, header: list[str], rows: list[list[Any]], align: str | None = None) -> None:
        self.blocks.append(("table", (header, rows, align or "l" + "r" * (len(header) - 1))))

    def figure(self, name: str, fig, caption: str = "") -> None:
        self.images[name] = _png(fig)
        self.blocks.append(("img", (name, caption)))

    # --------------------------------------------------------------------------------------- output
    def markdown(self, assets: str = "report_files") -> str:
        out = [f"# {self.title}", ""]
        for kind, val in self.blocks:
            if kind == "h2":
                out += [f"## {val}", ""]
            elif kind == "p":
                out += [val, ""]
            elif kind == "pre":
                out += ["```", val, "```", ""]
            elif kind == "table":
                header, rows, align = val
                out.append("| " + " | ".join(header) + " |")
                out.append("|" + "|".join("---:" if a == "r" else "---" for a in align) + "|")
                out += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]
                out.append("")
            elif kind == "img":
                name, caption = val
                out += [f"![{name}]({assets}/{name}.png)", ""]
                if caption:
                    out += [f"*{caption}*", ""]
        return "\n".join(out)

    def html(self) -> str:
        e = html.escape
        body = [f"<h1>{e(self.title)}</h1>"]
        for kind, val in self.blocks:
            if kind == "h2":
                body.append(f"<h2>{e(val)}</h2>")
            elif kind == "p":
                body.append(f"<p>{_inline(val)}</p>")
            elif kind == "pre":
                body.append(f"<pre>{e(val)}</pre>")
            elif kind == "table":
                header, rows, align = val
                cls = lambda i, align=align: ' class="num"' if align[i] == "r" else ""  # noqa: E731
                head = "".join(f"<th{cls(i)}>{e(h)}</th>" for i, h in enumerate(header))
                trs = "".join("<tr>" + "".join(f"<td{cls(i)}>{_inline(_cell(c))}</td>" for i, c in enumerate(r))
                              + "</tr>" for r in rows)
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>")
            elif kind == "img":
                name, caption = val
                b64 = base64.b64encode(self.images[name]).decode()
                cap = f"<figcaption>{e(caption)}</figcaption>" if caption else ""
                body.append(f'<figure><img alt="{e(name)}" src="data:image/png;base64,{b64}">{cap}</figure>')
        return _PAGE.format(title=e(self.title), body="\n".join(body))

    def write(self, out_dir: str | Path, stem: str = "report") -> tuple[Path, Path]:
        """Write ``<stem>.html`` (self-contained), ``<stem>.md`` and ``<stem>_files/*.png``; returns the two paths."""
        out = Path(out_dir)
        assets = out / f"{stem}_files"
        assets.mkdir(parents=True, exist_ok=True)
        for name, data in self.images.items():
            (assets / f"{name}.png").write_bytes(data)
        html_path, md_path = out / f"{stem}.html", out / f"{stem}.md"
        html_path.write_text(self.html(), encoding="utf-8")
        md_path.write_text(self.markdown(assets.name), encoding="utf-8")
        return html_path, md_path


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font-family: -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; color: #222;
       max-width: 1100px; margin: 24px auto; padding: 0 20px; line-height: 1.45; }}
h1 {{ font-size: 1.7em; border-bottom: 2px solid #1f77b4; padding-bottom: 6px; }}
h2 {{ font-size: 1.25em; margin-top: 1.6em; color: #1f4e79; }}
table {{ border-collapse: collapse; margin: 8px 0 16px; font-size: 0.92em; }}
th, td {{ border: 1px solid #d0d7de; padding: 4px 10px; }}
th {{ background: #f3f6f9; text-align: left; }}
td.num, th.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
tr:nth-child(even) td {{ background: #fafbfc; }}
figure {{ margin: 10px 0 18px; }}
figure img {{ width: 100%; height: auto; border: 1px solid #e5e8eb; }}
figcaption {{ font-size: 0.88em; color: #555; margin-top: 4px; }}
pre {{ background: #f6f8fa; padding: 10px; overflow-x: auto; font-size: 0.85em; }}
code {{ background: #f3f3f3; padding: 0 3px; }}
</style></head>
<body>
{body}
<p style="color:#888;font-size:0.8em;margin-top:2em">generated by spikeprune report</p>
</body></html>
"""


def _inline(text: str) -> str:
    """Escape, then render ``code`` and **bold** spans."""
    s = html.escape(str(text))
    parts = s.split("`")
    s = "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
    parts = s.split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:,.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


# ------------------------------------------------------------------------------------------------ plots
def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _style(ax) -> None:
    ax.grid(True, alpha=0.3)
    for s in ("top", "right"):
        ax.spines[s].set_visible(False)


def _training_figure(hist: list[dict]):
    from matplotlib.ticker import MaxNLocator

    fig = _figure(10, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    ep = [h.get("epoch", i + 1) for i, h in enumerate(hist)]
    for key, label, style in (("train_acc", "train", "--"), ("val_acc", "validation", "-."), ("test_acc", "test", "-")):
        ys = [h.get(key) for h in hist]
        if any(y is not None for y in ys):
            ax.plot(ep, [100 * y if y is not None else math.nan for y in ys], style, marker="o", ms=3,
                    label=f"{label} accuracy")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    _style(ax)
    handles, labels = ax.get_legend_handles_labels()
    dens = [h.get("density") for h in hist]
    if any(d is not None for d in dens):
        ax2 = ax.twinx()
        ax2.plot(ep, [100 * d if d is not None else math.nan for d in dens], color="#d62728", marker="s", ms=3,
                 label="connectivity (density)")
        units = [(h.get("units_alive"), h.get("units")) for h in hist]
        if any(a is not None and u for a, u in units):
            ax2.plot(ep, [100 * a / u if a is not None and u else math.nan for a, u in units], color="#9467bd",
                     marker="^", ms=3, ls=":", label="neurons/channels alive")
        ax2.set_ylabel("% of weights / units")
        ax2.set_ylim(0, 105)
        ax2.spines["top"].set_visible(False)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize=8, ncol=len(labels),
              frameon=False)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("accuracy and connectivity over training")
    return fig


def _layers_figure(layers: list[dict], spiking: list[dict]):
    fig = _figure(10, 3.6)
    ax = fig.add_subplot(1, 2, 1)
    names = [l["name"] for l in layers]
    conn = [100 * l.get("connectivity", l["nonzero"] / max(1, l["weights"])) for l in layers]
    bars = ax.bar(range(len(names)), conn, color="#1f77b4")
    for b, l in zip(bars, layers):
        ax.annotate(f"{l['nonzero']:,}\n/{l['weights']:,}", (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("connectivity (% non-zero weights)")
    ax.set_ylim(0, 118)
    ax.set_title("per-layer density")
    _style(ax)
    ax = fig.add_subplot(1, 2, 2)
    names = [s["name"] for s in spiking]
    units = [s["units"] for s in spiking]
    alive = [s["alive"] for s in spiking]
    x = range(len(names))
    ax.bar(x, units, color="#d9d9d9", label="units")
    bars = ax.bar(x, alive, color="#2ca02c", label="alive")
    for b, a, u in zip(bars, alive, units):
        ax.annotate(f"{a}/{u}", (b.get_x() + b.get_width() / 2, u), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("neurons / channels")
    ax.set_title("alive neurons / channels per spiking layer")
    ax.legend(fontsize=8)
    _style(ax)
    fig.tight_layout()
    return fig


def _firing_figure(spiking: list[dict]):
    layers = [s for s in spiking if s.get("unit_rates")]
    n = len(layers)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig = _figure(10, 2.7 * rows)
    for i, s in enumerate(layers):
        ax = fig.add_subplot(rows, cols, i + 1)
        r = s["unit_rates"]
        hi = max(max(r), 1e-3)
        ax.hist(r, bins=min(40, max(5, len(r) // 4)), range=(0, hi), color=_COLORS[i % len(_COLORS)], alpha=0.85)
        silent = sum(1 for v in r if v == 0)
        ax.set_title(f"{s['name']}: mean {s.get('firing_rate', sum(r) / len(r)):.3f}, {silent}/{len(r)} silent",
                     fontsize=9)
        ax.set_xlabel("firing rate (spikes / step)", fontsize=8)
        ax.set_ylabel("units", fontsize=8)
        ax.tick_params(labelsize=7)
        _style(ax)
    fig.tight_layout()
    return fig


def _energy_figure(layers: list[dict], pj_ac: float, pj_mac: float):
    fig = _figure(10, 3.6)
    names = [l["name"] for l in layers]
    x = list(range(len(names)))
    ax = fig.add_subplot(1, 2, 1)
    w = 0.4
    eff = [l.get("sops", 0.0) + l.get("macs", 0.0) for l in layers]
    dense = [l.get("dense_sops", 0.0) + (l.get("dense_macs", 0.0) if l.get("input") == "analog" else 0.0)
             for l in layers]
    ax.bar([i - w / 2 for i in x], dense, w, color="#c7c7c7", label="dense (all weights)")
    ax.bar([i + w / 2 for i in x], eff, w, color="#1f77b4", label="effective (non-zero weights)")
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("operations / sample")
    if any(v > 0 for v in eff + dense):
        ax.set_yscale("log")
    ax.set_title("SOPs (spiking input) / MACs (analog input)")
    ax.legend(fontsize=8)
    _style(ax)
    ax = fig.add_subplot(1, 2, 2)
    ac = [pj_ac * l.get("sops", 0.0) * 1e-6 for l in layers]
    mac = [pj_mac * l.get("macs", 0.0) * 1e-6 for l in layers]
    ax.bar(x, mac, color="#ff7f0e", label=f"MACs × {pj_mac} pJ")
    ax.bar(x, ac, bottom=mac, color="#2ca02c", label=f"SOPs × {pj_ac} pJ")
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("energy (µJ / sample)")
    ax.set_title("energy per layer")
    ax.legend(fontsize=8)
    _style(ax)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------- runs
def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written
                continue
    return out


def run_report(run_dir: str | Path) -> Report:
    """Build the report of one finished run directory."""
    rd = Path(run_dir)
    res_path = rd / "results.json"
    if not res_path.is_file():
        raise FileNotFoundError(f"{rd} has no results.json (is the run finished?)")
    from .runs import read_json

    res = read_json(res_path)
    hist = [h for h in _read_jsonl(rd / "metrics.jsonl") if isinstance(h, dict)]
    cfg = read_json(rd / "config.json") if (rd / "config.json").is_file() else {}
    method = res.get("method", "dense")
    rep = Report(f"spikeprune run: {res.get('name', rd.name)}")
    rep.p(f"**model** `{res.get('model', '?')}` (T={res.get('T', '?')}) · **dataset** `{res.get('dataset', '?')}` · "
          f"**method** `{method}` · **epochs** {res.get('epochs', len(hist))} · "
          f"**training time** {res.get('train_time_s', 0):.0f} s · run directory `{rd}`")
    acc = res.get("accuracy")
    rep.table(["accuracy", "connectivity", "non-zero params", "eff. SOPs / sample", "dense SOPs / sample",
               "MACs / sample", "energy µJ / sample", "firing rate", "neurons alive"],
              [[f"{100 * acc:.2f}%" if acc is not None else "-", f"{100 * res.get('connectivity', 0):.2f}%",
                res.get("params"), res.get("sops"), res.get("dense_sops"), res.get("macs"), res.get("energy_uj"),
                res.get("firing_rate"), f"{res.get('neurons_alive', 0):,} / {res.get('neurons', 0):,}"]], "r" * 9)
    rep.p(rule_note([res]))
    if hist:
        rep.h2("Training")
        rep.figure("training", _training_figure(hist), "accuracy per epoch (left axis); connectivity of the "
                   "prunable weights and the fraction of alive neurons/channels (right axis)")
    layers, spiking = res.get("layers", []), res.get("spiking", [])
    if layers or spiking:
        rep.h2("Layers")
        rep.figure("layers", _layers_figure(layers, spiking), "left: non-zero / all weights of every synaptic "
                   "layer (connection masks and dead units folded in); right: alive neurons (FC) or channels (conv)")
        rep.table(["layer", "kind", "input", "connectivity", "non-zero", "weights", "eff. SOPs", "dense SOPs",
                   "MACs", "input rate"],
                  [[l["name"], l.get("kind", ""), l.get("input", ""), f"{100 * l.get('connectivity', 0):.2f}%",
                    l.get("nonzero"), l.get("weights"), l.get("sops"), l.get("dense_sops"), l.get("macs"),
                    l.get("in_rate")] for l in layers], "lllrrrrrrr")
    if any(s.get("unit_rates") for s in spiking):
        rep.h2("Firing rates")
        rep.figure("firing_rates", _firing_figure(spiking), "per-unit firing rate on the test set (spikes per "
                   "neuron and step, averaged over positions for conv channels); masked units are silent")
        rep.table(["spiking layer", "alive / units", "firing rate"],
                  [[s["name"], f"{s['alive']} / {s['units']}", s.get("firing_rate")] for s in spiking], "lrr")
    if layers:
        rep.h2("Operations and energy")
        pj_ac, pj_mac = res.get("pj_per_ac", 0.9), res.get("pj_per_mac", 4.6)
        rep.figure("energy", _energy_figure(layers, pj_ac, pj_mac),
                   f"effective vs dense operations per sample (log scale) and energy = {pj_mac} pJ × MACs + "
                   f"{pj_ac} pJ × SOPs per layer (45 nm figures)")
    summary = res.get("method_summary")
    if summary:
        rep.h2(f"Method: {method}")
        rep.pre(json.dumps(summary, indent=1, default=str)[:4000])
    if cfg:
        rep.h2("Configuration")
        rep.pre(json.dumps({k: cfg[k] for k in ("model", "data", "train", "method") if k in cfg}, indent=1,
                           default=str)[:4000])
    return rep


# ---------------------------------------------------------------------------------------------- benches
_ACC = ("accuracy", "test_acc", "acc")
_CONN = ("connectivity", "density")
_SOPS = ("sops", "eff_sops", "effective_sops")
_GROUP = ("method",)
_LABEL = ("name", "cell", "run")


def _col(row: dict, keys) -> str | None:
    return next((k for k in keys if k in row and row[k] not in ("", None)), None)


def _num(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points ``(cost, accuracy)`` no other point beats (lower or equal cost and higher or equal
    accuracy, one of them strictly), sorted by cost."""
    idx = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in idx:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def _pareto_figure(rows: list[dict], xkey: str, xlabel: str, accuracy: str, group: str | None, log: bool):
    fig = _figure(5, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    pts = [(_num(r.get(xkey)), _num(r.get(accuracy)), r) for r in rows]
    pts = [(x * (100 if xkey in _CONN else 1), 100 * a, r) for x, a, r in pts if x is not None and a is not None]
    groups = sorted({str(r.get(group, "")) for _, _, r in pts}) if group else [""]
    for gi, g in enumerate(groups):
        sel = [(x, a) for x, a, r in pts if not group or str(r.get(group, "")) == g]
        ax.scatter([p[0] for p in sel], [p[1] for p in sel], s=28, color=_COLORS[gi % len(_COLORS)], label=g or None,
                   zorder=3, edgecolors="white", linewidths=0.5)
    front = pareto_front([(x, a) for x, a, _ in pts])
    if front:
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], color="#444", lw=1, ls="--", zorder=2,
                label="Pareto front", drawstyle="steps-post")
    if log and pts and min(p[0] for p in pts) > 0:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    _style(ax)
    ax.legend(fontsize=7, loc="lower right")
    return fig


def bench_report(path: str | Path) -> Report:
    """Build the report of a benchmark: a ``results.csv`` (or a directory holding one), one row per cell."""
    p = Path(path)
    csv_path = p / "results.csv" if p.is_dir() else p
    if not csv_path.is_file():
        raise FileNotFoundError(f"no results.csv in {p}")
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{csv_path} has no rows")
    acc = _col(rows[0], _ACC)
    if acc is None:
        raise ValueError(f"{csv_path} has no accuracy column (one of {list(_ACC)})")
    conn, sops = _col(rows[0], _CONN), _col(rows[0], _SOPS)
    group, label = _col(rows[0], _GROUP), _col(rows[0], _LABEL)
    rep = Report(f"spikeprune benchmark: {csv_path.parent.name if p.is_dir() else csv_path.stem}")
    rep.p(f"{len(rows)} cells from `{csv_path}`" + (f", grouped by `{group}`" if group else ""))
    rep.h2("Accuracy against cost")
    if conn:
        rep.figure("pareto_connectivity", _pareto_figure(rows, conn, "connectivity (% non-zero weights)", acc, group,
                                                         log=False),
                   "accuracy vs connectivity; the dashed line joins the cells no other cell beats")
    if sops:
        rep.figure("pareto_sops", _pareto_figure(rows, sops, "effective SOPs / sample", acc, group, log=True),
                   "accuracy vs effective synaptic operations per sample (log scale)")
    cols = [c for c in (label, group, acc, conn, sops, "energy_uj", "firing_rate", "params", "train_time_s")
            if c and c in rows[0]]
    seen = []
    for c in cols:
        if c not in seen:
            seen.append(c)
    order = sorted(rows, key=lambda r: -(_num(r.get(acc)) or 0))
    table = []
    for r in order:
        line = []
        for c in seen:
            v = _num(r.get(c))
            if c in (acc, conn) and v is not None:
                line.append(f"{100 * v:.2f}%")
            else:
                line.append(v if v is not None else r.get(c, ""))
        table.append(line)
    rep.table(seen, table, "".join("l" if c in (label, group) else "r" for c in seen))
    return rep


def write_report(path: str | Path, out_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` for a run directory (``results.json``) or a benchmark
    (``results.csv`` in the directory, or the CSV itself). Returns the two paths."""
    p = Path(path)
    if p.is_dir() and (p / "results.json").is_file():
        rep = run_report(p)
    elif (p.is_dir() and (p / "results.csv").is_file()) or (p.is_file() and p.suffix == ".csv"):
        rep = bench_report(p)
    else:
        raise FileNotFoundError(f"{p} holds neither a finished run (results.json) nor a benchmark (results.csv)")
    return rep.write(out_dir or (p if p.is_dir() else p.parent))
