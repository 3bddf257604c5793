"""BPTT training with surrogate gradients, checkpoints and resume, DDP, and a final honest measurement.

``Trainer(cfg).fit()`` builds data, model, optimizer and the configured compression method (a callback),
trains, evaluates every epoch, writes ``metrics.jsonl``/``metrics.csv`` and atomic checkpoints to
``cfg.run_dir``, and ends with :func:`spikeprune.measure.measure` on the test set (``results.json``).

Under ``torchrun`` (``WORLD_SIZE > 1``) the same code trains data-parallel (docs/ddp.md): the model is wrapped in
``DistributedDataParallel`` (gloo on CPU, nccl on GPU); ``data.batch_size`` is the batch of *one process* (the
global batch is ``batch_size × world_size``, and each rank takes every ``world_size``-th sample of the same
shuffled order, so 2 × 64 sees exactly the batches of 1 × 128); BatchNorm statistics span all ranks with
``train.sync_bn`` (else the running statistics are averaged over ranks before each evaluation); evaluation is
sharded over ranks and the counts summed; rank 0 alone logs and writes metrics, checkpoints and results. After
every mask change the ranks compare mask checksums and stop with :class:`MaskDivergenceError` if they differ.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import random
import signal
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint as ckpt
from . import dist
from .callbacks import Callback
from .config import RunConfig, jsonable, to_dict
from .measure import Measurement, measure, rule_note
from .perf import keep_versions
from .progress import progress_bar
from .sparsity.loop import LoopState, loop_field


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the message says where the last good state is."""


class MaskDivergenceError(TrainingError):
    """Under DDP the ranks' masks differ: some statistic or random draw behind a mask decision was rank-local."""


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
    """The run's optimizer; with ``train.fused_optimizer`` PyTorch's fused kernels (one pass per tensor instead of
    one per operation: fc3's Adam step 4x faster on CPU, measured), where this PyTorch has them for these params
    (CPU since 2.4), else the default implementation. Same update rule either way."""
    params = list(params)
    if cfg.optimizer == "sgd":
        cls, kw = torch.optim.SGD, {"momentum": cfg.momentum, "nesterov": cfg.nesterov and cfg.momentum > 0}
    else:
        cls, kw = (torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW), {}
    kw.update(lr=cfg.lr, weight_decay=cfg.weight_decay)
    if getattr(cfg, "fused_optimizer", True):
        try:
            opt = cls(params, fused=True, **kw)
        except (RuntimeError, TypeError, ValueError):  # an older PyTorch, or params its fused kernels cannot take
            pass
        else:
            keep_versions(opt)  # the fused kernels leave the params' version counters as they were
            return opt
    return cls(params, **kw)


def make_scheduler(opt, cfg):
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.epochs))
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma)
    return None


def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    st = {"torch": torch.get_rng_state(), "python": random.getstate(),
          "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    # RNG states must be CPU byte tensors; a checkpoint loaded with map_location="cuda" holds them on the GPU
    torch.set_rng_state(st["torch"].cpu())
    kind, keys, pos, has_gauss, gauss = st["numpy"]
    keys = keys.cpu().numpy() if torch.is_tensor(keys) else np.asarray(keys)
    np.random.set_state((kind, keys.astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in st["cuda"]])


class Trainer:
    """Trains ``cfg.model`` on ``cfg.data`` with ``cfg.method``; see the module docstring."""

    # the loop's counters live in ``self.loop`` (a LoopState, what compression methods read)
    epoch = loop_field("epoch")
    step_in_epoch = loop_field("step_in_epoch")
    global_step = loop_field("step")

    def __init__(self, cfg: RunConfig, model: nn.Module | None = None, loaders: tuple | None = None,
                 callbacks: list[Callback] | None = None, method: Callback | None = None, log=print):
        self.cfg = cfg
        dist.init_from_env()  # first: is_main() below must know this process's rank
        self.log = log if dist.is_main() else (lambda *a, **k: None)
        self.device = pick_device(cfg.train.device)
        if dist.is_dist() and self.device.type == "cuda":
            import os

            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if self.device.type == "cpu" and cfg.train.keep_freed_memory:
            from .perf import keep_freed_memory

            keep_freed_memory()
        seed_everything(cfg.seed)
        if loaders is None:
            from .data import build_loaders
            from .data.augment import make_augment

            d = cfg.data
            loaders = build_loaders(d.name, root=d.root, batch_size=d.batch_size, eval_batch_size=d.eval_batch_size,
                                    val_split=d.val_split, seed=cfg.seed, download=d.download, subset=d.subset,
                                    rank=dist.rank(), world_size=dist.world_size(),
                                    augment=make_augment(d.augment, cfg.seed), **d.options)
        self.train_loader, self.val_loader, self.test_loader, self.info = loaders
        if model is None:
            from .models import create_model

            m = cfg.model
            model = create_model(m.name, num_classes=self.info.num_classes, in_channels=self.info.in_shape[-3],
                                 T=m.T, neuron=m.neuron, encoding=m.encoding, **m.options)
        self.model = model.to(self.device)
        self.sync_bn = bool(getattr(cfg.train, "sync_bn", False)) and dist.world_size() > 1
        if self.sync_bn:  # before the optimizer and the methods see the model (parameters are kept)
            dist.convert_sync_batchnorm(self.model)
        self.example_input = self._example_input()
        self.optimizer = make_optimizer(self.model.parameters(), cfg.train)
        self.scheduler = make_scheduler(self.optimizer, cfg.train)
        if method is None and cfg.method is not None:
            from .sparsity.methods import create_method

            method = create_method(cfg.method)
        self.method = method
        if getattr(cfg.train, "tensorboard", False):
            from .tensorboard import TensorBoardLogger

            callbacks = [*(callbacks or []), TensorBoardLogger()]
        self.callbacks = [c for c in [*(callbacks or []), method] if c is not None]
        amp = cfg.train.amp == "on" or (cfg.train.amp == "auto" and self.device.type == "cuda")
        self.amp = amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if self.amp else None
        n_train = len(self.train_loader)
        cap = cfg.train.max_steps_per_epoch
        self.loop = LoopState(
            model=self.model, optimizer=self.optimizer, example_input=self.example_input,
            steps_per_epoch=max(1, n_train if cap is None else min(n_train, cap)), epochs=cfg.train.epochs,
            seed=cfg.seed, world_size=dist.world_size(), rank=dist.rank(), log=self.log,
            optimizer_factory=functools.partial(make_optimizer, cfg=cfg.train), batches=self.train_loader,
            validation=self.val_loader is not None, scaler=self.scaler)
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.history: list[dict] = []
        self._acc: dict | None = None  # running train loss/accuracy sums of the current epoch (checkpointed)
        self._stop = False  # set by Ctrl-C: stop and save at the next step boundary
        self._stopped_cleanly = False
        self.run_dir = Path(cfg.run_dir)
        for c in self.callbacks:
            c.setup(self.hook_arg(c))
        self._ckpt_acc: dict | None = None
        self.ddp = None
        if dist.is_dist():
            # no buffer broadcast at each forward: masks are equal by construction (and checked), BN running
            # statistics are synchronised by sync_bn or averaged before each evaluation (dist.sync_buffers)
            import inspect

            no_sync = ({"forward_sync_buffers": False}  # torch >= 2.13 name of broadcast_buffers=False
                       if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
                       else {"broadcast_buffers": False})
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None, **no_sync)
            dist.guard_group()  # created now, on every rank at the same point

    # ------------------------------------------------------------------------------------ helpers
    def _example_input(self) -> torch.Tensor:
        for name, loader in (("training", self.train_loader), ("test", self.test_loader)):
            if loader is None or len(loader.dataset) == 0 or len(loader) == 0:
                raise TrainingError(f"the {name} set of {self.cfg.data.name!r} has no samples "
                                    f"(data.subset, data.val_split or the files under data.root)")
        x, _ = next(iter(self.test_loader))
        return x[:2].to(self.device)

    def hook_arg(self, c: Callback):
        """What a callback's hooks receive: the LoopState for methods (``wants_loop_state``), else the trainer."""
        return self.loop if getattr(c, "wants_loop_state", False) else self

    @property
    def net(self) -> nn.Module:
        """The module to call in training (DDP wrapper under torchrun)."""
        return self.ddp if self.ddp is not None else self.model

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.float16) if self.amp else nullcontext()

    # ------------------------------------------------------------------------------ rank consistency
    def _engines(self) -> list:
        return [e for c in self.callbacks if (e := getattr(c, "engine", None)) is not None and e.layers]

    def _mask_versions(self) -> tuple:
        return tuple(getattr(e, "version", 0) for e in self._engines())

    def check_masks(self, where: str) -> None:
        """Under DDP, stop with :class:`MaskDivergenceError` unless every rank holds the same masks (a checksum
        of all connection and unit masks, all-gathered). Called after each mask change and every epoch end."""
        engines = self._engines()
        if not dist.is_dist() or not engines:
            return
        local = torch.cat([e.mask_checksum().detach().double().cpu() for e in engines]).tolist()
        sums = dist.all_gather_object(local, group=dist.guard_group())
        if all(s == sums[0] for s in sums):
            return
        per_layer = {}
        for i, e in enumerate(engines):
            for n, m in [*e.masks().items(), *e.unit_masks().items()]:
                per_layer[f"{i}:{n}"] = (int(m.sum()), hashlib.sha1(m.detach().cpu().numpy().tobytes()).hexdigest())
        layers = dist.all_gather_object(per_layer, group=dist.guard_group())
        bad = [k for k in layers[0] if any(lay.get(k) != layers[0][k] for lay in layers)]
        detail = "; ".join(f"{k.split(':', 1)[1]} (active per rank: {[lay.get(k, (None,))[0] for lay in layers]})"
                           for k in bad[:5]) or "the sets of masks differ"
        raise MaskDivergenceError(
            f"masks differ across the {dist.world_size()} DDP ranks after {where} (epoch {self.epoch + 1}, "
            f"global step {self.global_step}): {detail}. A statistic or random draw behind a mask decision was "
            "rank-local: reduce it over ranks (spikeprune.dist.all_mean) or draw it from the method's generator "
            "(seeded the same on every rank)")

    def _stop_requested(self) -> bool:
        """Ctrl-C seen (on any rank, under DDP: all ranks then stop at the same step boundary)."""
        if not dist.is_dist():
            return self._stop
        flag = torch.tensor([float(self._stop)])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=dist.guard_group())
        self._stop = bool(flag.item())
        return self._stop

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "callbacks": [c.state_dict() for c in self.callbacks],
                "callback_types": [type(c).__name__ for c in self.callbacks], "rng": rng_state(),
                "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                "epoch_acc": self._ckpt_acc if dist.is_dist() else self._acc, "history": self.history,
                "config": to_dict(self.cfg)}

    def load_state(self, st: dict) -> None:
        self.model.load_state_dict(st["model"])
        self.optimizer.load_state_dict(st["optimizer"])
        if self.scheduler and st.get("scheduler"):
            self.scheduler.load_state_dict(st["scheduler"])
        if self.scaler and st.get("scaler"):
            self.scaler.load_state_dict(st["scaler"])
        for c, s in self._callback_states(st):
            if isinstance(s, dict) and torch.is_tensor(s.get("generator")):  # generators take CPU states only
                s = {**s, "generator": s["generator"].cpu()}
            c.load_state_dict(s)
        if self.method is not None and getattr(self.method, "engine", None) is not None:
            self.method.engine.reattach()
        set_rng_state(st["rng"])
        self.epoch, self.step_in_epoch = st["epoch"], st["step_in_epoch"]
        self.global_step, self.history = st["global_step"], st["history"]
        self._acc = st.get("epoch_acc")

    def _callback_states(self, st: dict) -> list[tuple[Callback, Any]]:
        """Pair each callback with its saved state by type, so a resumed run may add or drop callbacks (e.g. a
        logger) without the method's state landing in the wrong one."""
        states, types = st.get("callbacks", []), st.get("callback_types")
        if types is None or len(types) != len(states):  # older checkpoints: by position
            return list(zip(self.callbacks, states))
        pool, pairs = list(zip(types, states)), []
        for c in self.callbacks:
            k = next((i for i, (t, _) in enumerate(pool) if t == type(c).__name__), None)
            if k is None:
                self.log(f"warning: the checkpoint holds no state for callback {type(c).__name__}; it starts fresh")
                continue
            pairs.append((c, pool.pop(k)[1]))
        return pairs

    def _where(self) -> str:
        if self.step_in_epoch == 0:
            return f"at the end of epoch {self.epoch}"
        return f"at epoch {self.epoch + 1}, step {self.step_in_epoch}"

    def _last_good(self) -> str:
        found = ckpt.list_checkpoints(self.run_dir) if dist.is_main() else []
        return f"the last good checkpoint is {found[0]}" if found else f"no checkpoint in {self.run_dir} yet"

    def check_finite(self) -> None:
        """Raise :class:`TrainingError` if a weight or buffer holds NaN/inf (run on every rank)."""
        bad = [n for n, t in [*self.model.named_parameters(), *self.model.named_buffers()]
               if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            raise TrainingError(f"non-finite values in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} "
                                f"{self._where()}; not checkpointing them, {self._last_good()} (lower train.lr "
                                "or enable train.grad_clip)")

    def save(self) -> None:
        """Checkpoint the whole training state (rotating files); refuses non-finite weights (TrainingError)."""
        self.check_finite()  # on every rank, so DDP ranks stop together
        if dist.is_dist():  # this epoch's running sums over all ranks, stored as an even share of each rank
            self._ckpt_acc = None
            if self._acc is not None:
                a = self._acc
                t = dist.all_sum(torch.stack([a["loss"].double(), a["correct"].double(),
                                              torch.tensor(float(a["seen"]), device=self.device).double()]))
                t = t / dist.world_size()
                self._ckpt_acc = {"loss": t[0].float(), "correct": t[1], "seen": float(t[2])}
        err = None
        if dist.is_main():
            try:
                ckpt.save_rotating(self.state(), self.run_dir, self.global_step, self.cfg.train.keep_checkpoints)
            except OSError as e:  # e.g. disk full: stop now, while the newest good checkpoint is recent
                err = f"cannot write a checkpoint in {self.run_dir} ({e.strerror or e}) {self._where()}; "
        self._agree(err, lambda msg: TrainingError(msg + f"{self._last_good()}; free space and continue with "
                                                   "--resume"))

    def _agree(self, err: str | None, make=None) -> None:
        """Raise on every rank when any rank (under DDP: rank 0) saw ``err``; also waits for rank 0."""
        if dist.is_dist():
            errs = [e for e in dist.all_gather_object(err) if e]
            err = errs[0] if errs else None
        if err is not None:
            raise (make or TrainingError)(err)

    def resume(self) -> bool:
        """Load the newest good checkpoint of this run, if any. Returns True if resumed. Under DDP rank 0 picks
        the checkpoint (the newest that passes its checksum) and every rank loads that same file, so the run
        directory must be on a filesystem all ranks share."""
        if not dist.is_dist():
            if not ckpt.list_checkpoints(self.run_dir):
                return False
            st, path = ckpt.load_latest(self.run_dir, map_location=self.device, warn=self.log)
        else:
            found = self._load_on_all_ranks()
            if found is None:
                return False
            st, path = found
        from .runs import config_diff, normalised

        if st.get("config"):
            try:
                saved = normalised(st["config"])
            except ValueError:  # a config this version cannot read: compare what can be compared
                saved = json.loads(json.dumps(st["config"], default=str))
            changed = config_diff(saved, json.loads(json.dumps(to_dict(self.cfg), default=str)))
            if changed:
                raise TrainingError(f"cannot resume {self.run_dir} with changed settings: {'; '.join(changed[:8])}"
                                    f"{' ...' if len(changed) > 8 else ''}. Resume with the run's own settings, or "
                                    "start a new run (another name, or --overwrite)")
        self.load_state(st)
        self.check_masks("loading the checkpoint")
        self.log(f"resumed from {path} (epoch {self.epoch}, step {self.step_in_epoch} of it)")
        return True

    def _load_on_all_ranks(self) -> tuple[dict, Path] | None:
        st, path, err = None, None, None
        if dist.is_main() and ckpt.list_checkpoints(self.run_dir):
            try:
                st, path = ckpt.load_latest(self.run_dir, map_location=self.device, warn=self.log)
            except ckpt.CheckpointError as e:  # said on every rank below, instead of leaving the others waiting
                err = str(e)
        path, err = dist.broadcast_object((None if path is None else str(path), err))  # also: wait for rank 0
        if err is not None:
            raise ckpt.CheckpointError(err)
        if path is None:
            return None
        if st is None:
            try:
                st = ckpt.load(path, map_location=self.device)
            except ckpt.CheckpointError as e:
                err = (f"rank {dist.rank()} cannot read the checkpoint rank 0 chose ({e}); under DDP the run "
                       "directory must be on a filesystem every rank shares")
        errors = [e for e in dist.all_gather_object(err) if e]
        if errors:
            raise ckpt.CheckpointError(errors[0])
        return st, Path(path)

    # ---------------------------------------------------------------------------------- training
    def train_epoch(self) -> dict:
        cfg = self.cfg.train
        self.net.train()
        loader = self.train_loader
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(self.epoch)
        n_batches = len(loader) if cfg.max_steps_per_epoch is None else min(len(loader), cfg.max_steps_per_epoch)
        if self.step_in_epoch == 0 or self._acc is None:  # a resumed epoch continues its sums
            self._acc = {"loss": torch.zeros((), device=self.device),
                         "correct": torch.zeros((), device=self.device, dtype=torch.long), "seen": 0}
        acc = self._acc
        skip = self.step_in_epoch
        # a tqdm bar on a terminal, else a plain line every ~10% of the epoch (logs, nohup, CI)
        bar = progress_bar(n_batches, skip, f"epoch {self.epoch + 1}/{cfg.epochs}", cfg.progress and dist.is_main(),
                           every=getattr(cfg, "log_every", 0) or None)
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
                                    f"{self._last_good()} (lower train.lr or enable train.grad_clip)")
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler:
                self.scaler.scale(loss).backward()
                if cfg.grad_clip:
                    self.scaler.unscale_(self.optimizer)
                    self._clip(cfg.grad_clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                if cfg.grad_clip:
                    self._clip(cfg.grad_clip)
                self.optimizer.step()
            self.global_step += 1
            self.step_in_epoch = i + 1
            versions = self._mask_versions()
            for c in self.callbacks:
                c.on_step_end(self.hook_arg(c))
            if versions != self._mask_versions():
                self.check_masks("a mask update at the end of a step")
            acc["loss"] += loss.detach() * x.shape[0]
            acc["correct"] += (out.detach().mean(0).argmax(-1) == y).sum()
            acc["seen"] += x.shape[0]
            bar.update(1)
            saved = bool(cfg.checkpoint_every) and self.global_step % cfg.checkpoint_every == 0
            if saved:
                self.save()
            if self._stop_requested():  # Ctrl-C: the step is complete, so the state is consistent
                self._stop_now(save=not saved)
        bar.close()
        loss_sum, correct, seen = acc["loss"], acc["correct"], acc["seen"]
        if dist.is_dist():  # the epoch's loss and accuracy over all ranks' samples
            t = dist.all_sum(torch.stack([loss_sum.double(), correct.double(),
                                          torch.tensor(float(seen), device=self.device).double()]))
            loss_sum, correct, seen = t[0], t[1], float(t[2])
            dist.sync_buffers(self.model)  # BN running statistics: the same model on every rank from here on
        seen = max(seen, 1)
        return {"train_loss": float(loss_sum) / seen, "train_acc": float(correct) / seen}

    def _clip(self, max_norm: float) -> None:
        """Clip the gradient norm of what the optimizer will apply: masked gradients are zeroed first."""
        engine = getattr(self.method, "engine", None)
        if engine is not None and engine.optimizer is self.optimizer:
            engine.before_step()
        nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    @torch.no_grad()
    def evaluate(self, loader) -> float:
        """Top-1 accuracy on ``loader``. Under DDP each rank evaluates every ``world_size``-th batch and the
        counts are summed, so every rank gets the accuracy of the whole set."""
        self.model.eval()
        stats = torch.zeros(2, device=self.device, dtype=torch.float64)
        r, w = dist.rank(), dist.world_size()
        for i, (x, y) in enumerate(loader):
            if i % w != r:
                continue
            if self._stop and w == 1:  # under DDP the stop waits for the end of the epoch (ranks agree there)
                self.model.train()
                self._stop_now()
            x, y = x.to(self.device), y.to(self.device)
            with self._autocast():
                out = self.model(x)
            stats[0] += (out.float().mean(0).argmax(-1) == y).sum()
            stats[1] += y.numel()
        dist.all_sum(stats)
        self.model.train()
        return float(stats[0] / stats[1].clamp_min(1))

    def fit(self, resume: bool = False, overwrite: bool = False) -> Measurement:
        """Train all epochs (continuing a checkpoint when ``resume``), then measure on the test set.

        The run directory is checked first (:mod:`spikeprune.runs`): a fresh run into a directory holding a run
        needs ``overwrite``; ``resume`` without a checkpoint is an error, and on a finished run it rewrites nothing
        (it measures the finished model); a read-only or full directory is refused before any training."""
        cfg = self.cfg.train
        if self._claim_run_dir(resume, overwrite):
            return self._finished_measurement()
        resumed = self.resume() if resume else False
        if dist.is_main():
            try:
                if resumed:  # the metrics files may hold epochs done after the checkpoint: rewrite them
                    self._write_metrics()
                else:
                    self._clear_previous_run()
                ckpt.atomic_write(self.run_dir / "config.json", json.dumps(to_dict(self.cfg), indent=2).encode())
            except OSError as e:
                raise TrainingError(f"cannot write the run files in {self.run_dir}: {e.strerror or e}") from None
        if dist.is_dist():
            bs = self.cfg.data.batch_size
            self.log(f"DDP: {dist.world_size()} processes ({dist.backend()}), batch {bs} per process = "
                     f"{bs * dist.world_size()} global{', synchronised BatchNorm' if self.sync_bn else ''}")
        if not resumed:
            for c in self.callbacks:
                c.on_train_start(self.hook_arg(c))
            self.check_masks("on_train_start (the initial masks)")
        self._stop = self._stopped_cleanly = False
        catch = threading.current_thread() is threading.main_thread()  # signal handlers live in the main thread
        old_handler = signal.getsignal(signal.SIGINT)
        if catch:
            signal.signal(signal.SIGINT, self._on_sigint)
        try:
            while self.epoch < cfg.epochs:
                for c in self.callbacks:
                    if self.step_in_epoch == 0:
                        c.on_epoch_start(self.hook_arg(c))
                t0 = time.perf_counter()
                metrics = {"epoch": self.epoch + 1, "lr": self.optimizer.param_groups[0]["lr"]}
                metrics.update(self.train_epoch())
                self.check_finite()  # before evaluation and mask updates see the weights
                metrics["epoch_time_s"] = time.perf_counter() - t0
                if self.val_loader is not None:
                    metrics["val_acc"] = self.evaluate(self.val_loader)
                metrics["test_acc"] = self.evaluate(self.test_loader)
                self.loop.metrics = metrics
                for c in self.callbacks:
                    c.on_epoch_end(self.hook_arg(c), metrics)
                self.check_masks("on_epoch_end")
                for c in self.callbacks:
                    metrics.update(c.epoch_metrics(self.hook_arg(c)))
                if self.scheduler:
                    self.scheduler.step()
                self.epoch += 1
                self.step_in_epoch = 0
                self.history.append(metrics)
                self._log_epoch(metrics)
                self.save()
                if self._stop_requested():
                    self._stop_now(save=False)
        except KeyboardInterrupt:
            if not self._stopped_cleanly:  # raised inside a step (2nd Ctrl-C, or by a callback): maybe torn
                self.log(f"interrupted inside a step: the state may be half-updated and is not saved; the newest "
                         f"checkpoint in {self.run_dir} is kept; continue with --resume")
            raise
        finally:
            if catch:
                signal.signal(signal.SIGINT, old_handler)
        for c in self.callbacks:
            c.on_train_end(self.hook_arg(c))
        self.check_masks("on_train_end")
        return self.final_measurement()

    def _on_sigint(self, signum, frame) -> None:
        if self._stop:  # second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self._stop = True
        self.log("interrupt: stopping after this step and saving (Ctrl-C again stops at once, without saving)")

    def _stop_now(self, save: bool = True) -> None:
        if save:
            self.save()
        self._stopped_cleanly = True
        self.log(f"interrupted: state saved in {self.run_dir} ({self._where()}); continue with --resume")
        raise KeyboardInterrupt

    def _claim_run_dir(self, resume: bool, overwrite: bool) -> bool:
        """Check that this run may use its directory (see :meth:`fit`); True when ``resume`` finds the run finished.
        Every rank reads the (shared) directory; rank 0 alone probes that it can write there."""
        from .runs import RunError, check_writable, is_finished, run_files

        rd, err = self.run_dir, None
        files = run_files(rd)
        finished = resume and is_finished(rd)
        if finished:
            self._check_finished_config()
        elif resume and not ckpt.list_checkpoints(rd):
            err = (f"nothing to resume in {rd}: it holds no checkpoint"
                   + (" (the run stopped before its first one); start it again with --overwrite" if files
                      else "; drop --resume to start the run"))
        elif not resume and files and not overwrite:
            names = ", ".join(sorted({p.name if not p.name.startswith("ckpt-") else "ckpt-*.pt" for p in files}))
            err = (f"{rd} already holds a run ({names}); continue it with --resume, or start afresh with "
                   "--overwrite (deletes those files)")
        if err is None and not finished and dist.is_main():
            try:
                check_writable(rd)
            except RunError as e:
                err = str(e)
        self._agree(err, RunError)
        return finished

    def _check_finished_config(self) -> None:
        from .runs import RunError, config_diff, normalised, read_config

        old = normalised(to_dict(read_config(self.run_dir)))
        changed = config_diff(old, json.loads(json.dumps(to_dict(self.cfg), default=str)))
        if changed:
            raise RunError(f"{self.run_dir} is a finished run with other settings ({'; '.join(changed[:8])}); "
                           "a finished run is not rewritten: train under another name, or use --overwrite")

    def _finished_measurement(self) -> Measurement:
        """``resume`` on a finished run: measure its saved model, write nothing."""
        self.log(f"{self.run_dir} is finished (results.json): nothing to resume, nothing rewritten")
        self.model.load_state_dict(ckpt.load_model(self.run_dir / "model.pt", map_location=self.device,
                                                   warn=self.log))
        return self.final_measurement(write=False)

    def _clear_previous_run(self) -> None:
        """A fresh run with ``overwrite`` in a used run directory: old checkpoints would outrank the new ones in
        rotation and resume, and old metrics/results would mix with the new run's, so the run's own files (and no
        others) are removed."""
        from .runs import run_files

        files = run_files(self.run_dir)
        if files:
            self.log(f"note: --overwrite: removing the previous run's {len(files)} file(s) in {self.run_dir}")
        for f in files:
            f.unlink(missing_ok=True)

    def final_measurement(self, write: bool = True) -> Measurement:
        """Measure on the test set. Under DDP every rank measures the same model and rank 0 writes
        ``results.json`` and ``model.pt`` (+ its ``.sha256``), each atomically; the others wait until both are on
        disk."""
        m = self.cfg.measure
        engine = getattr(self.method, "engine", None)
        prunable = list(engine.layers) if engine is not None and engine.layers else None
        result = measure(self.model, self.test_loader, self.device, m.max_batches, m.pj_per_ac, m.pj_per_mac,
                         prunable=prunable, unit_rates=True, pooled_spikes=m.pooled_spikes)
        err = None
        if write and dist.is_main():
            out = {"name": self.cfg.name, "model": self.cfg.model.name, "dataset": self.cfg.data.name,
                   "T": self.cfg.model.T, "method": (self.cfg.method or {}).get("name", "dense"),
                   "epochs": self.epoch, "train_time_s": sum(h.get("epoch_time_s", 0) for h in self.history),
                   **result.to_dict()}
            if self.method is not None and hasattr(self.method, "summary"):
                out["method_summary"] = self.method.summary()
            try:
                ckpt.save_model(self.model.state_dict(), self.run_dir / "model.pt")
                ckpt.atomic_write(self.run_dir / "results.json", json.dumps(jsonable(out), indent=2).encode())
            except OSError as e:
                err = (f"cannot write the final model and results in {self.run_dir} ({e.strerror or e}); "
                       f"{self._last_good()}: free space and run again with --resume")
        self._agree(err)
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
        self._write_metrics()

    def _write_metrics(self) -> None:
        """Rewrite ``metrics.jsonl`` and ``metrics.csv`` from ``history``, each atomically (a crash or a full disk
        leaves the previous complete files)."""
        keys: list[str] = []
        for h in self.history:
            keys += [k for k in h if k not in keys and not isinstance(h[k], (list, dict))]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(self.history)
        try:
            ckpt.atomic_write(self.run_dir / "metrics.jsonl",
                              "".join(json.dumps(jsonable(h)) + "\n" for h in self.history).encode())
            ckpt.atomic_write(self.run_dir / "metrics.csv", buf.getvalue().encode())
        except OSError as e:
            raise TrainingError(f"cannot write the metrics in {self.run_dir} ({e.strerror or e}) {self._where()}; "
                                f"{self._last_good()}: free space and continue with --resume") from None


def summary_table(rows: list[dict], baseline: dict | None = None) -> str:
    """Markdown results table (accuracy, Δ vs baseline, connectivity, params, effective SOPs, energy, rate), under
    the line naming the pooled-spike rule (:func:`~spikeprune.measure.rule_note`)."""
    head = ("| run | method | acc. % | Δ acc. | conn. % | params | eff. SOPs/sample | dense SOPs | energy µJ | "
            "firing rate | time s |")
    lines = [rule_note(rows), "", head, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        d = "" if baseline is None else f"{100 * (r['accuracy'] - baseline['accuracy']):+.2f}"
        lines.append(f"| {r.get('name', '')} | {r.get('method', '')} | {100 * r['accuracy']:.2f} | {d} | "
                     f"{100 * r['connectivity']:.2f} | {r['params']:,} | {r['sops']:,.0f} | "
                     f"{r['dense_sops']:,.0f} | {r['energy_uj']:.3f} | {r['firing_rate']:.4f} | "
                     f"{r.get('train_time_s', 0):.0f} |")
    return "\n".join(lines)
