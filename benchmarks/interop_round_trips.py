"""Round trips spikeprune -> NIR -> snnTorch / SpikingJelly -> back, on the pruned nets of tests/test_interop.py:
max |output difference| (float64) and whether every spiking layer's spike count is equal.

    python3 benchmarks/interop_round_trips.py
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import test_interop as ti  # noqa: E402
from snntorch.import_nir import import_from_nir as snn_import  # noqa: E402
from spikingjelly.activation_based import functional  # noqa: E402
from spikingjelly.activation_based.nir_exchange import import_from_nir as sj_import  # noqa: E402

from spikeprune.export.interop import (  # noqa: E402
    KeepDtype,
    StepRunner,
    from_snntorch,
    from_spikingjelly,
    to_snntorch,
    to_spikingjelly,
)
from spikeprune.export.nir import from_nir, to_nir  # noqa: E402

T, F64 = ti.T, torch.float64


def compare(ref, model, x=None):
    got = ti.run(model, ti.inputs() if x is None else x)
    return float((got[0].double() - ref[0].double()).abs().max()), got[1] == ref[1]


def round_trips(name: str) -> tuple[list, list]:
    model = ti.pruned(name)
    gs = {t: to_nir(model, target=t) for t in ("generic", "snntorch", "spikingjelly")}
    ref = ti.run(model.double(), ti.inputs())
    rows = []
    for t, g in gs.items():
        rows.append((f"spikeprune -> NIR({t}) -> spikeprune", compare(ref, from_nir(g).double())))
    released = snn_import(gs["snntorch"])
    for k, m in list(released.named_children()):
        if type(m).__name__ == "Leaky":
            setattr(released, k, KeepDtype(m))
    rows.append(("-> NIR(snntorch) -> snntorch.import_from_nir", compare(ref, StepRunner(released.double(), T))))
    for t in ("generic", "snntorch"):
        rows.append((f"-> NIR({t}) -> interop.to_snntorch", compare(ref, to_snntorch(gs[t], dtype=F64))))
    plain = ti._unwrap_snntorch(to_snntorch(gs["snntorch"], dtype=F64))
    back = from_snntorch(plain, ti.inputs()[:2]).double()
    rows.append(("-> snnTorch -> snnTorch export_to_nir -> spikeprune", compare(ref, back)))
    released = sj_import(gs["spikingjelly"], dt=1e-4, dtype=F64)
    rows.append(("-> NIR(spikingjelly) -> SpikingJelly import_from_nir", compare(ref, StepRunner(released, T))))
    for t in ("generic", "spikingjelly"):
        rows.append((f"-> NIR({t}) -> interop.to_spikingjelly", compare(ref, to_spikingjelly(gs[t], dtype=F64))))
    plain = ti._sj_plain(to_spikingjelly(gs["spikingjelly"], dtype=F64))
    x = ti.inputs()
    xs = x.unsqueeze(0).expand(T, *x.shape)
    functional.reset_net(plain)
    back = from_spikingjelly(plain, xs[:, :2]).double()
    rows.append(("-> SpikingJelly -> SpikingJelly export_to_nir -> spikeprune", compare(ref, back, x)))
    return ref[1], rows


def main() -> None:
    for name in ti.NETS:
        with contextlib.redirect_stdout(io.StringIO()):  # snnTorch's importer prints its threshold scaling
            spikes, rows = round_trips(name)
        print(f"## {name}: spikes per layer {spikes}")
        for what, (err, same) in rows:
            print(f"  {what:60s} max|diff| {err:.2e}  spike counts equal: {same}")


if __name__ == "__main__":
    main()
