"""Build the learned rule a meta-training run trains, and the flat inner problem it acts on.

One place decides this for every family, so the loop (and its distributed and benchmark variants) never
special-cases one: per-element families (``"mlp"``, ``"deepset"``) pool over parameter tensors; the UNF family
(``"unf"``) reads the flat vector as the entries of the task model's derived weight-space spec.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping

import torch

import optimizers as O
from unf import UnknownOpWarning, derive_spec

from .estimators import FlatProblem
from .tasks import Task

__all__ = ["build_rule"]


def build_rule(family: str, task: Task, params: Mapping[str, torch.Tensor], hidden: int = 32,
               layers: int = 3) -> tuple[O.LearnedRule, FlatProblem]:
    """A fresh rule of ``family`` for ``task`` and the :class:`FlatProblem` (flat layout of ``params``) it acts on."""
    if family in ("mlp", "deepset"):
        layers_kw = {"layers": layers if family == "deepset" else 2}
        rule = O.make_rule(family, hidden=hidden, **layers_kw)
        return rule, FlatProblem.from_task(task, params)
    if family == "unf":
        with warnings.catch_warnings():  # ops without rules only make axes fixed; the spec stays sound
            warnings.simplefilter("ignore", UnknownOpWarning)
            spec = derive_spec(task.model, task.example_inputs).parameters_only()
        rule = O.make_rule("unf", spec=spec, hidden=hidden, layers=layers)
        segments = rule.f.bind_layout(list(params), [p.shape for p in params.values()])
        return rule, dataclasses.replace(FlatProblem.from_task(task, params), segments=segments)
    raise KeyError(f"unknown optimizer family {family!r}; choose mlp, deepset or unf")
