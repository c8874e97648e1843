"""The UNF family: ``f`` = DeepSet layers, then one UNF layer with 1 output channel across the whole spec
(the UNF paper's optimizer), and :class:`UNFOptimizer`, which derives the spec from the model.

The flat parameter vector is read as spec entries through precomputed index maps, so ``f`` sees how weights
connect (which rows of one matrix feed which columns of the next) while staying equivariant to the model's
permutation symmetries: permuting the model by its spec permutes every update the same way.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from unf import WeightSpaceSpec, derive_spec
from unf.nn import UNFLinear

from .families import DeepSet
from .features import N_FEATURES, Segments
from .optimizer import LearnedOptimizer
from .rule import LearnedRule

__all__ = ["UNFFamily", "UNFOptimizer"]


class UNFFamily(nn.Module):
    """``f(features)``: DS[hidden] x layers (pooling per spec entry) -> UNFLinear(hidden -> 1) over ``spec``.

    Call :meth:`bind` with the parameters (in ``spec.sources`` order) before use: it fixes where each entry's
    elements sit in the flat vector.
    """

    def __init__(self, spec: WeightSpaceSpec, hidden: int = 32, layers: int = 3, in_features: int = N_FEATURES,
                 fixed: str = "relax"):
        super().__init__()
        self.spec = spec
        self.config = {"hidden": hidden, "layers": layers, "in_features": in_features, "fixed": fixed}
        self.deepset = DeepSet(hidden, layers, in_features)
        del self.deepset.out  # the UNF layer replaces the DeepSet read-out
        self.head = UNFLinear(spec, hidden, 1, fixed=fixed)
        with torch.no_grad():  # start as momentum SGD: the learned term is zero until meta-training changes it
            for p in self.head.parameters():
                p.zero_()
        self._index: dict[str, torch.Tensor] = {}
        self._segments: Segments | None = None

    def bind(self, params: list[torch.Tensor]) -> None:
        """Index maps entry -> flat positions for parameters laid out in ``spec.sources`` order."""
        sources = self.spec.sources
        if len(params) != len(sources):
            raise ValueError(f"the spec has {len(sources)} parameter sources but {len(params)} parameters were given")
        offsets, offset = {}, 0
        for name, p in zip(sources, params):
            offsets[name] = (offset, p.shape)
            offset += p.numel()
        ids = torch.empty(offset, dtype=torch.int64)
        counts = []
        for k, e in enumerate(self.spec.entries):
            start, shape = offsets[e.source]
            flat = torch.arange(start, start + int(torch.Size(shape).numel())).view(shape)
            index = e.view(flat)
            self._index[e.name] = index.contiguous()
            ids[index.reshape(-1)] = k
            counts.append(index.numel())
        self._segments = Segments(ids, torch.tensor(counts, dtype=torch.float32), len(counts))

    def segments(self, params: list[torch.Tensor]) -> Segments:
        if self._segments is None:
            self.bind(params)
        return self._segments

    def forward(self, features: torch.Tensor, segments: Segments) -> torch.Tensor:
        h = self.deepset.hidden(features, segments)  # (N, hidden)
        entries = {}
        for name, index in self._index.items():
            index = index.to(h.device)
            entries[name] = h[index].movedim(-1, 0).unsqueeze(0)  # (1, hidden, *entry shape)
        out = self.head(entries)
        # entries partition the parameters, so one scatter writes every element exactly once
        positions = torch.cat([index.reshape(-1) for index in self._index.values()]).to(h.device)
        values = torch.cat([out[name].reshape(-1) for name in self._index])
        return torch.zeros(h.shape[0], dtype=h.dtype, device=h.device).index_put((positions,), values)


class UNFOptimizer(LearnedOptimizer):
    """A learned optimizer whose ``f`` is a UNF over ``model``'s derived weight-space spec.

    Args:
        model: the model to train (its spec is derived with ``example_inputs``).
        example_inputs: inputs for one forward pass (as for :func:`unf.derive_spec`).
        rule: a :class:`LearnedRule` whose ``f`` is a :class:`UNFFamily` for this spec; built fresh if omitted.
        lr: multiplier on the learned step size.
        hidden, layers: DeepSet width and depth of a fresh rule.
    """

    def __init__(self, model: nn.Module, example_inputs: Any, rule: LearnedRule | None = None, lr: float = 1.0,
                 hidden: int = 32, layers: int = 3, spec: WeightSpaceSpec | None = None):
        spec = (spec or derive_spec(model, example_inputs)).parameters_only()
        named = dict(model.named_parameters())
        missing = [n for n in spec.sources if n not in named]
        if missing:
            raise ValueError(f"spec sources {missing[:3]} are not parameters of {type(model).__name__}")
        untracked = [n for n, p in named.items() if n not in spec.sources and p.requires_grad]
        if untracked:
            raise ValueError(f"parameters {untracked[:3]} are not in the spec; the UNF optimizer must see all of "
                             "them (derive the spec from the same model)")
        params = [named[n] for n in spec.sources]
        if rule is None:
            rule = LearnedRule(UNFFamily(spec, hidden, layers))
        if not isinstance(rule.f, UNFFamily):
            raise TypeError("UNFOptimizer needs a rule whose f is a UNFFamily")
        rule.f.bind(params)
        super().__init__(params, rule, lr=lr, segments_for=rule.f.segments)
        self.spec = spec

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "spec", None) is not None:
            raise RuntimeError("UNFOptimizer covers the whole model's spec in one group; to change the parameters, "
                               "build a new UNFOptimizer (its spec is re-derived from the model)")
        super().add_param_group(param_group)
