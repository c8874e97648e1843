"""Per-element input features of a learned optimizer (UNF paper / Harrison et al. 2022).

For every parameter element the learned function ``f`` sees 19 channels:

- 8 *tensor* channels: the parameter, its gradient, and momenta at decays
  ``MOMENTUM_DECAYS = (0.1, 0.5, 0.9, 0.99, 0.999, 0.9999)``. Each channel is divided by its root mean square over
  the element's *segment* (a parameter tensor, or a spec entry for the UNF optimizer). This makes ``f`` blind to
  the scale of the weights and gradients: multiplying a loss by 1000 leaves the features unchanged.
- 11 *step* channels: a fixed sinusoidal encoding of the step count ``t`` (log-spaced periods 1 ... 1e5,
  alternating sine and cosine), shared by all elements.

Everything here is a pure function of tensors (no in-place updates, no host syncs), so it runs inside
``torch.func`` transforms during meta-training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = ["MOMENTUM_DECAYS", "N_TENSOR_FEATURES", "N_STEP_FEATURES", "N_FEATURES", "Segments", "step_encoding",
           "segment_mean", "compute_features"]

MOMENTUM_DECAYS = (0.1, 0.5, 0.9, 0.99, 0.999, 0.9999)
N_TENSOR_FEATURES = 2 + len(MOMENTUM_DECAYS)
N_STEP_FEATURES = 11
N_FEATURES = N_TENSOR_FEATURES + N_STEP_FEATURES
_PERIODS = tuple(10 ** (5 * k / (N_STEP_FEATURES - 1)) for k in range(N_STEP_FEATURES))
_EPS = 1e-24  # added to mean squares; far below any fp32 gradient scale that matters


@dataclass(frozen=True)
class Segments:
    """Which segment (tensor or spec entry) each element of a flat parameter vector belongs to.

    ``sizes`` is set when the vector is a sequence of contiguous runs, each inside one segment (``run_segments``
    names it; by default run ``k`` is segment ``k``, as when each parameter tensor is one segment); the fast path
    then reduces and broadcasts per run instead of scattering by ``ids``.
    """

    ids: torch.Tensor  # (N,) int64
    counts: torch.Tensor  # (T,) float32, elements per segment
    n: int
    sizes: tuple[int, ...] | None = None
    run_segments: tuple[int, ...] | None = None
    _runs: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_ids(cls, ids: torch.Tensor, n: int, max_runs: int = 4096) -> Segments:
        """Segments from per-element ids; records the runs when there are at most ``max_runs`` of them."""
        counts = torch.bincount(ids, minlength=n).to(torch.float32)
        if ids.numel() == 0:
            return cls(ids, counts, n)
        starts = torch.cat([torch.zeros(1, dtype=torch.int64), torch.nonzero(ids[1:] != ids[:-1]).flatten() + 1])
        if starts.numel() > max_runs:
            return cls(ids, counts, n)
        bounds = starts.tolist() + [ids.numel()]
        sizes = tuple(b - a for a, b in zip(bounds[:-1], bounds[1:]))
        return cls(ids, counts, n, sizes, tuple(int(i) for i in ids[starts].tolist()))

    @classmethod
    def from_sizes(cls, sizes: list[int], device: torch.device | str = "cpu") -> Segments:
        sizes_t = torch.tensor(sizes, dtype=torch.int64, device=device)
        ids = torch.repeat_interleave(torch.arange(len(sizes), device=device), sizes_t)
        return cls(ids, sizes_t.to(torch.float32), len(sizes), tuple(int(x) for x in sizes))

    def to(self, device: torch.device | str) -> Segments:
        return Segments(self.ids.to(device), self.counts.to(device), self.n, self.sizes, self.run_segments)

    def runs(self, start: int, stop: int) -> list[tuple[int, int, int]]:
        """``(segment, a, b)`` runs covering ``[start, stop)`` (relative offsets); needs contiguous segments."""
        key = (start, stop)
        if key not in self._runs:
            out, offset = [], 0
            for k, size in enumerate(self.sizes or ()):
                a, b = max(start, offset), min(stop, offset + size)
                if a < b:
                    out.append((k if self.run_segments is None else self.run_segments[k], a - start, b - start))
                offset += size
            self._runs[key] = out
        return self._runs[key]


_CONSTANTS: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}


def step_encoding(step: torch.Tensor) -> torch.Tensor:
    """(11,) encoding of a scalar step tensor: sin/cos of ``t / tau`` for log-spaced ``tau`` in [1, 1e5].

    Computed in the step's floating dtype (float32 normally; float64 when meta-gradients are checked in float64).
    """
    dtype = step.dtype if step.is_floating_point() else torch.float32
    key = (step.device, dtype)
    consts = _CONSTANTS.get(key)
    if consts is None:  # built once per device and dtype: this runs every optimizer step
        periods = torch.tensor(_PERIODS, dtype=dtype, device=step.device)
        phase = torch.tensor([0.0 if k % 2 == 0 else math.pi / 2 for k in range(N_STEP_FEATURES)], dtype=dtype,
                             device=step.device)
        consts = _CONSTANTS[key] = (periods, phase)
    periods, phase = consts
    return torch.sin(step.to(dtype) / periods + phase)


def segment_mean(x: torch.Tensor, seg: Segments) -> torch.Tensor:
    """Mean of ``x`` (N, C) over each segment: (T, C)."""
    sums = torch.zeros(seg.n, x.shape[1], dtype=x.dtype, device=x.device).index_add(0, seg.ids, x)
    return sums / seg.counts.to(x.dtype)[:, None]


def compute_features(param: torch.Tensor, grad: torch.Tensor, momenta: torch.Tensor, step: torch.Tensor,
                     seg: Segments) -> torch.Tensor:
    """(N, 19) features from flat ``param`` (N,), ``grad`` (N,), feature ``momenta`` (6, N) and ``step``."""
    raw = torch.cat([param[None], grad[None], momenta], dim=0).T  # (N, 8)
    rms = torch.rsqrt(segment_mean(raw * raw, seg) + _EPS)  # (T, 8)
    tensor_feats = raw * rms[seg.ids]
    step_feats = step_encoding(step).expand(raw.shape[0], N_STEP_FEATURES)
    return torch.cat([tensor_feats, step_feats], dim=1)
