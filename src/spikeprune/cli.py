"""``spikeprune`` command line: train, eval, measure, compact, compare, list."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HELP = """Learn the sparse structure of spiking neural networks during training.

commands:
  train     train a model from a YAML recipe (dense, or compressed with the recipe's `method:`)
  eval      test accuracy of a finished run (RUN_DIR/model.pt)
  measure   accuracy, connectivity, params, effective SOPs, energy and firing rates of a finished run
  compact   build a physically smaller network from a run's channel/neuron masks and compare it
  compare   train several recipes with the same settings and print one results table
  bench     methods x target densities x seeds on one recipe (resumable): tables and plots
  convert   ANN->SNN conversion of a zoo model, accuracy vs T, and DynSNN on the converted SNN
  export    write a finished run as NIR (masks permanent, compacted), safetensors or torch.nn.utils.prune form
  report    HTML + Markdown report of a finished run (plots) or of a benchmark's results.csv (Pareto plots)
  list      list registered models, datasets and methods

Run `spikeprune COMMAND --help` for the options of one command."""


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML recipe (see configs/)")
    p.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=5 --set method.kappa=0.2")
    p.add_argument("--data-root", help="directory holding the dataset files (else SPIKEPRUNE_DATA or defaults)")


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run directory written by `spikeprune train`")
    p.add_argument("--data-root", help="directory holding the dataset files")
    p.add_argument("--max-batches", type=int, default=None, help="measure on the first N test batches only")


def _version() -> str:
    """The installed version, read without importing the package (and torch)."""
    try:
        from importlib.metadata import version

        return version("spikeprune")
    except Exception:  # noqa: BLE001 -- not installed: the source tree's
        import re

        text = (Path(__file__).parent / "__init__.py").read_text()
        m = re.search(r'__version__ = "([^"]+)"', text)
        return m.group(1) if m else "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spikeprune", description=HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"spikeprune {_version()}")
    # the description lists the commands already: no second list under "positional arguments"
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", help=argparse.SUPPRESS)
    p = sub.add_parser("train", help="train a model from a recipe")
    _config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint of the run")
    p = sub.add_parser("eval", help="test accuracy of a finished run")
    _run_args(p)
    p = sub.add_parser("measure", help="connectivity, SOPs, energy and firing rates of a finished run")
    _run_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p = sub.add_parser("compact", help="physically remove dead channels/neurons of a run and compare")
    _run_args(p)
    p.add_argument("--out", help="where to save the compacted model (default RUN_DIR/compact.pt)")
    p = sub.add_parser("compare", help="train several recipes and print one results table")
    p.add_argument("configs", nargs="+", help="YAML recipes; the first one is the baseline for Δ accuracy")
    p.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE",
                   help="override applied to every recipe")
    p.add_argument("--data-root", help="directory holding the dataset files")
    p.add_argument("--out", help="also write the table (Markdown) and rows (CSV) to this path prefix")
    p.add_argument("--reuse", action="store_true",
                   help="skip recipes whose run directory already holds results of the same config")
    p = sub.add_parser("bench", help="methods x target densities x seeds on one recipe, tables and plots")
    from .bench import add_arguments

    add_arguments(p)
    p = sub.add_parser("convert", help="train a ReLU ANN, convert it to an IF SNN, DynSNN on the result")
    _config_args(p)
    p = sub.add_parser("export", help="export a finished run: nir | safetensors | torch-prune")
    _run_args(p)
    p.add_argument("--format", "-f", default="nir", choices=["nir", "safetensors", "torch-prune"])
    p.add_argument("--out", help="output file (default: in RUN_DIR, model.nir / model.safetensors / ...)")
    p.add_argument("--dt", type=float, default=None,
                   help="NIR time step: tau_nir = tau * dt (default: 1, i.e. steps; 1e-4 for the snntorch and "
                        "spikingjelly targets)")
    p.add_argument("--target", default="generic", choices=["generic", "snntorch", "spikingjelly"],
                   help="NIR importer the graph is written for (time constants, dt, node forms); constructs "
                        "it cannot express are refused (default: generic)")
    p = sub.add_parser("report", help="HTML + Markdown report of a run or a benchmark (results.csv)")
    p.add_argument("run_dir", help="a run directory (results.json) or a benchmark directory / results.csv")
    p.add_argument("--out", help="directory for report.html, report.md and report_files/ (default: RUN_DIR)")
    sub.add_parser("list", help="list registered models, datasets and methods")
    return parser


def _load(args) -> object:
    from .config import load_config

    overrides = list(args.set)
    if getattr(args, "data_root", None):
        overrides.append(_root_override(args.data_root))
    return load_config(args.config, overrides)


def _root_override(root: str) -> str:
    """``data.root=...`` with the path quoted: override values are parsed as YAML, and a path such as
    ``/data/a #1``, ``null`` or ``123`` must stay that literal string."""
    return f"data.root={json.dumps(str(root))}"


def run_model(run_dir: str | Path, cfg=None, fold: bool = False):
    """A finished run's network rebuilt from ``config.json`` and ``model.pt``: with its masks (buffers and hooks,
    as trained) or, with ``fold``, the masks folded into the weights (:meth:`MaskEngine.remove`): the same network
    at full width with no mask machinery, e.g. the fair reference for a compacted one's speed."""
    import torch

    from .config import RunConfig, from_dict
    from .data import dataset_info
    from .models import create_model

    rd = Path(run_dir)
    if not (rd / "config.json").is_file() or not (rd / "model.pt").is_file():
        raise FileNotFoundError(f"{rd} is not a finished run (needs config.json and model.pt)")
    if cfg is None:
        cfg = from_dict(RunConfig, json.loads((rd / "config.json").read_text()))
    info, m = dataset_info(cfg.data.name, **cfg.data.options), cfg.model
    model = create_model(m.name, num_classes=info.num_classes, in_channels=info.in_shape[-3], T=m.T,
                         neuron=m.neuron, encoding=m.encoding, **m.options)
    engine = load_masked_state(model, torch.load(rd / "model.pt", map_location="cpu", weights_only=True))
    if fold and engine is not None:
        engine.remove()
    return model


def _load_run(run_dir: str, data_root: str | None):
    """Rebuild a finished run's model (with its masks) and test loader."""
    from .config import RunConfig, from_dict
    from .data import build_loaders

    rd = Path(run_dir)
    if not (rd / "config.json").is_file():
        raise FileNotFoundError(f"{rd} is not a finished run (needs config.json and model.pt)")
    cfg = from_dict(RunConfig, json.loads((rd / "config.json").read_text()))
    d = cfg.data
    _, _, test, _ = build_loaders(d.name, root=data_root or d.root, batch_size=d.batch_size,
                                  eval_batch_size=d.eval_batch_size, seed=cfg.seed, **d.options)
    return cfg, run_model(rd, cfg), test


def load_masked_state(model, state: dict):
    """Load a state dict that may carry ``weight_mask``/``unit_mask`` buffers (re-creating them and the hooks).
    Returns the :class:`MaskEngine` holding them (``None`` for a dense state)."""
    from .sparsity.masks import MaskEngine

    modules = dict(model.named_modules())
    weight_masked = [k[: -len(".weight_mask")] for k in state if k.endswith(".weight_mask")]
    unit_masked = [k[: -len(".unit_mask")] for k in state if k.endswith(".unit_mask")]
    engine = None
    if weight_masked or unit_masked:
        all_syn = [n for n, mm in modules.items() if hasattr(mm, "weight") and n in weight_masked]
        ignored = [n for n, mm in modules.items() if mm.__class__.__name__ in ("Conv2d", "Linear")
                   and n not in all_syn]
        engine = MaskEngine(model, ignored_layers=ignored)
        if unit_masked:
            engine.enable_units(unit_masked)
    model.load_state_dict(state)
    return engine


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        from .checkpoint import CheckpointError
        from .config import ConfigError
        from .train import TrainingError

        known = (ConfigError, FileNotFoundError, CheckpointError, TrainingError, ValueError)
        if isinstance(e, known) and not _debug():
            print(f"spikeprune {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise


def _debug() -> bool:
    import os

    return os.environ.get("SPIKEPRUNE_DEBUG", "") not in ("", "0")


def _dispatch(args) -> int:
    if args.command == "list":
        from .data import list_datasets
        from .models import list_models
        from .sparsity.methods import list_methods

        print("models:  ", ", ".join(list_models()))
        print("datasets:", ", ".join(list_datasets()))
        print("methods: ", ", ".join(list_methods()))
        return 0
    if args.command == "train":
        from .train import Trainer, summary_table

        cfg = _load(args)
        trainer = Trainer(cfg)
        trainer.fit(resume=args.resume)
        from . import dist

        if dist.is_main():
            res = json.loads((cfg.run_dir / "results.json").read_text())
            print(summary_table([res]))
            print(f"\nrun directory: {cfg.run_dir}")
        return 0
    if args.command == "compare":
        return _compare(args)
    if args.command == "bench":
        from .bench import main as bench_main

        return bench_main(args)
    if args.command == "convert":
        from .convert import load_convert_config, run_convert

        overrides = list(args.set) + ([_root_override(args.data_root)] if args.data_root else [])
        run_convert(load_convert_config(args.config, overrides))
        return 0
    if args.command == "report":
        from .report import write_report

        html_path, md_path = write_report(args.run_dir, args.out)
        print(f"wrote {html_path} and {md_path}")
        return 0
    if args.command == "export":
        from .export import export_run

        path, summary = export_run(args.run_dir, args.format, args.out, args.data_root, args.dt, args.target)
        if "weights_before_compaction" in summary:
            before, nz = summary["weights_before_compaction"], summary["nonzero"]
            print(f"wrote {path}: {nz:,} non-zero of {before:,} weights ({100 * nz / max(1, before):.2f}%), "
                  f"{summary['weights_exported']:,} stored after compaction")
        else:
            print(f"wrote {path}")
        return 0
    cfg, model, test = _load_run(args.run_dir, args.data_root)
    if args.command == "eval":
        from .measure import measure

        r = measure(model, test, max_batches=args.max_batches)
        print(f"test accuracy: {100 * r.accuracy:.2f}% ({r.samples} samples)")
        return 0
    if args.command == "measure":
        from .measure import measure

        r = measure(model, test, max_batches=args.max_batches, pj_per_ac=cfg.measure.pj_per_ac,
                    pj_per_mac=cfg.measure.pj_per_mac)
        if args.json:
            print(json.dumps(r.to_dict(), indent=2))
        else:
            print(r.table())
            s = r.summary()
            print(f"\naccuracy {100 * s['accuracy']:.2f}% | connectivity {100 * s['connectivity']:.2f}% | "
                  f"params {s['params']:,} | eff. SOPs {s['sops']:,.0f} | energy {s['energy_uj']:.3f} µJ | "
                  f"firing rate {s['firing_rate']:.4f}")
        return 0
    if args.command == "compact":
        from .compact import compact_report

        print(compact_report(model, test, out=args.out or str(Path(args.run_dir) / "compact.pt"),
                             max_batches=args.max_batches, reference=run_model(args.run_dir, cfg, fold=True)))
        return 0
    raise ValueError(f"unknown command {args.command!r}")


def provenance() -> str:
    """Markdown header: the exact command, the machine and the date (for committed results)."""
    import datetime
    import os
    import platform

    import torch

    cmd = " ".join(["spikeprune", *sys.argv[1:]])
    cpu = platform.processor() or platform.machine()
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    threads = os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads()))
    return (f"- command: `{cmd}`\n- machine: {platform.system()} {cpu}, {os.cpu_count()} cores, {threads} torch "
            f"thread(s), {dev}, torch {torch.__version__}\n- date: {datetime.date.today().isoformat()}\n")


def _finished_with(cfg) -> bool:
    """True if ``cfg.run_dir`` holds results of exactly this config."""
    from .config import to_dict

    rd = cfg.run_dir
    if not (rd / "results.json").is_file() or not (rd / "config.json").is_file():
        return False
    from .config import ConfigError, RunConfig, from_dict

    try:  # normalise through the dataclasses, so fields added since then take their defaults
        old = to_dict(from_dict(RunConfig, json.loads((rd / "config.json").read_text())))
    except ConfigError:
        return False
    return _result_fields(old) == _result_fields(to_dict(cfg))


# train settings that cannot change a run's results (what it prints, how often it checkpoints, the allocator)
_COSMETIC_TRAIN = ("progress", "checkpoint_every", "keep_checkpoints", "keep_freed_memory")


def _result_fields(d: dict) -> dict:
    """A config without the settings that cannot change results (``out_dir`` too: the run dir is what is checked)."""
    d = json.loads(json.dumps(d))
    d.pop("out_dir", None)
    for k in _COSMETIC_TRAIN:
        d.get("train", {}).pop(k, None)
    return d


def _compare(args) -> int:
    from .config import load_config
    from .train import Trainer, summary_table

    rows = []
    for path in args.configs:
        overrides = list(args.set) + ([_root_override(args.data_root)] if args.data_root else [])
        cfg = load_config(path, overrides)
        print(f"== {cfg.name} ({(cfg.method or {}).get('name', 'dense')})", flush=True)
        if not (args.reuse and _finished_with(cfg)):
            Trainer(cfg).fit()
        rows.append(json.loads((cfg.run_dir / "results.json").read_text()))
    table = summary_table(rows, baseline=rows[0])
    print("\n" + table)
    if args.out:
        import csv

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out + ".md").write_text(provenance() + "\n" + table + "\n")
        keys = [k for k in rows[0] if not isinstance(rows[0][k], (list, dict))]
        with open(args.out + ".csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
