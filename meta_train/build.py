"""Build the learned rule a meta-training run trains, and the flat inner problem it acts on.

One place decides this for every family, so the loop (and its distributed and benchmark variants) never
special-cases one: per-element families (``"mlp"``, ``"deepset"``) pool over parameter tensors; the UNF family
(``"unf"``) reads the flat vector as the entries of the task model's derived weight-space spec.

Task families: one *master* rule is meta-trained across tasks of different shapes. Per-element rules apply to any
task as they are; a UNF rule is spec-bound, so the master's UNF read-out holds a shared table of role keys
(:func:`union_role_keys` of a few of the family's tasks) and :func:`bind_rule` builds, per task, a rule on that
task's spec over the same table: its parameters have exactly the master's names and shapes, and the master's
tensors are substituted for them (``torch.func.functional_call``), so meta-gradients land on the master.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence

import torch

import optimizers as O
from unf import UnknownOpWarning, WeightSpaceSpec, derive_spec
from unf.nn import RoleUNFLinear

from .estimators import FlatProblem
from .tasks import Task

__all__ = ["build_rule", "warm_start", "copy_rule", "bind_rule", "union_role_keys", "task_spec"]


def build_rule(family: str, task: Task, params: Mapping[str, torch.Tensor], hidden: int = 32,
               layers: int = 3, init_from: str | os.PathLike | None = None,
               role_keys: Sequence[str] | None = None) -> tuple[O.LearnedRule, FlatProblem]:
    """A fresh rule of ``family`` for ``task`` and the :class:`FlatProblem` (flat layout of ``params``) it acts on.

    ``init_from``: a saved rule to start from (see :func:`warm_start`), e.g. a trained DeepSet rule for a UNF run.
    ``role_keys`` (``"unf"`` only): the UNF read-out's shared key table (:func:`optimizers.make_rule`), e.g.
    :func:`union_role_keys` of a task family, so the rule's shapes do not depend on ``task``.
    """
    rule, problem = _build(family, task, params, hidden, layers, role_keys)
    problem = dataclasses.replace(problem, segments=problem.segments.to(task.device))  # index maps live with data
    if init_from:
        warm_start(rule, init_from)
    return rule, problem


def warm_start(rule: O.LearnedRule, path: str | os.PathLike) -> None:
    """Start ``rule`` from a saved rule (see :func:`copy_rule`)."""
    copy_rule(rule, O.load_rule(path), source=str(path))


@torch.no_grad()
def copy_rule(rule: O.LearnedRule, src: O.LearnedRule, source: str = "the source rule") -> None:
    """Copy ``src``'s weights into ``rule``: the scalars and ``scale_floor`` always; ``f`` when the families match
    (a UNF rule of another spec is transferred by role), or a DeepSet rule into a UNF rule's DeepSet layers and
    read-out (the UNF read-out stays zero, so the warm-started rule starts out computing exactly the DeepSet rule's
    updates)."""
    for name in ("raw_alpha", "beta", "raw_gamma0"):
        getattr(rule, name).copy_(getattr(src, name))
    rule.scale_floor = src.scale_floor  # (relative steps are part of what the weights mean)
    if isinstance(rule.f, O.UNFFamily) and isinstance(src.f, O.UNFFamily):
        # same spec and key table (or both untied): the same parameters; else transfer by role
        if src.f.spec == rule.f.spec and _key_table(src.f) == _key_table(rule.f):
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


def _key_table(f: O.UNFFamily) -> tuple[str, ...] | None:
    return getattr(f.head, "role_keys", None)


def task_spec(task: Task) -> WeightSpaceSpec:
    """The parameters-only weight-space spec of ``task``'s model (what the UNF family reads the weights as)."""
    with warnings.catch_warnings():  # ops without rules only make axes fixed; the spec stays sound
        warnings.simplefilter("ignore", UnknownOpWarning)
        return derive_spec(task.model, task.example_inputs).parameters_only()


def union_role_keys(tasks: Iterable[Task]) -> list[str]:
    """The role keys of the UNF read-outs of ``tasks``: a shared table that covers every one of them, in the form
    of :attr:`unf.nn.RoleUNFLinear.role_keys` (prefixed; term keys, then bias keys, each in order of first
    appearance)."""
    keys: dict[str, None] = {}
    for task in tasks:
        keys.update(dict.fromkeys(RoleUNFLinear(task_spec(task), 1, 1).own_role_keys))
    return sorted(keys, key=lambda k: k.startswith("bias:"))  # stable: keeps the order within each kind


def bind_rule(master: O.LearnedRule, family: str, task: Task,
              params: Mapping[str, torch.Tensor]) -> tuple[O.LearnedRule, FlatProblem]:
    """The rule that runs ``master``'s meta-parameters on ``task``, and the flat problem of ``params``' layout.

    A per-element master (``"mlp"``, ``"deepset"``) is returned as it is. A UNF master gets a rule on ``task``'s
    spec over the master's key table (its read-out must be :class:`~unf.nn.RoleUNFLinear`): the parameters have
    exactly the master's names and shapes, so pass the master's tensors to ``torch.func.functional_call`` (the
    new rule's own values are placeholders). Terms whose key the table lacks contribute zero; the returned rule's
    ``f.head.coverage`` says which fraction of ``task``'s terms the table covers.
    """
    config = master.f.config
    keys = None
    if family == "unf":
        keys = _key_table(master.f) if isinstance(master.f, O.UNFFamily) else None
        if keys is None:
            raise ValueError("bind_rule needs a UNF master whose read-out is shared by role key (tie='role')")
    with torch.random.fork_rng(devices=[]):  # the placeholders' initialisation must not move the global RNG
        rule, problem = build_rule(family, task, params, hidden=config["hidden"], layers=config["layers"],
                                   role_keys=keys)
    if family != "unf":
        return master, problem
    rule.bound = master.bound
    rule.scale_floor = master.scale_floor
    return rule.to(master.raw_alpha.device), problem


def _build(family: str, task: Task, params: Mapping[str, torch.Tensor], hidden: int,
           layers: int, role_keys: Sequence[str] | None = None) -> tuple[O.LearnedRule, FlatProblem]:
    if family in ("mlp", "deepset"):
        layers_kw = {"layers": layers if family == "deepset" else 2}
        rule = O.make_rule(family, hidden=hidden, role_keys=role_keys, **layers_kw)
        return rule, FlatProblem.from_task(task, params)
    if family == "unf":
        rule = O.make_rule("unf", spec=task_spec(task), hidden=hidden, layers=layers, role_keys=role_keys)
        segments = rule.f.bind_layout(list(params), [p.shape for p in params.values()])
        return rule, dataclasses.replace(FlatProblem.from_task(task, params), segments=segments)
    raise KeyError(f"unknown optimizer family {family!r}; choose mlp, deepset or unf")
