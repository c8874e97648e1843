"""Build the learned rule a meta-training run trains, and the flat inner problem it acts on.

One place decides this for every family, so the loop (and its distributed and benchmark variants) never
special-cases one: per-element families (``"mlp"``, ``"deepset"``) pool over parameter tensors; the UNF family
(``"unf"``) reads the flat vector as the entries of the task model's derived weight-space spec.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping

import torch

import optimizers as O
from unf import UnknownOpWarning, derive_spec

from .estimators import FlatProblem
from .tasks import Task

__all__ = ["build_rule", "warm_start", "copy_rule"]


def build_rule(family: str, task: Task, params: Mapping[str, torch.Tensor], hidden: int = 32,
               layers: int = 3, init_from: str | os.PathLike | None = None) -> tuple[O.LearnedRule, FlatProblem]:
    """A fresh rule of ``family`` for ``task`` and the :class:`FlatProblem` (flat layout of ``params``) it acts on.

    ``init_from``: a saved rule to start from (see :func:`warm_start`), e.g. a trained DeepSet rule for a UNF run.
    """
    rule, problem = _build(family, task, params, hidden, layers)
    if init_from:
        warm_start(rule, init_from)
    return rule, problem


def warm_start(rule: O.LearnedRule, path: str | os.PathLike) -> None:
    """Start ``rule`` from a saved rule (see :func:`copy_rule`)."""
    copy_rule(rule, O.load_rule(path), source=str(path))


@torch.no_grad()
def copy_rule(rule: O.LearnedRule, src: O.LearnedRule, source: str = "the source rule") -> None:
    """Copy ``src``'s weights into ``rule``: the scalars always; ``f`` when the families match (a UNF rule of
    another spec is transferred by role), or a DeepSet rule into a UNF rule's DeepSet layers and read-out (the UNF
    read-out stays zero, so the warm-started rule starts out computing exactly the DeepSet rule's updates)."""
    for name in ("raw_alpha", "beta", "raw_gamma0"):
        getattr(rule, name).copy_(getattr(src, name))
    if isinstance(rule.f, O.UNFFamily) and isinstance(src.f, O.UNFFamily):
        if src.f.spec == rule.f.spec:
            rule.f.load_state_dict(src.f.state_dict())
        else:
            rule.f.deepset.load_state_dict(src.f.deepset.state_dict())
            rule.f.head.load_role_state(src.f.head.role_state())
    elif isinstance(rule.f, O.UNFFamily) and isinstance(src.f, O.DeepSet):
        rule.f.deepset.load_state_dict(src.f.state_dict())
    elif type(rule.f) is type(src.f):
        rule.f.load_state_dict(src.f.state_dict())
    else:
        raise ValueError(f"cannot start a {type(rule.f).__name__} rule from the {type(src.f).__name__} rule in "
                         f"{source}")


def _build(family: str, task: Task, params: Mapping[str, torch.Tensor], hidden: int,
           layers: int) -> tuple[O.LearnedRule, FlatProblem]:
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
