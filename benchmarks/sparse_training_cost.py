"""What sparsity bookkeeping costs during training: dense epochs vs ``pq_rewire``, ``sca`` and ``dynsnn``.

The same model, data, batch size and number of steps per epoch, trained by the project's ``Trainer`` with each
method at its **default cadence** (``create_method(name)`` with no options: pq_rewire rewires every epoch and
net-prunes every third, sca recomputes its channel masks every epoch, dynsnn updates its unit masks every 100 steps
after one warm-up epoch). All trainers are built first and then advanced side by side in chunks of ``--chunk``
steps (20), taking turns, the order rotated every round: this VM's speed drifts by up to 25% over tens of seconds,
which whole-epoch turns (10-30 s each) turned into ratios off by as much, while 0.5-s turns see the same machine.
Each method's trainer lives in its own process (one computes at a time), so their heaps cannot disturb each other;
a trainer pauses inside its epoch (a callback after the step's own callbacks) and the pauses are not timed.

Per epoch and method it times (a) the training steps (forward, backward, optimizer, the mask engine's gradient and
weight masking, activity observers, unit-mask hooks and per-step callbacks such as dynsnn's updates) and (b) the
epoch-end callbacks (mask updates of pq_rewire and sca). Evaluation and checkpointing, identical for every method,
are not run. The first epoch is a warm-up and left out of the ratios; ratios are method time / dense time (1.00 =
free bookkeeping). A masked ``Linear`` that keeps at most half of its weights computes its forward on a dense input and
its input gradient over the kept weights only (``Linear.max_weight_density``), as in any training run with
spikeprune: a sparse method pays its bookkeeping and gains that. ``NAME@dense`` in ``--methods`` (or
``--dense-masked`` for all) runs a method with every product dense, which leaves its bookkeeping (and its firing)
alone; convolutions are always dense products.

After the epochs, each trained net is rebuilt as a plain model (masks folded into its weights) and timed for
forward + backward passes on fixed batches, in turns (``--probe-rounds``): no optimizer step, so the weights and
the firing stay put. Its ratio to the dense net's separates what a method's *firing* costs (a spike-sparse
``Linear`` works in proportion to its non-zero inputs, or to those that changed since the step before, both
reported per layer) from what its bookkeeping costs.

``sca`` prunes conv channels only, so it runs on ``convnet`` and is skipped for ``fc3``.

Usage::

    python benchmarks/sparse_training_cost.py                          # synthetic FMNIST-shaped data, 469 steps
    python benchmarks/sparse_training_cost.py --data fashion_mnist --data-root ~/data
    python benchmarks/sparse_training_cost.py --quick --out /tmp/cost   # seconds: a smoke run
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import header  # noqa: E402  (same header: command, machine, date, load)

from spikeprune.callbacks import Callback  # noqa: E402
from spikeprune.config import RunConfig, from_dict  # noqa: E402
from spikeprune.data import build_loaders  # noqa: E402
from spikeprune.graph import SYNAPTIC  # noqa: E402
from spikeprune.layers import Linear  # noqa: E402
from spikeprune.models import create_model  # noqa: E402
from spikeprune.train import Trainer, spike_loss  # noqa: E402

METHODS = ["dense", "pq_rewire", "sca", "dynsnn"]
CONV_ONLY = {"sca"}


def make_trainer(method: str, model: str, T: int, loaders, args, out_dir: str) -> Trainer:
    cfg = from_dict(RunConfig, {
        "name": f"cost_{model}_{method}", "seed": 0, "out_dir": out_dir,
        "model": {"name": model, "T": T, "neuron": {"type": "lif", "tau": 2.0}, "options": args.model_options},
        "data": {"name": args.data, "batch_size": args.batch},
        # one epoch more than measured, so no method skips its "last epoch" update
        "train": {"epochs": args.epochs + 1, "optimizer": "adam", "lr": 1e-3, "scheduler": "cosine",
                  "device": args.device, "progress": False, "max_steps_per_epoch": args.steps,
                  "checkpoint_every": 0},
        "method": None if method == "dense" else {"name": method}})
    return Trainer(cfg, loaders=loaders, log=lambda *a, **k: None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Turns(Callback):
    """Hands the CPU back every ``chunk`` steps: reports the seconds computed since its last turn began and waits
    for the next turn. The last callback of the trainer, so each step's own callbacks are inside the timed turn."""

    def __init__(self, conn, chunk: int, steps: int):
        self.conn, self.chunk, self.steps, self.t0 = conn, chunk, steps, 0.0

    def begin(self) -> None:
        self.t0 = time.perf_counter()

    def on_step_end(self, trainer: Trainer) -> None:
        step = trainer.step_in_epoch
        if self.chunk and step % self.chunk == 0 and step < self.steps:
            sync(trainer.device)
            self.conn.send((time.perf_counter() - self.t0, 0.0, False))
            assert self.conn.recv() == "go"
            self.begin()


def run_epoch(tr: Trainer, turns: Turns) -> tuple[float, float]:
    """One epoch as ``Trainer.fit`` runs it, minus evaluation and checkpoints: (seconds of its last turn of steps,
    epoch-end seconds); ``turns`` has reported the turns before."""
    for c in tr.callbacks:
        c.on_epoch_start(tr.hook_arg(c))  # (methods get the trainer's LoopState)
    sync(tr.device)
    turns.begin()
    metrics = {"epoch": tr.epoch + 1}
    metrics.update(tr.train_epoch())
    sync(tr.device)
    t1 = time.perf_counter()
    t0 = turns.t0
    for c in tr.callbacks:
        c.on_epoch_end(tr.hook_arg(c), metrics)
    sync(tr.device)
    t2 = time.perf_counter()
    if tr.scheduler:
        tr.scheduler.step()
    tr.epoch += 1
    tr.step_in_epoch = 0
    return t1 - t0, t2 - t1


def changing(x: torch.Tensor, T: int, batch: int) -> torch.Tensor:
    """The temporal differences (``d[0] = x[0]``, ``d[t] = x[t] - x[t-1]``) of a layer input that is multi-step,
    ``[T, batch, ...]`` or flattened ``[T * batch, ...]``; a static input ``[batch, ...]`` (a first layer under
    direct encoding, computed once) as it is."""
    if T > 1 and x.shape[0] == T * batch:
        x = x.reshape(T, batch, *x.shape[1:])
    elif not (T > 1 and x.dim() >= 3 and x.shape[:2] == (T, batch)):
        return x
    return torch.cat([x[:1], x[1:] - x[:-1]])


@torch.no_grad()
def state(tr: Trainer) -> tuple[float, list[float], list[float]]:
    """The model's weight density, and for each synaptic layer on one training batch (training mode) the fraction
    of its inputs that are non-zero and of their temporal differences (a spike-sparse ``Linear`` sums whichever is
    cheaper: below 35% it beats the dense product, so models that fire less, or more steadily, train faster
    whatever their bookkeeping)."""
    engine = getattr(tr.method, "engine", None)
    dens = engine.density() if engine is not None else 1.0
    got: list[tuple[float, float]] = []
    x, _ = next(iter(tr.train_loader))
    T, batch = tr.cfg.model.T, x.shape[0]

    def look(m, a):
        got.append((float((a[0] != 0).float().mean()), float((changing(a[0], T, batch) != 0).float().mean())))

    hooks = [m.register_forward_pre_hook(look) for m in tr.net.modules() if isinstance(m, SYNAPTIC)]
    try:
        tr.net(x.to(tr.device))
    finally:
        for h in hooks:
            h.remove()
    return dens, [a for a, _ in got], [d for _, d in got]


class Probe:
    """The trained net as a plain model (masks folded into its weights by the engine's ``remove()``, no method, no
    hooks) and ``chunk`` fixed training batches: times forward + backward passes without optimizer steps, so the
    weights, and the firing, stay those of the end of training. Against the dense net's, run side by side, its time
    is what the method's *firing* costs, without any bookkeeping."""

    def __init__(self, tr: Trainer, chunk: int):
        m, self.cfg, self.info, self.device = tr.cfg.model, tr.cfg.train, tr.info, tr.device
        self.net = create_model(m.name, num_classes=tr.info.num_classes, in_channels=tr.info.in_shape[-3], T=m.T,
                                neuron=m.neuron, encoding=m.encoding, **m.options).to(tr.device).train()
        batches = iter(tr.train_loader)
        self.batches = [next(batches) for _ in range(min(chunk, len(tr.train_loader)))]
        x = self.batches[0][0].to(tr.device)
        tr.model.eval()
        with torch.no_grad():
            want = tr.model(x)
        engine = getattr(tr.method, "engine", None)
        if engine is not None:
            engine.remove()  # destructive: the probe is the worker's last work
        missing, unexpected = self.net.load_state_dict(tr.model.state_dict(), strict=False)
        if missing or unexpected:
            raise RuntimeError(f"the plain {m.name} does not take the trained weights: missing {missing}, "
                               f"unexpected {unexpected}")
        self.net.eval()
        with torch.no_grad():  # the plain net computes what the trained one did (eval mode: BN's running stats)
            err = float((self.net(x) - want).abs().max())
        if err > 1e-4 * max(1.0, float(want.abs().max())):
            raise RuntimeError(f"the plain {m.name} differs from the trained net by {err:.3g}")
        self.net.train()
        self.run()  # warm-up

    def run(self) -> float:
        t0 = time.perf_counter()
        for x, y in self.batches:
            x, y = x.to(self.device), y.to(self.device)
            out = self.net(x)
            c = self.cfg
            spike_loss(out.float(), y, c.loss, self.info.num_classes, c.tet_lambda, c.label_smoothing).backward()
            self.net.zero_grad(set_to_none=True)
        sync(self.device)
        return (time.perf_counter() - t0) / len(self.batches)


def worker(method: str, model: str, args, conn) -> None:
    """One method's trainer in its own process: runs an epoch per request and answers with its times. Each method
    has its own heap, so what one trainer allocates cannot change where another's buffers land (in one process
    the same kernels differed by up to 2x between trainers, from page faults on fresh memory)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dense_linear:
        Linear.max_input_density = 0.0
    method, _, variant = method.partition("@")
    if variant == "dense" or args.dense_masked:
        Linear.max_weight_density = 0.0
    opts = {"n": args.steps * args.batch, "in_shape": [1, 28, 28], "num_classes": 10} if args.data == "synthetic" \
        else {}
    loaders = build_loaders(args.data, root=args.data_root, batch_size=args.batch, eval_batch_size=args.batch,
                            seed=0, **opts)
    with tempfile.TemporaryDirectory() as tmp:
        tr = make_trainer(method, model, args.T, loaders, args, tmp)
        for c in tr.callbacks:
            c.on_train_start(tr.hook_arg(c))
        turns = Turns(conn, args.chunk, min(args.steps, len(loaders[0])))
        tr.callbacks.append(turns)
        conn.send("ready")
        probe = None
        while (cmd := conn.recv()) != "stop":
            if cmd == "go":
                conn.send((*run_epoch(tr, turns), True))
            elif cmd == "density":
                conn.send(state(tr))
            else:  # "probe", after "density" (it folds the masks away)
                probe = probe or Probe(tr, args.chunk or 20)
                conn.send(probe.run())


# spawned workers unpickle ``worker`` by module name: make it importable as this file's stem (the script's folder is
# on sys.path, see above), whatever name this module was loaded under (``__main__``, or a test's loader)
worker.__module__ = Path(__file__).stem
sys.modules[Path(__file__).stem] = sys.modules[__name__]  # the latest load: a second load has its own worker


def measure_model(model: str, args) -> list[dict]:
    methods = [m for m in args.methods if not (m.partition("@")[0] in CONV_ONLY and model != "convnet")]
    ctx = mp.get_context("spawn")
    procs, conns = {}, {}
    for m in methods:
        conns[m], child = ctx.Pipe()
        procs[m] = ctx.Process(target=worker, args=(m, model, args, child), daemon=True)
        procs[m].start()
    try:
        for m in methods:
            assert conns[m].recv() == "ready"
        times: dict[str, list[tuple[float, float]]] = {m: [] for m in methods}
        turn = 0
        for epoch in range(args.epochs):  # one process computes at a time, in turns; the order rotates every round
            acc = {m: [0.0, 0.0] for m in methods}
            running = list(methods)
            while running:
                k = turn % len(running)
                for m in running[k:] + running[:k]:
                    conns[m].send("go")
                    step_s, end_s, done = conns[m].recv()
                    acc[m][0] += step_s
                    acc[m][1] += end_s
                    if done:
                        running.remove(m)
                turn += 1
            for m in methods:
                times[m].append(tuple(acc[m]))
            print(f"{model} epoch {epoch + 1}/{args.epochs}: " + ", ".join(
                f"{m} {sum(times[m][-1]):.2f}s" for m in methods), flush=True)
        dens = {}
        for m in methods:
            conns[m].send("density")
            dens[m] = conns[m].recv()
        plain: dict[str, list[float]] = {m: [] for m in methods}
        for r in range(args.probe_rounds):  # the trained nets' forward + backward alone, in turns as above
            for m in methods[r % len(methods):] + methods[:r % len(methods)]:
                conns[m].send("probe")
                plain[m].append(conns[m].recv())
        for m in methods:
            conns[m].send("stop")
    finally:
        for p in procs.values():
            p.join(timeout=60)
            if p.is_alive():
                p.terminate()
    rows = []
    steady = slice(1, None) if args.epochs > 1 else slice(0, None)  # epoch 1 is the warm-up
    for m in methods:
        step_s = [s for s, _ in times[m][steady]]
        end_s = [e for _, e in times[m][steady]]
        epochs = [s + e for s, e in times[m][steady]]
        rows.append({"model": model, "method": m, "T": args.T, "batch": args.batch, "steps_per_epoch": args.steps,
                     "epochs_measured": len(step_s), "step_s_per_epoch": round(statistics.median(step_s), 4),
                     "epoch_end_s": round(statistics.median(end_s), 4), "epoch_s": round(statistics.median(epochs), 4),
                     "ms_per_step": round(1e3 * statistics.median(step_s) / args.steps, 3),
                     "first_epoch_s": round(sum(times[m][0]), 4), "final_density": round(dens[m][0], 4),
                     "input_density": " ".join(f"{d:.2f}" for d in dens[m][1]),
                     "changing_input_density": " ".join(f"{d:.2f}" for d in dens[m][2]),
                     "plain_ms_per_step": round(1e3 * statistics.median(plain[m]), 3) if plain[m] else "",
                     "epoch_times": " ".join(f"{t:.2f}" for t in epochs)})
    base = next((r for r in rows if r["method"] == "dense"), None)
    dense = [s + e for s, e in times["dense"][steady]] if base else []
    for r in rows:
        r["ratio_vs_dense"] = ""
        if base:  # the same epoch index of each method ran side by side: its ratio, epoch by epoch, and their median
            per = [(s + e) / d for (s, e), d in zip(times[r["method"]][steady], dense)]
            r["ratio_vs_dense"] = round(statistics.median(per), 3)
            r["ratio_range"] = f"{min(per):.2f}-{max(per):.2f}"
        r["plain_ratio_vs_dense"] = ""
        if base and plain[r["method"]]:  # round by round, then the median
            r["plain_ratio_vs_dense"] = round(statistics.median(
                [a / b for a, b in zip(plain[r["method"]], plain["dense"])]), 3)
    return rows


def report(rows: list[dict], head: list[str]) -> str:
    lines = list(head) + [
        "Epoch time = training steps (incl. per-step bookkeeping) + epoch-end mask updates; median over the epochs "
        "after the first (warm-up). Each method trains in its own process (its own heap), one process at a time, in "
        "turns of a few steps (see Setup). "
        "Ratio = method / dense epoch time of the same epoch index (side by side), median over the measured epochs "
        "(1.00: free); range: the smallest and largest of those ratios. Input density: fraction of non-zero inputs "
        "of each synaptic layer on one training batch after the last epoch (a `Linear` below 35% takes the "
        "spike-sparse path, so a model that fires less trains faster, whatever its bookkeeping); changing: the "
        "fraction of non-zero temporal differences (inputs that changed since the step before), which that path "
        "sums instead when they are fewer. Plain fwd+bwd: each trained net rebuilt as a plain model (masks folded "
        "into its weights, no method), forward and backward passes on fixed batches without optimizer steps, in "
        "turns as above; its ratio to the dense net's is what the method's firing costs without any bookkeeping.",
        "",
        "| model | method | ms / step | epoch-end updates (s) | epoch (s) | ratio vs dense | ratio range | "
        "final density | input density per layer | changing | plain fwd+bwd (ms) | plain ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|---:|---:|"]
    for r in rows:
        plain = (f"{r['plain_ms_per_step']:.2f} | {r['plain_ratio_vs_dense']:.3f}" if r["plain_ms_per_step"] != ""
                 else " | ")
        lines.append(f"| {r['model']} | {r['method']} | {r['ms_per_step']:.2f} | {r['epoch_end_s']:.3f} | "
                     f"{r['epoch_s']:.2f} | {r['ratio_vs_dense']:.3f} | {r.get('ratio_range', '')} | "
                     f"{100 * r['final_density']:.1f}% | {r['input_density']} | {r['changing_input_density']} | "
                     f"{plain} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["convnet", "fc3"])
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--steps", type=int, default=469, help="steps per epoch (469 = one Fashion-MNIST epoch at 128)")
    p.add_argument("--epochs", type=int, default=4, help="epochs per method; the first is a warm-up")
    p.add_argument("--chunk", type=int, default=20, help="steps per turn (0: whole epochs)")
    p.add_argument("--probe-rounds", type=int, default=10,
                   help="turns of --chunk forward + backward passes of each trained net as a plain model (its firing "
                        "without bookkeeping), after the epochs; 0: none")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--T", type=int, default=4)
    p.add_argument("--data", default="synthetic", help="synthetic (Fashion-MNIST shape) or fashion_mnist")
    p.add_argument("--data-root", default=None)
    p.add_argument("--dense-linear", action="store_true",
                   help="every Linear a dense product (Linear.max_input_density = 0): the spike-sparse path's speed "
                        "depends on the firing rates, which differ between a dense and a sparse model")
    p.add_argument("--dense-masked", action="store_true",
                   help="masked Linear layers multiply densely too (Linear.max_weight_density = 0): bookkeeping only, "
                        "without the products over kept weights; a method named 'NAME@dense' runs that way alone")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="tiny smoke run: small models, 2 epochs of 2 steps")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    bad = [m for m in args.methods if m.partition("@")[2] not in ("", "dense")]
    if bad:
        p.error(f"unknown method variant in {bad}: the one variant is NAME@dense")
    args.model_options = {}
    if args.quick:
        args.steps, args.epochs, args.batch, args.T = 2, 2, 8, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if "dense" not in args.methods:
        args.methods = ["dense", *args.methods]
    rows = []
    for model in args.models:
        if args.quick:
            args.model_options = ({"channels": [4, 8], "hidden": 16} if model == "convnet" else
                                  {"hidden": [32, 32]})
        rows += measure_model(model, args)
    device = torch.device("cuda" if args.device.startswith("cuda") else "cpu")
    head = header("Sparse training cost: dense vs pq_rewire, sca, dynsnn", argv, device,
                  [f"- Setup: T={args.T}, batch {args.batch}, {args.steps} steps per epoch, {args.epochs} epochs "
                   f"per method (first = warm-up), turns of {args.chunk or 'whole-epoch'} steps, data {args.data}, "
                   "Adam (the trainer's: fused kernels where PyTorch has them), methods at their default options; "
                   + ("every Linear dense (`--dense-linear`)" if args.dense_linear else
                      "spikeprune's default Linear (spike-sparse path below 35% input density, "
                      + ("masked products dense: `--dense-masked`)" if args.dense_masked else
                         f"products over the kept weights at {Linear.max_weight_density:.0%} kept or less)"))
                   + "; `NAME@dense`: that method with every product dense"],
                  script=__file__)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "sparse_training_cost" + ("_dense_linear" if args.dense_linear else "")
    with open(out / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (out / f"{stem}.md").write_text(report(rows, head))
    print(f"wrote {out / f'{stem}.md'} and {out / f'{stem}.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
