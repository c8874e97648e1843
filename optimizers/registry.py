"""Saving, loading and shipping learned-optimizer weights (safetensors + a JSON config in its metadata).

A weights file holds the rule's tensors (``f`` and the scalars) and, in the safetensors metadata, the family and
its constructor arguments, so :func:`load_rule` rebuilds the exact module. Files shipped in
``optimizers/weights/`` are listed by :func:`available` and built into optimizers by :func:`load`.

Transfer rule: per-element families (``mlp``, ``deepset``) share their weights across all elements and segments,
so weights trained on one model apply to any other model. The UNF family stores its spec too; on a model with
another spec its coefficients are matched by *role key* (see :mod:`optimizers.unf_family`): shared keys keep
their trained values, unseen ones start at zero. Only the family's hyperparameters (widths) are fixed by the file.
A UNF rule whose read-out holds a shared table of role keys (``make_rule("unf", spec, role_keys=...)``, e.g. one
meta-trained over a task family) also stores that key list, so it loads with exactly its parameter shapes.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as _safetensors_bytes
from torch import nn

from unf import WeightSpaceSpec
from unf.nn import RoleUNFLinear

from .families import FAMILIES
from .optimizer import LearnedOptimizer
from .rule import LearnedRule
from .unf_family import UNFFamily, UNFOptimizer

__all__ = ["save_rule", "load_rule", "available", "load", "make_rule", "weights_info", "WEIGHTS_DIR"]

WEIGHTS_DIR = Path(__file__).parent / "weights"
_FORMAT = "unf.LearnedRule/1"


def make_rule(family: str, spec: WeightSpaceSpec | None = None, role_keys: Sequence[str] | None = None,
              **family_kwargs: Any) -> LearnedRule:
    """A fresh rule of a named family (``"mlp"``, ``"deepset"``, or ``"unf"``, which needs ``spec``).

    ``role_keys`` (``"unf"`` with ``tie="role"`` only): the UNF read-out holds its coefficients over these keys
    (see :class:`unf.nn.RoleUNFLinear`'s ``keys``) instead of the spec's own, so rules built for different specs
    with the same keys have parameters of the same names and shapes (one set of weights drives them all)."""
    if family == "unf":
        if spec is None:
            raise ValueError("the 'unf' family needs the model's spec: make_rule('unf', spec=unf.derive_spec(...))")
        return LearnedRule(UNFFamily(spec.parameters_only(), **family_kwargs, keys=role_keys))
    if role_keys is not None:
        raise ValueError(f"role_keys applies to the 'unf' family only, not {family!r}")
    if family not in FAMILIES:
        raise KeyError(f"unknown family {family!r}; choose one of {sorted(FAMILIES) + ['unf']}")
    return LearnedRule(FAMILIES[family](**family_kwargs))


def _config(rule: LearnedRule) -> dict[str, Any]:
    config = {"family_kwargs": getattr(rule.f, "config", {}), "bound": rule.bound}
    if rule.scale_floor is not None:  # (absent from the files of rules without it: they stay byte for byte)
        config["scale_floor"] = rule.scale_floor
    if isinstance(rule.f, UNFFamily):
        head = rule.f.head
        if isinstance(head, RoleUNFLinear) and head.role_keys != head.own_role_keys:
            config["role_keys"] = list(head.role_keys)  # a shared table: its shapes are not the spec's own
        return {"family": "unf", "spec": rule.f.spec.to_json(), **config}
    family = next((k for k, v in FAMILIES.items() if type(rule.f) is v), None)
    if family is None:
        raise ValueError(f"cannot save a rule whose f is a {type(rule.f).__name__}: not a registered family")
    return {"family": family, **config}


def canonical_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """A safetensors file's bytes with its header's metadata keys sorted.

    The safetensors writer keeps metadata in a hash map whose order is random per process, so two runs that save
    equal tensors and equal metadata wrote different bytes. Sorted, equal contents give equal files (and a
    fit's re-run can be checked with ``cmp``). Tensor entries and data are the library's, unchanged."""
    raw = _safetensors_bytes(tensors, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned, as the library pads it
    return len(text).to_bytes(8, "little") + text + raw[8 + n :]


def save_rule(rule: LearnedRule, path: str | os.PathLike, **info: Any) -> None:
    """Write ``rule`` to ``path`` (safetensors, atomically: write to a temporary file, then rename). Equal rules
    saved with equal ``info`` give byte-identical files (:func:`canonical_safetensors`)."""
    path = Path(path)
    metadata = {"format": _FORMAT, "config": json.dumps(_config(rule)), "info": json.dumps(info)}
    tensors = {k: v.detach().cpu().contiguous() for k, v in rule.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        Path(tmp).write_bytes(canonical_safetensors(tensors, metadata))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; weights are meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def load_rule(path: str | os.PathLike, device: torch.device | str = "cpu") -> LearnedRule:
    """Rebuild a rule saved by :func:`save_rule`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no learned-optimizer weights at {path}")
    meta = _read_metadata(path)
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a learned-optimizer weights file (format={meta.get('format')!r})")
    config = json.loads(meta["config"])
    spec = WeightSpaceSpec.from_json(config["spec"]) if "spec" in config else None
    rule = make_rule(config["family"], spec=spec, role_keys=config.get("role_keys"),
                     **config.get("family_kwargs", {}))
    rule.bound = float(config.get("bound", rule.bound))
    rule.scale_floor = config.get("scale_floor")
    rule.load_state_dict(load_file(str(path), device=str(device)))
    return rule


def weights_info(name: str | os.PathLike) -> dict[str, Any]:
    """What a weights file says about itself: ``{"path", "config" (family, widths, spec), "info" (how it was
    trained: task, estimator, meta-steps, ...)}``, without building the rule."""
    path = _resolve(name)
    meta = _read_metadata(path)
    return {"path": str(path), "config": json.loads(meta.get("config", "{}")),
            "info": json.loads(meta.get("info", "{}"))}


def _resolve(name: str | os.PathLike) -> Path:
    path = Path(name)
    if not path.suffix:
        path = WEIGHTS_DIR / f"{name}.safetensors"
        if not path.exists():
            raise KeyError(f"no shipped optimizer weights named {name!r}; available: {available() or 'none yet'}")
    return path


def available() -> list[str]:
    """Names of the weights shipped with the package (``optimizers/weights/*.safetensors``)."""
    return sorted(p.stem for p in WEIGHTS_DIR.glob("*.safetensors"))


def load(name: str, model_or_params: nn.Module | Any, lr: float = 1.0, example_inputs: Any = None,
         **kwargs: Any) -> LearnedOptimizer:
    """An optimizer with shipped weights ``name`` (see :func:`available`) or a weights file path.

    UNF weights need the model and ``example_inputs`` (to derive its spec); they are transferred by role if the
    model's spec differs from the one they were trained on.
    """
    path = _resolve(name)
    rule = load_rule(path)
    if isinstance(rule.f, UNFFamily):
        if not isinstance(model_or_params, nn.Module) or example_inputs is None:
            raise ValueError(f"{name!r} is a UNF optimizer: pass the model and example_inputs, e.g. "
                             f"optimizers.load({name!r}, model, example_inputs=x)")
        return UNFOptimizer(model_or_params, example_inputs, rule=rule, lr=lr, **kwargs)
    params = model_or_params.parameters() if isinstance(model_or_params, nn.Module) else model_or_params
    return LearnedOptimizer(params, rule, lr=lr, **kwargs)
