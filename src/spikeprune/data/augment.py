"""Training-time augmentation on whole batches in plain PyTorch, set from YAML (``data.augment``).

.. code-block:: yaml

    data:
      augment: {crop: 4, flip: true}                    # CIFAR: pad 4 px with zeros, random 32x32 crop, h-flip
      augment: {flip: true, roll: 5, rotate: 15, cutout: 8}   # event frames (DVS): the usual NDA-style set

Transforms, in this order, each drawn independently per sample (one draw per sample for all of its time steps,
so event frames move together):

* ``crop: P`` — zero-pad by ``P`` pixels on each side, then crop back to the original size at a random offset;
* ``flip: true`` — mirror left-right with probability 1/2;
* ``roll: S`` — shift circularly by up to ``S`` pixels in each direction (DVS: events that leave come back);
* ``rotate: D`` — rotate by a uniform angle in ``[-D, D]`` degrees (nearest neighbour, zeros outside: event
  counts stay counts);
* ``cutout: L`` — zero an ``L``x``L`` square at a random centre (DeVries & Taylor, 2017).

Inputs are ``[B, C, H, W]`` (images, on [0, 1] values before normalisation) or ``[B, T, C, H, W]`` (frames).
Draws come from a generator seeded by ``(seed, epoch, batch, rank)``, so a resumed run sees the same batches as an
uninterrupted one, and no state needs checkpointing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

KEYS = ("crop", "flip", "roll", "rotate", "cutout")


@dataclass(frozen=True)
class AugmentSpec:
    crop: int = 0
    flip: bool = False
    roll: int = 0
    rotate: float = 0.0
    cutout: int = 0

    @classmethod
    def parse(cls, spec: dict | None, key: str = "data.augment") -> AugmentSpec | None:
        """A spec from the YAML mapping (``None`` or ``{}``: no augmentation); ``ValueError`` names a bad key."""
        if not spec:
            return None
        if not isinstance(spec, dict):
            raise ValueError(f"config key '{key}' must be a mapping of {', '.join(KEYS)}, got {spec!r}")
        unknown = [k for k in spec if k not in KEYS]
        if unknown:
            raise ValueError(f"config key '{key}.{unknown[0]}' is unknown (allowed: {', '.join(KEYS)})")
        out = {}
        for k, v in spec.items():
            if k == "flip":
                if not isinstance(v, bool):
                    raise ValueError(f"config key '{key}.flip' must be true or false, got {v!r}")
            elif isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or \
                    (k != "rotate" and (not float(v).is_integer() or v > 4096)) or (k == "rotate" and v > 180):
                rng = "[0, 180] degrees" if k == "rotate" else "a whole number of pixels in [0, 4096]"
                raise ValueError(f"config key '{key}.{k}' must be {rng}, got {v!r}")
            out[k] = v if k in ("flip", "rotate") else int(v)
        return cls(**out)


class Augment:
    """The batch transform of an :class:`AugmentSpec`; the loaders call :meth:`at` for each training batch."""

    def __init__(self, spec: AugmentSpec, seed: int = 0):
        self.spec, self.seed = spec, int(seed)

    def at(self, epoch: int, batch: int, rank: int = 0):
        """The transform of one batch, with its own generator (see the module docstring)."""
        g = torch.Generator().manual_seed(hash((self.seed, int(epoch), int(batch), int(rank))) % 2**63)
        return lambda x: self(x, g)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if x.dim() not in (4, 5):
            raise ValueError(f"augment takes [B, C, H, W] or [B, T, C, H, W] batches, got {list(x.shape)}")
        g = generator if generator is not None else torch.Generator().manual_seed(self.seed)
        shape = x.shape
        x = x.reshape(shape[0], -1, *shape[-2:])  # time steps fold into channels: one draw per sample
        s, B, (H, W) = self.spec, x.shape[0], x.shape[-2:]
        if s.crop:
            x = _shift(F.pad(x, (s.crop,) * 4), _uniform_int(g, B, 0, 2 * s.crop), _uniform_int(g, B, 0, 2 * s.crop),
                       H, W)
        if s.flip:
            flip = torch.rand(B, generator=g) < 0.5
            x = torch.where(flip.view(B, 1, 1, 1).to(x.device), x.flip(-1), x)
        if s.roll:
            dy, dx = _uniform_int(g, B, -s.roll, s.roll), _uniform_int(g, B, -s.roll, s.roll)
            x = _shift(x, dy % H, dx % W, H, W, wrap=True)
        if s.rotate:
            angle = (torch.rand(B, generator=g) * 2 - 1) * math.radians(s.rotate)
            cos, sin = angle.cos(), angle.sin()
            theta = torch.stack([torch.stack([cos, -sin, torch.zeros(B)], -1),
                                 torch.stack([sin, cos, torch.zeros(B)], -1)], 1).to(x)
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)
        if s.cutout:
            top = _uniform_int(g, B, 0, H - 1).view(B, 1, 1) - s.cutout // 2
            left = _uniform_int(g, B, 0, W - 1).view(B, 1, 1) - s.cutout // 2
            ys, xs = torch.arange(H).view(1, H, 1), torch.arange(W).view(1, 1, W)
            inside = (ys >= top) & (ys < top + s.cutout) & (xs >= left) & (xs < left + s.cutout)
            x = x.masked_fill(inside.unsqueeze(1).to(x.device), 0)
        return x.reshape(shape)


def _uniform_int(g: torch.Generator, n: int, lo: int, hi: int) -> torch.Tensor:
    """``n`` integers uniform in ``[lo, hi]``."""
    return torch.randint(lo, hi + 1, (n,), generator=g)


def _shift(x: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, H: int, W: int, wrap: bool = False) -> torch.Tensor:
    """Per-sample window ``x[b, :, oy_b : oy_b + H, ox_b : ox_b + W]`` (indices modulo the size with ``wrap``)."""
    B = x.shape[0]
    rows = oy.view(B, 1, 1) + torch.arange(H).view(1, H, 1)
    cols = ox.view(B, 1, 1) + torch.arange(W).view(1, 1, W)
    if wrap:
        rows, cols = rows % x.shape[-2], cols % x.shape[-1]
    rows, cols = rows.expand(B, H, W).to(x.device), cols.expand(B, H, W).to(x.device)
    b = torch.arange(B, device=x.device).view(B, 1, 1).expand(B, H, W)
    return x[b, :, rows, cols].permute(0, 3, 1, 2).contiguous()


def make_augment(spec: dict | None, seed: int = 0) -> Augment | None:
    """The training-batch transform of a ``data.augment`` mapping, or ``None`` for none."""
    parsed = AugmentSpec.parse(spec)
    return Augment(parsed, seed) if parsed is not None else None
