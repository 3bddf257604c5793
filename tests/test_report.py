"""`spikeprune report`: HTML (images inline) and Markdown reports of runs and benchmarks."""

import base64
import csv
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from spikeprune.report import bench_report, pareto_front, write_report

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from spikeprune import Trainer, load_config

    out = tmp_path_factory.mktemp("runs")
    cfg = load_config(None, [
        "name=tiny", f"out_dir={out}", "data.name=synthetic", "data.options={n: 64, in_shape: [1, 8, 8]}",
        "data.batch_size=16", "model.name=fc3", "model.options={hidden: [32, 24], image_size: 8}",
        "model.neuron={type: lif, v_threshold: 0.2}", "train.epochs=3", "train.lr=0.01", "train.progress=false",
        "train.device=cpu", "method={name: dynsnn, warmup_epochs: 1, update_every: 2, kappa: 0.6}"])
    Trainer(cfg, log=lambda *a, **k: None).fit()
    return out / "tiny"


@pytest.fixture(scope="module")
def report(run_dir, tmp_path_factory):
    return write_report(run_dir, tmp_path_factory.mktemp("rep"))


def _images(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def test_run_report(report):
    html_path, md_path = report
    html = html_path.read_text()
    imgs = _images(html)
    assert len(imgs) == 4 and all(b.startswith(b"\x89PNG\r\n\x1a\n") and len(b) > 5000 for b in imgs)
    for title in ("Training", "Layers", "Firing rates", "Operations and energy", "Method: dynsnn"):
        assert f"<h2>{title}</h2>" in html
    assert "src=\"http" not in html and "<script" not in html  # self-contained
    assert "body.3" in html and "kappa" in html
    md = md_path.read_text()
    linked = re.findall(r"\]\((report_files/[a-z_]+\.png)\)", md)
    assert len(linked) == 4 and all((md_path.parent / p).is_file() for p in linked)
    assert "| layer | kind | input | connectivity |" in md
    rule = "measure: pooled_spikes=mac (average-pooled spikes into a layer count as MACs"
    assert rule in md and rule in html


def test_report_cli_writes_into_the_run(run_dir):
    from spikeprune.cli import main

    assert main(["report", str(run_dir)]) == 0
    assert (run_dir / "report.html").is_file() and (run_dir / "report.md").is_file()
    assert main(["report", str(run_dir.parent / "missing")]) == 2


def test_pareto_front():
    pts = [(0.5, 0.90), (0.2, 0.85), (0.3, 0.80), (0.1, 0.70), (0.6, 0.89), (0.2, 0.86)]
    assert pareto_front(pts) == [3, 5, 0]


def test_bench_report(tmp_path):
    rows = []
    for i, (method, conn, sops, acc) in enumerate([("dense", 1.0, 5e5, 0.90), ("dynsnn", 0.4, 2e5, 0.88),
                                                    ("dynsnn", 0.3, 1.5e5, 0.86), ("pq_rewire", 0.35, 3e5, 0.87),
                                                    ("pq_rewire", 0.2, 1e5, 0.80)]):
        rows.append({"name": f"cell{i}", "method": method, "accuracy": acc, "connectivity": conn, "sops": sops,
                     "energy_uj": sops * 0.9e-6})
    with open(tmp_path / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    html_path, md_path = write_report(tmp_path)
    html = html_path.read_text()
    assert len(_images(html)) == 2 and "pareto_connectivity" in html and "pareto_sops" in html
    assert html.index("cell0") < html.index("cell1") < html.index("cell4")  # sorted by accuracy
    rep = bench_report(tmp_path / "results.csv")
    assert set(rep.images) == {"pareto_connectivity", "pareto_sops"}


def _shoot(page: Path, png: Path, size: str = "1000x7000") -> "np.ndarray":
    """Render ``page`` with headless Chromium (benchmarks/render_report.sh) and return the RGB pixels."""
    import numpy as np
    from PIL import Image

    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "render_report.sh"), str(page), str(png), size],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    assert png.read_bytes().startswith(b"\x89PNG")
    return np.asarray(Image.open(png).convert("RGB")).astype(np.int16)


def _bands(rows: "np.ndarray", gap: int = 40) -> list[tuple[int, int]]:
    """Runs of True in ``rows`` (row indices ``[start, end)``), runs closer than ``gap`` merged (a figure's legend
    sits a few pixels below its axes; captions keep figures > 100 px apart)."""
    bands: list[list[int]] = []
    for i in np.flatnonzero(rows):
        if bands and i - bands[-1][1] <= gap:
            bands[-1][1] = i + 1
        else:
            bands.append([int(i), int(i) + 1])
    return [(a, b) for a, b in bands]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium (.ci/run installs it)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    """The report of a short run, rendered headless, shows every figure: the page is rendered twice, as is and with
    everything but the images invisible (same layout), which tells where each figure sits; each of those regions
    must hold a plot (not blank, many colours) and look the same in the real page."""
    html = report[0].read_text()
    n_figures = len(_images(html))
    only = tmp_path / "figures_only.html"
    only.write_text(html.replace("</head>", "<style>body *:not(img) { color: transparent !important; "
                                 "background: transparent !important; border-color: transparent !important; } "
                                 "img { border-color: transparent !important; }</style></head>"))
    page = _shoot(report[0], tmp_path / "page.png")
    figs = _shoot(only, tmp_path / "figures.png")
    assert page.shape == figs.shape
    ink = (255 - figs).max(axis=2) > 24  # not (near-)white
    bands = _bands(ink.any(axis=1))
    assert len(bands) == n_figures == 4, bands
    assert bands[-1][1] < figs.shape[0] - 10  # the last figure is whole (the window is taller than the page)
    for top, bottom in bands:
        cols = np.flatnonzero(ink[top:bottom].any(axis=0))
        left, right = int(cols[0]), int(cols[-1]) + 1
        assert bottom - top > 150 and right - left > 400, (top, bottom, left, right)  # a figure, not a text line
        region = page[top:bottom, left:right]
        assert ((255 - region).max(axis=2) > 24).mean() > 0.02  # something drawn in the real page there
        colours = {tuple(c) for c in region[::4, ::4].reshape(-1, 3).tolist()}
        assert len(colours) > 20  # axes, labels, bars/lines: a plot, not a flat box
        assert np.abs(region - figs[top:bottom, left:right]).mean() < 8  # the same picture in both renders
