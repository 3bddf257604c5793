"""BPTT training with surrogate gradients, checkpoints and resume, DDP, and a final honest measurement.

``Trainer(cfg).fit()`` builds data, model, optimizer and the configured compression method (a callback),
trains, evaluates every epoch, writes ``metrics.jsonl``/``metrics.csv`` and atomic checkpoints to
``cfg.run_dir``, and ends with :func:`spikeprune.measure.measure` on the test set (``results.json``).
"""

from __future__ import annotations

import csv
import json
import math
import random
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import dist
from .callbacks import Callback
from .config import RunConfig, to_dict
from .measure import Measurement, measure


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the message says where the last good state is."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} requested but CUDA is not available")
    return dev


def spike_loss(out: torch.Tensor, y: torch.Tensor, kind: str, num_classes: int, tet_lambda: float = 0.0,
               label_smoothing: float = 0.0) -> torch.Tensor:
    """Loss on per-step outputs ``[T, B, K]``: ``ce`` on the time-mean, ``mse`` of the time-mean (firing rate)
    against one-hot targets, or ``tet`` (mean over steps of per-step CE, plus λ·MSE to 1)."""
    if kind == "ce":
        return F.cross_entropy(out.mean(0), y, label_smoothing=label_smoothing)
    if kind == "mse":
        return F.mse_loss(out.mean(0), F.one_hot(y, num_classes).to(out.dtype))
    if kind == "tet":
        T = out.shape[0]
        ce = F.cross_entropy(out.flatten(0, 1), y.repeat(T), label_smoothing=label_smoothing)
        return (1 - tet_lambda) * ce + (tet_lambda * F.mse_loss(out, torch.ones_like(out)) if tet_lambda else 0)
    raise ValueError(f"loss must be one of ['ce', 'mse', 'tet'], got {kind!r}")


def make_optimizer(params, cfg) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(opt, cfg):
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.epochs))
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma)
    return None


def rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


class Trainer:
    """Trains ``cfg.model`` on ``cfg.data`` with ``cfg.method``; see the module docstring."""

    def __init__(self, cfg: RunConfig, model: nn.Module | None = None, loaders: tuple | None = None,
                 callbacks: list[Callback] | None = None, method: Callback | None = None, log=print):
        self.cfg = cfg
        self.log = log if dist.is_main() else (lambda *a, **k: None)
        dist.init_from_env()
        self.device = pick_device(cfg.train.device)
        if dist.is_dist() and self.device.type == "cuda":
            import os

            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        seed_everything(cfg.seed)
        if loaders is None:
            from .data import build_loaders

            d = cfg.data
            loaders = build_loaders(d.name, root=d.root, batch_size=d.batch_size, eval_batch_size=d.eval_batch_size,
                                    val_split=d.val_split, seed=cfg.seed, download=d.download, subset=d.subset,
                                    rank=dist.rank(), world_size=dist.world_size(), **d.options)
        self.train_loader, self.val_loader, self.test_loader, self.info = loaders
        if model is None:
            from .models import create_model

            m = cfg.model
            model = create_model(m.name, num_classes=self.info.num_classes, in_channels=self.info.in_shape[-3],
                                 T=m.T, neuron=m.neuron, encoding=m.encoding, **m.options)
        self.model = model.to(self.device)
        self.example_input = self._example_input()
        self.optimizer = make_optimizer(self.model.parameters(), cfg.train)
        self.scheduler = make_scheduler(self.optimizer, cfg.train)
        if method is None and cfg.method is not None:
            from .sparsity.methods import create_method

            method = create_method(cfg.method)
        self.method = method
        self.callbacks = [c for c in [*(callbacks or []), method] if c is not None]
        amp = cfg.train.amp == "on" or (cfg.train.amp == "auto" and self.device.type == "cuda")
        self.amp = amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if self.amp else None
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.history: list[dict] = []
        self.run_dir = Path(cfg.run_dir)
        for c in self.callbacks:
            c.setup(self)
        self.ddp = None
        if dist.is_dist():
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    # ------------------------------------------------------------------------------------ helpers
    def _example_input(self) -> torch.Tensor:
        x, _ = next(iter(self.test_loader))
        return x[:2].to(self.device)

    @property
    def net(self) -> nn.Module:
        """The module to call in training (DDP wrapper under torchrun)."""
        return self.ddp if self.ddp is not None else self.model

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.float16) if self.amp else nullcontext()

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "callbacks": [c.state_dict() for c in self.callbacks], "rng": rng_state(),
                "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                "history": self.history, "config": to_dict(self.cfg)}

    def load_state(self, st: dict) -> None:
        self.model.load_state_dict(st["model"])
        self.optimizer.load_state_dict(st["optimizer"])
        if self.scheduler and st.get("scheduler"):
            self.scheduler.load_state_dict(st["scheduler"])
        if self.scaler and st.get("scaler"):
            self.scaler.load_state_dict(st["scaler"])
        for c, s in zip(self.callbacks, st.get("callbacks", [])):
            c.load_state_dict(s)
        if self.method is not None and getattr(self.method, "engine", None) is not None:
            self.method.engine.reattach()
        set_rng_state(st["rng"])
        self.epoch, self.step_in_epoch = st["epoch"], st["step_in_epoch"]
        self.global_step, self.history = st["global_step"], st["history"]

    def save(self) -> None:
        if dist.is_main():
            try:
                ckpt.save_rotating(self.state(), self.run_dir, self.global_step, self.cfg.train.keep_checkpoints)
            except OSError as e:  # e.g. disk full: keep the previous checkpoint and say so
                self.log(f"warning: could not write a checkpoint ({e.strerror}); the previous one is kept")

    def resume(self) -> bool:
        """Load the newest good checkpoint of this run, if any. Returns True if resumed."""
        if not ckpt.list_checkpoints(self.run_dir):
            return False
        st, path = ckpt.load_latest(self.run_dir, map_location=self.device, warn=self.log)
        self.load_state(st)
        self.log(f"resumed from {path} (epoch {self.epoch}, step {self.step_in_epoch} of it)")
        return True

    # ---------------------------------------------------------------------------------- training
    def train_epoch(self) -> dict:
        cfg = self.cfg.train
        self.net.train()
        loader = self.train_loader
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(self.epoch)
        n_batches = len(loader) if cfg.max_steps_per_epoch is None else min(len(loader), cfg.max_steps_per_epoch)
        tot_loss = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        seen = 0
        skip = self.step_in_epoch
        bar = tqdm(total=n_batches, initial=skip, desc=f"epoch {self.epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not (cfg.progress and dist.is_main() and sys.stderr.isatty()), dynamic_ncols=True)
        for i, (x, y) in enumerate(loader):
            if i >= n_batches:
                break
            if i < skip:
                continue
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with self._autocast():
                out = self.net(x)
                loss = spike_loss(out.float(), y, cfg.loss, self.info.num_classes, cfg.tet_lambda,
                                  cfg.label_smoothing)
            if not torch.isfinite(loss):
                raise TrainingError(f"loss became {loss.item()} at epoch {self.epoch + 1}, step {i + 1}; "
                                    f"last good checkpoint is in {self.run_dir} (lower train.lr or enable "
                                    "train.grad_clip)")
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler:
                self.scaler.scale(loss).backward()
                if cfg.grad_clip:
                    self.scaler.unscale_(self.optimizer)
                    nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                if cfg.grad_clip:
                    nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                self.optimizer.step()
            self.global_step += 1
            self.step_in_epoch = i + 1
            for c in self.callbacks:
                c.on_step_end(self)
            tot_loss += loss.detach() * x.shape[0]
            correct += (out.detach().mean(0).argmax(-1) == y).sum()
            seen += x.shape[0]
            bar.update(1)
            if cfg.checkpoint_every and self.global_step % cfg.checkpoint_every == 0:
                self.save()
        bar.close()
        seen = max(seen, 1)
        return {"train_loss": float(tot_loss) / seen, "train_acc": float(correct) / seen}

    @torch.no_grad()
    def evaluate(self, loader) -> float:
        """Top-1 accuracy on ``loader`` (gathered over ranks)."""
        self.model.eval()
        stats = torch.zeros(2, device=self.device, dtype=torch.float64)
        for x, y in loader:
            x, y = x.to(self.device), y.to(self.device)
            with self._autocast():
                out = self.model(x)
            stats[0] += (out.float().mean(0).argmax(-1) == y).sum()
            stats[1] += y.numel()
        self.model.train()
        return float(stats[0] / stats[1].clamp_min(1))

    def fit(self, resume: bool = False) -> Measurement:
        """Train all epochs (continuing a checkpoint when ``resume``), then measure on the test set."""
        cfg = self.cfg.train
        resumed = self.resume() if resume else False
        if dist.is_main():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(to_dict(self.cfg), indent=2))
        if not resumed:
            for c in self.callbacks:
                c.on_train_start(self)
        old_handler = signal.getsignal(signal.SIGINT)
        try:
            while self.epoch < cfg.epochs:
                for c in self.callbacks:
                    if self.step_in_epoch == 0:
                        c.on_epoch_start(self)
                t0 = time.perf_counter()
                metrics = {"epoch": self.epoch + 1, "lr": self.optimizer.param_groups[0]["lr"]}
                metrics.update(self.train_epoch())
                metrics["epoch_time_s"] = time.perf_counter() - t0
                if self.val_loader is not None:
                    metrics["val_acc"] = self.evaluate(self.val_loader)
                metrics["test_acc"] = self.evaluate(self.test_loader)
                for c in self.callbacks:
                    c.on_epoch_end(self, metrics)
                for c in self.callbacks:
                    metrics.update(c.epoch_metrics(self))
                if self.scheduler:
                    self.scheduler.step()
                self.epoch += 1
                self.step_in_epoch = 0
                self.history.append(metrics)
                self._log_epoch(metrics)
                self.save()
        except KeyboardInterrupt:
            self.save()
            self.log(f"interrupted: state saved in {self.run_dir}; continue with --resume")
            raise
        finally:
            signal.signal(signal.SIGINT, old_handler)
        for c in self.callbacks:
            c.on_train_end(self)
        return self.final_measurement()

    def final_measurement(self) -> Measurement:
        m = self.cfg.measure
        engine = getattr(self.method, "engine", None)
        prunable = list(engine.layers) if engine is not None and engine.layers else None
        result = measure(self.model, self.test_loader, self.device, m.max_batches, m.pj_per_ac, m.pj_per_mac,
                         prunable=prunable, unit_rates=True)
        if dist.is_main():
            out = {"name": self.cfg.name, "model": self.cfg.model.name, "dataset": self.cfg.data.name,
                   "T": self.cfg.model.T, "method": (self.cfg.method or {}).get("name", "dense"),
                   "epochs": self.epoch, "train_time_s": sum(h.get("epoch_time_s", 0) for h in self.history),
                   **result.to_dict()}
            if self.method is not None and hasattr(self.method, "summary"):
                out["method_summary"] = self.method.summary()
            (self.run_dir / "results.json").write_text(json.dumps(_jsonable(out), indent=2))
            torch.save(self.model.state_dict(), self.run_dir / "model.pt")
        return result

    def _log_epoch(self, metrics: dict) -> None:
        if not dist.is_main():
            return
        parts = [f"epoch {metrics['epoch']}/{self.cfg.train.epochs}", f"loss {metrics['train_loss']:.4f}",
                 f"train {100 * metrics['train_acc']:.2f}%"]
        if "val_acc" in metrics:
            parts.append(f"val {100 * metrics['val_acc']:.2f}%")
        parts.append(f"test {100 * metrics['test_acc']:.2f}%")
        if "density" in metrics:
            parts.append(f"density {100 * metrics['density']:.2f}%")
        parts.append(f"{metrics['epoch_time_s']:.1f}s")
        self.log(" | ".join(parts))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(_jsonable(metrics)) + "\n")
        keys: list[str] = []
        for h in self.history:
            keys += [k for k in h if k not in keys and not isinstance(h[k], (list, dict))]
        with open(self.run_dir / "metrics.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
            w.writeheader()
            w.writerows(self.history)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def summary_table(rows: list[dict], baseline: dict | None = None) -> str:
    """Markdown results table (accuracy, Δ vs baseline, connectivity, params, effective SOPs, energy, rate)."""
    head = ("| run | method | acc. % | Δ acc. | conn. % | params | eff. SOPs/sample | dense SOPs | energy µJ | "
            "firing rate | time s |")
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        d = "" if baseline is None else f"{100 * (r['accuracy'] - baseline['accuracy']):+.2f}"
        lines.append(f"| {r.get('name', '')} | {r.get('method', '')} | {100 * r['accuracy']:.2f} | {d} | "
                     f"{100 * r['connectivity']:.2f} | {r['params']:,} | {r['sops']:,.0f} | "
                     f"{r['dense_sops']:,.0f} | {r['energy_uj']:.3f} | {r['firing_rate']:.4f} | "
                     f"{r.get('train_time_s', 0):.0f} |")
    return "\n".join(lines)
