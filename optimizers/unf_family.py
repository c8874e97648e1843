"""The UNF family: ``f`` = DeepSet layers, then one UNF layer with 1 output channel across the whole spec
(the UNF paper's optimizer), and :class:`UNFOptimizer`, which derives the spec from the model.

The flat parameter vector is read as spec entries through precomputed index maps, so ``f`` sees how weights
connect (which rows of one matrix feed which columns of the next) while staying equivariant to the model's
permutation symmetries: permuting the model by its spec permutes every update the same way.

Transfer by role. With ``tie="role"`` (default) the UNF read-out is a :class:`unf.nn.RoleUNFLinear`: its
coefficients belong to *role keys* (the structure of a term: which axes are permuted or fixed, which share a
group, the partition), not to named entries, and the DeepSet layers are shared by every element. Weights
trained on one model therefore apply to any other: :meth:`UNFFamily.transfer` builds the family for a new spec,
copies every shared key and starts unseen keys at zero (those terms fall back to the DeepSet read-out, which
every element has). ``tie="none"`` gives every basis term its own coefficient (the paper's layer, spec-bound).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from unf import WeightSpaceSpec, derive_spec
from unf.nn import RoleUNFLinear, UNFLinear

from .families import DeepSet
from .features import N_FEATURES, Segments
from .optimizer import LearnedOptimizer
from .rule import LearnedRule

__all__ = ["UNFFamily", "UNFOptimizer"]


class UNFFamily(nn.Module):
    """``f(features)``: DS[hidden] x layers (pooling per spec entry) -> DS read-out + UNFLinear(hidden -> 1).

    Call :meth:`bind` (parameters in ``spec.sources`` order) or :meth:`bind_layout` (any flat layout) before use:
    it fixes where each entry's elements sit in the flat vector. The UNF read-out starts at zero, so a fresh
    family computes the DeepSet family's updates (and a family warm-started from trained DeepSet weights computes
    exactly those) until meta-training changes it.
    """

    #: With the fused Triton layers (:mod:`optimizers.fused`): compute the UNF read-out from per-entry projections
    #: made inside the last layer's kernel, without writing the hidden activations (the same result up to float
    #: rounding). ``False`` keeps the hidden activations and evaluates :meth:`unf_readout` on them (the path
    #: before; ``benchmarks/bench_optimizers.py`` times both). Read when a step is first traced.
    fused_readout: bool = True

    def __init__(self, spec: WeightSpaceSpec, hidden: int = 32, layers: int = 3, in_features: int = N_FEATURES,
                 tie: str = "role", keys: Sequence[str] | None = None):
        """``keys``: with ``tie="role"``, the role-key table of the read-out (:class:`unf.nn.RoleUNFLinear`),
        e.g. one shared by every task of a meta-training family; default: this spec's own keys."""
        super().__init__()
        if tie not in ("role", "none"):
            raise ValueError(f"tie must be 'role' (transferable) or 'none' (one coefficient per term), got {tie!r}")
        if keys is not None and tie != "role":
            raise ValueError(f"keys (a shared role-key table) needs tie='role', got tie={tie!r}")
        self.spec = spec
        self.config = {"hidden": hidden, "layers": layers, "in_features": in_features, "tie": tie}
        self.deepset = DeepSet(hidden, layers, in_features)
        self.head = (RoleUNFLinear(spec, hidden, 1, keys=None if keys is None else list(keys)) if tie == "role"
                     else UNFLinear(spec, hidden, 1))
        with torch.no_grad():
            for p in self.head.parameters():
                p.zero_()
        self._index: dict[str, torch.Tensor] = {}
        self._gather: torch.Tensor | None = None
        self._slices: dict[str, tuple[int, int]] = {}
        self._tiling: list[str] | None = None
        self._split: tuple[list[int], list[str | None]] = ([], [])
        self._segments: Segments | None = None

    # ------------------------------------------------------------------ layout
    def bind_layout(self, names: Sequence[str], shapes: Sequence[torch.Size | Sequence[int]]) -> Segments:
        """Index maps entry -> flat positions for parameters ``names`` (with ``shapes``) concatenated in that order.
        Returns the per-entry :class:`Segments` the DeepSet layers pool over."""
        shapes = [torch.Size(s) for s in shapes]
        missing = sorted(set(self.spec.sources) - set(names))
        if missing or len(names) != len(self.spec.sources):
            extra = sorted(set(names) - set(self.spec.sources))
            raise ValueError(f"the layout does not match the spec's parameters: missing {missing[:3]}, "
                             f"not in the spec {extra[:3]}")
        offsets, offset = {}, 0
        for name, shape in zip(names, shapes):
            offsets[name] = (offset, shape)
            offset += shape.numel()
        ids = torch.full((offset,), -1, dtype=torch.int64)
        counts, index = [], {}
        for k, e in enumerate(self.spec.entries):
            start, shape = offsets[e.source]
            try:
                idx = e.view(torch.arange(start, start + shape.numel()).view(shape)).contiguous()
            except RuntimeError as err:
                raise ValueError(f"parameter {e.source!r} of shape {tuple(shape)} cannot be viewed as spec entry "
                                 f"{e.name!r} {tuple(e.shape)}: {err}") from err
            if tuple(idx.shape) != tuple(e.shape):
                raise ValueError(f"parameter {e.source!r} of shape {tuple(shape)} gives entry {e.name!r} the shape "
                                 f"{tuple(idx.shape)}, the spec expects {tuple(e.shape)}")
            index[e.name] = idx
            ids[idx.reshape(-1)] = k
            counts.append(idx.numel())
        if bool((ids < 0).any()) or sum(counts) != offset:
            raise ValueError("the spec's entries do not cover every parameter element exactly once")
        self._index = index
        self.__dict__["_device_index"] = {}  # copies of the old maps on other devices are stale now
        # entries that are a whole run of the flat vector in their own layout (a plain parameter tensor) are read
        # as views, and if such runs tile the vector the outputs concatenate in order without a gather
        self._slices = {}
        for name, idx in index.items():
            flat = idx.reshape(-1)
            if flat.numel() and bool((flat == torch.arange(int(flat[0]), int(flat[0]) + flat.numel())).all()):
                self._slices[name] = (int(flat[0]), flat.numel())
        order = sorted(self._slices, key=lambda n: self._slices[n][0])
        tiles = len(order) == len(index) and all(
            self._slices[a][0] + self._slices[a][1] == self._slices[b][0] for a, b in zip(order, order[1:]))
        self._tiling = order if tiles else None
        # the slices as one split of the vector (gaps unnamed): in a backward pass a split concatenates its
        # pieces' gradients once, where each slice would write a zero-filled gradient of the whole vector (the ~30
        # entries of a GPT-2, batched: 0.8 s of a 2.7 s imitation step)
        sizes, names, pos = [], [], 0
        for name in order:
            start, n = self._slices[name]
            if start > pos:
                sizes.append(start - pos)
                names.append(None)
            sizes.append(n)
            names.append(name)
            pos = start + n
        if pos < offset:
            sizes.append(offset - pos)
            names.append(None)
        self._split = (sizes, names)
        positions = torch.cat([i.reshape(-1) for i in index.values()])
        self._gather = torch.argsort(positions)  # flat position -> place in the concatenated entry outputs
        self._segments = Segments.from_ids(ids, len(counts))
        return self._segments

    def bind(self, params: list[torch.Tensor]) -> Segments:
        """:meth:`bind_layout` for parameters given in ``spec.sources`` order."""
        if len(params) != len(self.spec.sources):
            raise ValueError(f"the spec has {len(self.spec.sources)} parameter sources but {len(params)} "
                             "parameters were given")
        return self.bind_layout(self.spec.sources, [p.shape for p in params])

    def segments(self, params: list[torch.Tensor]) -> Segments:
        if self._segments is None:
            self.bind(params)
        return self._segments

    # ------------------------------------------------------------------ f
    def forward(self, features: torch.Tensor, segments: Segments) -> torch.Tensor:
        if self._gather is None:
            raise RuntimeError("UNFFamily is not bound to a parameter layout: call bind() or bind_layout()")
        h = self.deepset.hidden(features, segments)  # (N, hidden)
        return self.deepset.out(h, segments).squeeze(-1) + self.unf_readout(h)

    def unf_readout(self, h: torch.Tensor, project_first: bool = False, workspace: dict | None = None
                    ) -> torch.Tensor:
        """The UNF layer's (N,) output from per-element hidden activations ``h`` (N, hidden).

        ``project_first``: evaluate the layer by :meth:`unf.nn.UNFLinear.forward_rows` (each term's coefficient
        before its reduction, reading ``h`` channels-last; faster for large models, see there), with its buffers
        kept in ``workspace``."""
        if project_first:
            rows = {}
            for name, index in self._index.items():
                if name in self._slices:
                    start, n = self._slices[name]
                    rows[name] = h[start:start + n]
                else:
                    rows[name] = h[self._on(name, index, h.device).reshape(-1)]
            out = self.head.forward_rows(rows, workspace)
            return self._flat_output(out)
        # channels-first entries: the UNF layer's reductions run over contiguous entry axes (5x faster than
        # reducing a channels-last view)
        ht = h.mT.contiguous()  # (mT: also right under vmap, where .T would see the batch axis)
        sizes, names = self._split
        views = dict(zip(names, ht.split(sizes, dim=1)))
        entries = {}
        for name, index in self._index.items():
            if name in self._slices:
                entries[name] = views[name].view(1, ht.shape[0], *index.shape)
            else:
                entries[name] = ht[:, self._on(name, index, h.device)].unsqueeze(0)
        return self._flat_output(self.head(entries))

    def _on(self, key: str, index: torch.Tensor, device: torch.device) -> torch.Tensor:
        """An index map on ``device``, copied there once (not on every optimizer step)."""
        if index.device == device:
            return index
        cache = self.__dict__.setdefault("_device_index", {})
        hit = cache.get((key, device))
        if hit is None:
            hit = cache[(key, device)] = index.to(device)
        return hit

    def _flat_output(self, out) -> torch.Tensor:
        """The 1-channel outputs per entry as one (N,) vector in the flat parameter layout."""
        if self._tiling is not None:
            return torch.cat([out[name].reshape(-1) for name in self._tiling])
        # entries partition the parameters: one gather puts every output element back at its flat position
        gather = self._on("", self._gather, out[self.spec.entries[0].name].device)
        return torch.cat([out[name].reshape(-1) for name in self._index])[gather]

    # ------------------------------------------------------------------ transfer
    def transfer(self, spec: WeightSpaceSpec) -> UNFFamily:
        """This family's weights on another spec (module docstring); ``.head.coverage`` says how many of the new
        spec's terms found a trained coefficient."""
        if self.config["tie"] != "role":
            raise ValueError("only tie='role' weights transfer to another spec; these were trained with one "
                             "coefficient per term of their own spec")
        cfg = {k: v for k, v in self.config.items()}
        new = UNFFamily(spec, **cfg).to(next(self.parameters()).device)
        new.deepset.load_state_dict(self.deepset.state_dict())
        new.head.load_role_state(self.head.role_state())
        return new


class UNFOptimizer(LearnedOptimizer):
    """A learned optimizer whose ``f`` is a UNF over ``model``'s derived weight-space spec.

    Args:
        model: the model to train (its spec is derived with ``example_inputs``).
        example_inputs: inputs for one forward pass (as for :func:`unf.derive_spec`).
        rule: a :class:`LearnedRule` whose ``f`` is a :class:`UNFFamily`; built fresh if omitted. If its spec
            differs from the model's, its weights are transferred by role (:meth:`UNFFamily.transfer`).
        lr: multiplier on the learned step size.
        hidden, layers: DeepSet width and depth of a fresh rule.
        spec: use this spec instead of deriving one.
        cuda_graph, compile, fused: as for :class:`LearnedOptimizer` (replay the step as a CUDA graph on a GPU;
            compile it with ``torch.compile``; fused Triton kernels for the per-element layers).
    """

    def __init__(self, model: nn.Module, example_inputs: Any, rule: LearnedRule | None = None, lr: float = 1.0,
                 hidden: int = 32, layers: int = 3, spec: WeightSpaceSpec | None = None,
                 cuda_graph: bool | None = None,
                 compile: bool = False, fused: bool | None = None):
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
        if rule.f.spec != spec:
            f = rule.f.transfer(spec)
            coverage = getattr(f.head, "coverage", 1.0)
            if coverage < 1.0:
                warnings.warn(f"learned-optimizer weights were trained on another weight space: {coverage:.0%} of "
                              "this model's UNF terms have trained coefficients; the rest start at zero",
                              stacklevel=2)
            rule = rule.with_f(f)
        rule.f.bind(params)
        super().__init__(params, rule, lr=lr, segments_for=rule.f.segments, cuda_graph=cuda_graph,
                         compile=compile, fused=fused)
        self.spec = spec

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "spec", None) is not None:
            raise RuntimeError("UNFOptimizer covers the whole model's spec in one group; to change the parameters, "
                               "build a new UNFOptimizer (its spec is re-derived from the model)")
        super().add_param_group(param_group)
