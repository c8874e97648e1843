"""Weight-space specs: which axes of which weights may be permuted together.

A :class:`WeightSpaceSpec` is an immutable value: a tuple of :class:`Entry` (named tensor views of the
model's ``state_dict`` tensors) and a mapping of permutation groups to their sizes. Each axis of each entry
carries a group name, or ``None`` when the axis is fixed (never permuted).

A permutation is a dict ``group -> LongTensor`` with ``perm[g][i]`` = the old index placed at new index
``i`` along every axis tagged ``g`` (i.e. ``new = old.index_select(axis, perm[g])``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["Entry", "WeightSpaceSpec", "Permutation"]

Permutation = dict[str, torch.Tensor]
# One step of an entry's view of its source tensor: ("view", shape) splits axes; ("narrow", axis, start, length)
# takes a contiguous block along one axis. Both return views, so entries can be read and written in place.
Step = tuple


def _apply_steps(t: torch.Tensor, steps: Sequence[Step], trailing: int = 0) -> torch.Tensor:
    """Apply view/narrow steps to the leading axes of ``t`` (``trailing`` axes, e.g. channels, are kept)."""
    rest = tuple(t.shape[t.dim() - trailing :]) if trailing else ()
    for step in steps:
        if step[0] == "view":
            t = t.view(tuple(step[1]) + rest)
        else:
            t = t.narrow(step[1], step[2], step[3])
    return t


@dataclass(frozen=True)
class Entry:
    """One named tensor view of a ``state_dict`` tensor.

    Attributes:
        name: unique entry name (the source name, plus ``[k]`` when a tensor is split into several entries).
        source: ``state_dict`` key of the tensor this entry views.
        shape: shape of the view.
        axes: group name per axis of the view, ``None`` for a fixed axis.
        steps: how the view is cut from the source (``view`` splits, ``narrow`` blocks).
        kind: ``"parameter"`` or ``"buffer"``.
        aliases: other ``state_dict`` keys holding the same tensor (tied weights).
        block: per source axis, the ``(start, stop)`` index range this entry covers.
    """

    name: str
    source: str
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    steps: tuple[Step, ...] = ()
    kind: str = "parameter"
    aliases: tuple[str, ...] = ()
    block: tuple[tuple[int, int], ...] | None = None

    def __post_init__(self) -> None:
        if len(self.shape) != len(self.axes):
            raise ValueError(f"entry {self.name!r}: shape {self.shape} has {len(self.shape)} axes but "
                             f"axes {self.axes} has {len(self.axes)}")

    def view(self, tensor: torch.Tensor, trailing: int = 0) -> torch.Tensor:
        """This entry's view of its source tensor (shares storage).

        ``trailing`` extra axes at the end of ``tensor`` (e.g. feature channels) are carried along untouched.
        """
        return _apply_steps(tensor, self.steps, trailing)

    @property
    def permuted_axes(self) -> tuple[int, ...]:
        return tuple(i for i, g in enumerate(self.axes) if g is not None)


@dataclass(frozen=True)
class WeightSpaceSpec:
    """The permutation symmetries of a weight space (see the module docstring).

    Build one with :func:`unf.derive_spec` (from a model) or :meth:`from_axes` (by hand).
    """

    entries: tuple[Entry, ...]
    groups: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "entries", tuple(self.entries))
        object.__setattr__(self, "groups", dict(self.groups))
        names = [e.name for e in self.entries]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"duplicate entry names: {dup}")
        for e in self.entries:
            for ax, (g, n) in enumerate(zip(e.axes, e.shape)):
                if g is None:
                    continue
                if g not in self.groups:
                    raise ValueError(f"entry {e.name!r} axis {ax} names unknown group {g!r}")
                if self.groups[g] != n:
                    raise ValueError(f"entry {e.name!r} axis {ax} has size {n} but group {g!r} has size "
                                     f"{self.groups[g]}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_axes(cls, entries: Mapping[str, Sequence[tuple[str | None, int]]]) -> WeightSpaceSpec:
        """A hand-written spec: entry name -> list of ``(group or None, size)`` per axis.

        Each entry is its own source (a plain ``name -> tensor`` dict is the "state dict"). Example, a 2-layer
        MLP with permutable hidden neurons::

            WeightSpaceSpec.from_axes({
                "W1": [("hidden", 32), (None, 64)], "b1": [("hidden", 32)],
                "W2": [(None, 10), ("hidden", 32)], "b2": [(None, 10)],
            })
        """
        groups: dict[str, int] = {}
        out = []
        for name, axes in entries.items():
            for g, n in axes:
                if g is not None and groups.setdefault(g, n) != n:
                    raise ValueError(f"group {g!r} has size {groups[g]} elsewhere but {n} in entry {name!r}")
            shape = tuple(int(n) for _, n in axes)
            out.append(Entry(name=name, source=name, shape=shape, axes=tuple(g for g, _ in axes)))
        return cls(tuple(out), groups)

    # ------------------------------------------------------------------ queries
    def __getitem__(self, name: str) -> Entry:
        for e in self.entries:
            if e.name == name:
                return e
        raise KeyError(f"no entry named {name!r}; entries: {[e.name for e in self.entries][:8]}...")

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def sources(self) -> tuple[str, ...]:
        """The state-dict keys the entries view, in order, without repeats."""
        return tuple(dict.fromkeys(e.source for e in self.entries))

    def axes_of(self, group: str) -> list[tuple[str, int]]:
        """Every ``(entry name, axis)`` carrying ``group``."""
        return [(e.name, i) for e in self.entries for i, g in enumerate(e.axes) if g == group]

    def parameters_only(self) -> WeightSpaceSpec:
        """The same spec without buffer entries (e.g. BatchNorm running statistics)."""
        kept = tuple(e for e in self.entries if e.kind == "parameter")
        used = {g for e in kept for g in e.axes if g is not None}
        return WeightSpaceSpec(kept, {g: n for g, n in self.groups.items() if g in used})

    # ------------------------------------------------------------------ permutations
    def random_permutation(self, generator: torch.Generator | None = None) -> Permutation:
        """A uniformly random element of the spec's group: one permutation per group."""
        return {g: torch.randperm(n, generator=generator) for g, n in self.groups.items()}

    def identity_permutation(self) -> Permutation:
        return {g: torch.arange(n) for g, n in self.groups.items()}

    @staticmethod
    def inverse_permutation(perm: Permutation) -> Permutation:
        return {g: torch.argsort(p) for g, p in perm.items()}

    def permute_views(self, views: Mapping[str, torch.Tensor], perm: Permutation,
                      batch_dims: int = 0) -> dict[str, torch.Tensor]:
        """Permute entry views (``name -> tensor``); ``batch_dims`` leading axes (batch, channels) are kept."""
        out = {}
        for e in self.entries:
            v = views[e.name]
            for ax, g in enumerate(e.axes):
                if g is not None:
                    v = v.index_select(batch_dims + ax, perm[g].to(v.device))
            out[e.name] = v
        return out

    def permute_state_dict(self, state_dict: Mapping[str, torch.Tensor], perm: Permutation) -> dict:
        """Apply ``perm`` to a model's own ``state_dict`` (same keys, same shapes)."""
        views = self.permute_views(self.to_views(state_dict), perm)
        return self.from_views(views, like=state_dict)

    # ------------------------------------------------------------------ views
    def to_views(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Entry name -> view tensor (sharing storage with ``state_dict``)."""
        missing = [s for s in self.sources if s not in state_dict]
        if missing:
            raise KeyError(f"state_dict lacks {missing[:5]} (spec sources); was the spec derived for another "
                           "model?")
        out = {}
        for e in self.entries:
            v = e.view(state_dict[e.source])
            if tuple(v.shape) != e.shape:
                raise ValueError(f"entry {e.name!r}: view has shape {tuple(v.shape)}, spec says {e.shape}")
            out[e.name] = v
        return out

    def from_views(self, views: Mapping[str, torch.Tensor], like: Mapping[str, torch.Tensor]) -> dict:
        """Inverse of :meth:`to_views`: a new state dict shaped like ``like`` with entries written from ``views``.

        Keys of ``like`` that no entry covers are carried over unchanged; tied aliases get the same tensor.
        """
        out = dict(like)
        for source in self.sources:
            out[source] = like[source].detach().clone()
        for e in self.entries:
            target = e.view(out[e.source])
            target.copy_(views[e.name].reshape(target.shape))
        for e in self.entries:
            for alias in e.aliases:
                if alias in out:
                    out[alias] = out[e.source]
        return out

    # ------------------------------------------------------------------ serialisation
    def to_json(self, indent: int | None = None) -> str:
        def enc(e: Entry) -> dict:
            d = {"name": e.name, "source": e.source, "shape": list(e.shape), "axes": list(e.axes),
                 "steps": [list(s) for s in e.steps], "kind": e.kind, "aliases": list(e.aliases)}
            if e.block is not None:
                d["block"] = [list(b) for b in e.block]
            return d

        return json.dumps({"format": "unf.WeightSpaceSpec/1", "groups": self.groups,
                           "entries": [enc(e) for e in self.entries]}, indent=indent)

    @classmethod
    def from_json(cls, text: str) -> WeightSpaceSpec:
        data = json.loads(text)
        if data.get("format") != "unf.WeightSpaceSpec/1":
            raise ValueError(f"not a WeightSpaceSpec JSON document (format={data.get('format')!r})")

        def step(s: list) -> Step:
            return ("view", tuple(s[1])) if s[0] == "view" else tuple(s)

        entries = tuple(
            Entry(name=d["name"], source=d["source"], shape=tuple(d["shape"]), axes=tuple(d["axes"]),
                  steps=tuple(step(s) for s in d["steps"]), kind=d.get("kind", "parameter"),
                  aliases=tuple(d.get("aliases", ())),
                  block=tuple(tuple(b) for b in d["block"]) if "block" in d else None)
            for d in data["entries"])
        return cls(entries, data["groups"])

    # ------------------------------------------------------------------ display
    def __str__(self) -> str:
        def fmt_axes(e: Entry) -> str:
            return "(" + ", ".join("-" if g is None else g for g in e.axes) + ")"

        def fmt_block(e: Entry) -> str:
            if e.block is None:
                return ""
            return "[" + ", ".join(":" if b is None else f"{b[0]}:{b[1]}" for b in e.block) + "]"

        rows = [("entry", "source", "block", "shape", "axes (group per axis, - = fixed)")]
        for e in self.entries:
            src = e.source + (f" (= {', '.join(e.aliases)})" if e.aliases else "")
            rows.append((e.name, src, fmt_block(e), "x".join(map(str, e.shape)) or "scalar", fmt_axes(e)))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        n_perm = sum(1 for e in self.entries for g in e.axes if g is not None)
        groups = ", ".join(f"{g}={n}" for g, n in self.groups.items())
        lines.append(f"{len(self.entries)} entries, {n_perm} permuted axes, {len(self.groups)} groups: {groups}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"WeightSpaceSpec({len(self.entries)} entries, {len(self.groups)} groups)"
