"""Batched weight-space features: entry name -> tensor ``(batch, channels, *entry_shape)``.

:class:`WeightFeatures` is what the layers in :mod:`unf.nn.layers` consume and produce (they also accept a
plain ``dict`` with the same layout). It is built from models or state dicts through a
:class:`~unf.spec.WeightSpaceSpec` (one model per batch element, one channel), can stack many models or many
channels (weights, gradients, momenta, ...), and maps back to state dicts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from ..spec import Permutation, WeightSpaceSpec

__all__ = ["WeightFeatures"]


class WeightFeatures(Mapping[str, torch.Tensor]):
    """An immutable mapping entry name -> ``(batch, channels, *entry.shape)`` tensor, in spec order.

    Args:
        spec: the weight space the features live on.
        data: one tensor per spec entry (extra keys are rejected).
        validate: check names and shapes (turn off on hot paths that build outputs of known shape).
    """

    __slots__ = ("spec", "_data")

    def __init__(self, spec: WeightSpaceSpec, data: Mapping[str, torch.Tensor],
                 validate: bool = True) -> None:
        self.spec = spec
        if validate:
            names = [e.name for e in spec.entries]
            extra = set(data) - set(names)
            missing = [n for n in names if n not in data]
            if missing or extra:
                raise KeyError(f"features do not match the spec: missing {missing[:5]}, "
                               f"extra {sorted(extra)[:5]}")
            lead = None
            for e in spec.entries:
                t = data[e.name]
                if t.dim() != 2 + len(e.shape) or tuple(t.shape[2:]) != e.shape:
                    raise ValueError(f"entry {e.name!r}: expected (batch, channels, *{e.shape}), got "
                                     f"{tuple(t.shape)}")
                if lead is None:
                    lead = tuple(t.shape[:2])
                elif tuple(t.shape[:2]) != lead:
                    raise ValueError(f"entry {e.name!r} has (batch, channels) = {tuple(t.shape[:2])}, "
                                     f"others {lead}")
        self._data = {e.name: data[e.name] for e in spec.entries}

    # ------------------------------------------------------------------ mapping protocol
    def __getitem__(self, name: str) -> torch.Tensor:
        return self._data[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return (f"WeightFeatures({len(self)} entries, batch={self.batch_size}, channels={self.channels}, "
                f"dtype={self.dtype})")

    def as_dict(self) -> dict[str, torch.Tensor]:
        return dict(self._data)

    # ------------------------------------------------------------------ properties
    def _first(self) -> torch.Tensor:
        return next(iter(self._data.values()))

    @property
    def batch_size(self) -> int:
        return self._first().shape[0]

    @property
    def channels(self) -> int:
        return self._first().shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self._first().dtype

    @property
    def device(self) -> torch.device:
        return self._first().device

    def numel_per_channel(self) -> int:
        """Number of weights one (batch element, channel) holds."""
        total = 0
        for e in self.spec.entries:
            n = 1
            for s in e.shape:
                n *= s
            total += n
        return total

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_state_dicts(cls, spec: WeightSpaceSpec, state_dicts: Sequence[Mapping[str, torch.Tensor]],
                         dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                         ) -> WeightFeatures:
        """Stack ``state_dicts`` (one model each) into a batch with one channel."""
        if not state_dicts:
            raise ValueError("need at least one state dict")
        views = [spec.to_views(sd) for sd in state_dicts]
        data = {}
        for e in spec.entries:
            t = torch.stack([v[e.name].detach() for v in views]).unsqueeze(1)
            data[e.name] = t.to(device=device, dtype=dtype)
        return cls(spec, data, validate=False)

    @classmethod
    def from_state_dict(cls, spec: WeightSpaceSpec, state_dict: Mapping[str, torch.Tensor],
                        dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                        ) -> WeightFeatures:
        """One model as a batch of one, one channel."""
        return cls.from_state_dicts(spec, [state_dict], dtype=dtype, device=device)

    @classmethod
    def from_models(cls, spec: WeightSpaceSpec, models: Sequence[nn.Module], dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None, grads: bool = False) -> WeightFeatures:
        """Stack models' weights (``grads=True``: their ``.grad``; zeros where a gradient is missing)."""
        sds = []
        for m in models:
            sd = m.state_dict(keep_vars=True)
            if grads:
                sd = {k: (v.grad if isinstance(v, nn.Parameter) and v.grad is not None
                          else torch.zeros_like(v)) for k, v in sd.items()}
            sds.append(sd)
        return cls.from_state_dicts(spec, sds, dtype=dtype, device=device)

    @classmethod
    def from_views(cls, spec: WeightSpaceSpec, views: Mapping[str, torch.Tensor]) -> WeightFeatures:
        """From ``name -> (*entry.shape)`` views of one model (batch 1, channel 1)."""
        return cls(spec, {e.name: views[e.name].reshape(1, 1, *e.shape) for e in spec.entries})

    @classmethod
    def zeros(cls, spec: WeightSpaceSpec, batch: int, channels: int, **kw) -> WeightFeatures:
        return cls(spec, {e.name: torch.zeros(batch, channels, *e.shape, **kw) for e in spec.entries}, False)

    @classmethod
    def randn(cls, spec: WeightSpaceSpec, batch: int, channels: int, generator: torch.Generator | None = None,
              **kw) -> WeightFeatures:
        return cls(spec, {e.name: torch.randn(batch, channels, *e.shape, generator=generator, **kw)
                          for e in spec.entries}, False)

    @staticmethod
    def cat_channels(features: Sequence[WeightFeatures]) -> WeightFeatures:
        """Concatenate along channels (e.g. weights, gradients and momenta as input channels)."""
        spec = features[0].spec
        return WeightFeatures(spec, {n: torch.cat([f[n] for f in features], 1) for n in features[0]}, False)

    @staticmethod
    def cat_batch(features: Sequence[WeightFeatures]) -> WeightFeatures:
        """Concatenate along the batch (many models)."""
        spec = features[0].spec
        return WeightFeatures(spec, {n: torch.cat([f[n] for f in features], 0) for n in features[0]}, False)

    # ------------------------------------------------------------------ back to weights
    def to_views(self, index: int = 0, channel: int = 0) -> dict[str, torch.Tensor]:
        """Entry views of batch element ``index``, channel ``channel``."""
        return {n: t[index, channel] for n, t in self._data.items()}

    def to_state_dict(self, like: Mapping[str, torch.Tensor], index: int = 0, channel: int = 0) -> dict:
        """A state dict shaped like ``like`` holding batch element ``index``, channel ``channel``."""
        views = {n: v.detach().to(dtype=like[self.spec[n].source].dtype) for n, v in
                 self.to_views(index, channel).items()}
        return self.spec.from_views(views, like=like)

    def to_state_dicts(self, like: Mapping[str, torch.Tensor], channel: int = 0) -> list[dict]:
        """One state dict per batch element."""
        return [self.to_state_dict(like, i, channel) for i in range(self.batch_size)]

    def load_into(self, model: nn.Module, index: int = 0, channel: int = 0) -> None:
        """Write batch element ``index`` into ``model``'s weights (in place)."""
        model.load_state_dict(self.to_state_dict(model.state_dict(), index, channel))

    # ------------------------------------------------------------------ transforms
    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> WeightFeatures:
        """Apply ``fn`` to every tensor (it must keep the ``(batch, channels, *shape)`` layout)."""
        return WeightFeatures(self.spec, {n: fn(t) for n, t in self._data.items()})

    def to(self, *args, **kwargs) -> WeightFeatures:
        return WeightFeatures(self.spec, {n: t.to(*args, **kwargs) for n, t in self._data.items()}, False)

    def detach(self) -> WeightFeatures:
        return WeightFeatures(self.spec, {n: t.detach() for n, t in self._data.items()}, False)

    def channels_slice(self, start: int, stop: int) -> WeightFeatures:
        return WeightFeatures(self.spec, {n: t[:, start:stop] for n, t in self._data.items()}, False)

    def permute(self, perm: Permutation) -> WeightFeatures:
        """Apply a spec permutation to every batch element and channel."""
        return WeightFeatures(self.spec, self.spec.permute_views(self._data, perm, batch_dims=2), False)

    def flatten(self) -> torch.Tensor:
        """``(batch, channels, total weights)``, entries concatenated in spec order."""
        return torch.cat([t.flatten(2) for t in self._data.values()], dim=2)

    @classmethod
    def unflatten(cls, spec: WeightSpaceSpec, flat: torch.Tensor) -> WeightFeatures:
        """Inverse of :meth:`flatten`."""
        out, off = {}, 0
        for e in spec.entries:
            n = 1
            for s in e.shape:
                n *= s
            out[e.name] = flat[:, :, off:off + n].reshape(flat.shape[0], flat.shape[1], *e.shape)
            off += n
        if off != flat.shape[2]:
            raise ValueError(f"flat tensor has {flat.shape[2]} weights per channel, the spec {off}")
        return cls(spec, out, False)

    def _binary(self, other: WeightFeatures | float | torch.Tensor, op: Callable) -> WeightFeatures:
        if isinstance(other, WeightFeatures):
            return WeightFeatures(self.spec, {n: op(t, other[n]) for n, t in self._data.items()}, False)
        return WeightFeatures(self.spec, {n: op(t, other) for n, t in self._data.items()}, False)

    def __add__(self, other):  # noqa: D105
        return self._binary(other, torch.add)

    def __sub__(self, other):  # noqa: D105
        return self._binary(other, torch.sub)

    def __mul__(self, other):  # noqa: D105
        return self._binary(other, torch.mul)

    __radd__ = __add__
    __rmul__ = __mul__
