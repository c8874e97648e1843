"""Basis of the equivariant linear maps between two entries (UNF paper, Sec. 3), as inspectable terms.

For an output entry with axis groups ``(o_1..o_p)`` and an input entry with ``(i_1..i_q)``, the index set has one
position per axis. A *valid partition* splits the positions into blocks that each hold one group only; every
valid partition is one basis term. Naming each block by a letter, a term reads the input with its letters
(repeated letters take a diagonal, letters absent from the output are averaged out) and writes the result to the
output with its letters (letters absent from the input are broadcast, repeated letters write onto a diagonal).

The number of terms for a pair is ``prod_g Bell(#out axes in g + #in axes in g)``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache

__all__ = ["Term", "bell", "set_partitions", "pair_terms", "count_pair_terms"]


@cache
def bell(n: int) -> int:
    """Bell numbers 1, 1, 2, 5, 15, 52, 203, ... (number of set partitions of n items)."""
    if n == 0:
        return 1
    return sum(math.comb(n - 1, k) * bell(k) for k in range(n))


def set_partitions(items: Sequence) -> Iterator[list[list]]:
    """All set partitions of ``items`` (blocks keep the items' order)."""
    items = list(items)
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for partition in set_partitions(rest):
        yield [[first], *partition]
        for i in range(len(partition)):
            yield [*partition[:i], [first, *partition[i]], *partition[i + 1 :]]


@dataclass(frozen=True)
class Term:
    """One basis term: a letter per output axis and per input axis (letters are small ints)."""

    out_entry: str
    in_entry: str
    out_letters: tuple[int, ...]
    in_letters: tuple[int, ...]

    @property
    def kept(self) -> tuple[int, ...]:
        """Letters read from the input and written to the output, in order of first input occurrence."""
        outs = set(self.out_letters)
        return tuple(dict.fromkeys(l for l in self.in_letters if l in outs))

    @property
    def reduced(self) -> tuple[int, ...]:
        outs = set(self.out_letters)
        return tuple(dict.fromkeys(l for l in self.in_letters if l not in outs))

    @property
    def broadcast(self) -> tuple[int, ...]:
        ins = set(self.in_letters)
        return tuple(dict.fromkeys(l for l in self.out_letters if l not in ins))

    def einsum(self) -> str:
        """The term as an einsum-like string, e.g. ``'ab <- ac'`` (for reading, not for evaluation)."""
        def word(letters: tuple[int, ...]) -> str:
            return "".join(chr(ord("a") + l) for l in letters) or "."

        return f"{word(self.out_letters)} <- {word(self.in_letters)}"


def pair_terms(out_entry: str, out_groups: Sequence[str], in_entry: str, in_groups: Sequence[str]) -> list[Term]:
    """All basis terms mapping ``in_entry`` (axis groups ``in_groups``) to ``out_entry`` (``out_groups``)."""
    positions: dict[str, list[tuple[str, int]]] = {}
    for i, g in enumerate(out_groups):
        positions.setdefault(g, []).append(("o", i))
    for i, g in enumerate(in_groups):
        positions.setdefault(g, []).append(("i", i))
    per_group = [list(set_partitions(pos)) for pos in positions.values()]
    terms = []
    for choice in itertools.product(*per_group):
        out_l = [0] * len(out_groups)
        in_l = [0] * len(in_groups)
        letter = 0
        for partition in choice:
            for block in partition:
                for side, i in block:
                    (out_l if side == "o" else in_l)[i] = letter
                letter += 1
        terms.append(Term(out_entry, in_entry, _canonical(tuple(out_l), tuple(in_l))[0],
                          _canonical(tuple(out_l), tuple(in_l))[1]))
    return terms


def _canonical(out_l: tuple[int, ...], in_l: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Renumber letters by first occurrence (input first), so equal terms compare equal."""
    order: dict[int, int] = {}
    for l in in_l + out_l:
        order.setdefault(l, len(order))
    return tuple(order[l] for l in out_l), tuple(order[l] for l in in_l)


def count_pair_terms(out_groups: Sequence[str], in_groups: Sequence[str]) -> int:
    """The Bell-number formula for the number of terms of a pair."""
    counts: dict[str, int] = {}
    for g in list(out_groups) + list(in_groups):
        counts[g] = counts.get(g, 0) + 1
    return math.prod(bell(c) for c in counts.values())
