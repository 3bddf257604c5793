"""Run configuration: the dataclasses of a training recipe, loaded from YAML with strict keys and types.

``load_config("recipe.yaml", overrides=["train.lr=0.01"])`` returns a :class:`RunConfig`. An unknown key, a
value of the wrong type or out of range raises :class:`ConfigError` naming the dotted key and what is allowed.
Method options live under ``method:`` and are checked against the method's own config dataclass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .schema import (  # noqa: F401  (re-exported: the names recipes and tests import from here)
    MAX_CONFIG_BYTES,
    ConfigError,
    _check,
    _finite,
    apply_overrides,
    check_name,
    from_dict,
    is_device,
    jsonable,
    read_yaml,
    to_dict,
)

MAX_T = 10_000  # time steps: beyond this a [T, B, ...] tensor of even a small net fills any memory
# keyword arguments the trainer passes to every model factory itself: model.options must not repeat them
MODEL_ARGS = ("num_classes", "in_channels", "T", "neuron", "encoding")


@dataclass
class ModelConfig:
    name: str = "fc3"
    T: int = 4
    neuron: dict = field(default_factory=lambda: {"type": "lif"})
    encoding: Literal["direct", "rate", "events"] = "direct"
    options: dict = field(default_factory=dict)  # extra keyword arguments of the model factory

    def validate(self, key: str) -> None:
        _check(1 <= self.T <= MAX_T, f"{key}.T", f"must be in [1, {MAX_T}], got {self.T}")
        for k in self.options:
            _check(k not in MODEL_ARGS, f"{key}.options.{k}",
                   f"is set by the trainer (from model.{k} or the dataset); remove it from model.options")
        _finite(self.neuron, f"{key}.neuron")
        _finite(self.options, f"{key}.options")
        from .neurons import make_neuron

        try:  # neuron options are checked now, not when the model is built
            make_neuron(self.neuron)
        except ValueError as e:
            raise ConfigError(f"config key '{key}.neuron' is invalid: {e}") from None


@dataclass
class DataConfig:
    name: str = "fashion_mnist"
    root: str | None = None
    batch_size: int = 128
    eval_batch_size: int = 512
    val_split: float = 0.0
    subset: int | None = None
    download: bool = False
    augment: dict = field(default_factory=dict)  # training-batch augmentation: crop, flip, roll, rotate, cutout
    options: dict = field(default_factory=dict)

    def validate(self, key: str) -> None:
        from .data.augment import AugmentSpec

        try:
            AugmentSpec.parse(self.augment, f"{key}.augment")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        _check(self.batch_size >= 1, f"{key}.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.eval_batch_size >= 1, f"{key}.eval_batch_size", f"must be >= 1, got {self.eval_batch_size}")
        _check(0.0 <= self.val_split < 1.0, f"{key}.val_split", f"must be in [0, 1), got {self.val_split}")
        _check(self.subset is None or self.subset >= 1, f"{key}.subset", "must be >= 1 or null")
        _finite(self.options, f"{key}.options")


@dataclass
class TrainConfig:
    epochs: int = 10
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    scheduler: Literal["cosine", "step", "none"] = "cosine"
    step_size: int = 30
    gamma: float = 0.1
    loss: Literal["ce", "mse", "tet"] = "ce"
    tet_lambda: float = 0.0
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    amp: Literal["auto", "on", "off"] = "auto"
    device: str = "auto"
    checkpoint_every: int = 0  # also save every N steps inside an epoch (0: only at epoch ends)
    keep_checkpoints: int = 2
    progress: bool = True
    tensorboard: bool = False  # scalars + histograms (firing rates, densities) in RUN_DIR/tb; needs tensorboard
    log_every: int = 0  # progress when stderr is not a terminal: a line every N steps (0: about 10 per epoch)
    max_steps_per_epoch: int | None = None  # cut epochs short (smoke tests)
    sync_bn: bool = False  # under DDP: BatchNorm batch statistics over all ranks (docs/ddp.md)
    keep_freed_memory: bool = True  # CPU: glibc malloc reuses freed blocks instead of faulting in new pages (perf.py)
    fused_optimizer: bool = True  # PyTorch's fused optimizer kernels where they take the params (train.py)

    def validate(self, key: str) -> None:
        _check(self.epochs >= 0, f"{key}.epochs", f"must be >= 0, got {self.epochs}")
        _check(self.lr > 0, f"{key}.lr", f"must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, f"{key}.weight_decay", "must be >= 0")
        _check(0 <= self.momentum < 1, f"{key}.momentum", f"must be in [0, 1), got {self.momentum}")
        _check(self.grad_clip is None or self.grad_clip > 0, f"{key}.grad_clip", "must be > 0 or null")
        _check(0 <= self.label_smoothing < 1, f"{key}.label_smoothing", "must be in [0, 1)")
        _check(self.device == "auto" or is_device(self.device), f"{key}.device",
               f"must be auto, cpu, cuda[:N] or mps, got {self.device!r}")
        _check(self.keep_checkpoints >= 1, f"{key}.keep_checkpoints", "must be >= 1")
        _check(self.step_size >= 1, f"{key}.step_size", f"must be >= 1, got {self.step_size}")
        _check(self.gamma > 0, f"{key}.gamma", f"must be > 0, got {self.gamma}")
        _check(0 <= self.tet_lambda <= 1, f"{key}.tet_lambda", f"must be in [0, 1], got {self.tet_lambda}")
        _check(self.checkpoint_every >= 0, f"{key}.checkpoint_every", f"must be >= 0, got {self.checkpoint_every}")
        _check(self.max_steps_per_epoch is None or self.max_steps_per_epoch >= 1, f"{key}.max_steps_per_epoch",
               "must be >= 1 or null")


@dataclass
class MeasureConfig:
    pj_per_ac: float = 0.9
    pj_per_mac: float = 4.6
    max_batches: int | None = None
    pooled_spikes: Literal["mac", "sop"] = "mac"  # average-pooled spikes into a layer: MACs (NeuroBench) or SOPs (UPR)

    def validate(self, key: str) -> None:
        _check(self.pooled_spikes in ("mac", "sop"), f"{key}.pooled_spikes",
               f"must be 'mac' or 'sop', got {self.pooled_spikes!r}")
        _check(self.pj_per_ac >= 0, f"{key}.pj_per_ac", f"must be >= 0, got {self.pj_per_ac}")
        _check(self.pj_per_mac >= 0, f"{key}.pj_per_mac", f"must be >= 0, got {self.pj_per_mac}")
        _check(self.max_batches is None or self.max_batches >= 1, f"{key}.max_batches", "must be >= 1 or null")


@dataclass
class RunBase:
    """What every run recipe starts with (training, conversion): a plain name, the directory it writes below
    (``out_dir/name``) and its seed."""

    name: str = "run"
    seed: int = 0
    out_dir: str = "runs"

    def validate(self, key: str = "") -> None:
        try:
            check_name(self.name)
        except ValueError as e:
            raise ConfigError(f"config key 'name' {e}") from None
        _check(bool(self.out_dir), "out_dir", "must not be empty")
        _check(abs(self.seed) < 2**63, "seed", f"must fit in 64 bits, got {self.seed}")

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


@dataclass
class RunConfig(RunBase):
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    method: dict | None = None  # {"name": "pq_rewire", ...options}; None trains densely

    def validate(self, key: str = "") -> None:
        super().validate(key)
        if self.method is not None:
            _finite(self.method, "method")
            if "name" not in self.method:
                raise ConfigError("config key 'method.name' is missing (or set method: null for dense training)")
            from .sparsity.methods import method_config

            method_config(self.method)  # raises ConfigError naming the bad option


# ----------------------------------------------------------------------------------------- loading
def load_config(path: str | Path | None = None, overrides: list[str] | None = None, schema: type = None) -> Any:
    """Read a YAML recipe (or defaults when ``path`` is None), apply overrides, and validate it against
    ``schema`` (default :class:`RunConfig`; ``convert`` and ``bench`` recipes pass their own dataclass)."""
    data: dict = {}
    if path is not None:
        data = read_yaml(path)
    data = apply_overrides(data, overrides or [])
    try:
        cfg = from_dict(schema or RunConfig, data)
    except RecursionError:
        raise ConfigError(f"config {path or '<overrides>'} is nested too deeply") from None
    if path is not None and "name" not in data and hasattr(cfg, "name"):
        cfg.name = Path(path).stem
    return cfg


