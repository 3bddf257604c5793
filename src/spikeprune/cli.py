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
  reproduce list the papers' table rows with their recipes, or run one and print the paper's number beside ours
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
    p.add_argument("--max-batches", type=_positive_int, default=None, metavar="N",
                   help="measure on the first N test batches only (N >= 1)")


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _version() -> str:
    """The package's version (``_version`` imports nothing, so ``--version`` does not wait for torch)."""
    from ._version import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spikeprune", description=HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"spikeprune {_version()}")
    # the description lists the commands already: no second list under "positional arguments"
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", help=argparse.SUPPRESS)
    p = sub.add_parser("train", help="train a model from a recipe")
    _config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint of the run")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a run directory that holds a run (its run files are deleted)")
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
    p.add_argument("--overwrite", action="store_true",
                   help="train recipes whose run directory holds another run afresh (its run files are deleted)")
    p = sub.add_parser("bench", help="methods x target densities x seeds on one recipe, tables and plots")
    from .bench import add_arguments

    add_arguments(p)
    p = sub.add_parser("convert", help="train a ReLU ANN, convert it to an IF SNN, DynSNN on the result")
    _config_args(p)
    p.add_argument("--overwrite", action="store_true", help="run again in a directory holding a finished conversion")
    p = sub.add_parser("reproduce", help="list the papers' table rows, or run one beside the paper's number")
    p.add_argument("row", nargs="?", help="a row id from the list (no id: list the rows)")
    p.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value")
    p.add_argument("--data-root", help="directory holding the dataset files")
    p.add_argument("--overwrite", action="store_true", help="run again in a run directory that holds a run")
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
    except Exception as e:  # noqa: BLE001 -- every failure becomes one line; SPIKEPRUNE_DEBUG=1 shows the traceback
        if _debug():
            raise
        code, msg = _explain(e)
        print(f"spikeprune {args.command}: error: {msg}", file=sys.stderr)
        return code


def _explain(e: BaseException) -> tuple[int, str]:
    """Exit code and message for a failure: 2 for what bad input, files or storage cause (the message says what
    and where), 1 for anything else (an internal error: the message says how to see the traceback)."""
    import pickle

    from .checkpoint import CheckpointError
    from .runs import RunError

    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError) and e.strerror:
        where = f" {e.filename}" if e.filename else ""
        return 2, f"{e.strerror}{':' if where else ''}{where}"
    if isinstance(e, MemoryError):
        return 2, "out of memory (lower data.batch_size, model.T or the model's width)"
    if isinstance(e, RecursionError):
        return 2, "input nested too deeply"
    if isinstance(e, ImportError):
        return 2, str(e).splitlines()[0] if str(e) else "a needed package is not installed"
    if isinstance(e, (ValueError, FileNotFoundError, CheckpointError, RunError, pickle.UnpicklingError,
                      OSError, KeyError)) or type(e).__name__ in ("TrainingError", "MaskDivergenceError"):
        return 2, str(e) or type(e).__name__
    first = str(e).splitlines()[0][:300] if str(e) else ""
    return 1, (f"internal error ({type(e).__name__}: {first}); run again with SPIKEPRUNE_DEBUG=1 for the "
               "traceback and report it")


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
        if args.resume and args.overwrite:
            raise ValueError("--resume and --overwrite contradict each other: choose one")
        trainer = Trainer(cfg)
        trainer.fit(resume=args.resume, overwrite=args.overwrite)
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
        run_convert(load_convert_config(args.config, overrides), overwrite=args.overwrite)
        return 0
    if args.command == "reproduce":
        from . import reproduce

        if not args.row:
            print(reproduce.table())
            return 0
        overrides = list(args.set) + ([_root_override(args.data_root)] if args.data_root else [])
        print(reproduce.comparison(reproduce.run(args.row, overrides, overwrite=args.overwrite)))
        return 0
    if args.command in ("report", "export", "compact"):  # refuse a read-only or full target before any work
        from .runs import check_writable

        rd = Path(args.run_dir)
        target = Path(args.out).parent if args.command != "report" and args.out else Path(args.out or rd)
        if args.command == "report" and not args.out and rd.is_file():
            target = rd.parent
        if target.exists() or rd.exists():
            check_writable(target, "the output directory")
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
    from .runs import load_run, run_model

    cfg, model, test = load_run(args.run_dir, args.data_root)
    if args.command == "eval":
        from .measure import measure

        r = measure(model, test, max_batches=args.max_batches)
        print(f"test accuracy: {100 * r.accuracy:.2f}% ({r.samples} samples)")
        return 0
    if args.command == "measure":
        from .measure import measure

        r = measure(model, test, max_batches=args.max_batches, pj_per_ac=cfg.measure.pj_per_ac,
                    pj_per_mac=cfg.measure.pj_per_mac, pooled_spikes=cfg.measure.pooled_spikes)
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


def _compare(args) -> int:
    """Validate every recipe and check every run directory first, then train: a bad last recipe or a run
    directory that holds another run stops the command before any training."""
    from .config import load_config
    from .runs import finished_with, run_files
    from .train import Trainer, summary_table

    overrides = list(args.set) + ([_root_override(args.data_root)] if args.data_root else [])
    cfgs = [load_config(path, overrides) for path in args.configs]
    seen: dict = {}
    for path, cfg in zip(args.configs, cfgs):
        rd = cfg.run_dir.resolve()
        if rd in seen:
            raise ValueError(f"{path} and {seen[rd]} both write to {cfg.run_dir}: give them different names")
        seen[rd] = path
    reuse = [bool(args.reuse and finished_with(cfg)) for cfg in cfgs]
    if not args.overwrite:
        busy = [str(cfg.run_dir) for cfg, r in zip(cfgs, reuse) if not r and run_files(cfg.run_dir)]
        if busy:
            raise ValueError(f"run directories already hold runs: {', '.join(busy)}; use --reuse to keep finished "
                             "runs of the same recipe, or --overwrite to train them again")
    rows = []
    for cfg, skip in zip(cfgs, reuse):
        print(f"== {cfg.name} ({(cfg.method or {}).get('name', 'dense')})", flush=True)
        if not skip:
            Trainer(cfg).fit(overwrite=args.overwrite)
        rows.append(json.loads((cfg.run_dir / "results.json").read_text()))
    table = summary_table(rows, baseline=rows[0])
    print("\n" + table)
    if args.out:
        import csv
        import io

        from .checkpoint import atomic_write
        from .runs import provenance

        atomic_write(args.out + ".md", (provenance() + "\n" + table + "\n").encode())
        keys = [k for k in rows[0] if not isinstance(rows[0][k], (list, dict))]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        atomic_write(args.out + ".csv", buf.getvalue().encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
