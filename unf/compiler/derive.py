"""``derive_spec``: trace a model, run the op rules over its graph, and cut the weights into spec entries."""

from __future__ import annotations

import operator
import warnings
from collections import defaultdict
from typing import Any

import torch
from torch import nn
from torch.export.graph_signature import InputKind

from ..spec import Entry, WeightSpaceSpec
from .axes import AxisGraph
from .context import RuleContext, TVal
from .entries import axis_tree, cut_entries
from .rules import fallback, rule_for
from .trace import WRAPPER_PREFIX, as_input_tuple, export_model

__all__ = ["derive_spec", "UnknownOpWarning"]


class UnknownOpWarning(UserWarning):
    """An op without a symmetry rule was met; every axis it touches was treated as fixed."""


def _bind(node: torch.fx.Node, env: dict[str, Any]) -> dict[str, Any]:
    """The node's arguments by schema name, graph values replaced by their :class:`TVal`."""

    def sub(x: Any) -> Any:
        if isinstance(x, torch.fx.Node):
            return env.get(x.name)
        if isinstance(x, (list, tuple)):
            return type(x)(sub(v) for v in x)
        return x

    args = [sub(a) for a in node.args]
    kwargs = {k: sub(v) for k, v in node.kwargs.items()}
    if node.target is operator.getitem:
        return {"seq": args[0], "index": args[1]}
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return {**{f"arg{i}": v for i, v in enumerate(args)}, **kwargs}
    bound: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(args):
            bound[arg.name] = args[i]
        elif arg.name in kwargs:
            bound[arg.name] = kwargs[arg.name]
        elif arg.has_default_value():
            bound[arg.name] = arg.default_value
    return bound


def _module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "<top level>"
    path = list(stack.values())[-1][0]
    path = path.removeprefix("L['self'].").removeprefix("L__self__")
    path = path.removeprefix(WRAPPER_PREFIX.rstrip(".")).lstrip(".")
    return path or "<top level>"


def derive_spec(model: nn.Module, example_inputs: Any, *, include_buffers: bool = True) -> WeightSpaceSpec:
    """Derive the permutation symmetries of ``model``'s weights from its computation graph.

    The model is exported (``torch.export``, non-strict, eval mode) with ``example_inputs`` (a tensor or a
    tuple of positional tensors); every op's rule ties or fixes axes; the result lists every floating-point
    ``state_dict`` tensor as one or more entries. Inputs and outputs are fixed. Ops without a rule fix every
    axis they touch and raise one :class:`UnknownOpWarning` per op naming the modules involved.

    Args:
        model: any ``nn.Module`` (HF models are fine: outputs are flattened to their tensors, caches dropped).
        example_inputs: positional inputs for one forward call.
        include_buffers: also list floating buffers (e.g. BatchNorm running statistics) as entries.

    Raises:
        SpecError: the inputs do not fit the model, or the model cannot be exported (the message says what
        to try).
    """
    inputs = as_input_tuple(example_inputs)
    program = export_model(model, inputs)
    return _compile(program, model, include_buffers)


def _compile(program: torch.export.ExportedProgram, model: nn.Module, include_buffers: bool) -> WeightSpaceSpec:
    axes = AxisGraph()
    ctx = RuleContext(axes)
    state = model.state_dict(keep_vars=True)
    # tied tensors (GPT-2's lm_head = wte) share one canonical key and one set of atoms
    canonical: dict[str, str] = {}
    first_key: dict[int, str] = {}
    for key, t in state.items():
        canonical[key] = first_key.setdefault(id(t), key)
    weights: dict[str, TVal] = {}

    def weight_value(key: str) -> TVal:
        key = canonical[key]
        if key not in weights:
            t = state[key]
            weights[key] = ctx.fresh(tuple(t.shape), fixed=not t.is_floating_point())
        return weights[key]

    env: dict[str, Any] = {}
    kinds = {spec.arg.name: spec for spec in program.graph_signature.input_specs}
    used_keys: set[str] = set()
    unknown: dict[str, list[str]] = defaultdict(list)
    graph = program.graph_module.graph
    for node in graph.nodes:
        if node.op == "placeholder":
            spec = kinds.get(node.name)
            meta = node.meta.get("val")
            key = (spec.target or "").removeprefix(WRAPPER_PREFIX) if spec is not None else ""
            if spec is not None and spec.kind in (InputKind.PARAMETER, InputKind.BUFFER) and key in canonical:
                env[node.name] = weight_value(key)
                if node.users:
                    used_keys.add(canonical[key])
            elif isinstance(meta, torch.Tensor):
                # user inputs, constants and non-persistent buffers cannot be permuted with the weights
                empty = meta.numel() == 0
                env[node.name] = ctx.fresh(tuple(meta.shape), fixed=not empty, uniform=empty)
            else:
                env[node.name] = meta
        elif node.op == "call_function":
            if node.target is operator.getitem and not node.users:
                continue  # an unread tuple element (e.g. an RNN's final state) constrains nothing
            ctx.node = node
            name, rule = rule_for(node.target)
            bound = _bind(node, env)
            if rule is None:
                unknown[name].append(_module_path(node))
                env[node.name] = fallback(ctx, bound)
                continue
            try:
                env[node.name] = rule(ctx, bound)
            except Exception as e:  # a rule that cannot handle this call must not claim symmetry
                unknown[f"{name} ({type(e).__name__} in its rule: {e})"].append(_module_path(node))
                env[node.name] = fallback(ctx, bound)
        elif node.op == "output":
            ctx.node = node
            ctx.fix(*[env.get(a.name) for a in node.args[0] if isinstance(a, torch.fx.Node)])
        # get_attr nodes (submodules of higher-order ops) carry no tensors of their own
    for name, paths in unknown.items():
        where = ", ".join(dict.fromkeys(paths))
        warnings.warn(f"derive_spec: no symmetry rule for {name} (in {where}); every axis it touches is "
                      "treated as fixed", UnknownOpWarning, stacklevel=3)
    return _build_spec(axes, state, canonical, weights, used_keys, include_buffers, model)


def _build_spec(axes: AxisGraph, state: dict, canonical: dict[str, str], weights: dict[str, TVal],
                used: set[str], include_buffers: bool, model: nn.Module) -> WeightSpaceSpec:
    param_ids = {id(p) for p in model.parameters()}
    aliases: dict[str, list[str]] = defaultdict(list)
    for key, c in canonical.items():
        if key != c:
            aliases[c].append(key)
    group_names: dict[int, str] = {}
    entries: list[Entry] = []
    for key, t in state.items():
        if canonical[key] != key or not t.is_floating_point() or t.numel() == 0:
            continue
        kind = "parameter" if id(t) in param_ids else "buffer"
        if kind == "buffer" and not include_buffers:
            continue
        value = weights.get(key)
        if value is None or key not in used:  # never read by the forward pass: nothing to learn about it
            trees = [axis_tree(axes, []) if s == 1 else axis_tree(axes, axes.new_dim(s, fixed=True))
                     for s in t.shape]
        else:
            trees = [axis_tree(axes, d) for d in value.dims]
        cuts = cut_entries(trees)
        for k, cut in enumerate(cuts):
            names = tuple(None if r is None else group_names.setdefault(r, f"g{len(group_names)}")
                          for r in cut.roots)
            entries.append(Entry(name=key if len(cuts) == 1 else f"{key}[{k}]", source=key, shape=cut.shape,
                                 axes=names, steps=cut.steps, kind=kind, aliases=tuple(aliases[key]),
                                 block=cut.block if len(cuts) > 1 else None))
    groups = {name: axes.size(r) for r, name in group_names.items()}
    return WeightSpaceSpec(tuple(entries), groups)
