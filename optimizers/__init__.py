"""Learned optimizers as drop-in ``torch.optim.Optimizer`` subclasses.

Quick start::

    import optimizers
    opt = optimizers.LearnedOptimizer(model.parameters(), optimizers.LearnedRule(optimizers.DeepSet()))

The update rule and features are documented in :mod:`optimizers.rule` and :mod:`optimizers.features`.
"""

from .families import FAMILIES, DeepSet, DeepSetLayer, PerParamMLP
from .features import MOMENTUM_DECAYS, N_FEATURES, Segments, compute_features
from .optimizer import LearnedOptimizer
from .registry import available, load, load_rule, make_rule, save_rule, weights_info
from .rule import LearnedRule, RuleState, init
from .unf_family import UNFFamily, UNFOptimizer

__all__ = [
    "LearnedOptimizer",
    "UNFOptimizer",
    "UNFFamily",
    "available",
    "load",
    "load_rule",
    "save_rule",
    "make_rule",
    "weights_info",
    "LearnedRule",
    "RuleState",
    "init",
    "PerParamMLP",
    "DeepSet",
    "DeepSetLayer",
    "FAMILIES",
    "Segments",
    "compute_features",
    "MOMENTUM_DECAYS",
    "N_FEATURES",
]
