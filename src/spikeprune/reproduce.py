"""``spikeprune reproduce``: every reported table row of the three core papers, its recipe and the paper's number.

``spikeprune reproduce`` lists the rows (:data:`ROWS`); ``spikeprune reproduce ID`` runs one through the normal
paths (:class:`~spikeprune.train.Trainer` for ``configs/paper/`` recipes, :func:`~spikeprune.convert.run_convert`
for the ANN-to-SNN row) and prints the paper's number beside ours. Each recipe's header gives the source of every
setting; the papers' numbers and where they come from are in ``docs/methods.md`` §3, §4.2 and §5.1.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout: recipes live in ROOT/configs

DYNSNN = "Liu et al., ICASSP 2022 (DynSNN), poster MNIST table"
SHEN = "Shen et al., ICLR 2025 (PQ-index rewiring), Table 1 via reviews"
SCA = "Li et al., ICML 2024 (SCA)"


@dataclass(frozen=True)
class Row:
    """One reported result and the recipe meant to reproduce it.

    ``accuracy`` is the paper's top-1 test accuracy in percent (``None``: not retrieved or not a paper row);
    ``sparsity`` is ``(quantity, percent)`` with quantity ``connectivity`` (non-zero prunable weights),
    ``compression`` (removed weights) or ``channels`` (conv channels kept); ``implied`` marks a dense accuracy that
    the paper does not print but that follows from a pruned row and its Δ."""

    id: str
    paper: str
    row: str
    recipe: str
    needs: str
    accuracy: float | None = None
    sparsity: tuple[str, float] | None = None
    implied: bool = False
    dense: str | None = None  # the id of the row's dense baseline
    delta: float | None = None  # the paper's accuracy change against its dense baseline, in points

    @property
    def kind(self) -> str:
        """``convert`` for ``spikeprune convert`` recipes, else ``train``."""
        return "convert" if self.recipe.startswith("configs/convert/") else "train"

    def paper_number(self) -> str:
        delta = "" if self.delta is None else f" (Δ {self.delta:+.2f})"
        if self.accuracy is None:
            if self.sparsity is None:
                return "none (not a paper row, or not retrieved)"
            return f"accuracy not retrieved{delta} at {_sparsity(self.sparsity)}"
        acc = f"{self.accuracy:.2f}%" + (" (implied)" if self.implied else "") + delta
        return acc if self.sparsity is None else f"{acc} at {_sparsity(self.sparsity)}"


def _sparsity(s: tuple[str, float]) -> str:
    what, value = s
    return {"connectivity": f"{value:.2f}% connectivity", "compression": f"{value:.1f}% compression",
            "channels": f"{value:.0f}% of channels"}[what]


_MNIST = "MNIST (CPU is enough)"
_C10 = "CIFAR-10, a GPU"
_C100 = "CIFAR-100, a GPU"
_DVS = "DVS-CIFAR10 (tonic), a GPU"

ROWS: tuple[Row, ...] = (
    # DynSNN: the three MNIST rows of the poster; "3 FC" is Grad R's 784-800-10 net (configs/paper/mnist_fc3_dense.yaml)
    Row("liu2022/mnist-3fc-dense", DYNSNN, "3 FC dense (99.23 + 0.02 = 99.25, as Grad R's row)",
        "configs/paper/mnist_fc3_dense.yaml", _MNIST, 99.25, implied=True),
    Row("liu2022/mnist-3fc-57", DYNSNN, "this work, SNN training, 3 FC", "configs/paper/mnist_fc3_dynsnn_57.yaml",
        _MNIST, 99.23, ("compression", 57.4), delta=-0.02, dense="liu2022/mnist-3fc-dense"),
    Row("liu2022/mnist-3fc-70", DYNSNN, "this work, SNN training, 3 FC", "configs/paper/mnist_fc3_dynsnn_70.yaml",
        _MNIST, 98.98, ("compression", 69.7), delta=-0.27, dense="liu2022/mnist-3fc-dense"),
    Row("liu2022/mnist-lenet-ann2snn", DYNSNN, "this work, ANN-to-SNN, LeNet (dense 99.50 implied)",
        "configs/convert/mnist_lenet5_dynsnn.yaml", _MNIST, 99.15, ("compression", 61.5), delta=-0.35),
    Row("liu2022/mnist-lenet-direct-dense", DYNSNN, "variant: LeNet trained directly, dense",
        "configs/paper/mnist_lenet5_dense.yaml", _MNIST),
    Row("liu2022/mnist-lenet-direct", DYNSNN, "variant: LeNet row's target, directly trained (not the row's pipeline)",
        "configs/paper/mnist_lenet5_dynsnn.yaml", _MNIST, dense="liu2022/mnist-lenet-direct-dense"),
    # Shen et al. (ICLR'25) Table 1
    Row("shen2025/cifar10-resnet19-t2-dense", SHEN, "ResNet19 T=2 dense (92.48 - 1.18)",
        "configs/paper/cifar10_resnet19_dense.yaml", _C10, 91.30, implied=True),
    Row("shen2025/cifar10-resnet19-t2-headline", SHEN, "ResNet19 T=2, headline, best iteration",
        "configs/paper/cifar10_resnet19_pq_headline.yaml", _C10, 92.48, ("connectivity", 40.58), delta=1.18,
        dense="shen2025/cifar10-resnet19-t2-dense"),
    Row("shen2025/cifar10-resnet19-t2-layer", SHEN, "ResNet19 T=2, layer-wise, iteration 4",
        "configs/paper/cifar10_resnet19_pq_layer.yaml", _C10, 92.38, ("connectivity", 29.72),
        dense="shen2025/cifar10-resnet19-t2-dense"),
    Row("shen2025/cifar10-resnet19-t2-neuron", SHEN, "ResNet19 T=2, neuron-wise",
        "configs/paper/cifar10_resnet19_pq_neuron.yaml", _C10, 92.1, ("connectivity", 26.63),
        dense="shen2025/cifar10-resnet19-t2-dense"),
    Row("shen2025/cifar10-resnet19-t2-gradual", SHEN, "ablation: GraduallySparse, iteration 7",
        "configs/paper/cifar10_resnet19_pq_gradual.yaml", _C10, 91.99, dense="shen2025/cifar10-resnet19-t2-dense"),
    Row("shen2025/cifar100-resnet19-t2-dense", SHEN, "ResNet19 T=2 dense, CIFAR-100 (70.3 - 1.07)",
        "configs/paper/cifar100_resnet19_dense.yaml", _C100, 69.23, implied=True),
    Row("shen2025/cifar100-resnet19-t2-layer", SHEN, "ResNet19 T=2, CIFAR-100",
        "configs/paper/cifar100_resnet19_pq_layer.yaml", _C100, 70.3, ("connectivity", 29.48), delta=1.07,
        dense="shen2025/cifar100-resnet19-t2-dense"),
    Row("shen2025/dvscifar10-vggsnn-dense", SHEN, "VGGSNN T=10 dense, DVS-CIFAR10 (78.4 - 0.08)",
        "configs/paper/dvscifar10_vggsnn_dense.yaml", _DVS, 78.32, implied=True),
    Row("shen2025/dvscifar10-vggsnn-layer", SHEN, "VGGSNN T=10, DVS-CIFAR10",
        "configs/paper/dvscifar10_vggsnn_pq_layer.yaml", _DVS, 78.4, ("connectivity", 30.0), delta=0.08,
        dense="shen2025/dvscifar10-vggsnn-dense"),
    # SCA (ICML'24): only the headline was retrieved; the other recipes are variants without a paper number
    Row("li2024/cifar10-vgg16bn-dense", SCA, "VGG-16-BN dense", "configs/paper/cifar10_vgg16bn_dense.yaml", _C10),
    Row("li2024/cifar10-vgg16bn-c20", SCA, "headline: about 2 points lost retaining 20% of channels (VGG-16-BN)",
        "configs/paper/cifar10_vgg16bn_sca.yaml", _C10, None, ("channels", 20.0), delta=-2.0,
        dense="li2024/cifar10-vgg16bn-dense"),
    Row("li2024/cifar10-cifarnet-dense", SCA, "variant: cifarnet stand-in, dense",
        "configs/paper/cifar10_vgg_dense.yaml", _C10),
    Row("li2024/cifar10-cifarnet-sca", SCA, "variant: cifarnet stand-in for VGG-16-BN (no paper number)",
        "configs/paper/cifar10_vgg_sca.yaml", _C10, dense="li2024/cifar10-cifarnet-dense"),
    Row("li2024/cifar10-resnet19-dense", SCA, "variant: ResNet19, SCA recipe, dense",
        "configs/paper/cifar10_resnet19_t4_dense.yaml", _C10),
    Row("li2024/cifar10-resnet19-sca", SCA, "ResNet (rows not retrieved): ResNet19, SCA recipe",
        "configs/paper/cifar10_resnet19_sca.yaml", _C10, dense="li2024/cifar10-resnet19-dense"),
)
_BY_ID = {r.id: r for r in ROWS}


def get_row(row_id: str) -> Row:
    """The row called ``row_id``; an unknown id is a ``ValueError`` naming the close ones."""
    if row_id in _BY_ID:
        return _BY_ID[row_id]
    import difflib

    close = difflib.get_close_matches(row_id, list(_BY_ID), n=3, cutoff=0.4)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ValueError(f"no paper row {row_id!r}{hint}; `spikeprune reproduce` lists them")


def recipe_path(row: Row, root: str | Path | None = None) -> Path:
    """The recipe file of ``row`` in the checkout (``root``: another checkout)."""
    path = Path(root or ROOT) / row.recipe
    if not path.is_file():
        raise FileNotFoundError(f"recipe {row.recipe} of {row.id} not found under {Path(root or ROOT)}: "
                                "`spikeprune reproduce` runs from a source checkout (the recipes are not installed)")
    return path


def table(rows: Sequence[Row] = ROWS) -> str:
    """The rows as a Markdown table: id, paper, table row, the paper's number, recipe, what it needs."""
    lines = ["| id | paper | table row | paper's number | recipe | needs |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.id} | {r.paper} | {r.row} | {r.paper_number()} | {r.recipe} | {r.needs} |")
    return "\n".join(lines)


def load(row: Row, overrides: Sequence[str] = (), root: str | Path | None = None):
    """The row's recipe as its config object (``RunConfig`` or ``ConvertRunConfig``) with ``overrides``."""
    path = recipe_path(row, root)
    if row.kind == "convert":
        from .convert import load_convert_config

        return load_convert_config(path, list(overrides))
    from .config import load_config

    return load_config(path, list(overrides))


def run(row_id: str, overrides: Sequence[str] = (), overwrite: bool = False, root: str | Path | None = None,
        log: Callable[[str], None] | None = None) -> dict:
    """Run one row's recipe (``overrides`` as ``--set`` strings) and return ``{"row", "ours", "results"}``: ours is
    ``{"accuracy": %, quantity: %}`` in the row's terms, from the run's ``results.json``."""
    row = get_row(row_id)
    cfg = load(row, overrides, root)
    if row.kind == "convert":
        from .convert import run_convert

        results = run_convert(cfg, log=log, overwrite=overwrite)
    else:
        from .train import Trainer

        trainer = Trainer(cfg, log=log) if log is not None else Trainer(cfg)
        trainer.fit(overwrite=overwrite)
        results = json.loads((cfg.run_dir / "results.json").read_text())
    recipe_data = load(row, (), root).data.name
    return {"row": row, "ours": ours(row, results), "results": results, "dense": _dense_accuracy(row, cfg, root),
            "dataset": cfg.data.name, "recipe_dataset": recipe_data,
            "overrides": [o for o in overrides if not o.startswith(("data.root=", "out_dir="))]}


def ours(row: Row, results: dict) -> dict:
    """Our accuracy and sparsity (percent) in the row's terms, from a ``results.json`` mapping."""
    out: dict = {}
    if "dynsnn" in results or "ann_accuracy" in results:  # a conversion: the DynSNN SNN at the DynSNN T
        dyn = results.get("dynsnn") or {}
        acc = dyn.get("accuracy", {}).get(str(dyn.get("T"))) if dyn else None
        if acc is not None:
            out["accuracy"] = 100 * acc
        if "measure_compression" in dyn:
            out["compression"] = 100 * dyn["measure_compression"]
        out["converted_snn_accuracy"] = 100 * results.get("snn_accuracy", {}).get(str(dyn.get("T")), float("nan"))
        return out
    out["accuracy"] = 100 * results["accuracy"]
    conn = results.get("connectivity")
    if conn is not None:
        out["connectivity"] = 100 * conn
        out["compression"] = 100 * (1 - conn)
    frac = (results.get("method_summary") or {}).get("channel_fraction")
    if frac is not None:
        out["channels"] = 100 * frac
    for k in ("sops", "dense_sops", "pooled_spikes", "other_rule"):
        if k in results:
            out[k] = results[k]
    return out


def _dense_accuracy(row: Row, cfg, root) -> float | None:
    """Our dense baseline's accuracy (%) when its run exists beside this one (same ``out_dir``), else ``None``."""
    if row.dense is None:
        return None
    try:
        dense_cfg = load(get_row(row.dense), [f"out_dir={json.dumps(str(cfg.out_dir))}"], root)
    except (FileNotFoundError, ValueError):
        return None
    path = Path(dense_cfg.run_dir) / "results.json"
    if not path.is_file():
        return None
    try:
        return 100 * json.loads(path.read_text())["accuracy"]
    except (ValueError, KeyError, TypeError):
        return None


def comparison(outcome: dict) -> str:
    """The paper's number beside ours, as a few lines of text."""
    row, o = outcome["row"], outcome["ours"]
    lines = [f"{row.id}: {row.paper}, {row.row}", f"  paper: {row.paper_number()}"]
    acc = o.get("accuracy")
    ours_txt = "n/a" if acc is None else f"{acc:.2f}%"
    if row.sparsity is not None and row.sparsity[0] in o:
        ours_txt += f" at {_sparsity((row.sparsity[0], o[row.sparsity[0]]))}"
    elif "connectivity" in o:
        ours_txt += f" at {o['connectivity']:.2f}% connectivity"
    lines.append(f"  ours:  {ours_txt}")
    other_data = outcome.get("dataset", outcome.get("recipe_dataset")) != outcome.get("recipe_dataset")
    if outcome.get("overrides"):
        lines.append(f"  overrides: {' '.join(outcome['overrides'])}")
    if other_data:
        lines.append(f"  ours is on {outcome['dataset']}, the paper's on {outcome['recipe_dataset']}: "
                     "no difference is taken")
    elif row.accuracy is not None and acc is not None:
        lines.append(f"  difference (ours - paper): {acc - row.accuracy:+.2f} points")
    if outcome.get("dense") is not None and acc is not None:
        lines.append(f"  Δ vs our dense run ({row.dense}): {acc - outcome['dense']:+.2f} points")
    if "converted_snn_accuracy" in o:
        lines.append(f"  our converted SNN before DynSNN: {o['converted_snn_accuracy']:.2f}%")
    if "sops" in o:
        line = f"  our effective SOPs/sample: {o['sops']:,.0f} (pooled spikes as {o.get('pooled_spikes', 'mac')})"
        other = o.get("other_rule")
        if other:
            line += f"; {other['sops']:,.0f} with pooled spikes as {other['pooled_spikes']}"
        lines.append(line)
    return "\n".join(lines)
