"""Per-element input features of a learned optimizer (UNF paper / Harrison et al. 2022).

For every parameter element the learned function ``f`` sees 19 channels:

- 8 *tensor* channels: the parameter, its gradient, and momenta at decays
  ``MOMENTUM_DECAYS = (0.1, 0.5, 0.9, 0.99, 0.999, 0.9999)``. Each channel is divided by its root mean square over
  the element's *segment* (a parameter tensor, or a spec entry for the UNF optimizer). This makes ``f`` blind to
  the scale of the weights and gradients: multiplying a loss by 1000 leaves the features unchanged.
- 11 *step* channels: a fixed sinusoidal encoding of the step count ``t`` (log-spaced periods 1 ... 1e5,
  alternating sine and cosine), shared by all elements.

Everything here is a pure function of tensors (no host syncs, and no in-place updates except
:func:`segment_add_`'s on the fresh tensor it is given), so it runs inside ``torch.func`` transforms during
meta-training. The functions take leading batch axes (e.g. a population of inner runs: ``param`` (P, N),
``momenta`` (P, 6, N), ``step`` (P,)); segment reductions and broadcasts act along the element axis ``dim``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = ["MOMENTUM_DECAYS", "N_TENSOR_FEATURES", "N_STEP_FEATURES", "N_FEATURES", "Segments", "step_encoding",
           "segment_sum", "segment_mean", "segment_mean_square", "segment_mul", "segment_add_",
           "tensor_features", "compute_features"]

MOMENTUM_DECAYS = (0.1, 0.5, 0.9, 0.99, 0.999, 0.9999)
N_TENSOR_FEATURES = 2 + len(MOMENTUM_DECAYS)
N_STEP_FEATURES = 11
N_FEATURES = N_TENSOR_FEATURES + N_STEP_FEATURES
_PERIODS = tuple(10 ** (5 * k / (N_STEP_FEATURES - 1)) for k in range(N_STEP_FEATURES))
_EPS = 1e-24  # added to mean squares; far below any fp32 gradient scale that matters
#: up to this many contiguous runs, segment reductions and broadcasts go run by run (a view and one op per run)
#: instead of ``index_add`` / ``index_select`` over every element: the same sums, several times faster, most of
#: all for a batch of vectors (or under ``torch.func.vmap``), where ``index_add`` along the element axis scatters
#: an element at a time (measured 14x slower for 16 x 8 x 2410 floats)
MAX_SPLIT_RUNS = 64


@dataclass(frozen=True)
class Segments:
    """Which segment (tensor or spec entry) each element of a flat parameter vector belongs to.

    ``sizes`` is set when the vector is a sequence of contiguous runs, each inside one segment (``run_segments``
    names it; by default run ``k`` is segment ``k``, as when each parameter tensor is one segment); the fast path
    then reduces and broadcasts per run instead of scattering by ``ids``. ``gather_broadcasts`` keeps the per-run
    reductions but broadcasts by gathering with ``ids`` (for ``torch.compile``: one fused kernel reads a per-segment
    table by index, where per-run adds become a chain of range tests per element).
    """

    ids: torch.Tensor  # (N,) int64
    counts: torch.Tensor  # (T,) float32, elements per segment
    n: int
    sizes: tuple[int, ...] | None = None
    run_segments: tuple[int, ...] | None = None
    gather_broadcasts: bool = False
    _runs: dict = field(default_factory=dict, compare=False, repr=False)
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def split_runs(self) -> bool:
        """Whether reductions and broadcasts go run by run (contiguous runs, at most ``MAX_SPLIT_RUNS`` of them)."""
        return self.sizes is not None and len(self.sizes) <= MAX_SPLIT_RUNS

    @property
    def run_per_segment(self) -> bool:
        """Whether run ``k`` is segment ``k`` (so there are as many runs as segments)."""
        if "identity" not in self._cache:
            self._cache["identity"] = self.run_segments is None or self.run_segments == tuple(range(self.n))
        return self._cache["identity"]

    def _run_ids(self, device: torch.device) -> torch.Tensor:
        """(R,) segment of each run."""
        key = ("run_ids", device)
        if key not in self._cache:
            ids = range(len(self.sizes)) if self.run_segments is None else self.run_segments
            self._cache[key] = torch.tensor(tuple(ids), dtype=torch.int64, device=device)
        return self._cache[key]

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
        return Segments(self.ids.to(device), self.counts.to(device), self.n, self.sizes, self.run_segments,
                        self.gather_broadcasts)

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
    """(..., 11) encoding of a step tensor (..., e.g. a scalar): sin/cos of ``t / tau`` for log-spaced ``tau`` in
    [1, 1e5].

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
    return torch.sin(step.to(dtype).unsqueeze(-1) / periods + phase)


def segment_sum(x: torch.Tensor, seg: Segments, dim: int = 0) -> torch.Tensor:
    """Sums of ``x`` over each segment along ``dim`` (of size N): ``x``'s shape with N replaced by T."""
    shape = list(x.shape)
    shape[dim] = seg.n
    if seg.split_runs:
        runs = torch.stack([part.sum(dim) for part in x.split(seg.sizes, dim)], dim)
        if seg.run_per_segment:
            return runs
        return x.new_zeros(shape).index_add(dim, seg._run_ids(x.device), runs)  # several runs share a segment
    return x.new_zeros(shape).index_add(dim, seg.ids, x)


def segment_mean(x: torch.Tensor, seg: Segments, dim: int = 0) -> torch.Tensor:
    """Means of ``x`` over each segment along ``dim``: (N, C) -> (T, C) by default, (C, N) -> (C, T) with dim 1."""
    if seg.split_runs and seg.run_per_segment:  # torch.mean is sum / count too, in one op per run
        return torch.stack([part.mean(dim) for part in x.split(seg.sizes, dim)], dim)
    counts = seg.counts.to(x.device, x.dtype)
    return segment_sum(x, seg, dim) / counts.view(-1, *[1] * (x.dim() - 1 - dim % x.dim()))


def segment_mean_square(x: torch.Tensor, seg: Segments, dim: int = 0) -> torch.Tensor:
    """``segment_mean(x * x)``; per run it is a squared 2-norm, which reads ``x`` without writing ``x * x``."""
    if seg.split_runs and seg.run_per_segment:
        norms = torch.stack([torch.linalg.vector_norm(part, dim=dim) for part in x.split(seg.sizes, dim)], dim)
        counts = seg.counts.to(x.device, x.dtype)
        return norms * norms / counts.view(-1, *[1] * (x.dim() - 1 - dim % x.dim()))
    return segment_mean(x * x, seg, dim)


def _run_columns(table: torch.Tensor, seg: Segments, dim: int) -> list[torch.Tensor] | tuple[torch.Tensor, ...]:
    """Each run's slice (width 1 along ``dim``) of a per-segment ``table``: views, no copies."""
    if seg.run_per_segment:
        return table.split(1, dim)
    return [table.narrow(dim, k, 1) for k in seg.run_segments]


def segment_mul(x: torch.Tensor, table: torch.Tensor, seg: Segments, dim: int = 0) -> torch.Tensor:
    """``x`` times its segment's entry of the per-segment ``table`` (T along ``dim``), e.g. ``x * table[ids]`` for
    dim 0; run by run, without materialising ``table[ids]`` (a product per run, then one cat)."""
    if seg.split_runs and not seg.gather_broadcasts:
        return torch.cat([part * column for part, column in zip(x.split(seg.sizes, dim),
                                                                 _run_columns(table, seg, dim))], dim)
    return x * table.index_select(dim, seg.ids)


def segment_add_(x: torch.Tensor, table: torch.Tensor, seg: Segments, dim: int = 0) -> torch.Tensor:
    """``x += table[ids]`` along ``dim`` (as :func:`segment_mul`), in place, run by run; returns ``x``.

    Only for a fresh intermediate ``x`` that nothing else reads (e.g. a matmul's output: autograd saves its inputs,
    not its output), so the enclosing function stays pure."""
    if seg.split_runs and not seg.gather_broadcasts:
        offset = 0
        for column, size in zip(_run_columns(table, seg, dim), seg.sizes):
            x.narrow(dim, offset, size).add_(column)  # narrow, not split: autograd allows in-place on single views
            offset += size
        return x
    return x.add_(table.index_select(dim, seg.ids))


def tensor_features(param: torch.Tensor, grad: torch.Tensor, momenta: torch.Tensor, seg: Segments) -> torch.Tensor:
    """(..., 8, N) tensor channels, channels first: ``param`` (..., N), ``grad`` (..., N), feature ``momenta``
    (..., 6, N), each divided by its root mean square over the element's segment."""
    raw = torch.cat([param.unsqueeze(-2), grad.unsqueeze(-2), momenta], dim=-2)  # (..., 8, N)
    rms = torch.rsqrt(segment_mean_square(raw, seg, dim=-1) + _EPS)  # (..., 8, T)
    return segment_mul(raw, rms, seg, dim=-1)


def compute_features(param: torch.Tensor, grad: torch.Tensor, momenta: torch.Tensor, step: torch.Tensor,
                     seg: Segments) -> torch.Tensor:
    """(..., N, 19) features from flat ``param`` (..., N), ``grad`` (..., N), feature ``momenta`` (..., 6, N) and
    ``step`` (...)."""
    tensor_feats = tensor_features(param, grad, momenta, seg).transpose(-1, -2)
    step_feats = step_encoding(step).unsqueeze(-2).expand(*tensor_feats.shape[:-1], N_STEP_FEATURES)
    return torch.cat([tensor_feats, step_feats], dim=-1)
