"""``UNFLinear``: the maximally expressive permutation-equivariant linear layer for any weight-space spec.

Features are a dict ``entry name -> (batch, channels, *entry_shape)``. The layer sums, for every ordered pair of
entries and every valid partition of their axes (:mod:`unf.nn.terms`), a term with its own channel matrix, plus a
per-entry bias.

How fixed (``None``) axes are treated (``fixed=``):

- ``"relax"`` (default, as in the UNF paper): each fixed axis becomes a permutable group of its own. The layer is
  then equivariant to a larger group than the model's symmetry (so, in particular, to the true one), with few
  parameters. ``positional=True`` adds a learned per-position encoding on those axes to the input (as NFN's
  ``io_embed``), which lets the network break the false symmetry.
- ``"exact"``: fixed axes are folded into channels, giving exactly the equivariant maps of the true group. The
  channel matrices grow with the product of fixed sizes, so use it only where fixed axes are small.

Speed: each distinct reduction of an input entry is computed once; terms that land on an output entry the same way
share one channel-mixing einsum over their concatenated inputs; diagonal writes go through ``diagonal`` views of the
output, never through a zero tensor of full size. Reductions use means, so scale does not grow with width.
Initialisation: N(0, 1/fan_in) with fan_in = input channels summed over all terms feeding an output entry.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..spec import Entry, WeightSpaceSpec
from .terms import Term, pair_terms

__all__ = ["UNFLinear", "Features", "layer_groups"]

Features = dict[str, torch.Tensor]
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def layer_groups(entry: Entry, fixed: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The group label per axis the layer permutes, and the fixed axes folded into channels (``exact`` mode)."""
    if fixed == "exact":
        keep = tuple(i for i, g in enumerate(entry.axes) if g is not None)
        return tuple(entry.axes[i] for i in keep), tuple(i for i, g in enumerate(entry.axes) if g is None)
    if fixed != "relax":
        raise ValueError(f"fixed must be 'relax' or 'exact', got {fixed!r}")
    return tuple(g if g is not None else f"{entry.name}#{i}" for i, g in enumerate(entry.axes)), ()


@dataclass(frozen=True)
class _Block:
    """Terms that write to one output entry in the same way: one weight matrix, one einsum."""

    out_entry: str
    out_letters: tuple[int, ...]
    kept: tuple[int, ...]
    sources: tuple[tuple[str, tuple[int, ...]], ...]  # (input entry, input letters) per term, in weight order
    terms: tuple[Term, ...]


def _word(letters: tuple[int, ...]) -> str:
    return "".join(_LETTERS[l] for l in letters)


class UNFLinear(nn.Module):
    """Equivariant linear map from features with ``in_channels`` to ``out_channels`` over ``spec``'s entries.

    Args:
        spec: the weight space (entries and groups); ``spec.parameters_only()`` if buffers should be left out.
        in_channels, out_channels: channels per entry.
        fixed: ``"relax"`` or ``"exact"`` treatment of fixed axes (see module docstring).
        positional: learned positional encodings on relaxed fixed axes (``relax`` mode only).
        bias: per-entry, per-channel bias.
    """

    def __init__(self, spec: WeightSpaceSpec, in_channels: int, out_channels: int, fixed: str = "relax",
                 positional: bool = False, bias: bool = True):
        super().__init__()
        self.spec, self.in_channels, self.out_channels, self.fixed = spec, in_channels, out_channels, fixed
        self.entries = list(spec.entries)
        self._groups: dict[str, tuple[str, ...]] = {}
        self._folded: dict[str, tuple[int, ...]] = {}
        self._fold_size: dict[str, int] = {}
        for e in self.entries:
            self._groups[e.name], self._folded[e.name] = layer_groups(e, fixed)
            self._fold_size[e.name] = math.prod(e.shape[i] for i in self._folded[e.name])
        self._shape = {e.name: tuple(e.shape[i] for i in range(len(e.shape)) if i not in self._folded[e.name])
                       for e in self.entries}
        terms = [t for o in self.entries for i in self.entries
                 for t in pair_terms(o.name, self._groups[o.name], i.name, self._groups[i.name])]
        self.terms: tuple[Term, ...] = tuple(terms)
        blocks: dict[tuple, list[Term]] = {}
        for t in terms:
            blocks.setdefault((t.out_entry, t.out_letters, t.kept), []).append(t)
        self.blocks = tuple(_Block(o, ol, k, tuple((t.in_entry, t.in_letters) for t in ts), tuple(ts))
                            for (o, ol, k), ts in blocks.items())
        fan_in = {e.name: 0 for e in self.entries}
        for t in terms:
            fan_in[t.out_entry] += in_channels * self._fold_size[t.in_entry]
        self.weights = nn.ParameterList()
        for b in self.blocks:
            cols = sum(in_channels * self._fold_size[src] for src, _ in b.sources)
            w = torch.randn(out_channels * self._fold_size[b.out_entry], cols) / math.sqrt(max(1, fan_in[b.out_entry]))
            self.weights.append(nn.Parameter(w))
        self.bias = nn.ParameterDict() if bias else None
        self._bias_keys = {e.name: f"e{i}" for i, e in enumerate(self.entries)}
        if bias:
            for e in self.entries:
                self.bias[self._bias_keys[e.name]] = nn.Parameter(
                    torch.zeros(out_channels * self._fold_size[e.name]))
        self.positional = None
        if positional:
            if fixed != "relax":
                raise ValueError("positional encodings apply to relaxed fixed axes (fixed='relax')")
            sizes = {f"{e.name}#{i}": n for e in self.entries for i, (g, n) in enumerate(zip(e.axes, e.shape))
                     if g is None}
            self._pos_keys = {label: f"p{k}" for k, label in enumerate(sizes)}
            self.positional = nn.ParameterDict({self._pos_keys[label]: nn.Parameter(torch.zeros(in_channels, n))
                                                for label, n in sizes.items()})

    # ------------------------------------------------------------------ inspection
    def __repr__(self) -> str:
        n_params = sum(p.numel() for p in self.parameters())
        return (f"UNFLinear({len(self.entries)} entries, {len(self.terms)} terms in {len(self.blocks)} blocks, "
                f"{self.in_channels}->{self.out_channels} channels, fixed={self.fixed!r}, {n_params:,} parameters)")

    def term_weights(self) -> list[tuple[Term, torch.Tensor]]:
        """Each term with its (out, in) channel matrix (views into the block weights), in ``self.terms`` order."""
        out: dict[Term, torch.Tensor] = {}
        for b, w in zip(self.blocks, self.weights):
            col = 0
            for t, (src, _) in zip(b.terms, b.sources):
                width = self.in_channels * self._fold_size[src]
                out[t] = w[:, col : col + width]
                col += width
        return [(t, out[t]) for t in self.terms]

    # ------------------------------------------------------------------ layout
    def to_internal(self, features: Mapping[str, torch.Tensor]) -> Features:
        """Fold fixed axes into channels (``exact`` mode) and add positional encodings (if any)."""
        out = {}
        for e in self.entries:
            x = features[e.name]
            if self.positional is not None:
                for i, (g, n) in enumerate(zip(e.axes, e.shape)):
                    if g is None:
                        p = self.positional[self._pos_keys[f"{e.name}#{i}"]]
                        shape = [1, p.shape[0]] + [1] * len(e.shape)
                        shape[2 + i] = n
                        x = x + p.view(shape)
            folded = self._folded[e.name]
            if folded:
                b, c = x.shape[:2]
                kept = [i for i in range(len(e.shape)) if i not in folded]
                x = x.permute(0, 1, *[2 + i for i in folded], *[2 + i for i in kept])
                x = x.reshape(b, c * self._fold_size[e.name], *self._shape[e.name])
            out[e.name] = x
        return out

    def from_internal(self, features: Mapping[str, torch.Tensor]) -> Features:
        out = {}
        for e in self.entries:
            y = features[e.name]
            folded = self._folded[e.name]
            if folded:
                b = y.shape[0]
                kept = [i for i in range(len(e.shape)) if i not in folded]
                y = y.reshape(b, self.out_channels, *[e.shape[i] for i in folded], *self._shape[e.name])
                order = [0, 1] + [0] * len(e.shape)
                for k, i in enumerate(folded):
                    order[2 + i] = 2 + k
                for k, i in enumerate(kept):
                    order[2 + i] = 2 + len(folded) + k
                y = y.permute(*order)
            out[e.name] = y
        return out

    # ------------------------------------------------------------------ forward
    @staticmethod
    def reduce(x: torch.Tensor, in_letters: tuple[int, ...], kept: tuple[int, ...]) -> torch.Tensor:
        """Input side of a term: diagonals of repeated letters, mean over letters not kept."""
        eq = f"YZ{_word(in_letters)}->YZ{_word(kept)}"
        r = torch.einsum(eq, x) if eq.split("->")[0] != eq.split("->")[1] else x
        dropped = 1
        seen: set[int] = set()
        for l, n in zip(in_letters, x.shape[2:]):
            if l not in kept and l not in seen:
                dropped *= n
            seen.add(l)
        return r / dropped if dropped != 1 else r

    @staticmethod
    def place(y: torch.Tensor, out_letters: tuple[int, ...], kept: tuple[int, ...], value: torch.Tensor) -> None:
        """Output side of a term: add ``value`` (batch, channels, *kept) into ``y``, broadcasting letters not kept
        and writing repeated letters onto diagonals (through views of ``y``)."""
        view, letters = y, list(out_letters)
        while True:
            dup = next((l for l in letters if letters.count(l) > 1), None)
            if dup is None:
                break
            p = letters.index(dup)
            q = letters.index(dup, p + 1)
            view = view.diagonal(0, 2 + p, 2 + q)
            letters = [l for k, l in enumerate(letters) if k not in (p, q)] + [dup]
        # arrange value's kept axes in the view's letter order, with size-1 axes for broadcast letters
        order = [kept.index(l) for l in letters if l in kept]
        value = value.permute(0, 1, *[2 + k for k in order])
        shape = list(value.shape[:2])
        it = iter(value.shape[2:])
        for l in letters:
            shape.append(next(it) if l in kept else 1)
        view.add_(value.reshape(shape))

    def forward(self, features: Mapping[str, torch.Tensor]) -> Features:
        x = self.to_internal(features)
        any_x = next(iter(x.values()))
        batch, device, dtype = any_x.shape[0], any_x.device, any_x.dtype
        reductions: dict[tuple, torch.Tensor] = {}
        out = {e.name: torch.zeros(batch, self.out_channels * self._fold_size[e.name], *self._shape[e.name],
                                   device=device, dtype=dtype) for e in self.entries}
        for b, w in zip(self.blocks, self.weights):
            parts = []
            for src, in_letters in b.sources:
                key = (src, in_letters, b.kept)
                r = reductions.get(key)
                if r is None:
                    r = reductions[key] = self.reduce(x[src], in_letters, b.kept)
                parts.append(r)
            stacked = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
            mixed = torch.einsum("oc,bc...->bo...", w.to(dtype), stacked)
            self.place(out[b.out_entry], b.out_letters, b.kept, mixed)
        if self.bias is not None:
            for e in self.entries:
                y = out[e.name]
                out[e.name] = y + self.bias[self._bias_keys[e.name]].to(dtype).view(1, -1, *[1] * (y.dim() - 2))
        return self.from_internal(out)
