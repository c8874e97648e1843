"""UNF layers whose coefficients are shared *by role*, so one set of weights applies to any weight space.

A plain :class:`unf.nn.UNFLinear` owns one coefficient per basis term, so its weights are tied to one spec. Here
every term gets a *role key* that names its structure but not its entries or sizes:

- the pair's axes as kinds, ``p`` (permuted by a true group) or ``f`` (a relaxed fixed axis), output side then
  input side, e.g. ``pf|fp`` for ``W2 <- W1`` of an MLP (``W1``: hidden x inputs, ``W2``: outputs x hidden);
- which of those axes carry the same group (canonical labels, e.g. ``01|20``: ``W2``'s hidden axis is ``W1``'s
  hidden axis);
- whether output and input are the same entry;
- the term's partition (the basis's canonical block labels, e.g. ``01|02``).

Terms with equal keys share one ``out_channels x in_channels`` coefficient, and the terms of one key that feed the
same output entry are *averaged*, so the scale does not grow with depth (a 5-layer MLP feeds ``W3`` from as many
unrelated entries as it has, all with the key "no shared group"). Sharing coefficients across terms keeps the
layer exactly equivariant (each term is).

Transfer rule (:meth:`RoleUNFLinear.role_state` / :meth:`RoleUNFLinear.load_role_state`): a layer built for
another spec takes the coefficients of every key the two share and starts the others at zero;
:attr:`RoleUNFLinear.coverage` reports which fraction of its terms found a trained key. Fixed axes are relaxed
one group per axis (``relax_groups="per_axis"``), never by size, so keys do not depend on coincidences of sizes.

Shared tables (``keys=``): a layer can hold its coefficients over a *given* list of keys instead of its own spec's
(e.g. ``master.role_keys``, or the union over several specs), so layers built for different specs have parameters
of exactly the same names and shapes and one set of weights drives them all (``torch.func.functional_call``);
this is how one UNF learned optimizer is meta-trained over a family of tasks. Terms whose key is not in the
table contribute zero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..spec import WeightSpaceSpec
from .basis import BasisEntry, Term
from .layers import UNFLinear

__all__ = ["RoleUNFLinear", "term_role", "bias_role"]


def _kinds(e: BasisEntry) -> str:
    relaxed = set(e.relaxed_axes)
    return "".join("f" if ax in relaxed else "p" for ax in e.perm_axes)


def _group_labels(groups: Sequence[str]) -> str:
    seen: dict[str, int] = {}
    return "".join(str(seen.setdefault(g, len(seen))) for g in groups)


def _digits(labels: Sequence[int]) -> str:
    # labels are small ints (< 36 for any realistic entry); base-36 keeps one character per axis
    return "".join("0123456789abcdefghijklmnopqrstuvwxyz"[b] for b in labels)


def term_role(term: Term, entries: Sequence[BasisEntry]) -> str:
    """The role key of a basis term (module docstring), e.g. ``"pf|fp g=01|20 cross P=01|21"``."""
    out, inp = entries[term.out], entries[term.inp]
    g = _group_labels(out.groups + inp.groups)
    n = len(out.groups)
    same = "self" if term.out == term.inp else "cross"
    return (f"{_kinds(out)}|{_kinds(inp)} g={g[:n]}|{g[n:]} {same} "
            f"P={_digits(term.out_labels)}|{_digits(term.in_labels)}")


def bias_role(entry: BasisEntry, out_labels: Sequence[int]) -> str:
    """The role key of an output entry's learned constant (``out_labels`` marks a diagonal pattern)."""
    return f"{_kinds(entry)} g={_group_labels(entry.groups)} bias={_digits(out_labels)}"


class RoleUNFLinear(UNFLinear):
    """:class:`UNFLinear` with coefficients shared by role key (module docstring): weights transfer across specs.

    Args:
        spec, in_channels, out_channels, bias, init_scale, device, dtype: as for :class:`UNFLinear`.
        keys: the role keys to hold coefficients for, each prefixed ``"term:"`` or ``"bias:"`` as in
            :meth:`role_state`; the term keys and the bias keys each keep their given order in the table
            (default: this spec's own keys, :attr:`own_role_keys`). Passing a trained layer's :attr:`role_keys`
            keeps the parameter shapes of that layer, whatever the spec (unused keys cost nothing at run time);
            terms of this spec whose key is not in the table contribute zero and count against :attr:`coverage`.

    Fixed axes are always relaxed one group per axis (no positional encodings: their sizes differ by model).
    """

    def __init__(self, spec: WeightSpaceSpec, in_channels: int, out_channels: int, *,
                 keys: Sequence[str] | None = None, bias: bool = True, init_scale: float = 1.0,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(spec, in_channels, out_channels, fixed="relax", relax_groups="per_axis", bias=bias,
                         init_scale=init_scale, device=device, dtype=dtype)
        plan, entries = self.plan, self.plan.entries
        block_term = {}
        for t, (g, k) in enumerate(plan.term_group):
            block_term[(g, k)] = t
        roles = [term_role(t, entries) for t in plan.terms]
        has_bias = bias and self._bias_mix >= 0
        broles = ([bias_role(entries[plan.groups[g].out], plan.groups[g].out_labels)
                   for g in plan.mixes[self._bias_mix].groups] if has_bias else [])
        #: this spec's own keys (the default table), prefixed as in :meth:`role_state`
        self.own_role_keys: tuple[str, ...] = (tuple(f"term:{k}" for k in dict.fromkeys(roles))
                                               + tuple(f"bias:{k}" for k in dict.fromkeys(broles)))
        term_keys, bias_keys = _split_keys(self.own_role_keys if keys is None else keys, bias)
        self.term_keys: tuple[str, ...] = term_keys
        key_id = {k: i for i, k in enumerate(self.term_keys)}
        absent = len(self.term_keys)  # the index of a zero row appended to the table for keys it lacks
        self._term_absent = any(r not in key_id for r in roles)
        # terms of one key feeding one output entry are averaged
        count: dict[tuple[int, str], int] = {}
        for t, r in zip(plan.terms, roles):
            count[(t.out, r)] = count.get((t.out, r), 0) + 1
        self._mix_shape: list[tuple[int, int]] = []
        for mi, m in enumerate(plan.mixes):
            ids = torch.empty(len(m.groups), len(m.parts), dtype=torch.int64)
            scale = torch.empty(len(m.groups), len(m.parts), dtype=torch.float64)
            for j, g in enumerate(m.groups):
                for k in range(len(m.parts)):
                    t = plan.terms[block_term[(g, k)]]
                    ids[j, k] = key_id.get(roles[t.index], absent)
                    scale[j, k] = 1.0 / count[(t.out, roles[t.index])]
            self.register_buffer(f"_role_ids{mi}", ids, persistent=False)
            self._exact_buffer(f"_role_scale{mi}", scale, {"device": device, "dtype": dtype})
            self._mix_shape.append((len(m.groups), len(m.parts)))
        fk = {"device": device, "dtype": dtype}
        # fan-in: input channels times the number of distinct keys feeding an output entry (averaged within a key)
        keys_per_out: dict[int, set[str]] = {}
        for t, r in zip(plan.terms, roles):
            keys_per_out.setdefault(t.out, set()).add(r)
        fan_in = in_channels * max(len(v) for v in keys_per_out.values())
        self.weights = nn.ParameterList()  # the per-term weights of the parent are replaced by the role table
        self.coef = nn.Parameter(torch.randn(len(self.term_keys), out_channels, in_channels, **fk)
                                 * (init_scale / math.sqrt(fan_in)))
        self.bias_keys: tuple[str, ...] = bias_keys
        self.bias = None
        if self.bias_keys:
            self.bias_coef = nn.Parameter(torch.zeros(len(self.bias_keys), out_channels, **fk))
        self._bias_absent = False
        if has_bias:
            bias_id = {k: i for i, k in enumerate(self.bias_keys)}
            self.register_buffer("_bias_ids", torch.tensor([bias_id.get(r, len(self.bias_keys)) for r in broles],
                                                           dtype=torch.int64), persistent=False)
            self._bias_absent = any(r not in bias_id for r in broles)
        found = [r in key_id for r in roles]
        self._coverage = sum(found) / len(found) if found else 1.0

    @property
    def role_keys(self) -> tuple[str, ...]:
        """The keys of the coefficient table, in order, prefixed as in :meth:`role_state` (pass them as ``keys=``
        to build a layer with the same parameter shapes on another spec)."""
        return tuple(f"term:{k}" for k in self.term_keys) + tuple(f"bias:{k}" for k in self.bias_keys)

    # ------------------------------------------------------------------ tied weights
    def mix_weights(self) -> list[torch.Tensor]:
        out = []
        co, ci = self.coef.shape[1:]
        table = self.coef
        if self._term_absent:  # terms whose key the table lacks read this zero row
            table = torch.cat([table, table.new_zeros(1, co, ci)])
        for mi, (J, K) in enumerate(self._mix_shape):
            ids, scale = getattr(self, f"_role_ids{mi}"), getattr(self, f"_role_scale{mi}")
            blocks = table[ids] * scale[..., None, None].to(table.dtype)  # (J, K, co, ci)
            out.append(blocks.permute(0, 2, 1, 3).reshape(J * co, K * ci))
        return out

    def bias_vector(self) -> torch.Tensor | None:
        if self._bias_mix < 0:
            return None
        ids = self._bias_ids
        if not self.bias_keys:  # a shared table without constants: the plan still adds a (zero) bias
            return self.coef.new_zeros(ids.numel() * self.out_channels)
        table = self.bias_coef
        if self._bias_absent:
            table = torch.cat([table, table.new_zeros(1, table.shape[1])])
        return table[ids].reshape(-1)

    def term_coefficient(self, t: int) -> torch.Tensor:
        """Term ``t``'s ``(out_channels, in_channels)`` coefficient: a view of its key's row of the table, or
        zeros (a new tensor) when the table lacks its key."""
        key = term_role(self.plan.terms[t], self.plan.entries)
        if key not in self.term_keys:
            return self.coef.new_zeros(self.coef.shape[1:])
        return self.coef[self.term_keys.index(key)]

    def bias_of(self, entry: str) -> torch.Tensor | None:
        if self._bias_mix < 0:
            return None
        return self.bias_vector().view(-1, self.out_channels)[self._scalar_group_row(self.names.index(entry))]

    def _scalar_group_row(self, i: int) -> int:
        m = self.plan.mixes[self._bias_mix]
        for j, g in enumerate(m.groups):
            grp = self.plan.groups[g]
            if grp.out == i and grp.is_scalar:
                return j
        raise AssertionError("entry has no constant pattern")

    # ------------------------------------------------------------------ transfer
    @property
    def coverage(self) -> float:
        """Fraction of this layer's terms whose key was found by the last :meth:`load_role_state`; before any,
        the fraction whose key is in the table (1 unless ``keys=`` lacks some of this spec's keys)."""
        return self._coverage

    def role_state(self) -> dict[str, torch.Tensor]:
        """``{"term:" + key: coefficient, "bias:" + key: constant}``, the spec-free form of the weights."""
        state = {f"term:{k}": self.coef[i].detach() for i, k in enumerate(self.term_keys)}
        if self.bias_keys:
            state.update({f"bias:{k}": self.bias_coef[i].detach() for i, k in enumerate(self.bias_keys)})
        return state

    @torch.no_grad()
    def load_role_state(self, state: Mapping[str, torch.Tensor]) -> float:
        """Copy the coefficients of every shared key from :meth:`role_state` of any layer with the same
        channels; other keys become zero. Returns (and stores in :attr:`coverage`) the fraction of terms covered."""
        found = torch.zeros(len(self.term_keys), dtype=torch.bool)
        for i, k in enumerate(self.term_keys):
            v = state.get(f"term:{k}")
            if v is not None:
                if tuple(v.shape) != tuple(self.coef.shape[1:]):
                    raise ValueError(f"role {k!r}: coefficient shape {tuple(v.shape)} does not match this "
                                     f"layer's {tuple(self.coef.shape[1:])} (out, in channels)")
                self.coef[i].copy_(v)
                found[i] = True
            else:
                self.coef[i].zero_()
        for i, k in enumerate(self.bias_keys):
            v = state.get(f"bias:{k}")
            self.bias_coef[i].copy_(v) if v is not None else self.bias_coef[i].zero_()
        per_term = torch.cat([getattr(self, f"_role_ids{mi}").reshape(-1) for mi in range(len(self._mix_shape))])
        found = torch.cat([found, torch.zeros(1, dtype=torch.bool)])  # terms outside the table are never found
        self._coverage = float(found[per_term.cpu()].float().mean()) if per_term.numel() else 1.0
        return self._coverage

    def extra_repr(self) -> str:
        return super().extra_repr() + f", roles={len(self.term_keys)}"


def _split_keys(keys: Sequence[str], bias: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``("term:a", "bias:b", ...)`` -> (term keys, bias keys), unprefixed and in order; ValueError naming ``keys``
    for a key without a prefix, a repeated key, or a bias key on a layer without bias."""
    if isinstance(keys, str):
        raise ValueError("keys must be a sequence of role keys, not one string")
    terms, biases = [], []
    for k in keys:
        if not isinstance(k, str) or not k.startswith(("term:", "bias:")):
            raise ValueError(f"keys: every key must start with 'term:' or 'bias:' (as in role_state()); got {k!r}")
        (terms if k.startswith("term:") else biases).append(k[5:])
    for kind, lst in (("term", terms), ("bias", biases)):
        if len(set(lst)) != len(lst):
            dup = next(k for k in lst if lst.count(k) > 1)
            raise ValueError(f"keys: {kind} key {dup!r} is given twice")
    if biases and not bias:
        raise ValueError(f"keys: bias keys given ({biases[0]!r}, ...) but the layer has bias=False")
    return tuple(terms), tuple(biases)
