"""meta_train.data: offline datasets, real-format loaders on small files written here, tokenisers and splits."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import random
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import meta_train
from meta_train.data import (
    WORK_SEPARATOR,
    ByteTokenizer,
    CharTokenizer,
    ClassificationData,
    cifar10_16x16,
    fashion_mnist_8x8,
    load_cifar10,
    load_digits,
    load_fashion_mnist,
    load_shakespeare,
    load_synthetic_words,
    load_text,
    make_mnist1d,
    read_idx,
    resize_images,
    shakespeare_slice_path,
    synthetic_words_text,
)

# ----------------------------------------------------------------------------------------------------------------
# writers for the real formats (also used by test_meta_tasks)
# ----------------------------------------------------------------------------------------------------------------

_IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C,
              np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write ``array`` as an IDX file (big-endian; gzip if the name ends in .gz)."""
    array = np.asarray(array)
    if array.dtype.itemsize > 1:
        array = array.astype(array.dtype.newbyteorder(">"))
    header = bytes([0, 0, _IDX_CODES[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def write_fashion_mnist(root: Path, n_train: int = 30, n_test: int = 12, gz: bool = True, seed: int = 0) -> Path:
    """Four small Fashion-MNIST IDX files (train images gzip-compressed when ``gz``, the rest plain)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    write_idx(root / f"train-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8))
    write_idx(root / "train-labels-idx1-ubyte", np.arange(n_train, dtype=np.uint8) % 10)
    write_idx(root / "t10k-images-idx3-ubyte", rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8))
    write_idx(root / f"t10k-labels-idx1-ubyte{suffix}", np.arange(n_test, dtype=np.uint8) % 10)
    return root


def write_cifar10(root: Path, per_batch: int = 4, n_test: int = 6, seed: int = 0, str_keys: bool = False) -> Path:
    """CIFAR-10 python pickles shaped like the originals (dict with b'data' (N, 3072) uint8, b'labels' list)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    key = (lambda k: k) if str_keys else (lambda k: k.encode())
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        batch = {key("batch_label"): key(name), key("labels"): [int(v) for v in rng.integers(0, 10, n)],
                 key("data"): rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 key("filenames"): [key(f"img{i}.png") for i in range(n)]}
        with open(root / name, "wb") as f:
            pickle.dump(batch, f, protocol=pickle.DEFAULT_PROTOCOL if str_keys else 2)
    return root


# ----------------------------------------------------------------------------------------------------------------
# offline classification data
# ----------------------------------------------------------------------------------------------------------------


def test_digits_shapes_and_normalisation():
    data = load_digits()
    assert data.name == "digits" and data.num_classes == 10 and data.input_shape == (1, 8, 8)
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    assert data.train_x.shape[0] + data.test_x.shape[0] == 1797
    assert data.test_x.shape[0] == round(1797 * 0.2)
    assert abs(float(data.train_x.mean())) < 1e-4 and abs(float(data.train_x.std()) - 1) < 1e-3
    assert set(data.train_y.tolist()) == set(range(10))
    raw = load_digits(standardize=False)
    assert float(raw.train_x.min()) == 0.0 and float(raw.train_x.max()) == 1.0
    assert load_digits(image_size=16).input_shape == (1, 16, 16)


def test_digits_split_is_fixed_by_seed():
    a, b = load_digits.__wrapped__(), load_digits.__wrapped__()
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    c = load_digits.__wrapped__(split_seed=1)
    assert not torch.equal(a.test_y, c.test_y)


def test_mnist1d_generated_locally_and_seedable():
    np.random.seed(123)
    random.seed(123)
    np_before, py_before = np.random.get_state()[1].copy(), random.getstate()
    a = make_mnist1d.__wrapped__(num_samples=200, seed=3)
    assert np.array_equal(np.random.get_state()[1], np_before) and random.getstate() == py_before
    assert a.train_x.shape == (160, 40) and a.test_x.shape == (40, 40)
    assert a.train_x.dtype == torch.float32 and a.train_y.dtype == torch.int64 and a.num_classes == 10
    b = make_mnist1d.__wrapped__(num_samples=200, seed=3)
    c = make_mnist1d.__wrapped__(num_samples=200, seed=4)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.train_y, b.train_y)
    assert not torch.equal(a.train_x, c.train_x)
    assert make_mnist1d().train_x.shape == (4000, 40)


def test_sample_is_deterministic_and_validates():
    data = load_digits()
    x1, y1 = data.sample(torch.Generator().manual_seed(5), 7)
    x2, y2 = data.sample(torch.Generator().manual_seed(5), 7)
    assert x1.shape == (7, 1, 8, 8) and torch.equal(x1, x2) and torch.equal(y1, y2)
    xt, _ = data.sample(torch.Generator().manual_seed(5), 500, split="test")
    assert all(any(torch.equal(row, t) for t in data.test_x) for row in xt[:5])
    with pytest.raises(ValueError, match="split"):
        data.sample(None, 3, split="validation")
    with pytest.raises(ValueError, match="labels"):
        ClassificationData("bad", torch.zeros(3, 2), torch.zeros(2, dtype=torch.long), torch.zeros(1, 2),
                           torch.zeros(1, dtype=torch.long), 2)


def test_resize_images():
    blocks = torch.arange(64.0).reshape(1, 1, 8, 8)
    big = blocks.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # each pixel a 2x2 block
    assert torch.allclose(resize_images(big, 8), blocks)  # area averaging undoes it exactly
    assert resize_images(torch.rand(3, 1, 28, 28), 8).shape == (3, 1, 8, 8)
    up = resize_images(torch.rand(2, 3, 8, 8), (16, 12))
    assert up.shape == (2, 3, 16, 12) and up.dtype == torch.float32
    assert resize_images(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), 2).dtype == torch.float32
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        resize_images(torch.zeros(4, 4), 2)


# ----------------------------------------------------------------------------------------------------------------
# IDX / Fashion-MNIST
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, ">i2", ">i4", ">f4", ">f8"])
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_roundtrip(tmp_path, dtype, gz):
    array = (np.arange(2 * 3 * 5) - 7).astype(dtype).reshape(2, 3, 5)
    path = write_idx(tmp_path / ("a.idx.gz" if gz else "a.idx"), array)
    out = read_idx(path)
    assert out.shape == (2, 3, 5)
    assert np.array_equal(out.numpy(), array.astype(np.dtype(dtype).newbyteorder("=")))


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    path = write_idx(tmp_path / "short", np.zeros((4, 2), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match="header says shape"):
        read_idx(path)


def test_fashion_mnist_loader(tmp_path):
    root = write_fashion_mnist(tmp_path / "fm")
    raw = load_fashion_mnist(root, standardize=False)
    assert raw.train_x.shape == (30, 1, 28, 28) and raw.test_x.shape == (12, 1, 28, 28)
    assert raw.train_y.tolist() == [i % 10 for i in range(30)] and raw.num_classes == 10
    images = read_idx(root / "train-images-idx3-ubyte.gz")
    assert torch.allclose(raw.train_x[:, 0], images.float() / 255)
    small = fashion_mnist_8x8(root)
    assert small.input_shape == (1, 8, 8) and small.name == "fashion_mnist-8x8"
    assert abs(float(small.train_x.mean())) < 1e-4
    assert torch.allclose(load_fashion_mnist(root, image_size=8, standardize=False).train_x,
                          resize_images(raw.train_x, 8))


def test_fashion_mnist_torchvision_layout_and_errors(tmp_path):
    write_fashion_mnist(tmp_path / "tv" / "FashionMNIST" / "raw", gz=False)
    assert load_fashion_mnist(tmp_path / "tv").train_x.shape[0] == 30
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_fashion_mnist(tmp_path / "nowhere")
    root = write_fashion_mnist(tmp_path / "partial")
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte\[\.gz\].*train-images-idx3-ubyte"):
        load_fashion_mnist(root)
    write_idx(root / "t10k-labels-idx1-ubyte", np.zeros(5, dtype=np.uint8))
    with pytest.raises(ValueError, match="12 images but .* 5 labels"):
        load_fashion_mnist(root)


# ----------------------------------------------------------------------------------------------------------------
# CIFAR-10
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("str_keys", [False, True])
def test_cifar10_loader(tmp_path, str_keys):
    root = write_cifar10(tmp_path / "c", str_keys=str_keys)
    raw = load_cifar10(root, standardize=False)
    assert raw.train_x.shape == (20, 3, 32, 32) and raw.test_x.shape == (6, 3, 32, 32)
    with open(root / "data_batch_1", "rb") as f:
        first = pickle.load(f, encoding="bytes")
    first = {k.decode() if isinstance(k, bytes) else k: v for k, v in first.items()}
    # channel-major rows: the first 1024 values are the red plane, row by row
    assert torch.allclose(raw.train_x[0, 0].flatten(), torch.tensor(first["data"][0, :1024] / 255.0).float())
    assert raw.train_y[:4].tolist() == first["labels"]
    small = cifar10_16x16(root)
    assert small.input_shape == (3, 16, 16) and small.name == "cifar10-16x16"
    assert small.train_x.mean(dim=(0, 2, 3)).abs().max() < 1e-4  # per-channel standardisation


def test_cifar10_layout_and_errors(tmp_path):
    write_cifar10(tmp_path / "archive" / "cifar-10-batches-py")
    assert load_cifar10(tmp_path / "archive").test_x.shape[0] == 6
    root = write_cifar10(tmp_path / "partial")
    (root / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="missing test_batch .*data_batch_1 ... data_batch_5"):
        load_cifar10(root)
    with open(root / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), dtype=np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match=r"\(N, 3072\)"):
        load_cifar10(root)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_cifar10(tmp_path / "nowhere")


def test_cifar10_refuses_code_in_pickles(tmp_path):
    root = write_cifar10(tmp_path / "evil")

    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(root / "data_batch_3", "wb") as f:
        pickle.dump({b"data": Exploit(), b"labels": []}, f)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load builtins.print"):
        load_cifar10(root)


# ----------------------------------------------------------------------------------------------------------------
# text
# ----------------------------------------------------------------------------------------------------------------


def test_tokenizers_roundtrip():
    tok = CharTokenizer.from_text("hello world")
    assert tok.vocab == " dehlorw" and tok.vocab_size == 8
    ids = tok.encode("world hello")
    assert ids.dtype == torch.int64 and tok.decode(ids) == "world hello"
    with pytest.raises(ValueError, match="outside the tokenizer's vocabulary"):
        tok.encode("help!")
    btok = ByteTokenizer()
    text = "naïve café"
    assert btok.vocab_size == 256 and btok.decode(btok.encode(text)) == text
    assert int(btok.encode(text).max()) < 256


def test_load_text_blocks(tmp_path):
    text = "".join(chr(97 + i % 26) for i in range(10_000))
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    data = load_text(path, block_size=100, valid_fraction=0.1)
    assert data.name == "corpus" and data.vocab_size == 26
    assert data.train.numel() == 9000 and data.valid.numel() == 1000
    # validation is every 10th block of 100 characters, in order
    assert data.tokenizer.decode(data.valid[:100]) == text[900:1000]
    assert data.tokenizer.decode(data.train[:900]) == text[:900]
    assert data.train.dtype == torch.uint8  # stored compactly
    bytes_data = load_text(path, tokenizer="byte", block_size=100)
    assert bytes_data.vocab_size == 256 and bytes_data.train.numel() == 9000


def test_load_text_works_and_directories(tmp_path):
    works = ["first work\nwith lines", "second work", "third work is held out"]
    path = tmp_path / "works.txt"
    path.write_text(WORK_SEPARATOR.join(works))
    data = load_text(path)  # the separator makes it split by work
    assert data.tokenizer.decode(data.valid) == works[-1]
    assert data.tokenizer.decode(data.train) == WORK_SEPARATOR.join(works[:2])
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, w in enumerate(works):
        (folder / f"{i:02d}.txt").write_text(w + "\n")
    from_dir = load_text(folder, valid_works=2)
    assert from_dir.tokenizer.decode(from_dir.valid) == WORK_SEPARATOR.join(works[1:])
    with pytest.raises(ValueError, match="more than valid_works=3"):
        load_text(path, valid_works=3)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text(tmp_path / "missing.txt")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \*\.txt files"):
        load_text(tmp_path / "empty_dir")


def test_text_sample_windows():
    data = load_shakespeare()
    x1, y1 = data.sample(torch.Generator().manual_seed(0), 4, 16)
    x2, y2 = data.sample(torch.Generator().manual_seed(0), 4, 16)
    assert x1.shape == y1.shape == (4, 16) and x1.dtype == torch.int64
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are the next characters
    valid_text = data.tokenizer.decode(data.valid)
    xv, yv = data.sample(torch.Generator().manual_seed(1), 3, 32, split="valid")
    for row, nxt in zip(xv, yv):
        assert data.tokenizer.decode(torch.cat([row, nxt[-1:]])) in valid_text
    with pytest.raises(ValueError, match="fewer than"):
        data.sample(None, 1, data.valid.numel() + 5, split="valid")


def test_synthetic_words_corpus_is_reproducible_and_text_like():
    text = synthetic_words_text(20_000, seed=3)
    assert text == synthetic_words_text(20_000, seed=3) and len(text) == 20_000
    assert text != synthetic_words_text(20_000, seed=4)
    sentences = [s for s in text.replace("?", ".").replace("!", ".").split(".") if s.strip()]
    assert len(sentences) > 100 and all(s.strip()[0].isupper() for s in sentences[:-1])
    words = text.lower().replace(",", " ").replace(".", " ").replace("?", " ").replace("!", " ").split()
    counts = sorted(Counter(words).values(), reverse=True)
    assert 50 < len(counts) <= 400 and counts[0] > 10 * counts[len(counts) // 2]  # Zipf-like: a few frequent words
    data = load_synthetic_words()
    assert data is load_synthetic_words() and data.vocab_size < 60
    assert 0.05 < data.valid.numel() / (data.train.numel() + data.valid.numel()) < 0.15
    with pytest.raises(ValueError, match="n_chars"):
        synthetic_words_text(10)
    # the default corpus, which the shipped unf-mnist1d-synthlm weights were fitted on, is pinned: Python promises
    # only random()'s sequence across versions, and choice()/choices() are built on it
    assert hashlib.sha256(synthetic_words_text().encode()).hexdigest()[:16] == "955f22bf9ab0e517"


def test_shakespeare_slice_is_shipped():
    path = shakespeare_slice_path()
    assert path.is_file() and Path(meta_train.__file__).parent in path.parents
    size = path.stat().st_size
    assert 800_000 <= size <= 1_000_000
    text = path.read_text(encoding="ascii")
    works = text.split(WORK_SEPARATOR)
    assert len(works) == 8 and works[0].startswith("THE SONNETS") and works[-2].startswith("THE TEMPEST")
    data = load_shakespeare()
    assert data.tokenizer.decode(data.valid[:11]) == "THE TEMPEST"
    assert data.tokenizer.decode(data.train[:11]) == "THE SONNETS"
    assert 0.15 < data.valid.numel() / (data.train.numel() + data.valid.numel()) < 0.25
    assert 60 <= data.vocab_size <= 90
    assert load_shakespeare("byte").vocab_size == 256
