"""The fused neuron on CUDA: the ``torch.compile`` path (and the eager path) against the step-by-step reference.

Every GPU test is marked ``gpu`` and skipped without CUDA. The compiled loops are the very functions the CPU runs
eagerly, so two CPU checks live here too: the in-place surrogates they use equal the plain ones, and (opt-in,
``SPIKEPRUNE_TEST_COMPILE_CPU=1``, about two minutes on a laptop core) the compiled loops agree on the CPU."""

from __future__ import annotations

import itertools
import os
import shutil
import zlib

import pytest
import torch

import spikeprune.neurons as neurons
from spikeprune.neurons import IF, LIF, PLIF, SURROGATES, reference_multistep

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

KINDS = ["lif", "lif_nodecay", "if", "plif"]
RESETS = [0.0, -0.3, None]


def build(kind: str, v_reset, detach_reset: bool, surrogate: str, tau: float = 3.0):
    kw = dict(v_threshold=1.0, v_reset=v_reset, detach_reset=detach_reset, surrogate=surrogate)
    if kind == "lif":
        return LIF(tau=tau, **kw)
    if kind == "lif_nodecay":
        return LIF(tau=tau, decay_input=False, **kw)
    if kind == "if":
        return IF(**kw)
    return PLIF(init_tau=tau, **kw)


def reference(neuron, x):
    k = torch.sigmoid(neuron.w).to(x.dtype) if isinstance(neuron, PLIF) else (
        1.0 if neuron.kind == "if" else 1.0 / neuron.tau)
    v0 = torch.full_like(x[0], 0.0 if neuron.v_reset is None else neuron.v_reset)
    return reference_multistep(x, neuron.kind, k, neuron.v_threshold, neuron.v_reset, neuron.decay_input,
                               neuron.detach_reset, neuron.surrogate, v0=v0)


def compare(kind, v_reset, detach_reset, surrogate, device, shape=(6, 3, 5), dtype=torch.float32):
    """Fused (whatever path ``device`` takes) vs reference: equal spikes, gradients within 1e-6."""
    torch.manual_seed(zlib.crc32(repr((kind, v_reset, detach_reset, surrogate)).encode()))
    neuron = build(kind, v_reset, detach_reset, surrogate).to(device=device, dtype=dtype)
    scale = 4.5 if kind in ("lif", "plif") else 1.8
    x = (torch.rand(*shape, dtype=dtype, device=device) * scale - 0.3).requires_grad_()
    w_out = torch.randn(*shape, dtype=dtype, device=device)
    s = neuron(x)
    (s * w_out).sum().backward()
    g = x.grad.clone()
    gw = neuron.w.grad.clone() if kind == "plif" else None
    x.grad = None
    neuron.zero_grad()
    r = reference(neuron, x)
    (r * w_out).sum().backward()
    assert torch.equal(s, r)
    assert 0 < s.sum() < s.numel()
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    assert torch.allclose(g, x.grad, rtol=tol, atol=tol), (g - x.grad).abs().max()
    if kind == "plif":
        assert abs(gw.item() - neuron.w.grad.item()) <= tol * (1 + abs(neuron.w.grad.item()))


# ------------------------------------------------------------------------------------------- CPU checks
@pytest.mark.parametrize("name", sorted(SURROGATES))
@pytest.mark.parametrize("alpha", [0.7, None])
def test_inplace_surrogate_equals_plain(name, alpha):
    sur = neurons.make_surrogate(name, alpha)
    x = torch.linspace(-3, 3, 1001, dtype=torch.float64)
    want = sur.grad(x)
    got = sur.grad_(x.clone())
    assert torch.allclose(got, want, rtol=1e-15, atol=0)


def test_cpu_never_compiles():
    x = torch.zeros(2, 3)
    assert neurons._loops(x) == (neurons._forward_loop, neurons._backward_loop)


@pytest.mark.skipif(os.environ.get("SPIKEPRUNE_TEST_COMPILE_CPU") != "1" or shutil.which("g++") is None,
                    reason="opt-in (SPIKEPRUNE_TEST_COMPILE_CPU=1): compiling takes minutes on a CPU")
def test_compiled_loops_on_cpu(monkeypatch):
    monkeypatch.setattr(neurons, "_compile_wanted", lambda x: True)
    for kind, v_reset, detach, sur in [("lif", 0.0, True, "atan"), ("lif", None, False, "sigmoid"),
                                       ("plif", -0.3, False, "triangle"), ("if", None, True, "atan")]:
        compare(kind, v_reset, detach, sur, "cpu")


# ------------------------------------------------------------------------------------------- GPU tests
@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("kind, v_reset, detach_reset", list(itertools.product(KINDS, RESETS, [True, False])))
@pytest.mark.parametrize("compiled", [True, False])
def test_cuda_matches_reference(kind, v_reset, detach_reset, compiled):
    neurons.use_compile(compiled)
    try:
        compare(kind, v_reset, detach_reset, "atan", "cuda", shape=(6, 4, 33))
    finally:
        neurons.use_compile(None)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("surrogate", sorted(SURROGATES))
def test_cuda_compiled_surrogates(surrogate):
    neurons.use_compile(True)
    try:
        compare("lif", 0.0, True, surrogate, "cuda", shape=(4, 2, 3, 5, 5))
    finally:
        neurons.use_compile(None)


@pytest.mark.gpu
@cuda
def test_cuda_compiled_float64_exact():
    neurons.use_compile(True)
    try:
        compare("plif", -0.3, False, "atan", "cuda", dtype=torch.float64)
    finally:
        neurons.use_compile(None)


@pytest.mark.gpu
@cuda
def test_cuda_compiled_equals_eager_and_cpu():
    # the same model on CPU, CUDA eager and CUDA compiled: identical spikes, gradients within 1e-6
    torch.manual_seed(0)
    x_cpu = torch.rand(4, 8, 64) * 4
    w_cpu = torch.randn(4, 8, 64)
    grads, spikes = [], []
    for device, compiled in [("cpu", None), ("cuda", False), ("cuda", True)]:
        neurons.use_compile(compiled)
        try:
            x = x_cpu.to(device).requires_grad_()
            s = LIF(tau=2.0)(x)
            (s * w_cpu.to(device)).sum().backward()
            spikes.append(s.cpu())
            grads.append(x.grad.cpu())
        finally:
            neurons.use_compile(None)
    assert torch.equal(spikes[0], spikes[1]) and torch.equal(spikes[0], spikes[2])
    assert torch.allclose(grads[0], grads[1], rtol=1e-6, atol=1e-6)
    assert torch.allclose(grads[0], grads[2], rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@cuda
def test_cuda_compiled_stateful_and_observer():
    neurons.use_compile(True)
    try:
        torch.manual_seed(1)
        x = torch.rand(8, 2, 16, device="cuda") * 1.5
        n = LIF(tau=2.0, stateful=True)
        seen = []
        n.observers.append(lambda m, s, h: seen.append(h.detach()))
        a, b = n(x[:4]), n(x[4:])
        full = LIF(tau=2.0)(x)
        assert torch.equal(torch.cat([a, b]), full)
        assert len(seen) == 2 and seen[0].shape == (4, 2, 16)
    finally:
        neurons.use_compile(None)
