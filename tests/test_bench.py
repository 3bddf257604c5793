"""`spikeprune bench`: a 2 methods x 2 densities grid on synthetic data (rows, resumability, plots), the bench schema,
and the shipped bench recipes (every cell builds; nothing reads real data)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from spikeprune import bench as B
from spikeprune.cli import main as cli_main
from spikeprune.config import ConfigError, from_dict

ROOT = Path(__file__).resolve().parents[1]
BENCHES = sorted((ROOT / "configs" / "bench").glob("*.yaml"))
TINY = {"seed": 0, "model": {"name": "fc3", "T": 2, "options": {"hidden": [16, 12], "image_size": 8},
                             "neuron": {"type": "lif", "v_threshold": 0.2}},
        "data": {"name": "synthetic", "batch_size": 8, "eval_batch_size": 16,
                 "options": {"n": 16, "in_shape": [1, 8, 8]}},
        "train": {"epochs": 1, "max_steps_per_epoch": 2, "lr": 0.01, "progress": False, "device": "cpu"},
        "measure": {"max_batches": 1}}


def tiny_bench(tmp_path: Path) -> B.BenchConfig:
    return from_dict(B.BenchConfig, {
        "name": "tiny", "recipe": TINY, "out_dir": str(tmp_path / "out"), "densities": [0.5, 0.25], "seeds": [0],
        "methods": [{"name": "gmp", "method": {"name": "magnitude", "update_every": 1}},
                    {"name": "set", "method": {"name": "set"}}]})


def test_bench_grid_rows_resume_and_plots(tmp_path, monkeypatch):
    bench = tiny_bench(tmp_path)
    lines: list[str] = []
    res = B.run_bench(bench, tmp_path, log=lines.append)
    assert res["cells"] == 5 and res["trained"] == 5
    assert [ln for ln in lines if ln.startswith("cell ")][-1].startswith("cell 5/5 done")
    assert any("ETA" in ln for ln in lines)
    out = tmp_path / "out"
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["target_density"]) for r in rows] == [
        ("dense", ""), ("gmp", "0.5"), ("gmp", "0.25"), ("set", "0.5"), ("set", "0.25")]
    assert [r["run"] for r in rows] == ["dense_s0", "gmp_d50_s0", "gmp_d25_s0", "set_d50_s0", "set_d25_s0"]
    for r in rows:
        want = 1.0 if r["method"] == "dense" else float(r["target_density"])
        assert abs(float(r["connectivity"]) - want) <= 0.02
        assert (out / "runs" / r["run"] / "results.json").is_file() and float(r["sops"]) >= 0
    md = (out / "results.md").read_text()
    assert "| gmp | 25 | 1 |" in md and "| dense |  | 1 |" in md
    assert "\n- measure: pooled_spikes=mac (" in md and "the other rule gives the same figures" in md  # fc3: no pooling
    for name in ("acc_vs_connectivity.png", "acc_vs_sops.png", "layer_density.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a second invocation trains nothing
    from spikeprune.train import Trainer

    def refuse(self, *a, **k):
        raise AssertionError("a finished cell was trained again")

    monkeypatch.setattr(Trainer, "fit", refuse)
    bench.report_dir = str(tmp_path / "report")  # tables and plots elsewhere; the runs stay where they are
    res = B.run_bench(bench, tmp_path, log=lambda *a: None)
    assert res["trained"] == 0
    with open(tmp_path / "report" / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 5
    assert (tmp_path / "report" / "acc_vs_sops.png").is_file() and not (tmp_path / "report" / "runs").exists()
    # a cell without results.json is trained again (and only that one)
    monkeypatch.undo()
    (out / "runs" / "set_d25_s0" / "results.json").unlink()
    assert B.run_bench(bench, tmp_path, log=lambda *a: None)["trained"] == 1


def test_bench_schema_errors_name_the_key(tmp_path):
    ok = {"recipe": TINY, "methods": [{"name": "gmp", "method": {"name": "magnitude"}}]}
    for bad, key in (({"methods": [{"name": "gmp", "mehtod": {}}]}, "methods[0].mehtod"),
                     ({"densities": [0.5, 1.5]}, "densities"),
                     ({"methods": [{"name": "a b", "method": {"name": "set"}}]}, "methods[0].name"),
                     ({"methods": [{"name": "x", "method": None}]}, "methods[0].target"),
                     ({"methods": [{"name": "x", "method": {"name": "set"}},
                                   {"name": "x", "method": {"name": "rigl"}, "densities": [0.1]}]}, "methods[1]"),
                     ({"methods": [{"name": "x", "method": {"name": "set"}, "densities": [0.3]}]},
                      "methods[0].densities"),
                     ({"seeds": []}, "seeds")):
        with pytest.raises(ConfigError, match=f"'{key}'".replace("[", r"\[").replace("]", r"\]")):
            from_dict(B.BenchConfig, {**ok, **bad})
    bad_option = [{"name": "gmp", "method": {"name": "magnitude", "scope": "x"}}]
    bench = from_dict(B.BenchConfig, {**ok, "methods": bad_option})
    with pytest.raises(ConfigError, match="bench cell gmp_d50_s0: config key 'method.scope'"):
        B.cells(bench, tmp_path)


def test_bench_maps_targets_and_overrides(tmp_path):
    bench = from_dict(B.BenchConfig, {
        "recipe": TINY, "out_dir": str(tmp_path), "densities": [0.25], "seeds": [1, 2], "dense": False,
        "set": ["train.epochs=3"],
        "methods": [{"name": "dyn", "method": {"name": "dynsnn"}, "target": "method.target_compression",
                     "transform": "sparsity"},
                    {"name": "sca", "method": {"name": "sca"}, "target": "method.keep", "offset": -0.05,
                     "set": ["train.epochs=5"]}]})
    grid = B.cells(bench, tmp_path, overrides=["train.lr=0.5"])
    # seed by seed (the default order): every method's seed 1, then seed 2
    assert [c.name for c in grid] == ["dyn_d25_s1", "sca_d25_s1", "dyn_d25_s2", "sca_d25_s2"]
    assert grid[0].cfg.method["target_compression"] == 0.75 and grid[1].cfg.method["keep"] == 0.2
    assert [c.cfg.seed for c in grid] == [1, 1, 2, 2] and {c.cfg.train.lr for c in grid} == {0.5}
    assert [c.cfg.train.epochs for c in grid] == [3, 5, 3, 5]
    assert grid[0].run_dir == tmp_path / "runs" / "dyn_d25_s1"
    bench.order = "method"
    assert [c.name for c in B.cells(bench, tmp_path)] == ["dyn_d25_s1", "dyn_d25_s2", "sca_d25_s1", "sca_d25_s2"]


def test_bench_recipes_found_and_documented():
    assert {p.stem for p in BENCHES} >= {"fmnist_fc3", "fmnist_convnet", "cifar10_cifarnet", "cifar10_resnet19"}
    for p in BENCHES:
        text = p.read_text()
        assert text.startswith("# ") and "[R]" in text.split("\nname:")[0], p.name
        bench, root = B.load_bench(p)
        assert B.cells(bench, root), p.name  # every cell's run config validates
    bench, root = B.load_bench(ROOT / "configs" / "bench" / "fmnist_fc3.yaml")
    used = {(c.cfg.method or {}).get("name", "dense") for c in B.cells(bench, root)}
    assert used >= {"dense", "magnitude", "lth", "set", "rigl", "deep_r", "grad_r", "stds", "admm", "eslsnn", "upr",
                    "dynsnn", "pq_rewire", "lamp"}
    assert bench.densities == [0.05, 0.02, 0.01] and bench.seeds == [0, 1, 2]


@pytest.mark.parametrize("name", ["fmnist_fc3", "fmnist_convnet", "fmnist_convnet_channels", "fmnist_fc3_pq30",
                                  "fmnist_fc2_dynsnn", "fmnist_convnet_sca_hard30", "fmnist_fc2_narrow"])
def test_fmnist_bench_cells_build(name):
    """Every cell of the Fashion-MNIST benches builds its trainer and method (on synthetic data of the same shape)."""
    from spikeprune.train import Trainer

    bench, root = B.load_bench(ROOT / "configs" / "bench" / f"{name}.yaml")
    data = ["data.name=synthetic", "data.options={n: 4, in_shape: [1, 28, 28]}", "data.batch_size=2",
            "train.device=cpu"]
    for c in B.cells(bench, root, overrides=data):
        Trainer(c.cfg, log=lambda *a: None)


def test_cli_bench_dry_run_lists_cells(capsys, tmp_path):
    src = ROOT / "configs" / "bench" / "fmnist_fc3.yaml"
    text = src.read_text().replace("base: ../fmnist/fc3_dense.yaml", f"base: {ROOT / 'configs/fmnist/fc3_dense.yaml'}")
    path = tmp_path / "fmnist_fc3.yaml"  # the shipped recipe with its runs in tmp_path (the tree may hold real ones)
    path.write_text(text.replace("out_dir: runs/bench/fmnist_fc3", f"out_dir: {tmp_path / 'bench'}"))
    assert cli_main(["bench", "--config", str(path), "--dry-run", "--set", "train.epochs=1"]) == 0
    out = capsys.readouterr().out
    assert "dense_s0" in out and "rigl_d1_s2" in out and "lamp_d5_s0" in out and "pq_rewire_noregrow_d5" not in out
    # 14 labels x 3 targets x 3 seeds, two ablations at 2% x 3 seeds, dense x 3
    assert "135 cells: 0 done, 135 to train" in out and not (tmp_path / "bench").exists()
    lines = [ln for ln in out.splitlines() if ln.startswith("[")]
    assert lines[0].split()[1] == "dense_s0" and lines[1].split()[1] == "pq_rewire_d5_s0"  # seed 0 of tier 1 first
    assert lines[13].split()[1] == "dense_s1"  # tier 1 (dense, pq, dynsnn, gmp, lamp) seed by seed
    assert lines[39].split()[1] == "magnitude_oneshot_d5_s0" and lines[-1].split()[1] == "lth_d1_s2"
    assert cli_main(["bench", "--config", str(src), "--dry-run", "--only", "rigl,dense"]) == 0
    assert "12 cells" in capsys.readouterr().out
    assert cli_main(["bench", "--config", str(src), "--dry-run", "--only", "rigl,dense", "--shard", "2/5"]) == 0
    assert "3 cells" in capsys.readouterr().out  # cells 1, 6, 11 of the 12
    assert cli_main(["bench", "--config", str(tmp_path / "missing.yaml")]) == 2


def _row(method, name, d, acc, conn, sops, seed=0):
    return {"method": method, "method_name": name, "target_density": d, "seed": seed, "accuracy": acc,
            "connectivity": conn, "measured": conn, "on_target": B.on_target(conn, d), "sops": sops,
            "energy_uj": 1.0, "firing_rate": 0.1, "train_time_s": 1.0, "run": f"{method}_s{seed}"}


def test_standing_compares_core_methods_with_the_best_on_target_baseline():
    from spikeprune.bench import markdown, standing

    rows = [_row("dense", None, None, 0.90, 1.0, 1000.0),
            _row("set", "set", 0.25, 0.880, 0.250, 400.0),
            _row("rigl", "rigl", 0.25, 0.885, 0.255, 500.0),
            _row("admm", "admm", 0.25, 0.899, 0.300, 600.0),  # more accurate but 5 points denser: not counted
            _row("pq_rewire", "pq_rewire", 0.25, 0.889, 0.245, 250.0),
            _row("dynsnn", "dynsnn", 0.25, 0.870, 0.260, 300.0)]
    table = standing(rows).splitlines()
    assert len(table) == 4  # header, rule, one line per core method
    pq = next(line for line in table if "| pq_rewire |" in line)
    cells = [c.strip() for c in pq.strip("|").split("|")]
    assert cells[1] == "rigl" and cells[2] == "88.50"  # the best baseline within ±2 points
    assert cells[8] == "+0.40" and cells[9] == "0.50x"  # 88.9 - 88.5 points; 250 / 500 SOPs
    dyn = next(line for line in table if "| dynsnn |" in line)
    assert "| -1.50 |" in dyn and "| 0.60x |" in dyn
    md = markdown(rows)
    assert "| admm | 25 | 0 of 1 | — |" in md and "admm_s0 measured 30.00% for 25%" in md and "✓ +0.50" in md
