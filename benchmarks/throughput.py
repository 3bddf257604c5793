"""Training and inference throughput: spikeprune vs SpikingJelly 2.0.0 vs snnTorch 1.0.0 on identical SNNs.

For each configuration (``fc3`` at T=4 and T=8, ``convnet`` at T=4; same batch size everywhere) the script builds
the same network in every framework, plus spikeprune's network with every neuron replaced by ``nn.Identity``
(the cost of the layers alone), and times, side by side in one run with the framework order rotated every round:

* a **training step**: forward, cross-entropy on the time-mean of the ``[T, B, 10]`` outputs, backward, Adam
  step (and SpikingJelly's ``functional.reset_net``);
* an **inference batch**: eval mode, ``torch.no_grad()``.

It reports the median samples/s over rounds and the ratios spikeprune / other framework (> 1: spikeprune is
faster), and the neuron overhead, spikeprune's training step time over the identity network's.

What is identical, and what cannot be:

* **Static first layer (all frameworks):** the first synaptic layer (fc3: ``Linear(784, 800)``; convnet:
  ``Conv2d(1, 32) + BatchNorm2d``) runs once per batch on the image ``[B, ...]``; its output is repeated over T
  (``expand``, no copy) and fed to the first LIF. This is spikeprune's direct encoding; SpikingJelly gets the
  same static stem in single-step mode and a multi-step body; snnTorch computes the stem once before its loop.
* **Layers:** no biases, same widths; SpikingJelly uses ``layer.Linear/Conv2d/BatchNorm2d/MaxPool2d/Flatten``
  with ``step_mode='m'`` (``[T*B, ...]`` folded, as spikeprune); snnTorch uses plain ``nn`` layers called once per
  time step inside its loop (its single-step design), so its BatchNorm normalises per step.
* **LIF:** spikeprune ``LIF(tau=2)`` = SpikingJelly ``LIFNode(tau=2., detach_reset=True, surrogate ATan(α=2),
  step_mode='m')``: ``H = V + (X - V)/2``, spike ``H >= 1``, hard reset to 0 with a detached reset. snnTorch
  ``Leaky(beta=0.5, threshold=1, spike_grad=atan(alpha=2), reset_mechanism="zero")`` (default ``reset_delay=True``:
  the detached reset is applied at the start of the next step, which is the same recursion) computes
  ``H = 0.5 V + X``: it has no input decay, so its input is ours times 1/τ, a reparametrisation of the layer before
  each neuron (it does not change the cost; the parity check below scales those layers by 0.5), and it fires on
  ``H > 1`` rather than ``>=`` (ties have measure zero).
* **Parity check:** with spikeprune's weights copied in (float64, eval mode), the other frameworks' outputs are
  compared with spikeprune's; the table reports the largest difference.

SpikingJelly 2.0.0 has no backend argument: on a CPU it runs its Torch implementation; on CUDA it picks its own
kernels. spikeprune compiles its neuron on CUDA when triton is available (warm-up steps absorb the compilation).

Usage::

    python benchmarks/throughput.py                                  # CPU, batch 128, writes benchmarks/results
    python benchmarks/throughput.py --device cuda --batch 128 512
    python benchmarks/throughput.py --quick --out /tmp/tp              # seconds: a smoke run (tiny batches)
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from spikeprune._ext import use_cpp
from spikeprune.layers import Linear
from spikeprune.models import create_model
from spikeprune.neurons import BaseNeuron

CONFIGS = [("fc3", 4), ("fc3", 8), ("convnet", 4)]
CONV_CHANNELS = (16, 32)  # spikeprune convnet defaults
TAU = 2.0


# ---------------------------------------------------------------------------------------------- header
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{platform.node()}: {cpu}, {os.cpu_count()} logical cores, {platform.system()} {platform.release()}"


def header(title: str, argv: list[str], device: torch.device, extra: list[str] = (), script: str = __file__
           ) -> list[str]:
    """The results header: command, machine, date and load (also used by the other benchmark scripts)."""
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return [f"# {title}", "",
            f"- Command: `{shlex.join(['python', f'benchmarks/{Path(script).name}', *argv])}`",
            f"- Machine: {machine()}; device {dev}; torch {torch.__version__}, {torch.get_num_threads()} threads",
            f"- Date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
            f"- Load average at start (1, 5, 15 min): {load}", *extra, ""]


# ---------------------------------------------------------------------------------------------- models
def ours(name: str, T: int, identity: bool = False) -> nn.Module:
    model = create_model(name, T=T, neuron={"type": "lif", "tau": TAU})
    if identity:
        for parent in list(model.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, BaseNeuron):
                    setattr(parent, child_name, nn.Identity())
    return model


class SJNet(nn.Module):
    """The same network in SpikingJelly 2.x: a single-step static stem, then a multi-step body."""

    def __init__(self, name: str, T: int):
        super().__init__()
        from spikingjelly.activation_based import layer, neuron, surrogate

        def lif():
            return neuron.LIFNode(tau=TAU, detach_reset=True, surrogate_function=surrogate.ATan(alpha=2.0),
                                  step_mode="m")

        self.T = T
        if name == "fc3":
            self.stem = nn.Sequential(layer.Flatten(step_mode="s"), layer.Linear(784, 800, bias=False))
            self.body = nn.Sequential(lif(), layer.Linear(800, 800, bias=False, step_mode="m"), lif(),
                                      layer.Linear(800, 10, bias=False, step_mode="m"))
        else:
            c1, c2 = CONV_CHANNELS  # spikeprune's convnet: conv -> BN -> maxpool -> LIF (the first pool is static)
            self.stem = nn.Sequential(layer.Conv2d(1, c1, 3, 1, 1, bias=False), layer.BatchNorm2d(c1),
                                      layer.MaxPool2d(2))
            self.body = nn.Sequential(
                lif(), layer.Conv2d(c1, c2, 3, 1, 1, bias=False, step_mode="m"),
                layer.BatchNorm2d(c2, step_mode="m"), layer.MaxPool2d(2, step_mode="m"), lif(),
                layer.Flatten(step_mode="m"), layer.Linear(c2 * 7 * 7, 256, bias=False, step_mode="m"), lif(),
                layer.Linear(256, 10, bias=False, step_mode="m"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        return self.body(s.unsqueeze(0).expand(self.T, *s.shape))


class SnnTorchNet(nn.Module):
    """The same network in snnTorch 1.0: plain ``nn`` layers and ``Leaky`` neurons in a loop over T."""

    def __init__(self, name: str, T: int):
        super().__init__()
        import snntorch as snn
        from snntorch import surrogate

        def lif():
            return snn.Leaky(beta=1 - 1 / TAU, threshold=1.0, spike_grad=surrogate.atan(alpha=2.0),
                             reset_mechanism="zero")

        self.T, self.name = T, name
        if name == "fc3":  # attribute order = parameter order = spikeprune's
            self.fc1, self.lif1 = nn.Linear(784, 800, bias=False), lif()
            self.fc2, self.lif2 = nn.Linear(800, 800, bias=False), lif()
            self.fc3 = nn.Linear(800, 10, bias=False)
            self.lifs = [self.lif1, self.lif2]
            self.pre_neuron = ["fc1.weight", "fc2.weight"]
        else:
            c1, c2 = CONV_CHANNELS
            self.conv1, self.bn1, self.lif1 = nn.Conv2d(1, c1, 3, 1, 1, bias=False), nn.BatchNorm2d(c1), lif()
            self.conv2, self.bn2, self.lif2 = nn.Conv2d(c1, c2, 3, 1, 1, bias=False), nn.BatchNorm2d(c2), lif()
            self.fc1, self.lif3 = nn.Linear(c2 * 7 * 7, 256, bias=False), lif()
            self.fc2 = nn.Linear(256, 10, bias=False)
            self.lifs = [self.lif1, self.lif2, self.lif3]
            self.pre_neuron = ["bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias", "fc1.weight"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for lif in self.lifs:
            lif.reset_mem()
        outs = []
        dt = x.dtype  # snnTorch's spikes are float32 whatever the membrane (a no-op in float32)
        if self.name == "fc3":
            cur1 = self.fc1(x.flatten(1))
            for _ in range(self.T):
                s1, _ = self.lif1(cur1)
                s2, _ = self.lif2(self.fc2(s1.to(dt)))
                outs.append(self.fc3(s2.to(dt)))
        else:
            cur1 = F.max_pool2d(self.bn1(self.conv1(x)), 2)
            for _ in range(self.T):
                s1, _ = self.lif1(cur1)
                s2, _ = self.lif2(F.max_pool2d(self.bn2(self.conv2(s1.to(dt))), 2))
                s3, _ = self.lif3(self.fc1(s2.to(dt).flatten(1)))
                outs.append(self.fc2(s3.to(dt)))
        return torch.stack(outs)


def sj_reset():
    from spikingjelly.activation_based import functional

    return functional.reset_net


def available(framework: str) -> bool:
    framework = framework.removesuffix("-nhwc")
    try:
        if framework == "spikingjelly":
            import spikingjelly.activation_based  # noqa: F401
        elif framework == "snntorch":
            import snntorch  # noqa: F401
    except ImportError:
        return False
    return True


def build(framework: str, name: str, T: int) -> tuple[nn.Module, object]:
    """(model, reset function or None)."""
    if framework in ("spikeprune", "spikeprune-eager"):  # eager: the same model, compiled kernels off (below)
        return ours(name, T), None
    if framework in ("spikeprune-identity", "spikeprune-dense-linear"):
        # every Linear a dense matrix product. With identity neurons the layers after the static stem see its
        # output repeated over T, whose temporal differences are zero after the first step: the spike-sparse path
        # would do 1/T of the synaptic work and the identity net would no longer time "the layers alone"
        model = ours(name, T, identity=framework == "spikeprune-identity")
        for m in model.modules():
            if isinstance(m, Linear):
                m.max_input_density = 0.0
        return model, None
    if framework.endswith("-nhwc"):  # the other framework with its conv weights (so activations) channels-last
        model, reset = build(framework[:-len("-nhwc")], name, T)
        return model.to(memory_format=torch.channels_last), reset
    if framework == "spikingjelly":
        return SJNet(name, T), sj_reset()
    return SnnTorchNet(name, T), None


# --------------------------------------------------------------------------------------------- parity
@torch.no_grad()
def parity(name: str, T: int, framework: str) -> tuple[float, float]:
    """Largest |output difference| to spikeprune with copied weights (float64, eval), and spikeprune's hidden
    firing rate on that input (so a 0.0 difference is not a silent network)."""
    torch.manual_seed(0)
    ref = ours(name, T).double().eval()
    other, reset = build(framework, name, T)
    other = other.double().eval()
    src, dst = list(ref.parameters()), list(other.parameters())
    assert [p.shape for p in src] == [p.shape for p in dst], f"{framework} {name}: parameter shapes differ"
    scaled = set(getattr(other, "pre_neuron", ()))
    for (pname, p), q in zip(other.named_parameters(), src):
        p.copy_(q * (1 / TAU if pname in scaled else 1.0))
    x = torch.rand(8, 1, 28, 28, dtype=torch.float64) * 5
    rates = []
    for n in ref.neurons():
        n.observers.append(lambda m, s, h: rates.append(float(s.mean())))
    want = ref(x)
    got = other(x)
    if reset is not None:
        reset(other)
    return float((want - got).abs().max()), (sum(rates) / len(rates) if rates else 0.0)


# --------------------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(model: nn.Module, reset, phase: str, x: torch.Tensor, y: torch.Tensor):
    if phase == "train":
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step():
            out = model(x)
            loss = F.cross_entropy(out.mean(0), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if reset is not None:
                reset(model)
    else:
        model.eval()

        def step():
            with torch.no_grad():
                model(x)
            if reset is not None:
                reset(model)
    return step


def inputs(batch: int, data: str, root: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch: the first ``batch`` Fashion-MNIST training images (normalised as the trainer does) and labels,
    or, with ``data == "synthetic"``, uniform noise of that shape and random labels."""
    if data == "synthetic":
        g = torch.Generator().manual_seed(batch)
        return torch.rand(batch, 1, 28, 28, generator=g), torch.randint(0, 10, (batch,), generator=g)
    from spikeprune.data import create_dataset

    ds = create_dataset(data, "train", root=root)
    return torch.stack([ds[i][0] for i in range(batch)]), torch.tensor([int(ds[i][1]) for i in range(batch)])


def hidden_rates(name: str, T: int, x: torch.Tensor, y: torch.Tensor, steps: int) -> list[float]:
    """spikeprune's firing rate per spiking layer on the timed batch, after ``steps`` Adam steps from the same
    initialisation as the timed model: how much the spike-sparse Linear path (``Linear.max_input_density``) has to
    skip, since its speed depends on it."""
    torch.manual_seed(0)
    model = ours(name, T).to(x.device).train(steps > 0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    rates: list[float] = []
    for n in model.neurons():
        n.observers.append(lambda m, s, h: rates.append(float(s.detach().float().mean())))
    if steps == 0:  # inference: the freshly initialised model, as timed
        with torch.no_grad():
            model(x)
    for _ in range(steps):
        rates.clear()
        loss = F.cross_entropy(model(x).mean(0), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return rates


def measure_config(name: str, T: int, batch: int, frameworks: list[str], args, device: torch.device) -> list[dict]:
    x, y = (t.to(device) for t in inputs(batch, args.data, args.data_root))
    rows = []
    if name == "fc3":  # no 4-D activations: the channels-last variants would time the same thing again
        frameworks = [fw for fw in frameworks if not fw.endswith("-nhwc")]
    for phase in ("train", "infer"):
        steps = {}
        for fw in frameworks:
            torch.manual_seed(0)
            model, reset = build(fw, name, T)
            steps[fw] = make_step(model.to(device), reset, phase, x, y)
            if fw == "spikeprune-eager":
                steps[fw] = without_cpp(steps[fw])
            for _ in range(args.warmup):
                steps[fw]()
        times: dict[str, list[float]] = {fw: [] for fw in frameworks}
        for r in range(args.rounds):
            order = frameworks[r % len(frameworks):] + frameworks[:r % len(frameworks)]
            for fw in order:
                sync(device)
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    steps[fw]()
                sync(device)
                times[fw].append((time.perf_counter() - t0) / args.steps)
        n_steps = args.warmup + args.rounds * args.steps
        rates = hidden_rates(name, T, x, y, n_steps if phase == "train" else 0)
        for fw in frameworks:
            med = statistics.median(times[fw])
            rows.append({"model": name, "T": T, "batch": batch, "phase": phase, "framework": fw,
                         "hidden_rates": " ".join(f"{r:.3f}" for r in rates),
                         "samples_per_s": round(batch / med, 2), "ms_per_batch": round(1e3 * med, 3),
                         "ms_min": round(1e3 * min(times[fw]), 3), "ms_max": round(1e3 * max(times[fw]), 3),
                         "rounds": args.rounds, "steps": args.steps})
        print(f"{name} T={T} batch {batch} {phase}: " + ", ".join(
            f"{r['framework']} {r['samples_per_s']:.1f}/s" for r in rows if r["phase"] == phase), flush=True)
    return rows


def without_cpp(step):
    """``step`` run with spikeprune's compiled CPU kernels switched off (the eager PyTorch loops)."""
    def run():
        use_cpp(False)
        try:
            step()
        finally:
            use_cpp(True)
    return run


# ---------------------------------------------------------------------------------------------- report
def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def report(rows: list[dict], parities: list[tuple], frameworks: list[str], head: list[str],
           data: str = "synthetic") -> str:
    lines = list(head)
    lines += ["## Setup", "",
              "- Static first layer (all frameworks): the first Linear (fc3) or Conv2d+BatchNorm2d (convnet) runs "
              "once per batch on the image, its output is repeated over T (`expand`) into the first LIF.",
              "- LIF everywhere: tau=2 (snnTorch beta=0.5, no input decay: input = ours/tau), V_th=1, hard reset to "
              "0, detached reset, ATan(alpha=2) surrogate. snnTorch runs its layers once per time step (its "
              "single-step design; BatchNorm per step); spikeprune and SpikingJelly fold T into the batch.",
              "- Training step: forward, cross-entropy on the time-mean output, backward, Adam (lr 1e-3). "
              "Inference: eval mode, `torch.no_grad()`. Inputs: " + (
                  "uniform noise of Fashion-MNIST shape, random labels." if data == "synthetic" else
                  f"the first batch of {data}'s training images (normalised), their labels; every step trains on "
                  "that batch."),
              "- Spike-sparse layers: spikeprune's `Linear` runs its forward and weight gradient over the non-zero "
              "inputs only when at most 35% of them are non-zero (`Linear.max_input_density`; less for layers with "
              "few outputs); its speed therefore "
              "depends on the firing rates, listed per spiking layer for the last timed step (measured on "
              "spikeprune's model after as many steps from the same initialisation; for inference, of the freshly "
              "initialised model that is timed, which fires far less than a trained one, so the inference ratios "
              "of fc3 overstate what a trained model gets). The other frameworks always run dense matrix products.",
              "- Layout: spikeprune's Conv2d makes its input channels-last (NHWC) on CPU, where oneDNN's conv, BN "
              "and max-pool kernels are faster; SpikingJelly and snnTorch run their default NCHW. The *NHWC* "
              "columns (convnet only) time the other frameworks after `model.to(memory_format=torch.channels_last)`, "
              "which their users can do by hand: the gap that is left there is the neurons' alone.",
              "- Ratios are spikeprune samples/s over the other framework's (> 1: spikeprune faster). "
              "Neuron overhead: spikeprune training step time over the same network with identity neurons "
              "(same layers, same layout, every Linear a dense matrix product: the synaptic work alone); "
              "spikeprune's own Linear layers run spike-sparse, so the *dense Linear* column compares like with "
              "like, spikeprune with every Linear dense (`max_input_density = 0`) over the identity network (the "
              "neurons' own cost). "
              "*compiled / eager*: spikeprune with its compiled CPU kernels (neuron, "
              "spike-sparse Linear) "
              "(`spikeprune._ext`) over the same model with it switched off (`use_cpp(False)`).", ""]
    def get(cfg, phase, fw):
        return next((r for r in rows if (r["model"], r["T"], r["batch"]) == cfg and r["phase"] == phase
                     and r["framework"] == fw), None)
    cfgs = list(dict.fromkeys((r["model"], r["T"], r["batch"]) for r in rows))
    others = [fw for fw in ("spikingjelly", "snntorch", "spikingjelly-nhwc", "snntorch-nhwc") if fw in frameworks]
    names = {"spikingjelly": "SpikingJelly", "snntorch": "snnTorch", "spikingjelly-nhwc": "SpikingJelly NHWC",
             "snntorch-nhwc": "snnTorch NHWC"}
    for phase, title in (("train", "Training"), ("infer", "Inference")):
        cols = ["model", "T", "batch", "spikeprune /s", *[f"{names[o]} /s" for o in others],
                *[f"ours / {names[o]}" for o in others]]
        if "spikeprune-eager" in frameworks:
            cols.append("compiled / eager kernels")
        if phase == "train":
            cols.append("neuron overhead (ours / identity step time)")
            if "spikeprune-dense-linear" in frameworks:
                cols.append("neuron overhead, dense Linear (ours / identity)")
        cols.append("firing rates (last step)" if phase == "train" else "firing rates (untrained model)")
        lines += [f"## {title} (samples/s, median of rounds)", "", "| " + " | ".join(cols) + " |",
                  "|" + "---|" * 3 + "---:|" * (len(cols) - 3)]
        for cfg in cfgs:
            me = get(cfg, phase, "spikeprune")
            sps = {fw: (get(cfg, phase, fw) or {}).get("samples_per_s") for fw in frameworks}
            cells = [*map(str, cfg), f"{sps['spikeprune']:.1f}", *[f"{sps[o]:.1f}" if sps[o] else "-" for o in others],
                     *[ratio(sps["spikeprune"], sps[o]) for o in others]]
            if "spikeprune-eager" in frameworks:
                cells.append(ratio(sps["spikeprune"], sps["spikeprune-eager"]))
            if phase == "train":
                ident = get(cfg, phase, "spikeprune-identity")
                cells.append(ratio(me["ms_per_batch"], ident["ms_per_batch"]) if ident else "-")
                if "spikeprune-dense-linear" in frameworks:
                    dl = get(cfg, phase, "spikeprune-dense-linear")
                    cells.append(ratio(dl["ms_per_batch"], ident["ms_per_batch"]) if dl and ident else "-")
            cells.append(me["hidden_rates"])
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if parities:
        lines += ["## Parity (float64, eval, spikeprune weights copied; snnTorch's pre-neuron layers scaled by 1/tau)",
                  "", "| model | T | framework | max abs output difference | spikeprune firing rate |",
                  "|---|---|---|---:|---:|"]
        lines += [f"| {m} | {T} | {fw} | {d:.3g} | {rate:.3f} |" for m, T, fw, d, rate in parities]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--batch", type=int, nargs="+", default=[128])
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (the median is reported)")
    p.add_argument("--steps", type=int, default=5, help="steps per framework per round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--frameworks", nargs="+",
                   default=["spikeprune", "spikeprune-eager", "spikeprune-identity", "spikeprune-dense-linear",
                            "spikingjelly", "snntorch",
                            "spikingjelly-nhwc", "snntorch-nhwc"],
                   help="'-nhwc' variants: that framework's model converted to channels-last (convnet only)")
    p.add_argument("--configs", nargs="+", default=[f"{m}:{T}" for m, T in CONFIGS], help="model:T pairs")
    p.add_argument("--data", default="auto",
                   help="fashion_mnist (real images: realistic firing rates), synthetic (uniform noise), or auto "
                        "(fashion_mnist when its files are found, else synthetic)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--quick", action="store_true", help="tiny smoke run: batch 4, 1 round of 1 step")
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc malloc's defaults (by default the process runs as spikeprune's trainer sets it, "
                        "spikeprune.perf.keep_freed_memory, which applies to every framework in this process)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.rounds, args.steps, args.warmup = [4], 1, 1, 1
    if args.data == "auto":
        try:
            inputs(1, "fashion_mnist", args.data_root)
            args.data = "fashion_mnist"
        except (FileNotFoundError, RuntimeError, OSError):
            args.data = "synthetic"
    kept = False
    if not args.default_malloc and args.device != "cuda":
        from spikeprune.perf import keep_freed_memory

        kept = keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    frameworks = [fw for fw in args.frameworks if available(fw)]
    missing = [fw for fw in args.frameworks if fw not in frameworks]
    if missing:
        print(f"skipping (not installed): {', '.join(missing)}")
    if "spikeprune" not in frameworks:
        frameworks.insert(0, "spikeprune")
    configs = [(c.split(":")[0], int(c.split(":")[1])) for c in args.configs]
    head = header("Throughput: spikeprune vs SpikingJelly vs snnTorch", argv, device,
                  [f"- Versions: {versions(frameworks)}",
                   f"- Timing: {args.warmup} warm-up steps, then {args.rounds} rounds x {args.steps} steps per "
                   "framework, order rotated each round",
                   "- Allocator: " + ("glibc malloc keeps freed blocks for reuse (`spikeprune.perf.keep_freed_memory`, "
                                      "what spikeprune's trainer sets on CPU), for all frameworks in this process"
                                      if kept else "glibc malloc defaults")])
    rows, parities = [], []
    for name, T in configs:
        for fw in ("spikingjelly", "snntorch"):
            if fw in frameworks:
                diff, rate = parity(name, T, fw)
                parities.append((name, T, fw, diff, rate))
        for b in args.batch:
            rows += measure_config(name, T, b, frameworks, args, device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "throughput.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (out / "throughput.md").write_text(report(rows, parities, frameworks, head, args.data))
    print(f"wrote {out / 'throughput.md'} and {out / 'throughput.csv'}")
    return 0


def versions(frameworks: list[str]) -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("spikeprune", "spikingjelly", "snntorch"):
        try:
            out.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            pass
    return ", ".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
