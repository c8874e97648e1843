"""Tracing a model to an ATen graph with ``torch.export`` (non-strict), with errors a user can act on."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = ["SpecError", "as_input_tuple", "flatten_outputs", "export_model", "eval_mode"]


class SpecError(ValueError):
    """A model or its example inputs could not be turned into a weight-space spec; the message says why."""


# Optional HF outputs that are caches or debugging views, not the model's function: never treat as outputs.
_SKIPPED_OUTPUT_KEYS = ("past_key_values",)


def as_input_tuple(example_inputs: Any) -> tuple:
    """Accept a tensor or a tuple/list of tensors (the forms ``derive_spec`` documents)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise SpecError(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")


def flatten_outputs(out: Any) -> tuple[torch.Tensor, ...]:
    """All tensors of a model output (tensor, tuple, dict, HF ``ModelOutput``), in a stable order.

    HF caches (``past_key_values``) are dropped: they are internal state, and treating them as outputs would
    pin every attention head.
    """
    if isinstance(out, torch.Tensor):
        return (out,)
    if isinstance(out, dict):  # includes transformers.ModelOutput (an OrderedDict subclass)
        return tuple(t for k, v in out.items() if k not in _SKIPPED_OUTPUT_KEYS for t in flatten_outputs(v))
    if isinstance(out, (tuple, list)):
        return tuple(t for v in out for t in flatten_outputs(v))
    return ()


class _TensorOutputs(nn.Module):
    """Wraps a model so that its forward returns a flat tuple of tensors (what export and checks compare)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any) -> tuple[torch.Tensor, ...]:
        return flatten_outputs(self.model(*args))


WRAPPER_PREFIX = "model."


@contextmanager
def eval_mode(model: nn.Module):
    """Put ``model`` in eval mode for the duration, restoring every submodule's flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:400]


# Ops whose schema says "mutable" but that change only autograd metadata, not values.
_BENIGN_MUTATIONS = {"detach_", "_set_grad_enabled"}


def _mutates(program: torch.export.ExportedProgram) -> bool:
    for node in program.graph.nodes:
        schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
        if schema is not None and schema.is_mutable and schema.name.split("::")[-1] not in _BENIGN_MUTATIONS:
            return True
    return False


def export_model(model: nn.Module, inputs: Sequence[torch.Tensor]) -> torch.export.ExportedProgram:
    """Export ``model`` (in eval mode) to a functional ATen graph whose outputs are a flat tuple of tensors.

    Export's training IR may keep in-place writes through views (``h[:, :4] = x``), which a per-op analysis
    would misread; such graphs are functionalized (``run_decompositions({})``: writes become ``*_scatter``
    ops, high-level ops such as ``linear`` and ``lstm`` are kept). Graphs without writes skip that cost.
    """
    if not isinstance(model, nn.Module):
        raise SpecError(f"derive_spec needs a torch.nn.Module, got {type(model).__name__}")
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor):
            raise SpecError(f"example input {i} is a {type(x).__name__}; pass tensors only (wrap the model "
                            "in a small nn.Module that fixes the other arguments)")
    wrapper = _TensorOutputs(model)
    with eval_mode(model), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The tensor attributes .*_flat_weights")
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec")
        try:
            program = torch.export.export(wrapper, tuple(inputs), strict=False)
        except Exception as export_error:  # diagnose: is it the inputs or the model?
            try:
                with torch.no_grad():
                    model(*inputs)
            except Exception as call_error:
                shapes = ", ".join(f"{tuple(x.shape)}:{str(x.dtype).replace('torch.', '')}" for x in inputs)
                raise SpecError(
                    f"the example inputs do not fit {type(model).__name__}: calling model(*example_inputs) "
                    f"with inputs [{shapes}] raised {type(call_error).__name__}: {_first_line(call_error)}. "
                    "Pass inputs the model accepts (a tensor or a tuple of positional tensors)."
                ) from call_error
            raise SpecError(
                f"torch.export could not trace {type(model).__name__} ({type(export_error).__name__}: "
                f"{_first_line(export_error)}). The model runs eagerly, so the failure is in tracing: "
                "data-dependent Python control flow, non-tensor outputs or unsupported Python features. "
                "Try making control flow depend on shapes only, or wrap the model so forward() takes and "
                "returns tensors; see torch.export's troubleshooting guide."
            ) from export_error
        if _mutates(program):
            try:
                program = program.run_decompositions({})
            except Exception as e:
                raise SpecError(
                    f"{type(model).__name__} writes into tensors in place and the graph could not be "
                    f"functionalized ({type(e).__name__}: {_first_line(e)}); rewrite the in-place writes "
                    "(e.g. h[:, :k] = x) functionally (torch.cat, torch.where)."
                ) from e
    return program
