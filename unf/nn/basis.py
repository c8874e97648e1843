"""The UNF basis: valid partitions -> einsum-like terms -> an execution plan of shared instructions.

For an ordered pair (output entry, input entry) the index set holds one index per output axis and one per
input axis. A *valid partition* splits it into blocks whose indices all carry the same group; each valid
partition is one basis term ``E_P`` of the space of equivariant linear maps (UNF paper, Thm 3.3). Naming each
block by a letter, the term reads like an einsum:

- a letter repeated on the input side takes a diagonal,
- a letter only on the input side is *mean*-reduced (mean, not sum, so scale does not grow with width),
- a letter only on the output side is broadcast,
- a letter repeated on the output side writes onto that diagonal (zero elsewhere).

The number of terms of a pair is ``prod_g Bell(c_g(out) + c_g(in))``. The terms are linearly independent
(and span every equivariant map) when each group's size is at least the number of indices it has in the pair;
for smaller groups some terms coincide linearly (harmless, merely redundant).

Fixed (``None``) axes. The true symmetry never permutes them. Two treatments are offered:

- ``"relax"`` (default, the UNF paper's choice): each fixed axis becomes a permutable group of its own.
  With ``relax_groups="by_size"`` (default) the k-th fixed axis of size n of every entry joins the group
  ``~n`` (``~n#k`` for k > 0), which reproduces the paper's hand-written specs (``W2``'s and ``b2``'s output
  axis share one group; an embedding and an untied head share the vocabulary group) and never puts two axes
  of one entry into one relaxed group (that would multiply terms through Bell numbers). ``"per_axis"`` gives
  every fixed axis its own group. Any relaxation is still *exactly* equivariant under the true group (which
  acts trivially on fixed axes); it only gives up the expressivity of treating fixed indices individually.
  Its cost is independent of the fixed axes' sizes, so it scales to vocabulary axes; a learned positional
  encoding (see :class:`unf.nn.UNFLinear`) can break the false symmetry.
- ``"exact"``: fixed axes are folded into the channel dimension (channel index = ``c * N_fixed + f``, fixed
  axes row-major in their original order). Every term then mixes ``c_out * N_out_fixed`` by
  ``c_in * N_in_fixed`` channels, which is exactly the space ``Hom_G(V_in, V_out) (x) Hom(R^N_in, R^N_out)``
  of maps equivariant under the true group. Parameters grow with ``N_out * N_in``, so use it where fixed axes
  are small.
- ``"auto"``: exact for fixed axes of size ``<= exact_max_size``, relaxed for larger ones.
"""

from __future__ import annotations

import itertools
import string
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache

from ..spec import WeightSpaceSpec

__all__ = [
    "bell",
    "set_partitions",
    "BasisEntry",
    "Term",
    "Reduction",
    "MixGroup",
    "Mix",
    "Plan",
    "resolve_entries",
    "pair_term_count",
    "count_terms",
    "enumerate_terms",
    "build_plan",
    "reduction_tree",
    "canonical_labels",
]

_LETTERS = string.ascii_lowercase + string.ascii_uppercase


@cache
def bell(n: int) -> int:
    """The Bell number B(n): how many set partitions an n-element set has (1, 1, 2, 5, 15, 52, 203, ...)."""
    if n < 0:
        raise ValueError(f"bell(n) needs n >= 0, got {n}")
    row = [1]
    for _ in range(n):  # Bell triangle
        nxt = [row[-1]]
        for v in row:
            nxt.append(nxt[-1] + v)
        row = nxt
    return row[0]


@cache
def set_partitions(n: int) -> tuple[tuple[int, ...], ...]:
    """All set partitions of ``range(n)`` as restricted growth strings (block id per item)."""
    out: list[tuple[int, ...]] = []

    def rec(prefix: list[int], m: int) -> None:
        if len(prefix) == n:
            out.append(tuple(prefix))
            return
        for b in range(m + 1):
            prefix.append(b)
            rec(prefix, max(m, b + 1))
            prefix.pop()

    rec([], 0)
    return tuple(out)


# ---------------------------------------------------------------------------------------------- entries
@dataclass(frozen=True)
class BasisEntry:
    """An entry as the basis sees it: its permuted axes (true or relaxed groups) and folded fixed axes.

    Attributes:
        name: the spec entry's name.
        shape: the entry's full shape.
        perm_axes: positions (in ``shape``) of the axes the layer permutes, in order.
        groups: group per permuted axis (relaxed fixed axes get ``~n``-style names).
        sizes: size per permuted axis.
        folded_axes: positions of exact-treated fixed axes, folded into channels.
        fold: product of the folded axes' sizes (channel multiplier).
        relaxed_axes: positions of relaxed fixed axes (candidates for positional encodings).
    """

    name: str
    shape: tuple[int, ...]
    perm_axes: tuple[int, ...]
    groups: tuple[str, ...]
    sizes: tuple[int, ...]
    folded_axes: tuple[int, ...] = ()
    fold: int = 1
    relaxed_axes: tuple[int, ...] = ()


def resolve_entries(spec: WeightSpaceSpec, fixed: str = "relax", exact_max_size: int = 16,
                    relax_groups: str = "by_size") -> tuple[tuple[BasisEntry, ...], dict[str, int]]:
    """Apply a fixed-axis policy (module docstring) to ``spec``: the basis entries and all group sizes."""
    if fixed not in ("relax", "exact", "auto"):
        raise ValueError(f"fixed must be 'relax', 'exact' or 'auto', got {fixed!r}")
    if relax_groups not in ("by_size", "per_axis"):
        raise ValueError(f"relax_groups must be 'by_size' or 'per_axis', got {relax_groups!r}")
    groups = dict(spec.groups)
    entries = []
    for e in spec.entries:
        perm_axes, gs, folded, relaxed = [], [], [], []
        seen_sizes: dict[int, int] = defaultdict(int)
        for ax, (g, n) in enumerate(zip(e.axes, e.shape)):
            if g is not None:
                perm_axes.append(ax)
                gs.append(g)
            elif fixed == "exact" or (fixed == "auto" and n <= exact_max_size):
                folded.append(ax)
            else:
                if relax_groups == "by_size":
                    k = seen_sizes[n]
                    seen_sizes[n] += 1
                    rg = f"~{n}" if k == 0 else f"~{n}#{k}"
                else:
                    rg = f"~{e.name}:{ax}"
                groups[rg] = n
                perm_axes.append(ax)
                gs.append(rg)
                relaxed.append(ax)
        fold = 1
        for ax in folded:
            fold *= e.shape[ax]
        entries.append(BasisEntry(name=e.name, shape=tuple(e.shape), perm_axes=tuple(perm_axes),
                                  groups=tuple(gs), sizes=tuple(e.shape[a] for a in perm_axes),
                                  folded_axes=tuple(folded), fold=fold, relaxed_axes=tuple(relaxed)))
    return tuple(entries), groups


# ---------------------------------------------------------------------------------------------- terms
@dataclass(frozen=True)
class Term:
    """One basis term ``E_P`` for the pair (output entry ``out``, input entry ``inp``).

    Blocks are numbered by first appearance over the output axes, then the input axes; ``out_labels`` /
    ``in_labels`` give the block of each permuted axis.
    """

    index: int
    out: int
    inp: int
    out_labels: tuple[int, ...]
    in_labels: tuple[int, ...]
    block_groups: tuple[str, ...]
    block_sizes: tuple[int, ...]

    @property
    def kept(self) -> tuple[int, ...]:
        """Blocks on both sides (carried from input to output), in output first-appearance order."""
        ins = set(self.in_labels)
        return tuple(dict.fromkeys(b for b in self.out_labels if b in ins))

    @property
    def reduced(self) -> tuple[int, ...]:
        """Input-only blocks (mean-reduced)."""
        outs = set(self.out_labels)
        return tuple(dict.fromkeys(b for b in self.in_labels if b not in outs))

    @property
    def broadcast(self) -> tuple[int, ...]:
        """Output-only blocks (broadcast)."""
        ins = set(self.in_labels)
        return tuple(dict.fromkeys(b for b in self.out_labels if b not in ins))

    def equation(self, names: Sequence[str] | None = None) -> str:
        """Readable form, e.g. ``W2[ab] <- W1[bc]`` (``c`` mean-reduced, ``a`` broadcast)."""
        o = "".join(_LETTERS[b] for b in self.out_labels)
        i = "".join(_LETTERS[b] for b in self.in_labels)
        on = names[self.out] if names else f"#{self.out}"
        inn = names[self.inp] if names else f"#{self.inp}"
        return f"{on}[{o}] <- {inn}[{i}]"


def pair_term_count(out: BasisEntry, inp: BasisEntry) -> int:
    """Bell-number formula: ``prod_g Bell(c_g(out) + c_g(in))``."""
    counts: dict[str, int] = defaultdict(int)
    for g in out.groups + inp.groups:
        counts[g] += 1
    total = 1
    for c in counts.values():
        total *= bell(c)
    return total


def count_terms(entries: Sequence[BasisEntry]) -> int:
    """Total number of basis terms over all ordered pairs (by the Bell formula, without enumerating)."""
    return sum(pair_term_count(o, i) for o in entries for i in entries)


def _pair_partitions(out: BasisEntry, inp: BasisEntry) -> Iterator[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Valid partitions of one pair as (out_labels, in_labels) in canonical first-appearance numbering."""
    idx_groups = out.groups + inp.groups
    by_group: dict[str, list[int]] = defaultdict(list)
    for pos, g in enumerate(idx_groups):
        by_group[g].append(pos)
    gl = list(by_group.values())
    p = len(out.groups)
    for choice in itertools.product(*(set_partitions(len(pos)) for pos in gl)):
        raw = [0] * len(idx_groups)
        for gi, (positions, rgs) in enumerate(zip(gl, choice)):
            for pos, b in zip(positions, rgs):
                raw[pos] = (gi, b)
        relabel: dict = {}
        labels = tuple(relabel.setdefault(r, len(relabel)) for r in raw)
        yield labels[:p], labels[p:]


def enumerate_terms(entries: Sequence[BasisEntry]) -> list[Term]:
    """Every basis term, ordered by output entry, then input entry, then partition."""
    terms: list[Term] = []
    for oi, out in enumerate(entries):
        for ii, inp in enumerate(entries):
            axis_groups = out.groups + inp.groups
            axis_sizes = out.sizes + inp.sizes
            for ol, il in _pair_partitions(out, inp):
                labels = ol + il
                nb = max(labels, default=-1) + 1
                bg, bs = [""] * nb, [0] * nb
                for lab, g, n in zip(labels, axis_groups, axis_sizes):
                    bg[lab], bs[lab] = g, n
                terms.append(Term(len(terms), oi, ii, ol, il, tuple(bg), tuple(bs)))
    return terms


# ---------------------------------------------------------------------------------------------- plan
def canonical_labels(labels: Sequence[int]) -> tuple[tuple[int, ...], dict[int, int]]:
    """Relabel by first appearance; returns the new labels and old -> new map."""
    m: dict[int, int] = {}
    return tuple(m.setdefault(b, len(m)) for b in labels), m


def diagonal_ops(labels: Sequence[int]) -> tuple[tuple[tuple[int, int], ...], tuple[int, ...]]:
    """How to view a ``(B, C, *axes)`` tensor as ``(B, C, *blocks)`` (blocks in label order).

    Returns ``torch.diagonal`` dim pairs to apply in order (each appends the diagonal as the last dim) and a
    final permutation.
    """
    cur = list(labels)
    ops = []
    while len(set(cur)) < len(cur):
        seen: dict[int, int] = {}
        for q, b in enumerate(cur):
            if b in seen:
                p = seen[b]
                break
            seen[b] = q
        ops.append((2 + p, 2 + q))
        cur = [b for k, b in enumerate(cur) if k not in (p, q)] + [b]
    perm = (0, 1) + tuple(2 + cur.index(b) for b in sorted(cur))
    return tuple(ops), perm


@dataclass(frozen=True)
class Reduction:
    """``(B, C, *kept blocks)`` from one input entry: diagonals for repeated input letters, then means.

    ``struct`` labels the input's permuted axes canonically; ``kept`` (sorted) are the labels that survive.
    The tensor is computed from ``parent`` (another reduction with a superset of ``kept`` and the same
    ``struct``, or the diagonal view itself when ``parent`` is None) by averaging over ``mean_dims``.
    """

    index: int
    inp: int
    struct: tuple[int, ...]
    kept: tuple[int, ...]
    parent: int | None
    mean_dims: tuple[int, ...]


@dataclass
class MixGroup:
    """All terms with one output entry and one output pattern: one concatenation, one matmul, one write.

    ``out_labels`` are the output axes' blocks; ``kept_mask`` says per output block whether it comes from the
    input. ``parts`` lists ``(term index, reduction index, dim permutation)`` whose reductions, permuted into
    output block order, are concatenated along channels.
    """

    index: int
    out: int
    out_labels: tuple[int, ...]
    kept_mask: tuple[bool, ...]
    parts: list[tuple[int, int, tuple[int, ...]]] = field(default_factory=list)

    @property
    def is_diagonal(self) -> bool:
        return len(set(self.out_labels)) < len(self.out_labels)

    @property
    def is_scalar(self) -> bool:
        """Nothing carried from the input, no diagonal: a per-channel constant broadcast (takes the bias)."""
        return not self.is_diagonal and not any(self.kept_mask)


@dataclass
class Mix:
    """Groups that concatenate the very same reductions share one concatenation and one matmul.

    The weight of a mix is ``(sum of the groups' output channels, sum of the parts' input channels)``; rows of
    group ``groups[j]`` times columns of part ``k`` hold the coefficient of term ``groups[j].parts[k][0]``.
    """

    index: int
    parts: tuple[tuple[int, tuple[int, ...]], ...]  # (reduction index, dim permutation)
    groups: list[int] = field(default_factory=list)


@dataclass
class Plan:
    """The instructions a :class:`unf.nn.UNFLinear` executes, in order: reductions, then mixes (each one
    concatenation and one matmul), then per-group writes into the output entries."""

    entries: tuple[BasisEntry, ...]
    terms: list[Term]
    reductions: list[Reduction]
    groups: list[MixGroup]
    mixes: list[Mix]
    term_group: list[tuple[int, int]]  # term -> (group index, part index)

    def describe(self, max_lines: int = 60) -> str:
        """A human-readable listing of the instructions."""
        names = [e.name for e in self.entries]
        lines = [f"{len(self.terms)} terms, {len(self.reductions)} reductions, {len(self.mixes)} matmuls, "
                 f"{len(self.groups)} output writes"]
        for r in self.reductions:
            src = f"R{r.parent}" if r.parent is not None else f"diag({names[r.inp]}[" + "".join(
                _LETTERS[b] for b in r.struct) + "])"
            keep = "".join(_LETTERS[b] for b in r.kept)
            lines.append(f"R{r.index} = mean({src}, dims={r.mean_dims}) -> [{keep}]")
        for m in self.mixes:
            srcs = ", ".join(f"R{r}" for r, _ in m.parts)
            outs = []
            for gi in m.groups:
                g = self.groups[gi]
                # lower case: carried from the input; upper case: broadcast
                outs.append(names[g.out] + "[" + "".join(
                    _LETTERS[b] if g.kept_mask[b] else _LETTERS[b].upper() for b in g.out_labels) + "]")
            lines.append(f"M{m.index} = W{m.index} @ cat({srcs}) -> " + ", ".join(outs))
        if len(lines) > max_lines:
            lines = lines[: max_lines - 1] + [f"... ({len(lines) - max_lines + 1} more)"]
        return "\n".join(lines)


def reduction_tree(entries: Sequence[BasisEntry], specs: Sequence[tuple[int, tuple[int, ...], tuple[int, ...]]]
                   ) -> tuple[list[Reduction], dict[int, int]]:
    """Order the reductions ``specs[k] = (entry, struct, kept)`` so that each one is computed from the smallest
    already-computed reduction of the same ``(entry, struct)`` that keeps a strict superset of its labels (or
    from the diagonal view itself). Returns the reductions in execution order (parents first) and the map
    ``k -> position``. Used for the input reductions of a plan and, with output patterns as structures, for
    the sums of output gradients in :class:`unf.nn.UNFLinear`'s backward."""
    by_base: dict[tuple, list[int]] = defaultdict(list)
    for rid, (inp, struct, _) in enumerate(specs):
        by_base[(inp, struct)].append(rid)
    red_list: list[Reduction | None] = [None] * len(specs)
    order: list[int] = []
    for (inp, struct), rids in by_base.items():
        e = entries[inp]
        nb = max(struct, default=-1) + 1
        bsize = [1] * nb
        for lab, n in zip(struct, e.sizes):
            bsize[lab] = n

        def numel(kept: tuple[int, ...], bsize: list[int] = bsize) -> int:
            out = 1
            for b in kept:
                out *= bsize[b]
            return out

        done: list[int] = []
        for rid in sorted(rids, key=lambda r: (-len(specs[r][2]), specs[r][2])):
            kept = specs[rid][2]
            if len(kept) == nb:
                parent, src_kept = None, tuple(range(nb))
            else:
                cands = [d for d in done if set(kept) < set(specs[d][2])]
                if cands:
                    parent = min(cands, key=lambda d: numel(specs[d][2]))
                    src_kept = specs[parent][2]
                else:
                    parent, src_kept = None, tuple(range(nb))
            mean_dims = tuple(2 + k for k, b in enumerate(src_kept) if b not in kept)
            red_list[rid] = Reduction(rid, inp, struct, kept, parent, mean_dims)
            done.append(rid)
            order.append(rid)
    # renumber so parents precede children
    new_id = {old: new for new, old in enumerate(order)}
    reductions = [Reduction(new_id[r.index], r.inp, r.struct, r.kept,
                            None if r.parent is None else new_id[r.parent], r.mean_dims)
                  for r in (red_list[o] for o in order)]
    return reductions, new_id


def build_plan(entries: Sequence[BasisEntry], terms: Sequence[Term] | None = None) -> Plan:
    """Group terms into shared reductions and per-(output entry, output pattern) mixing groups."""
    entries = tuple(entries)
    terms = list(enumerate_terms(entries) if terms is None else terms)
    red_key: dict[tuple, int] = {}
    red_specs: list[tuple[int, tuple[int, ...], tuple[int, ...]]] = []
    groups: dict[tuple, MixGroup] = {}
    term_group: list[tuple[int, int]] = []
    for t in terms:
        struct, m = canonical_labels(t.in_labels)
        kept_out_order = t.kept
        kept_sorted = tuple(sorted(m[b] for b in kept_out_order))
        key = (t.inp, struct, kept_sorted)
        if key not in red_key:
            red_key[key] = len(red_specs)
            red_specs.append(key)
        rid = red_key[key]
        # reduction dims are in input-canonical order; the group wants output block order
        perm = (0, 1) + tuple(2 + kept_sorted.index(m[b]) for b in kept_out_order)
        nb_out = max(t.out_labels, default=-1) + 1
        ins = set(t.in_labels)
        kept_mask = tuple(b in ins for b in range(nb_out))
        gkey = (t.out, t.out_labels, kept_mask)
        if gkey not in groups:
            groups[gkey] = MixGroup(len(groups), t.out, t.out_labels, kept_mask)
        g = groups[gkey]
        term_group.append((g.index, len(g.parts)))
        g.parts.append((t.index, rid, perm))
    reductions, new_id = reduction_tree(entries, red_specs)
    glist = list(groups.values())
    mixes: dict[tuple, Mix] = {}
    for g in glist:
        # canonical part order, so that groups reading the same reductions share a mix
        g.parts = sorted(((ti, new_id[rid], perm) for ti, rid, perm in g.parts), key=lambda p: (p[1], p[2]))
        for k, (ti, _, _) in enumerate(g.parts):
            term_group[ti] = (g.index, k)
        key = tuple((rid, perm) for _, rid, perm in g.parts)
        if key not in mixes:
            mixes[key] = Mix(len(mixes), key)
        mixes[key].groups.append(g.index)
    return Plan(entries, terms, reductions, glist, list(mixes.values()), term_group)
