"""Neural functionals on weight spaces: the UNF basis, weight-space features, UNF layers and baselines."""

from .basis import Term, bell, build_plan, count_terms, enumerate_terms, pair_term_count, resolve_entries
from .checks import assert_equivariant, assert_invariant
from .features import WeightFeatures
from .layers import (
    UNF,
    DeepSet,
    DeepSetLayer,
    EntryActivation,
    EntryNorm,
    InvariantPool,
    StatFeatures,
    StatNN,
    UNFInvariant,
    UNFLinear,
)
from .roles import RoleUNFLinear

__all__ = [
    "WeightFeatures",
    "UNFLinear",
    "RoleUNFLinear",
    "UNF",
    "EntryNorm",
    "EntryActivation",
    "InvariantPool",
    "UNFInvariant",
    "DeepSetLayer",
    "DeepSet",
    "StatFeatures",
    "StatNN",
    "Term",
    "bell",
    "count_terms",
    "pair_term_count",
    "enumerate_terms",
    "resolve_entries",
    "build_plan",
    "assert_equivariant",
    "assert_invariant",
]
