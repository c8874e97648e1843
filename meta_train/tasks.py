"""Functional training tasks for learned optimizers: the UNF paper's four, offline stand-ins, and task families.

A :class:`Task` separates a model's *skeleton* (``task.model``, an ``nn.Module`` whose own parameters are never
trained) from its *parameters* (a ``dict`` of tensors keyed like ``model.named_parameters()``), so that inner
training is a pure function an optimizer, ``torch.func.grad`` or ``torch.func.vmap`` can drive::

    task = get_task("mlp-digits")
    g = torch.Generator().manual_seed(0)
    params = task.init(g)
    batch = task.sample_batch(g)
    grads = torch.func.grad(task.loss)(params, batch)

``unf.derive_spec(task.model, task.example_inputs)`` gives the weight-space symmetries of the same parameters.

The paper's tasks (Zhou et al. 2023, after Harrison et al. 2022 / learned_optimization):

================================  ==========================================================================
``mlp-fashion8``                  MLP 64→32→10, ReLU, batch 128, Fashion-MNIST 8×8 (needs ``data_dir``)
``mlp-digits``                    the same MLP on scikit-learn's 8×8 digits: the offline default
``cnn-cifar16``                   conv 16 (stride 2) → conv 32 → global average pool → linear, ReLU, batch 128,
                                  CIFAR-10 16×16 (needs ``data_dir``)
``cnn-digits``                    the same CNN (1 input channel) on 8×8 digits: the offline default (upsampling
                                  to 16×16, ``cnn-digits16``, adds no information, costs 4× the compute, and
                                  plain SGD makes far less progress on it in the first steps)
``rnn-shakespeare``               char-level identity-initialised ReLU RNN LM (IRNN), embed 32, hidden 64, batch 64,
                                  length 16, on the shipped Shakespeare slice (the paper used LM1B)
``transformer-shakespeare``       GPT-2 LM, 2 blocks, d 32, 4 heads, batch 8, length 8, on the Shakespeare slice
================================  ==========================================================================

Held-out variants for evaluation: ``mlp-digits-w128`` (width), ``mlp-digits-tanh`` (activation),
``mlp-digits-deep`` (depth), ``mlp-mnist1d`` (dataset). Families (:class:`MLPFamily`, :class:`CNNFamily`,
:class:`RNNLMFamily`, :class:`TransformerLMFamily`, :class:`MixtureFamily`) sample width, depth, activation, batch
size and dataset for meta-training diversity (``MetaTrainConfig.task_family``). Registered families
(:func:`get_family`): ``mlp``, ``cnn``, ``rnn-lm``, ``transformer-lm`` (each kind's default ranges), ``all`` (their
mixture), and the small offline ones ``mlp-mnist1d`` / ``mlp-digits``: MLPs on one dataset with width 16–128,
depth 1–2, ReLU or tanh, batch 64–256 (the ``-w128`` / ``-tanh`` tasks lie inside them, ``-deep`` outside).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .data import ClassificationData, TextData, load_digits, load_shakespeare, load_synthetic_words, make_mnist1d
from .data import cifar10_16x16 as _cifar10_16x16
from .data import fashion_mnist_8x8 as _fashion_mnist_8x8

__all__ = [
    "Batch",
    "Params",
    "Task",
    "ClassificationTask",
    "LanguageModelTask",
    "MLP",
    "ConvNet",
    "RecurrentLM",
    "CausalTransformerLM",
    "ACTIVATIONS",
    "load_classification_data",
    "load_text_data",
    "mlp_task",
    "cnn_task",
    "rnn_lm_task",
    "transformer_lm_task",
    "TaskFamily",
    "MLPFamily",
    "CNNFamily",
    "RNNLMFamily",
    "TransformerLMFamily",
    "MixtureFamily",
    "register_task",
    "get_task",
    "list_tasks",
    "register_family",
    "get_family",
    "list_families",
]

Params = dict[str, torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]

#: Activation names accepted by the MLP and CNN tasks and families.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU, "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU, "sigmoid": nn.Sigmoid,
}


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose from {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


# --------------------------------------------------------------------------------------------------------------
# models (skeletons)
# --------------------------------------------------------------------------------------------------------------


class MLP(nn.Sequential):
    """Flatten → (Linear → activation) per hidden width → Linear."""

    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int, activation: str = "relu") -> None:
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), _activation(activation)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)


class ConvNet(nn.Module):
    """3×3 convolutions (padding 1; the first one strided, as in learned_optimization's conv tasks) each followed
    by the activation, then a global average pool over space and a linear classifier."""

    def __init__(self, in_channels: int, channels: Sequence[int], num_classes: int, activation: str = "relu",
                 first_stride: int = 2) -> None:
        super().__init__()
        convs, width = [], in_channels
        for i, c in enumerate(channels):
            convs += [nn.Conv2d(width, c, 3, stride=first_stride if i == 0 else 1, padding=1), _activation(activation)]
            width = c
        self.features = nn.Sequential(*convs)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


class RecurrentLM(nn.Module):
    """Char-level Elman RNN language model: embed → h_t = act(W_ih e_t + b + W_hh h_{t-1}) → linear to logits.

    Written as an explicit loop of ``nn.Linear`` calls rather than ``nn.RNN`` because ``torch.func.vmap`` has no
    batching rule for the fused ``rnn_tanh``/``rnn_relu`` kernels, and populations of inner runs are vmapped.
    """

    def __init__(self, vocab_size: int, embed: int = 32, hidden: int = 64, activation: str = "relu") -> None:
        super().__init__()
        if activation not in ("relu", "tanh"):
            raise ValueError(f"RecurrentLM activation must be 'relu' or 'tanh', got {activation!r}")
        self.activation = activation
        self.embed = nn.Embedding(vocab_size, embed)
        self.ih = nn.Linear(embed, hidden)
        self.hh = nn.Linear(hidden, hidden, bias=False)  # one bias is enough (a second one changes nothing)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        act = torch.relu if self.activation == "relu" else torch.tanh
        x = self.ih(self.embed(tokens))  # input projections for all steps at once
        h = x.new_zeros(x.shape[0], self.hh.in_features)
        outs = []
        for t in range(tokens.shape[1]):
            h = act(x[:, t] + self.hh(h))
            outs.append(h)
        return self.head(torch.stack(outs, dim=1))


class CausalTransformerLM(nn.Module):
    """A ``transformers`` GPT-2 LM built from a config (no download), returning logits only.

    Dropout is off so the loss is a deterministic function of parameters and batch; attention is the "eager"
    (plain matmul/softmax) implementation, which ``torch.func.vmap`` batches natively (SDPA's CPU kernel has no
    batching rule); the input embedding and the output head are tied, as in GPT-2 (one parameter,
    ``lm.transformer.wte.weight``).
    """

    def __init__(self, vocab_size: int, seq_len: int, d_model: int = 32, n_layer: int = 2, n_head: int = 4) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        if d_model % n_head:
            raise ValueError(f"d_model={d_model} is not divisible by n_head={n_head}")
        self.config = GPT2Config(vocab_size=vocab_size, n_positions=seq_len, n_embd=d_model, n_layer=n_layer,
                                 n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                                 bos_token_id=0, eos_token_id=0, attn_implementation="eager")
        self.lm = GPT2LMHeadModel(self.config)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=tokens, use_cache=False).logits


# --------------------------------------------------------------------------------------------------------------
# initialisation (explicit, from a generator, so that init(g) is reproducible and independent of global RNG)
# --------------------------------------------------------------------------------------------------------------


def _normal(shape: Sequence[int], std: float, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else "cpu"
    return torch.randn(tuple(shape), generator=generator, device=device) * std


def _lecun_init(module: nn.Module, name: str, p: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Weights N(0, 1/fan_in), biases 0, embeddings N(0, 1), norm gains 1 (learned_optimization's defaults)."""
    if name == "bias":
        return torch.zeros(p.shape)
    if isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d):
        fan_in = p[0].numel()
        return _normal(p.shape, 1.0 / math.sqrt(fan_in), generator)
    if isinstance(module, nn.Embedding):
        return _normal(p.shape, 1.0, generator)
    if isinstance(module, nn.LayerNorm) and name == "weight":
        return torch.ones(p.shape)
    raise TypeError(f"no initialiser for parameter {name!r} of {type(module).__name__}")


def _gpt2_init(n_layer: int) -> Callable[[nn.Module, str, torch.Tensor, torch.Generator | None], torch.Tensor]:
    def init(module: nn.Module, name: str, p: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        # GPT-2's scheme: N(0, 0.02) everywhere, residual projections scaled by 1/sqrt(2 * n_layer)
        if isinstance(module, nn.LayerNorm):
            return torch.ones(p.shape) if name == "weight" else torch.zeros(p.shape)
        if name == "bias":
            return torch.zeros(p.shape)
        std = 0.02 / math.sqrt(2 * n_layer) if getattr(module, "_unf_residual_proj", False) else 0.02
        return _normal(p.shape, std, generator)

    return init


def _init_params(model: nn.Module, generator: torch.Generator | None, rule: Callable[..., torch.Tensor]) -> Params:
    owners = {}
    for module in model.modules():
        for p_name, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), (module, p_name))
    # named_parameters() drops tied duplicates, matching what functional_call expects
    return {name: rule(*owners[id(p)], p, generator).to(p.dtype) for name, p in model.named_parameters()}


# --------------------------------------------------------------------------------------------------------------
# tasks
# --------------------------------------------------------------------------------------------------------------


class Task:
    """A functional training problem: ``init(generator)``, ``sample_batch(generator)``, ``loss(params, batch)``.

    Attributes:
        name: registry-style name, e.g. ``"mlp-digits"``.
        model: the ``nn.Module`` skeleton (its own parameter values are irrelevant to :meth:`loss`).
        example_inputs: a small input batch ``(x,)`` for ``unf.derive_spec(task.model, task.example_inputs)``.
        batch_size: examples per :meth:`sample_batch`.
        config: the hyperparameters that define the task (for logs and checkpoints).
        device: where parameters and batches are put.
    """

    def __init__(self, name: str, model: nn.Module, batch_size: int, config: Mapping[str, Any],
                 init_rule: Callable[..., torch.Tensor] = _lecun_init, device: torch.device | str = "cpu") -> None:
        self.name = name
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)  # the skeleton's values are never trained; keeps autograd off them
        self.batch_size = int(batch_size)
        self.config = dict(config)
        self._init_rule = init_rule
        self.example_inputs: tuple[torch.Tensor, ...] = (self.sample_batch(torch.Generator().manual_seed(0))[0][:2],)

    @property
    def param_shapes(self) -> dict[str, torch.Size]:
        return {k: p.shape for k, p in self.model.named_parameters()}

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def init(self, generator: torch.Generator | None = None) -> Params:
        """Fresh parameters ``{name: tensor}`` (on :attr:`device`), drawn only from ``generator``."""
        params = _init_params(self.model, generator, self._init_rule)
        return {k: v.to(self.device) for k, v in params.items()}

    def sample_batch(self, generator: torch.Generator | None = None, split: str = "train") -> Batch:
        """One ``(inputs, targets)`` batch of :attr:`batch_size` from ``split`` (``"train"`` or held-out).

        Abstract: every task kind (classification, language model) samples from its own data."""
        raise NotImplementedError(f"{type(self).__name__} must implement sample_batch")

    def apply(self, params: Mapping[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
        """The model's output (logits) with ``params`` substituted for its parameters."""
        return functional_call(self.model, dict(params), (inputs,))

    def loss(self, params: Mapping[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        """Mean cross-entropy of the model with ``params`` on ``batch`` (a scalar, differentiable in ``params``)."""
        inputs, targets = batch
        logits = self.apply(params, inputs)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, params={self.num_params}, batch_size={self.batch_size})"


def _held_out(split: str) -> bool:
    # "test" and "valid" both name the held-out split, whatever the dataset calls it
    if split not in ("train", "test", "valid"):
        raise ValueError(f"split must be 'train', 'test' or 'valid', got {split!r}")
    return split != "train"


class ClassificationTask(Task):
    """Cross-entropy classification on a :class:`~meta_train.data.ClassificationData` (held-out split ``"test"``)."""

    def __init__(self, name: str, model: nn.Module, data: ClassificationData, batch_size: int,
                 config: Mapping[str, Any], device: torch.device | str = "cpu") -> None:
        self.data = data.to(device)
        super().__init__(name, model, batch_size, config, device=device)

    def sample_batch(self, generator: torch.Generator | None = None, split: str = "train") -> Batch:
        return self.data.sample(generator, self.batch_size, "test" if _held_out(split) else "train")

    def accuracy(self, params: Mapping[str, torch.Tensor], split: str = "test") -> float:
        """Accuracy of ``params`` on a whole split."""
        x, y = self.data.arrays("test" if _held_out(split) else "train")
        with torch.no_grad():
            return float((self.apply(params, x).argmax(-1) == y).float().mean())


class LanguageModelTask(Task):
    """Next-token cross-entropy on random windows of a :class:`~meta_train.data.TextData` (held-out ``"valid"``)."""

    def __init__(self, name: str, model: nn.Module, data: TextData, batch_size: int, seq_len: int,
                 config: Mapping[str, Any], init_rule: Callable[..., torch.Tensor] = _lecun_init,
                 device: torch.device | str = "cpu") -> None:
        self.data = data.to(device)
        self.seq_len = int(seq_len)
        super().__init__(name, model, batch_size, config, init_rule=init_rule, device=device)

    def sample_batch(self, generator: torch.Generator | None = None, split: str = "train") -> Batch:
        return self.data.sample(generator, self.batch_size, self.seq_len, "valid" if _held_out(split) else "train")


class _IRNNTask(LanguageModelTask):
    """RNN LM task whose recurrence starts at the identity (Le et al. 2015's IRNN, as in learned_optimization)."""

    def init(self, generator: torch.Generator | None = None) -> Params:
        params = super().init(generator)
        hh = params["hh.weight"]
        params["hh.weight"] = torch.eye(hh.shape[0], dtype=hh.dtype, device=hh.device)
        return params


# --------------------------------------------------------------------------------------------------------------
# data by name
# --------------------------------------------------------------------------------------------------------------

_NEEDS_DIR = {"fashion_mnist-8x8": "Fashion-MNIST IDX files", "cifar10-16x16": "CIFAR-10 python pickles"}
CLASSIFICATION_DATASETS = ("digits", "digits-16x16", "mnist1d", "fashion_mnist-8x8", "cifar10-16x16")


def load_classification_data(name: str | ClassificationData, data_dir: str | None = None) -> ClassificationData:
    """A classification dataset by name: ``digits`` (8×8), ``digits-16x16``, ``mnist1d`` (offline), or
    ``fashion_mnist-8x8`` / ``cifar10-16x16`` read from ``data_dir``. A ``ClassificationData`` passes through."""
    if isinstance(name, ClassificationData):
        return name
    if name == "digits":
        return load_digits()
    if name == "digits-16x16":
        return load_digits(image_size=16)
    if name == "mnist1d":
        return make_mnist1d()
    if name in _NEEDS_DIR:
        if data_dir is None:
            raise ValueError(f"dataset {name!r} needs data_dir= pointing at the {_NEEDS_DIR[name]}; the offline "
                             "datasets are 'digits', 'digits-16x16' and 'mnist1d'")
        return _fashion_mnist_8x8(data_dir) if name == "fashion_mnist-8x8" else _cifar10_16x16(data_dir)
    raise ValueError(f"unknown classification dataset {name!r}; choose from {list(CLASSIFICATION_DATASETS)}")


def load_text_data(name: str | TextData) -> TextData:
    """A text corpus by name: ``shakespeare`` (char-level), ``shakespeare-bytes`` or ``synthetic-words`` (char-level,
    :func:`meta_train.data.load_synthetic_words`). A ``TextData`` passes through
    (use :func:`meta_train.data.load_text` for your own files)."""
    if isinstance(name, TextData):
        return name
    if name == "shakespeare":
        return load_shakespeare("char")
    if name == "shakespeare-bytes":
        return load_shakespeare("byte")
    if name == "synthetic-words":
        return load_synthetic_words()
    raise ValueError(f"unknown text dataset {name!r}; choose 'shakespeare', 'shakespeare-bytes' or "
                     "'synthetic-words', or pass a TextData from meta_train.data.load_text")


# --------------------------------------------------------------------------------------------------------------
# task constructors
# --------------------------------------------------------------------------------------------------------------


def mlp_task(dataset: str | ClassificationData = "digits", hidden: Sequence[int] = (32,), activation: str = "relu",
             batch_size: int = 128, data_dir: str | None = None, name: str | None = None,
             device: torch.device | str = "cpu") -> ClassificationTask:
    """An MLP classifier; the defaults are the UNF paper's MLP task (64→32→10, ReLU, batch 128) on 8×8 digits."""
    data = load_classification_data(dataset, data_dir)
    model = MLP(math.prod(data.input_shape), tuple(hidden), data.num_classes, activation)
    config = {"kind": "mlp", "dataset": data.name, "hidden": list(hidden), "activation": activation,
              "batch_size": batch_size}
    name = name or f"mlp-{data.name}-h{'x'.join(map(str, hidden)) or '0'}-{activation}-b{batch_size}"
    return ClassificationTask(name, model, data, batch_size, config, device)


def cnn_task(dataset: str | ClassificationData = "digits", channels: Sequence[int] = (16, 32),
             activation: str = "relu", batch_size: int = 128, data_dir: str | None = None, name: str | None = None,
             device: torch.device | str = "cpu") -> ClassificationTask:
    """A conv net (see :class:`ConvNet`); the defaults are the UNF paper's CNN task (conv 16 → conv 32 → global
    average pool → linear, ReLU, batch 128) on 8×8 digits; ``dataset="cifar10-16x16"`` with ``data_dir`` gives the
    paper's CIFAR-10 16×16, ``"digits-16x16"`` the digits upsampled to that size."""
    data = load_classification_data(dataset, data_dir)
    if len(data.input_shape) != 3:
        raise ValueError(f"cnn_task needs image data (C, H, W); {data.name} has examples of shape {data.input_shape}")
    model = ConvNet(data.input_shape[0], tuple(channels), data.num_classes, activation)
    config = {"kind": "cnn", "dataset": data.name, "channels": list(channels), "activation": activation,
              "batch_size": batch_size}
    name = name or f"cnn-{data.name}-c{'x'.join(map(str, channels))}-{activation}-b{batch_size}"
    return ClassificationTask(name, model, data, batch_size, config, device)


def rnn_lm_task(dataset: str | TextData = "shakespeare", embed: int = 32, hidden: int = 64, activation: str = "relu",
                batch_size: int = 64, seq_len: int = 16, name: str | None = None,
                device: torch.device | str = "cpu") -> LanguageModelTask:
    """A char-level RNN LM with identity-initialised recurrence; defaults are the UNF paper's (embed 32, hidden 64,
    batch 64, length 16) on the shipped Shakespeare slice."""
    data = load_text_data(dataset)
    model = RecurrentLM(data.vocab_size, embed, hidden, activation)
    config = {"kind": "rnn_lm", "dataset": data.name, "embed": embed, "hidden": hidden, "activation": activation,
              "batch_size": batch_size, "seq_len": seq_len}
    name = name or f"rnn-{data.name}-e{embed}-h{hidden}-{activation}-b{batch_size}-l{seq_len}"
    return _IRNNTask(name, model, data, batch_size, seq_len, config, device=device)


def transformer_lm_task(dataset: str | TextData = "shakespeare", d_model: int = 32, n_layer: int = 2, n_head: int = 4,
                        batch_size: int = 8, seq_len: int = 8, name: str | None = None,
                        device: torch.device | str = "cpu") -> LanguageModelTask:
    """A GPT-2 LM built from a ``transformers`` config; defaults are the UNF paper's (2 blocks, d 32, 4 heads,
    batch 8, length 8) on the shipped Shakespeare slice."""
    data = load_text_data(dataset)
    model = CausalTransformerLM(data.vocab_size, seq_len, d_model, n_layer, n_head)
    for mod_name, module in model.named_modules():
        if mod_name.endswith("c_proj"):  # residual projections get GPT-2's scaled-down init
            module._unf_residual_proj = True
    config = {"kind": "transformer_lm", "dataset": data.name, "d_model": d_model, "n_layer": n_layer,
              "n_head": n_head, "batch_size": batch_size, "seq_len": seq_len}
    name = name or f"transformer-{data.name}-d{d_model}-l{n_layer}-h{n_head}-b{batch_size}-s{seq_len}"
    return LanguageModelTask(name, model, data, batch_size, seq_len, config, init_rule=_gpt2_init(n_layer),
                             device=device)


# --------------------------------------------------------------------------------------------------------------
# task families
# --------------------------------------------------------------------------------------------------------------


class TaskFamily(Protocol):
    """Anything with ``sample(generator) -> Task`` (a distribution over tasks)."""

    def sample(self, generator: torch.Generator | None = None) -> Task: ...


def _choice(options: Sequence[Any], generator: torch.Generator | None) -> Any:
    if not options:
        raise ValueError("cannot sample from an empty list of options")
    return options[int(torch.randint(len(options), (1,), generator=generator))]


@dataclass(frozen=True)
class MLPFamily:
    """MLPs with sampled dataset, depth (hidden layers), width, activation and batch size."""

    datasets: tuple[str, ...] = ("digits", "mnist1d")
    depths: tuple[int, ...] = (1, 2, 3)
    widths: tuple[int, ...] = (16, 32, 64, 128)
    activations: tuple[str, ...] = ("relu", "tanh", "gelu", "silu")
    batch_sizes: tuple[int, ...] = (32, 64, 128, 256)
    data_dir: str | None = None
    device: str = "cpu"

    def sample(self, generator: torch.Generator | None = None) -> ClassificationTask:
        dataset, depth = _choice(self.datasets, generator), _choice(self.depths, generator)
        hidden = tuple(_choice(self.widths, generator) for _ in range(depth))
        return mlp_task(dataset, hidden, _choice(self.activations, generator), _choice(self.batch_sizes, generator),
                        data_dir=self.data_dir, device=self.device)


@dataclass(frozen=True)
class CNNFamily:
    """Conv nets with sampled dataset, depth (conv layers), channel widths, activation and batch size."""

    datasets: tuple[str, ...] = ("digits-16x16", "digits")
    depths: tuple[int, ...] = (1, 2, 3)
    channels: tuple[int, ...] = (8, 16, 32)
    activations: tuple[str, ...] = ("relu", "tanh", "gelu")
    batch_sizes: tuple[int, ...] = (32, 64, 128)
    data_dir: str | None = None
    device: str = "cpu"

    def sample(self, generator: torch.Generator | None = None) -> ClassificationTask:
        dataset, depth = _choice(self.datasets, generator), _choice(self.depths, generator)
        channels = tuple(_choice(self.channels, generator) for _ in range(depth))
        return cnn_task(dataset, channels, _choice(self.activations, generator), _choice(self.batch_sizes, generator),
                        data_dir=self.data_dir, device=self.device)


@dataclass(frozen=True)
class RNNLMFamily:
    """Identity-initialised RNN LMs with sampled corpus/tokenisation, embedding and hidden width, activation,
    batch size and sequence length."""

    datasets: tuple[str, ...] = ("shakespeare", "shakespeare-bytes")
    embeds: tuple[int, ...] = (16, 32, 64)
    hiddens: tuple[int, ...] = (32, 64, 128)
    activations: tuple[str, ...] = ("relu", "tanh")
    batch_sizes: tuple[int, ...] = (32, 64)
    seq_lens: tuple[int, ...] = (8, 16, 32)
    device: str = "cpu"

    def sample(self, generator: torch.Generator | None = None) -> LanguageModelTask:
        return rnn_lm_task(_choice(self.datasets, generator), _choice(self.embeds, generator),
                           _choice(self.hiddens, generator), _choice(self.activations, generator),
                           _choice(self.batch_sizes, generator), _choice(self.seq_lens, generator), device=self.device)


@dataclass(frozen=True)
class TransformerLMFamily:
    """GPT-2 LMs with sampled corpus/tokenisation, width, heads (dividing the width), depth, batch size and
    sequence length."""

    datasets: tuple[str, ...] = ("shakespeare", "shakespeare-bytes")
    d_models: tuple[int, ...] = (16, 32, 64)
    n_heads: tuple[int, ...] = (2, 4)
    n_layers: tuple[int, ...] = (1, 2, 3)
    batch_sizes: tuple[int, ...] = (8, 16)
    seq_lens: tuple[int, ...] = (8, 16)
    device: str = "cpu"

    def sample(self, generator: torch.Generator | None = None) -> LanguageModelTask:
        dataset, d_model = _choice(self.datasets, generator), _choice(self.d_models, generator)
        heads = [h for h in self.n_heads if d_model % h == 0] or [1]
        return transformer_lm_task(dataset, d_model, _choice(self.n_layers, generator), _choice(heads, generator),
                                   _choice(self.batch_sizes, generator), _choice(self.seq_lens, generator),
                                   device=self.device)


@dataclass(frozen=True)
class MixtureFamily:
    """Picks one of ``families`` (with probabilities proportional to ``weights``), then samples from it."""

    families: tuple[TaskFamily, ...]
    weights: tuple[float, ...] | None = None

    def sample(self, generator: torch.Generator | None = None) -> Task:
        if not self.families:
            raise ValueError("MixtureFamily needs at least one family")
        w = torch.tensor(self.weights if self.weights is not None else [1.0] * len(self.families))
        if w.shape != (len(self.families),) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights must be {len(self.families)} non-negative numbers with a positive sum")
        return self.families[int(torch.multinomial(w, 1, generator=generator))].sample(generator)


# --------------------------------------------------------------------------------------------------------------
# registries
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _Registry:
    kind: str
    entries: dict[str, Callable[..., Any]] = field(default_factory=dict)

    def register(self, name: str, factory: Callable[..., Any], overwrite: bool = False) -> None:
        if name in self.entries and not overwrite:
            raise ValueError(f"{self.kind} {name!r} is already registered (pass overwrite=True to replace it)")
        self.entries[name] = factory

    def get(self, name: str, **kwargs: Any) -> Any:
        if name not in self.entries:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {sorted(self.entries)}")
        return self.entries[name](**kwargs)


_TASKS = _Registry("task")
_FAMILIES = _Registry("task family")


def register_task(name: str, factory: Callable[..., Task], overwrite: bool = False) -> None:
    """Register ``factory(**kwargs) -> Task`` under ``name`` for :func:`get_task`."""
    _TASKS.register(name, factory, overwrite)


def get_task(name: str, **kwargs: Any) -> Task:
    """Build a registered task; ``kwargs`` go to its constructor (e.g. ``data_dir=``, ``device=``, ``batch_size=``)."""
    return _TASKS.get(name, **kwargs)


def list_tasks() -> list[str]:
    return sorted(_TASKS.entries)


def register_family(name: str, factory: Callable[..., TaskFamily], overwrite: bool = False) -> None:
    """Register ``factory(**kwargs) -> TaskFamily`` under ``name`` for :func:`get_family`."""
    _FAMILIES.register(name, factory, overwrite)


def get_family(name: str, **kwargs: Any) -> TaskFamily:
    """Build a registered task family; ``kwargs`` override its fields (e.g. ``widths=(32, 64)``)."""
    return _FAMILIES.get(name, **kwargs)


def list_families() -> list[str]:
    return sorted(_FAMILIES.entries)


def _named(factory: Callable[..., Task], name: str, **defaults: Any) -> Callable[..., Task]:
    def build(**kwargs: Any) -> Task:
        return factory(**{"name": name, **defaults, **kwargs})

    build.__doc__ = f"{name}: {factory.__name__}({', '.join(f'{k}={v!r}' for k, v in defaults.items())})"
    return build


for _name, _factory, _defaults in [
    ("mlp-digits", mlp_task, {"dataset": "digits"}),
    ("mlp-fashion8", mlp_task, {"dataset": "fashion_mnist-8x8"}),
    ("mlp-mnist1d", mlp_task, {"dataset": "mnist1d"}),
    ("mlp-mnist1d-w128", mlp_task, {"dataset": "mnist1d", "hidden": (128,)}),
    ("mlp-mnist1d-tanh", mlp_task, {"dataset": "mnist1d", "activation": "tanh"}),
    ("mlp-mnist1d-deep", mlp_task, {"dataset": "mnist1d", "hidden": (32, 32, 32)}),
    # members of the mlp-mnist1d-relu family (below), for imitation and for choosing a teacher without touching
    # the held-out tasks (benchmarks/select_teacher.py)
    ("mlp-mnist1d-w64-b64", mlp_task, {"dataset": "mnist1d", "hidden": (64,), "batch_size": 64}),
    ("mlp-mnist1d-16x16-b256", mlp_task, {"dataset": "mnist1d", "hidden": (16, 16), "batch_size": 256}),
    ("mlp-mnist1d-32x64-b128", mlp_task, {"dataset": "mnist1d", "hidden": (32, 64), "batch_size": 128}),
    # smooth activations other than the held-out tanh (a diagnostic of teacher selection, BENCHMARKS.md)
    ("mlp-mnist1d-gelu", mlp_task, {"dataset": "mnist1d", "activation": "gelu"}),
    ("mlp-mnist1d-silu", mlp_task, {"dataset": "mnist1d", "activation": "silu"}),
    ("mlp-digits-w128", mlp_task, {"dataset": "digits", "hidden": (128,)}),
    ("mlp-digits-tanh", mlp_task, {"dataset": "digits", "activation": "tanh"}),
    ("mlp-digits-deep", mlp_task, {"dataset": "digits", "hidden": (32, 32, 32)}),
    ("cnn-digits", cnn_task, {"dataset": "digits"}),
    ("cnn-digits16", cnn_task, {"dataset": "digits-16x16"}),
    ("cnn-cifar16", cnn_task, {"dataset": "cifar10-16x16"}),
    ("rnn-shakespeare", rnn_lm_task, {}),
    ("transformer-shakespeare", transformer_lm_task, {}),
    # a smaller GPT-2 on another corpus: a language model to train learned optimizers on while the Shakespeare LMs
    # (other width, other data) stay held out
    ("transformer-synthwords-d16", transformer_lm_task, {"dataset": "synthetic-words", "d_model": 16}),
]:
    register_task(_name, _named(_factory, _name, **_defaults))

register_family("mlp", MLPFamily)
for _dataset in ("mnist1d", "digits"):  # small one-dataset families for offline meta-training
    register_family(f"mlp-{_dataset}", functools.partial(
        MLPFamily, datasets=(_dataset,), depths=(1, 2), widths=(16, 32, 64, 128), activations=("relu", "tanh"),
        batch_sizes=(64, 128, 256)))
# the shipped family-trained optimizer's family: ReLU MLPs of width <= 64 on mnist1d, so that width 128, tanh,
# depth 3, other datasets and the language models stay held out
register_family("mlp-mnist1d-relu", functools.partial(
    MLPFamily, datasets=("mnist1d",), depths=(1, 2), widths=(16, 32, 64), activations=("relu",),
    batch_sizes=(64, 128, 256)))
register_family("cnn", CNNFamily)
register_family("rnn-lm", RNNLMFamily)
register_family("transformer-lm", TransformerLMFamily)


def _all_families(data_dir: str | None = None, device: str = "cpu") -> MixtureFamily:
    """Every family with its default ranges, equally likely."""
    return MixtureFamily((MLPFamily(data_dir=data_dir, device=device), CNNFamily(data_dir=data_dir, device=device),
                          RNNLMFamily(device=device), TransformerLMFamily(device=device)))


register_family("all", _all_families)
