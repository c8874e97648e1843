"""Offline datasets for meta-training tasks, held as tensors.

Two kinds of data:

* :class:`ClassificationData` — images ``(N, C, H, W)`` or vectors ``(N, D)`` as float32, labels as int64,
  with a train and a test split. Sources: scikit-learn's bundled 8x8 ``digits`` (:func:`load_digits`),
  ``mnist1d`` generated locally (:func:`make_mnist1d`), and real Fashion-MNIST / CIFAR-10 files in a directory
  the user points to (:func:`load_fashion_mnist`, :func:`load_cifar10`).
* :class:`TextData` — a token stream (char- or byte-level) with a train and a validation split, by work or by
  contiguous blocks. Sources: the Shakespeare slice shipped in this package (:func:`load_shakespeare`), a
  synthetic corpus generated from a seed (:func:`load_synthetic_words`), or any text file or folder of text files
  (:func:`load_text`).

Nothing here downloads anything. Batches are sampled i.i.d. with an explicit ``torch.Generator`` so that every
draw is reproducible from a seed.
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import itertools
import pickle
import random
import struct
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

__all__ = [
    "ClassificationData",
    "TextData",
    "CharTokenizer",
    "ByteTokenizer",
    "Tokenizer",
    "WORK_SEPARATOR",
    "load_digits",
    "make_mnist1d",
    "read_idx",
    "load_fashion_mnist",
    "load_cifar10",
    "fashion_mnist_8x8",
    "cifar10_16x16",
    "resize_images",
    "load_text",
    "load_shakespeare",
    "shakespeare_slice_path",
    "synthetic_words_text",
    "load_synthetic_words",
]

Split = Literal["train", "test"]

#: Separator between works in the shipped Shakespeare slice (four blank lines; the corpus never has more than two).
WORK_SEPARATOR = "\n\n\n\n\n"


# --------------------------------------------------------------------------------------------------------------
# classification data
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassificationData:
    """A labelled dataset with train and test splits, as tensors (treat them as read-only: loaders cache them).

    Attributes:
        name: short identifier, e.g. ``"digits"`` or ``"fashion_mnist-8x8"``.
        train_x, test_x: float32 inputs, ``(N, C, H, W)`` for images or ``(N, D)`` for vectors.
        train_y, test_y: int64 labels in ``[0, num_classes)``.
        num_classes: number of classes.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if x.shape[0] != y.shape[0]:
                raise ValueError(f"{self.name}: {split} has {x.shape[0]} inputs but {y.shape[0]} labels")
            if x.shape[0] == 0:
                raise ValueError(f"{self.name}: the {split} split is empty")
        if self.train_x.shape[1:] != self.test_x.shape[1:]:
            raise ValueError(f"{self.name}: train inputs {tuple(self.train_x.shape[1:])} and test inputs "
                             f"{tuple(self.test_x.shape[1:])} differ in shape")

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example, e.g. ``(1, 8, 8)``."""
        return tuple(self.train_x.shape[1:])

    @property
    def device(self) -> torch.device:
        return self.train_x.device

    def arrays(self, split: Split = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` of one split."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        return (self.train_x, self.train_y) if split == "train" else (self.test_x, self.test_y)

    def sample(self, generator: torch.Generator | None, batch_size: int,
               split: Split = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``batch_size`` examples uniformly with replacement (i.i.d. batches keep every draw seedable)."""
        x, y = self.arrays(split)
        idx = torch.randint(x.shape[0], (batch_size,), generator=generator,
                            device=generator.device if generator is not None else "cpu")
        idx = idx.to(x.device)
        return x[idx], y[idx]

    def to(self, device: torch.device | str) -> ClassificationData:
        """A copy with every tensor on ``device``."""
        return replace(self, train_x=self.train_x.to(device), train_y=self.train_y.to(device),
                       test_x=self.test_x.to(device), test_y=self.test_y.to(device))

    def standardized(self) -> ClassificationData:
        """Inputs shifted and scaled by the train split's mean and std (per channel for images, else global)."""
        dims = (0, 2, 3) if self.train_x.dim() == 4 else tuple(range(self.train_x.dim()))
        mean = self.train_x.mean(dim=dims, keepdim=True)
        std = self.train_x.std(dim=dims, keepdim=True).clamp_min(1e-8)
        return replace(self, train_x=(self.train_x - mean) / std, test_x=(self.test_x - mean) / std)

    def resized(self, size: int | tuple[int, int]) -> ClassificationData:
        """Images resized to ``size`` with :func:`resize_images`; the name gets a ``-HxW`` suffix."""
        h, w = _pair(size)
        return replace(self, name=f"{self.name}-{h}x{w}", train_x=resize_images(self.train_x, (h, w)),
                       test_x=resize_images(self.test_x, (h, w)))


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def resize_images(x: torch.Tensor, size: int | tuple[int, int], chunk: int = 8192) -> torch.Tensor:
    """Resize float images ``(N, C, H, W)`` to ``size``.

    Shrinking uses area averaging (adaptive average pooling, so no aliasing, also for 28 -> 8); growing uses
    bilinear interpolation. Works in chunks of ``chunk`` images so that large sets never need a second full copy
    at the original size. Integer images are converted to float32 first.
    """
    if x.dim() != 4:
        raise ValueError(f"resize_images expects (N, C, H, W), got shape {tuple(x.shape)}")
    h, w = _pair(size)
    if not x.is_floating_point():
        x = x.float()
    if (h, w) == tuple(x.shape[-2:]):
        return x
    mode = "area" if h <= x.shape[-2] and w <= x.shape[-1] else "bilinear"
    kwargs = {} if mode == "area" else {"align_corners": False}
    out = x.new_empty((x.shape[0], x.shape[1], h, w))
    for i in range(0, x.shape[0], chunk):
        out[i:i + chunk] = F.interpolate(x[i:i + chunk], size=(h, w), mode=mode, **kwargs)
    return out


def _split_arrays(name: str, x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int,
                  num_classes: int) -> ClassificationData:
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    perm = np.random.default_rng(seed).permutation(len(y))
    n_test = max(1, int(round(len(y) * test_fraction)))
    test, train = perm[:n_test], perm[n_test:]
    tx, ty = torch.from_numpy(np.ascontiguousarray(x)).float(), torch.from_numpy(np.asarray(y)).long()
    return ClassificationData(name, tx[train], ty[train], tx[test], ty[test], num_classes)


@functools.lru_cache(maxsize=8)
def load_digits(image_size: int | tuple[int, int] = 8, test_fraction: float = 0.2, split_seed: int = 0,
                standardize: bool = True) -> ClassificationData:
    """scikit-learn's bundled handwritten digits (1,797 images, 8x8, 10 classes) as ``(N, 1, H, W)``.

    Pixels are scaled from 0..16 to [0, 1], then (``standardize``) to zero mean and unit variance over the train
    split. ``image_size`` other than 8 resizes (e.g. 16 for the offline stand-in of the CNN task). The train/test
    split is a fixed permutation drawn from ``split_seed``. Needs scikit-learn (no network: the data ships with it).
    """
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("load_digits needs scikit-learn: pip install scikit-learn") from e
    bunch = _sk_load_digits()
    images = bunch.images.astype(np.float32)[:, None] / 16.0
    data = _split_arrays("digits", images, bunch.target, test_fraction, split_seed, 10)
    if _pair(image_size) != (8, 8):
        data = data.resized(image_size)
    return data.standardized() if standardize else data


@functools.lru_cache(maxsize=8)
def make_mnist1d(num_samples: int = 5000, seed: int = 0, train_split: float = 0.8,
                 final_seq_length: int = 40) -> ClassificationData:
    """MNIST-1D (Greydanus 2020) generated locally with ``mnist1d``'s ``make_dataset``: ``(N, 40)`` signals.

    Only the generator is used, never the package's download path, so nothing is fetched. The generator seeds
    numpy's and Python's global RNGs; their states are saved and restored so callers' randomness is untouched.
    The signals come standardized by ``make_dataset`` itself.
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
        from mnist1d.utils import ObjectView
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("make_mnist1d needs the mnist1d package: pip install mnist1d") from e
    args = get_dataset_args(as_dict=True)
    args.update(num_samples=int(num_samples), seed=int(seed), train_split=float(train_split),
                final_seq_length=int(final_seq_length), url=None)
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        ds = make_dataset(ObjectView(args))
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    to_x = lambda a: torch.from_numpy(np.ascontiguousarray(a)).float()  # noqa: E731
    to_y = lambda a: torch.from_numpy(np.asarray(a)).long()  # noqa: E731
    return ClassificationData("mnist1d", to_x(ds["x"]), to_y(ds["y"]), to_x(ds["x_test"]), to_y(ds["y_test"]), 10)


# --------------------------------------------------------------------------------------------------------------
# real image formats: IDX (MNIST / Fashion-MNIST) and CIFAR-10 python pickles
# --------------------------------------------------------------------------------------------------------------

_IDX_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | Path) -> torch.Tensor:
    """Read one IDX file (the MNIST format; gzip-compressed if the name ends in ``.gz``) into a tensor.

    Header: two zero bytes, a type byte (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
    0x0E float64), the number of dimensions, then each dimension as a big-endian uint32; the data follows.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: IDX header says shape {shape} ({expected} data bytes) but the file has "
                         f"{len(raw) - header}")
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))


_FASHION_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                  "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_FASHION_LAYOUT = ("expected the four Fashion-MNIST IDX files (optionally .gz) in the directory, in raw/ or in "
                   "FashionMNIST/raw/: train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                   "t10k-labels-idx1-ubyte")


def _find_idx(root: Path, stem: str) -> Path:
    for folder in (root, root / "raw", root / "FashionMNIST" / "raw"):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    raise FileNotFoundError(f"missing {stem}[.gz] under {root}; {_FASHION_LAYOUT}")


def load_fashion_mnist(root: str | Path, image_size: int | tuple[int, int] | None = None,
                       standardize: bool = True) -> ClassificationData:
    """Fashion-MNIST (or MNIST: same format) from the IDX files in ``root``, as ``(N, 1, 28, 28)`` float32.

    Pixels are scaled to [0, 1]; ``image_size`` resizes (8 for the UNF paper's MLP task, see
    :func:`fashion_mnist_8x8`); ``standardize`` then normalises by the train split's mean and std.

    Raises:
        FileNotFoundError: ``root`` or one of the four files is missing (the message names it and the layout).
        ValueError: a file is not valid IDX, or images and labels disagree.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"Fashion-MNIST directory {root} does not exist; {_FASHION_LAYOUT}")
    arrays = {}
    for split, (images_stem, labels_stem) in _FASHION_FILES.items():
        images_path, labels_path = _find_idx(root, images_stem), _find_idx(root, labels_stem)
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.dim() != 3 or labels.dim() != 1:
            raise ValueError(f"{images_path} must hold (N, H, W) images and {labels_path} (N,) labels; got "
                             f"shapes {tuple(images.shape)} and {tuple(labels.shape)}")
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images_path} has {images.shape[0]} images but {labels_path} has "
                             f"{labels.shape[0]} labels")
        arrays[split] = (images[:, None].float() / 255.0, labels.long())
    num_classes = int(max(arrays["train"][1].max(), arrays["test"][1].max())) + 1
    data = ClassificationData("fashion_mnist", *arrays["train"], *arrays["test"], max(num_classes, 10))
    if image_size is not None:
        data = data.resized(image_size)
    return data.standardized() if standardize else data


def fashion_mnist_8x8(root: str | Path) -> ClassificationData:
    """Fashion-MNIST shrunk to 8x8 (64 inputs, the UNF paper's MLP task) and standardized."""
    return load_fashion_mnist(root, image_size=8)


_CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
_CIFAR_LAYOUT = ("expected the CIFAR-10 python pickles data_batch_1 ... data_batch_5 and test_batch in the directory "
                 "or in cifar-10-batches-py/ (the 'CIFAR-10 python version' archive, extracted)")


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only builds numpy arrays, so a tampered batch file cannot run code."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("numpy.core.numeric", "_frombuffer"),
                ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):  # noqa: ANN201 - signature fixed by pickle
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 batch file")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):  # numpy 2 moved it; old files name numpy.core
            module = "numpy._core." + module.removeprefix("numpy.core.")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    with open(path, "rb") as f:
        batch = _ArrayUnpickler(f, encoding="bytes").load()
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a pickled dict with 'data' and 'labels', got {type(batch).__name__}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise ValueError(f"{path}: the pickled dict lacks 'data' or 'labels' (keys: {sorted(batch)})")
    data = np.asarray(batch["data"], dtype=np.uint8)
    labels = np.asarray(batch["labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise ValueError(f"{path}: expected data of shape (N, 3072) and N labels, got {data.shape} and "
                         f"{labels.shape}")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)


def load_cifar10(root: str | Path, image_size: int | tuple[int, int] | None = None,
                 standardize: bool = True) -> ClassificationData:
    """CIFAR-10 from its python pickles in ``root``, as ``(N, 3, 32, 32)`` float32 scaled to [0, 1].

    ``image_size`` resizes (16 for the UNF paper's CNN task, see :func:`cifar10_16x16`), batch file by batch file
    so the full-size float copy never exists; ``standardize`` normalises per channel by the train split. Files
    are unpickled with a loader that only accepts numpy arrays.

    Raises:
        FileNotFoundError: ``root`` or one of the six batch files is missing (the message names it).
        ValueError: a batch file does not hold CIFAR-10 data.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"CIFAR-10 directory {root} does not exist; {_CIFAR_LAYOUT}")
    folder = root if (root / "test_batch").is_file() or not (root / "cifar-10-batches-py").is_dir() \
        else root / "cifar-10-batches-py"
    xs: dict[str, list[torch.Tensor]] = {"train": [], "test": []}
    ys: dict[str, list[torch.Tensor]] = {"train": [], "test": []}
    for name in _CIFAR_FILES:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"missing {name} in {folder}; {_CIFAR_LAYOUT}")
        x, y = _read_cifar_batch(path)
        x = x.float() / 255.0
        if image_size is not None:
            x = resize_images(x, image_size)
        split = "test" if name == "test_batch" else "train"
        xs[split].append(x)
        ys[split].append(y)
    name = "cifar10" if image_size is None else "cifar10-{}x{}".format(*_pair(image_size))
    data = ClassificationData(name, torch.cat(xs["train"]), torch.cat(ys["train"]), torch.cat(xs["test"]),
                              torch.cat(ys["test"]), 10)
    return data.standardized() if standardize else data


def cifar10_16x16(root: str | Path) -> ClassificationData:
    """CIFAR-10 shrunk to 16x16 (the UNF paper's CNN task) and standardized per channel."""
    return load_cifar10(root, image_size=16)


# --------------------------------------------------------------------------------------------------------------
# text
# --------------------------------------------------------------------------------------------------------------


class CharTokenizer:
    """Character-level tokenizer over a fixed vocabulary (the sorted characters of a corpus)."""

    def __init__(self, vocab: str | Sequence[str]) -> None:
        chars = sorted(set(vocab))
        if not chars:
            raise ValueError("CharTokenizer needs a non-empty vocabulary")
        self.vocab = "".join(chars)
        self._codes = np.array([ord(c) for c in self.vocab], dtype=np.uint32)  # sorted: searchsorted maps to ids

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(set(text))

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> torch.Tensor:
        """Token ids (int64) of ``text``; raises ``ValueError`` naming characters outside the vocabulary."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = np.searchsorted(self._codes, codes)
        ids_clipped = np.minimum(ids, len(self._codes) - 1)
        bad = self._codes[ids_clipped] != codes
        if bad.any():
            unknown = sorted({chr(c) for c in codes[bad]})[:10]
            raise ValueError(f"characters outside the tokenizer's vocabulary: {unknown!r}")
        return torch.from_numpy(ids_clipped.astype(np.int64))

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        return "".join(self.vocab[int(i)] for i in ids)

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


class ByteTokenizer:
    """Byte-level tokenizer: UTF-8 bytes, vocabulary 256 (the same for every corpus)."""

    vocab_size = 256

    def encode(self, text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


Tokenizer = CharTokenizer | ByteTokenizer


@dataclass(frozen=True)
class TextData:
    """A tokenised corpus: 1-D train and validation token streams and the tokenizer that made them.

    Tokens are stored compactly (uint8 / int16 / int32) and widened to int64 per batch.
    """

    name: str
    train: torch.Tensor
    valid: torch.Tensor
    tokenizer: Tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def tokens(self, split: Literal["train", "valid"] = "train") -> torch.Tensor:
        if split not in ("train", "valid"):
            raise ValueError(f"split must be 'train' or 'valid', got {split!r}")
        return self.train if split == "train" else self.valid

    def sample(self, generator: torch.Generator | None, batch_size: int, seq_len: int,
               split: Literal["train", "valid"] = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` random windows: ``(inputs, targets)``, both int64 ``(B, seq_len)``, targets shifted by 1."""
        tokens = self.tokens(split)
        if tokens.numel() < seq_len + 1:
            raise ValueError(f"{self.name}: the {split} split has {tokens.numel()} tokens, fewer than "
                             f"seq_len + 1 = {seq_len + 1}")
        starts = torch.randint(tokens.numel() - seq_len, (batch_size,), generator=generator,
                               device=generator.device if generator is not None else "cpu")
        idx = starts.to(tokens.device)[:, None] + torch.arange(seq_len + 1, device=tokens.device)
        window = tokens[idx].long()
        return window[:, :-1], window[:, 1:]

    def to(self, device: torch.device | str) -> TextData:
        return replace(self, train=self.train.to(device), valid=self.valid.to(device))


def _compact(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    dtype = torch.uint8 if vocab_size <= 256 else torch.int16 if vocab_size <= 32767 else torch.int32
    return ids.to(dtype)


def _split_text(text: str, split: Literal["works", "blocks"], valid_works: int, valid_fraction: float,
                block_size: int, separator: str, source: str) -> tuple[list[str], list[str]]:
    if split == "works":
        works = [w for w in text.split(separator) if w.strip()]
        if len(works) <= valid_works:
            raise ValueError(f"{source}: split='works' needs more than valid_works={valid_works} works separated "
                             f"by {separator!r}, found {len(works)}; use split='blocks' for a single text")
        return works[:-valid_works], works[-valid_works:]
    if split == "blocks":
        if not 0.0 < valid_fraction < 1.0:
            raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
        blocks = [text[i:i + block_size] for i in range(0, len(text), block_size)]
        # every k-th contiguous block goes to validation: spread over the whole text, never overlapping training
        every = max(2, round(1.0 / valid_fraction))
        if len(blocks) < every:
            raise ValueError(f"{source}: {len(text)} characters make {len(blocks)} blocks of {block_size}; need "
                             f"at least {every} for valid_fraction={valid_fraction} (lower block_size)")
        valid = [b for i, b in enumerate(blocks) if i % every == every - 1]
        train = [b for i, b in enumerate(blocks) if i % every != every - 1]
        return train, valid
    raise ValueError(f"split must be 'works' or 'blocks', got {split!r}")


def _text_data(name: str, text: str, tokenizer: Literal["char", "byte"] | Tokenizer,
               split: Literal["works", "blocks"], valid_works: int, valid_fraction: float, block_size: int,
               separator: str, source: str) -> TextData:
    if tokenizer == "char":
        tok: Tokenizer = CharTokenizer.from_text(text)
    elif tokenizer == "byte":
        tok = ByteTokenizer()
    elif isinstance(tokenizer, CharTokenizer | ByteTokenizer):
        tok = tokenizer
    else:
        raise ValueError(f"tokenizer must be 'char', 'byte' or a tokenizer object, got {tokenizer!r}")
    train, valid = _split_text(text, split, valid_works, valid_fraction, block_size, separator, source)
    joiner = separator if split == "works" else ""
    return TextData(name, _compact(tok.encode(joiner.join(train)), tok.vocab_size),
                    _compact(tok.encode(joiner.join(valid)), tok.vocab_size), tok)


def load_text(path: str | Path, tokenizer: Literal["char", "byte"] | Tokenizer = "char",
              split: Literal["works", "blocks"] | None = None, valid_works: int = 1, valid_fraction: float = 0.1,
              block_size: int = 16384, separator: str = WORK_SEPARATOR) -> TextData:
    """Tokenise any UTF-8 text file, or every ``*.txt`` file in a directory (sorted by name), for LM tasks.

    Splits:
        * ``"works"`` — the last ``valid_works`` works are the validation set (out of distribution). A directory's
          files are its works; within one file works are separated by ``separator`` (four blank lines).
        * ``"blocks"`` — the text is cut into contiguous blocks of ``block_size`` characters and every
          ``round(1 / valid_fraction)``-th block is held out (in distribution, no overlap with training).

    ``split=None`` picks ``"works"`` for a directory with several files or a file containing ``separator``,
    else ``"blocks"``. The char vocabulary is built from the whole text, so validation never meets unknown
    characters; pass a tokenizer object to share one vocabulary between corpora.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"no *.txt files in {path}; expected a text file or a directory of .txt files "
                                    "(one work per file)")
        text = separator.join(f.read_text(encoding="utf-8").strip("\n") for f in files)
        if split is None:
            split = "works" if len(files) > 1 else "blocks"
    elif path.is_file():
        text = path.read_text(encoding="utf-8")
        if split is None:
            split = "works" if separator in text else "blocks"
    else:
        raise FileNotFoundError(f"text corpus {path} does not exist; expected a UTF-8 text file or a directory of "
                                ".txt files")
    if not text.strip():
        raise ValueError(f"{path} holds no text")
    return _text_data(path.stem, text, tokenizer, split, valid_works, valid_fraction, block_size, separator,
                      str(path))


def _slice_resource() -> Traversable:
    return importlib.resources.files("meta_train").joinpath("corpus", "shakespeare_slice.txt")


def shakespeare_slice_path() -> Path:
    """Path of the shipped Shakespeare slice (8 whole works, ~0.9 MB, public domain; see ``corpus/README.md``)."""
    return Path(str(_slice_resource()))


@functools.lru_cache(maxsize=4)
def load_shakespeare(tokenizer: Literal["char", "byte"] = "char", valid_works: int = 2) -> TextData:
    """The shipped Shakespeare slice, split by work: the last ``valid_works`` works (The Tempest and The Comedy
    of Errors by default) are the validation set; the Sonnets, Hamlet, Macbeth, Romeo and Juliet, A Midsummer
    Night's Dream and Julius Caesar are the training set. Char-level by default (vocabulary of the slice)."""
    resource = _slice_resource()  # read through importlib.resources: works from a zipped install too
    text = resource.read_text(encoding="ascii")
    return _text_data(f"shakespeare-{tokenizer}", text, tokenizer, "works", valid_works, 0.1, 0, WORK_SEPARATOR,
                      str(resource))


_VOWELS, _CONSONANTS = "aeiouy", "bcdfghjklmnprstvwz"


def synthetic_words_text(n_chars: int = 300_000, n_words: int = 400, seed: int = 0) -> str:
    """A synthetic English-like corpus, generated from ``seed`` (no file, no download).

    Pronounceable pseudo-words (alternating consonants and vowels, 1–9 letters) with Zipfian frequencies; each word
    has a few preferred successors (a sparse word-bigram model, followed 70% of the time), sentences of geometric
    length with a capital first letter, commas and ``.?!``, lines of a few sentences and blank-line paragraphs. So a
    char-level model has structure to learn at several scales (letters within words, word pairs, punctuation), as in
    natural text, while its words are not those of any real corpus (a few short ones happen to be words). Drawn with
    Python's ``random.Random(seed)``: the same text on every machine for a given Python; Python promises only
    ``random()``'s sequence across versions, so a test pins a checksum of the default corpus (the shipped
    ``unf-mnist1d-synthlm`` weights were fitted on it).
    """
    if n_chars < 1000 or n_words < 10:
        raise ValueError(f"synthetic_words_text needs n_chars >= 1000 and n_words >= 10, got {n_chars}, {n_words}")
    rng = random.Random(seed)
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < n_words:
        length = rng.choice((1, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 6, 6, 7, 8, 9))
        start = rng.random() < 0.5
        word = "".join(rng.choice(_CONSONANTS if (i % 2 == 0) == start else _VOWELS) for i in range(length))
        if word not in seen:
            seen.add(word)
            words.append(word)
    # cumulative Zipf weights, accumulated once (``choices`` would redo it on every draw; same draws either way)
    zipf = list(itertools.accumulate(1.0 / (rank + 1) for rank in range(n_words)))
    successors = [rng.choices(range(n_words), cum_weights=zipf, k=4) for _ in range(n_words)]
    out: list[str] = []
    size, word = 0, rng.choices(range(n_words), cum_weights=zipf)[0]
    while size < n_chars:
        sentence = []
        while True:
            sentence.append(words[word])
            word = (rng.choice(successors[word]) if rng.random() < 0.7
                    else rng.choices(range(n_words), cum_weights=zipf)[0])
            if rng.random() < 0.1:
                break
            if rng.random() < 0.08:
                sentence[-1] += ","
        text = " ".join(sentence)
        text = text[0].upper() + text[1:] + rng.choice(".....?!")
        r = rng.random()
        text += "\n\n" if r < 0.03 else "\n" if r < 0.2 else " "
        out.append(text)
        size += len(text)
    return "".join(out)[:n_chars]


@functools.lru_cache(maxsize=4)
def load_synthetic_words(n_chars: int = 300_000, seed: int = 0) -> TextData:
    """:func:`synthetic_words_text` as char-level :class:`TextData`, every 10th block of 16,384 characters held out
    for validation. An LM corpus that is not Shakespeare, for training learned optimizers on language models
    while the Shakespeare LM tasks stay held out."""
    text = synthetic_words_text(n_chars, seed=seed)
    return _text_data(f"synthetic-words-{seed}", text, "char", "blocks", 1, 0.1, 16384, WORK_SEPARATOR,
                      "synthetic_words_text")
