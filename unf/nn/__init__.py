"""Permutation-equivariant networks over weight spaces (Universal Neural Functionals).

- :class:`UNFLinear` — the maximally expressive equivariant linear layer for any spec (``terms`` enumerates its
  basis); :class:`UNF` — a stack; :class:`InvariantPool` and :class:`UNFInvariant` — invariant models.
- Baselines with the same API: :class:`DeepSetWeightNet`, :class:`StatNN`.
- Features: ``entry name -> (batch, channels, *entry_shape)``; see :mod:`unf.nn.batch`.
- Checks shipped for users: :func:`assert_equivariant`, :func:`assert_invariant`.
"""

from .batch import (
                    features_from_models,
                    features_from_state_dicts,
                    features_to_state_dicts,
                    permute_features,
                    random_features,
)
from .linear import UNFLinear
from .models import UNF, ChannelNorm, DeepSetWeightLayer, DeepSetWeightNet, InvariantPool, StatNN, UNFInvariant
from .terms import Term, bell, count_pair_terms, pair_terms
from .testing import assert_equivariant, assert_invariant

__all__ = [
    "UNFLinear", "UNF", "InvariantPool", "UNFInvariant", "ChannelNorm", "DeepSetWeightLayer", "DeepSetWeightNet",
    "StatNN", "Term", "bell", "pair_terms", "count_pair_terms", "features_from_models", "features_from_state_dicts",
    "features_to_state_dicts", "permute_features", "random_features", "assert_equivariant", "assert_invariant",
]
