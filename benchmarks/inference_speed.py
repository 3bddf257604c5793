"""Does sparsity make inference faster? (a) structured: compacted vs dense; (b) unstructured: event-driven vs dense.

(a) **Structured.** A ``convnet`` keeping at most half of its conv channels (random unit masks at ``--keep``, or the
masks of a finished run given by ``--run``) is compacted (:func:`spikeprune.compact`: dead channels sliced out) and
timed against the full-width dense network at several batch sizes. It reports the speed-up (dense time / compacted
time) next to the MAC reduction (dense MACs / compacted MACs, from :func:`spikeprune.measure`): the ratio of the two
says how much of the arithmetic saving turns into time.

(b) **Unstructured.** An ``fc3`` at 10% connectivity (random connection masks on every layer, each hidden layer
scaled so its neurons fire at ``--target-rate`` on the inputs, since random weights leave it nearly silent; or
``--fc3-run``) runs at batch 1 and 32, T=4: dense (masks folded, ``F.linear``; also ``spike-sparse``, the same
layers on spikeprune's default ``Linear`` path over the inputs that spiked) against
:func:`spikeprune.inference.to_event_driven` in each mode (``csr``: sparse weights; ``gather``: columns of the
spiking inputs; ``event``: only non-zero weights of spiking inputs; ``auto``: the fastest per layer by a one-time
calibration, then held to "not slower than dense" for the whole network by
:func:`~spikeprune.inference.check_network`; ``chain``: auto's paths for that batch size run as one compiled call,
:func:`~spikeprune.inference.compile_chain`). It reports whole-network times, the auto choice per layer, the
layers' input firing rates, and auto's per-layer calibration timings. The first layer has analog input: it may
use its sparse weights (csr) but not input events.

Inputs are Fashion-MNIST test images with ``--data fashion_mnist --data-root DIR``, else the synthetic dataset of
the same shape (class patterns plus noise). Variants are timed in interleaved rounds; medians are reported.

Usage::

    python benchmarks/inference_speed.py
    python benchmarks/inference_speed.py --run runs/fmnist/convnet_sca --data fashion_mnist --data-root ~/data
    python benchmarks/inference_speed.py --quick --out /tmp/inf        # seconds: a smoke run
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import header  # noqa: E402  (same header: command, machine, date, load)

from spikeprune.compact import compact, timed_inference  # noqa: E402
from spikeprune.config import RunConfig, from_dict  # noqa: E402
from spikeprune.data import create_dataset, dataset_info  # noqa: E402
from spikeprune.inference import (  # noqa: E402
    LINEAR_MODES,
    check_network,
    compile_chain,
    event_layers,
    event_report,
    to_event_driven,
)
from spikeprune.layers import Linear  # noqa: E402
from spikeprune.measure import measure  # noqa: E402
from spikeprune.models import create_model  # noqa: E402
from spikeprune.neurons import BaseNeuron  # noqa: E402
from spikeprune.sparsity.masks import MaskEngine, random_mask  # noqa: E402


# ------------------------------------------------------------------------------------------------ inputs
def images(args, n: int) -> torch.Tensor:
    """``n`` test images ``[n, 1, 28, 28]``: Fashion-MNIST if asked for, else the synthetic dataset."""
    if args.data == "synthetic":
        ds = create_dataset("synthetic", "test", n=n, in_shape=(1, 28, 28), num_classes=10)
    else:
        ds = create_dataset(args.data, "test", root=args.data_root)
    x = ds.transform(ds.x[:n])
    return x.repeat(math.ceil(n / len(x)), 1, 1, 1)[:n]


def batches_of(x: torch.Tensor, batch: int, count: int) -> list[torch.Tensor]:
    return [x[i * batch:(i + 1) * batch] for i in range(count)]


def load_run(run_dir: str) -> tuple[nn.Module, nn.Module]:
    """A finished run's model with its masks (``config.json`` + ``model.pt``), and a fresh dense model of the
    same configuration (no masks)."""
    from spikeprune.runs import run_model

    rd = Path(run_dir)
    cfg = from_dict(RunConfig, json.loads((rd / "config.json").read_text()))
    info = dataset_info(cfg.data.name, **cfg.data.options)
    m = cfg.model
    dense = create_model(m.name, num_classes=info.num_classes, in_channels=info.in_shape[-3], T=m.T,
                         neuron=m.neuron, encoding=m.encoding, **m.options)
    return run_model(rd, cfg).eval(), dense.eval()


@torch.no_grad()
def tune_rates(model: nn.Module, x: torch.Tensor, target: float) -> list[float]:
    """Scale the synaptic layer feeding each spiking layer (in order) so that it fires at about ``target`` on
    ``x`` (geometric bisection): random weights would leave the network nearly silent. Returns the rates."""
    layers = list(model.body)
    got = []
    for i, m in enumerate(layers):
        if not isinstance(m, BaseNeuron):
            continue
        producer = next(p for p in reversed(layers[:i]) if isinstance(p, (nn.Linear, nn.Conv2d)))
        w0 = producer.weight.clone()
        seen: list[float] = []
        m.observers.append(lambda mod, spikes, h, seen=seen: seen.append(float(spikes.mean())))
        lo, hi = -6.0, 6.0  # log2 of the scale
        for _ in range(24):
            mid = (lo + hi) / 2
            producer.weight.copy_(w0 * 2 ** mid)
            seen.clear()
            model(x)
            lo, hi = (mid, hi) if seen[0] < target else (lo, mid)
        producer.weight.copy_(w0 * 2 ** ((lo + hi) / 2))
        seen.clear()
        model(x)
        got.append(seen[0])
        m.observers.clear()
    return got


def interleaved(models: dict[str, nn.Module], batches: list[torch.Tensor], rounds: int) -> dict[str, float]:
    """Median seconds per batch of each model, timed in rounds with the order rotated."""
    names = list(models)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            times[n].append(timed_inference(models[n], batches, repeats=1, warmup=0))
    return {n: statistics.median(t) for n, t in times.items()}


def plain_dense(model: nn.Module) -> nn.Module:
    """``model`` with spikeprune's spike-sparse ``Linear`` path switched off: every Linear a dense matrix product,
    as in ``torch.nn`` (the reference both parts time against)."""
    for m in model.modules():
        if isinstance(m, Linear):
            m.max_input_density = 0.0
    return model


# ---------------------------------------------------------------------------------------- (a) structured
def structured(args) -> tuple[list[dict], list[str]]:
    if args.run:
        masked, dense = load_run(args.run)
        source = f"masks of {args.run}"
    else:
        torch.manual_seed(0)
        dense = create_model("convnet", T=args.T, **args.convnet_options).eval()
        masked = copy.deepcopy(dense)
        engine = MaskEngine(masked, example_input=masked.example_input(2))
        modules = dict(masked.named_modules())
        g = torch.Generator().manual_seed(0)
        for grp in engine.unit_groups():
            if all(isinstance(modules[p], nn.Conv2d) for p in grp.producers):
                engine.enable_units([grp.neuron])
                keep = max(1, math.floor(args.keep * grp.units))
                mask = torch.zeros(grp.units, dtype=torch.bool)
                mask[torch.randperm(grp.units, generator=g)[:keep]] = True
                engine.set_unit_mask(grp.neuron, mask)
        source = f"random unit masks keeping {100 * args.keep:.0f}% of each conv layer's channels"
    x = images(args, max(args.struct_batches) * args.timing_batches)
    small = plain_dense(compact(masked, x[:2]).eval())
    plain_dense(dense)
    probe = [(x[:8], torch.zeros(len(x[:8]), dtype=torch.long))]
    macs_dense, macs_small = measure(dense, probe).dense_macs, measure(small, probe).dense_macs
    with torch.no_grad():
        diff = float((masked.eval()(x[:8]) - small(x[:8])).abs().max())
    convs = [(n, m.out_channels) for n, m in small.named_modules() if isinstance(m, nn.Conv2d)]
    full = [m.out_channels for m in dense.modules() if isinstance(m, nn.Conv2d)]
    rows = []
    for b in args.struct_batches:
        t = interleaved({"dense": dense, "compacted": small}, batches_of(x, b, args.timing_batches), args.rounds)
        rows.append({"part": "structured", "model": "convnet", "batch": b, "T": dense.T, "variant": "compacted",
                     "ms_dense": round(1e3 * t["dense"], 3), "ms": round(1e3 * t["compacted"], 3),
                     "speedup": round(t["dense"] / t["compacted"], 3),
                     "mac_reduction": round(macs_dense / macs_small, 3),
                     "detail": " ".join(f"{n}:{c}/{f}" for (n, c), f in zip(convs, full))})
        print(f"structured batch {b}: speed-up {rows[-1]['speedup']:.2f}x, MACs /{rows[-1]['mac_reduction']:.2f}",
              flush=True)
    notes = [f"- Source: {source}; compacted conv widths {', '.join(f'{c}/{f}' for (_, c), f in zip(convs, full))}",
             f"- Max abs output difference masked vs compacted (first 8 images): {diff:.3g}",
             f"- Dense MACs per sample: {macs_dense:,.0f} -> {macs_small:,.0f}"]
    return rows, notes


# -------------------------------------------------------------------------------------- (b) unstructured
def unstructured(args) -> tuple[list[dict], list[str]]:
    if args.fc3_run:
        model, _ = load_run(args.fc3_run)
        source = f"weights and masks of {args.fc3_run}"
    else:
        torch.manual_seed(0)
        model = create_model("fc3", T=args.T, **args.fc3_options).eval()
        engine = MaskEngine(model, example_input=model.example_input(2))
        g = torch.Generator().manual_seed(0)
        for name, layer in engine.layers.items():
            engine.set_mask(name, random_mask(layer.weight.shape, args.connectivity, g))
        x = images(args, max(args.unstruct_batches) * args.timing_batches)
        rates = tune_rates(model, x[:64], args.target_rate)
        source = (f"random connection masks at {100 * args.connectivity:.0f}% on every layer, each hidden layer's "
                  f"weights scaled so its neurons fire at about {args.target_rate} (got "
                  f"{', '.join(f'{r:.3f}' for r in rates)})")
    x = images(args, max(args.unstruct_batches) * args.timing_batches)
    dense = plain_dense(compact(model, x[:2]).eval())  # masks folded; plain dense layers
    # the same layers with spikeprune's default Linear: dense weights, forward over the inputs that spiked when at
    # most 35% did (Linear.max_input_density, scaled down for layers with few outputs)
    variants = {"dense": dense, "spike-sparse": compact(model, x[:2]).eval()}
    for mode in [m for m in LINEAR_MODES if m != "dense"] + ["auto"]:
        variants[mode] = to_event_driven(model, mode=mode, example_input=x[:2], repeats=args.calib_repeats)
    names = list(event_layers(variants["auto"]))
    rows, notes = [], [f"- Source: {source}; event-driven layers: {', '.join(names)} (an analog-input layer may only "
                       "use its sparse weights: csr or dense)"]
    for b in args.unstruct_batches:
        bs = batches_of(x, b, args.timing_batches)
        rates: dict[str, list[float]] = {n: [] for n in names}
        hooks = [m.register_forward_pre_hook(lambda mod, inp, r=rates[n]: r.append(float(inp[0].mean())))
                 for n, m in event_layers(variants["auto"]).items()]
        with torch.no_grad():
            for model_ in variants.values():  # builds the index structures; auto calibrates every batch's key
                for xb in bs:
                    model_(xb)
        for h in hooks:
            h.remove()
        guard = check_network(variants["auto"], bs, rounds=args.rounds)  # auto holds for the whole network
        duels = "; ".join(f"{n} {1e3 * a:.3f} vs {1e3 * d:.3f} dense" for n, (a, d) in guard["layers"].items())
        notes.append(f"- Batch {b}: auto's network check: auto {1e3 * guard['auto_s']:.3f} ms vs all-dense "
                     f"{1e3 * guard['dense_s']:.3f} ms per pass, kept {guard['kept']}"
                     + (f" (after per-layer duels, its choices vs dense in ms per pass: {duels})" if duels else ""))
        # auto's paths for this batch size, frozen into one compiled call for the whole body
        chain = compile_chain(to_event_driven(model, mode="auto", example_input=x[:2], repeats=args.calib_repeats),
                              bs, rounds=args.rounds)
        notes.append(f"- Batch {b}: chain paths " + ", ".join(f"{n} {p}" for n, p in chain.body.paths.items()))
        t = interleaved({**variants, "chain": chain}, bs, args.rounds)
        with torch.no_grad():
            ref = dense(bs[0])
            worst = max(float((v(bs[0]) - ref).abs().max()) for v in (*variants.values(), chain))
        auto = variants["auto"]
        analog = {n for n, m in event_layers(auto).items() if m.paths != m.MODES}
        choices = {n: sorted({m.choice[k] for k in m.choice if k[0][0] in (b, b * auto.T)})
                   for n, m in event_layers(auto).items()}
        for mode, sec in t.items():
            if mode == "dense":
                continue
            rows.append({"part": "unstructured", "model": "fc3", "batch": b, "T": auto.T, "variant": mode,
                         "ms_dense": round(1e3 * t["dense"], 3), "ms": round(1e3 * sec, 3),
                         "speedup": round(t["dense"] / sec, 3), "mac_reduction": "",
                         "detail": "; ".join((f"{n}: analog input" if n in analog else
                                              f"{n}: rate {statistics.mean(rates[n]):.3f}")
                                             + (f", auto {'/'.join(choices[n])}" if mode == "auto" else "")
                                             + (f", {chain.body.paths.get(n.split('.')[-1], 'dense')}"
                                                if mode == "chain" else "")
                                             for n in names)})
        print(f"unstructured batch {b}: " + ", ".join(f"{r['variant']} {r['speedup']:.2f}x" for r in rows
                                                        if r["batch"] == b), flush=True)
        notes.append(f"- Batch {b}: max abs output difference of any variant to dense: {worst:.3g}")
    notes.append("")
    notes += ["Auto's per-layer calibration (ms per call of each path, best of its timed runs; * = chosen):", "",
              "| layer | input rows | input rate | " + " | ".join(LINEAR_MODES) + " |",
              "|---|---:|---:|" + "---:|" * len(LINEAR_MODES)]
    for rec in event_report(variants["auto"]):
        for c in rec["calibration"]:
            cells = [f"{1e3 * c['seconds'][m]:.3f}{'*' if m == c['choice'] else ''}" if m in c["seconds"] else "-"
                     for m in LINEAR_MODES]
            b = c["rate_bucket"]
            rate = "0" if b == -99 else f"{2 ** (b / 2):.3g}-{2 ** ((b + 1) / 2):.3g}"
            notes.append(f"| {rec['layer']} (density {100 * rec['density']:.1f}%) | {c['shape'][0]} | {rate} | "
                         + " | ".join(cells) + " |")
    return rows, notes


def report(head, s_rows, s_notes, u_rows, u_notes) -> str:
    lines = list(head)
    if s_rows:
        lines += ["## (a) Structured: compacted convnet vs dense", "", *s_notes, "",
                  "| batch | T | dense ms/batch | compacted ms/batch | speed-up | MAC reduction | "
                  "speed-up / MAC red. |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['batch']} | {r['T']} | {r['ms_dense']:.3f} | {r['ms']:.3f} | {r['speedup']:.2f}x | "
                  f"{r['mac_reduction']:.2f}x | {r['speedup'] / r['mac_reduction']:.2f} |" for r in s_rows]
        lines.append("")
    if u_rows:
        lines += ["## (b) Unstructured: event-driven fc3 vs dense", "",
                  "| batch | T | variant | dense ms/batch | ms/batch | speed-up | per layer |",
                  "|---:|---:|---|---:|---:|---:|---|"]
        lines += [f"| {r['batch']} | {r['T']} | {r['variant']} | {r['ms_dense']:.3f} | {r['ms']:.3f} | "
                  f"{r['speedup']:.2f}x | {r['detail']} |" for r in u_rows]
        lines += ["", *u_notes, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", default=["structured", "unstructured"])
    p.add_argument("--run", help="finished convnet run whose channel masks to use (default: random masks)")
    p.add_argument("--fc3-run", help="finished fc3 run whose weights and masks to use (default: random 10%%)")
    p.add_argument("--keep", type=float, default=0.5, help="fraction of conv channels kept (random masks)")
    p.add_argument("--connectivity", type=float, default=0.1, help="fc3 connection density (random masks)")
    p.add_argument("--target-rate", type=float, default=0.1, help="hidden firing rate of the random fc3")
    p.add_argument("--struct-batches", type=int, nargs="+", default=[1, 32, 128])
    p.add_argument("--unstruct-batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--T", type=int, default=4)
    p.add_argument("--timing-batches", type=int, default=5, help="distinct input batches per timing pass")
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (median reported)")
    p.add_argument("--calib-repeats", type=int, default=5, help="timed runs per path in auto's calibration")
    p.add_argument("--data", default="synthetic", help="synthetic or fashion_mnist")
    p.add_argument("--data-root", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="tiny smoke run: small batches, 1 round")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    args.convnet_options, args.fc3_options = {}, {}
    if args.quick:
        args.struct_batches, args.unstruct_batches = [2], [1, 4]
        args.timing_batches, args.rounds, args.calib_repeats = 2, 1, 1
        args.convnet_options, args.fc3_options = {"channels": (8, 16), "hidden": 32}, {"hidden": (64, 64)}
    if args.threads:
        torch.set_num_threads(args.threads)
    s_rows, s_notes = structured(args) if "structured" in args.parts else ([], [])
    u_rows, u_notes = unstructured(args) if "unstructured" in args.parts else ([], [])
    head = header("Inference speed: structured compaction and unstructured event-driven inference", argv,
                  torch.device("cpu"), [f"- Inputs: {args.data} test images; T={args.T}; {args.timing_batches} "
                                        f"batches per pass, {args.rounds} interleaved rounds (median)"],
                  script=__file__)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = s_rows + u_rows
    with open(out / "inference_speed.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (out / "inference_speed.md").write_text(report(head, s_rows, s_notes, u_rows, u_notes))
    print(f"wrote {out / 'inference_speed.md'} and {out / 'inference_speed.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
