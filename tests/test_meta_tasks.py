"""meta_train.tasks: functional tasks train under torch.func, vmap over populations, and have derivable specs."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.func import grad, vmap

import unf
from meta_train.tasks import (
    ClassificationTask,
    CNNFamily,
    LanguageModelTask,
    MixtureFamily,
    MLPFamily,
    RNNLMFamily,
    Task,
    TransformerLMFamily,
    get_family,
    get_task,
    list_families,
    list_tasks,
    mlp_task,
    register_task,
)
from tests.test_meta_data import write_cifar10, write_fashion_mnist

OFFLINE_TASKS = ["mlp-digits", "mlp-mnist1d", "mlp-mnist1d-w128", "mlp-mnist1d-tanh", "mlp-mnist1d-deep",
                 "mlp-digits-w128", "mlp-digits-tanh", "mlp-digits-deep",
                 "cnn-digits", "cnn-digits16", "rnn-shakespeare", "transformer-shakespeare",
                 "transformer-synthwords-d16"]
# plain-SGD learning rates under which each task's loss falls clearly within 50 steps
SGD_LR = {"mlp": 0.1, "cnn": 0.5, "rnn": 0.05, "transformer": 0.5}

_TASK_CACHE: dict[str, Task] = {}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # the models are tiny: a second intra-op thread buys nothing and spin-waits badly when the shared cores are busy
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cached_task(name: str) -> Task:
    if name not in _TASK_CACHE:
        _TASK_CACHE[name] = get_task(name)
    return _TASK_CACHE[name]


def sgd(task: Task, params: dict, steps: int, lr: float, generator: torch.Generator) -> dict:
    loss_grad = grad(task.loss)
    for _ in range(steps):
        g = loss_grad(params, task.sample_batch(generator))
        params = {k: v - lr * g[k] for k, v in params.items()}
    return params


def mean_loss(task: Task, params: dict, batches: list) -> float:
    with torch.no_grad():
        return sum(float(task.loss(params, b)) for b in batches) / len(batches)


def derive_quietly(task: Task) -> unf.WeightSpaceSpec:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", unf.UnknownOpWarning)  # GPT-2's mask ops touch no weights
        return unf.derive_spec(task.model, task.example_inputs)


# ----------------------------------------------------------------------------------------------------------------
# the registered offline tasks
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OFFLINE_TASKS)
def test_init_is_seeded_and_matches_the_model(name):
    task = cached_task(name)
    rng_before = torch.get_rng_state()
    a = task.init(torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), rng_before)  # only the given generator is consumed
    b = task.init(torch.Generator().manual_seed(0))
    c = task.init(torch.Generator().manual_seed(1))
    shapes = dict(task.model.named_parameters())
    assert list(a) == list(shapes) and all(a[k].shape == shapes[k].shape for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in a.values())


@pytest.mark.parametrize("name", OFFLINE_TASKS)
def test_batches_are_seeded(name):
    task = cached_task(name)
    x1, y1 = task.sample_batch(torch.Generator().manual_seed(3))
    x2, y2 = task.sample_batch(torch.Generator().manual_seed(3))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.shape[0] == y1.shape[0] == task.batch_size and y1.dtype == torch.int64
    xv, _ = task.sample_batch(torch.Generator().manual_seed(3), split="test")
    assert xv.shape == x1.shape
    assert task.example_inputs[0].shape[1:] == x1.shape[1:]


@pytest.mark.parametrize("name", OFFLINE_TASKS)
def test_loss_is_finite_and_falls_under_sgd(name):
    task = cached_task(name)
    g = torch.Generator().manual_seed(0)
    params = task.init(g)
    held = [task.sample_batch(torch.Generator().manual_seed(100 + i)) for i in range(4)]
    before = mean_loss(task, params, held)
    assert math.isfinite(before)
    trained = sgd(task, params, 50, SGD_LR[name.split("-")[0]], g)
    after = mean_loss(task, trained, held)
    # the CNNs learn slowest (global pooling); 16x16 digits fall ~7% in 50 steps, the others 10-75%
    assert math.isfinite(after) and after < 0.95 * before, (before, after)


@pytest.mark.parametrize("name", OFFLINE_TASKS)
def test_spec_derives_and_checks(name):
    task = cached_task(name)
    spec = derive_quietly(task)
    params = task.init(torch.Generator().manual_seed(7))
    covered = {e.source for e in spec.entries} | {a for e in spec.entries for a in e.aliases}
    assert set(params) <= covered
    assert any(axis is not None for e in spec.entries for axis in e.axes)  # hidden units do permute
    model = task.model
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        model.load_state_dict(params, strict=False)
        report = unf.check_spec(model, spec, task.example_inputs, trials=3)
    finally:
        model.load_state_dict(saved)
    assert report.ok, str(report)


@pytest.mark.parametrize("name", OFFLINE_TASKS)
def test_loss_vmaps_over_a_population(name):
    task = cached_task(name)
    members = [task.init(torch.Generator().manual_seed(s)) for s in range(3)]
    stacked = {k: torch.stack([m[k] for m in members]) for k in members[0]}
    batch = task.sample_batch(torch.Generator().manual_seed(0))
    losses = vmap(task.loss, in_dims=(0, None))(stacked, batch)
    expected = torch.stack([task.loss(m, batch) for m in members])
    assert torch.allclose(losses, expected, rtol=1e-4, atol=1e-5)
    grads = vmap(grad(task.loss), in_dims=(0, None))(stacked, batch)
    g0 = grad(task.loss)(members[0], batch)
    assert all(torch.allclose(grads[k][0], g0[k], rtol=1e-3, atol=1e-5) for k in g0)


# ----------------------------------------------------------------------------------------------------------------
# the paper's configurations
# ----------------------------------------------------------------------------------------------------------------


def test_paper_mlp_and_cnn_shapes():
    mlp = cached_task("mlp-digits")
    assert {k: tuple(v) for k, v in mlp.param_shapes.items()} == {
        "1.weight": (32, 64), "1.bias": (32,), "3.weight": (10, 32), "3.bias": (10,)}
    assert mlp.batch_size == 128 and isinstance(mlp, ClassificationTask)
    cnn = cached_task("cnn-digits16")
    shapes = {k: tuple(v) for k, v in cnn.param_shapes.items()}
    assert shapes["features.0.weight"] == (16, 1, 3, 3) and shapes["features.2.weight"] == (32, 16, 3, 3)
    assert shapes["head.weight"] == (10, 32) and cnn.batch_size == 128
    assert cnn.example_inputs[0].shape[1:] == (1, 16, 16)


def test_paper_lm_shapes():
    rnn = cached_task("rnn-shakespeare")
    assert isinstance(rnn, LanguageModelTask) and (rnn.batch_size, rnn.seq_len) == (64, 16)
    shapes = {k: tuple(v) for k, v in rnn.param_shapes.items()}
    vocab = rnn.data.vocab_size
    assert shapes == {"embed.weight": (vocab, 32), "ih.weight": (64, 32), "ih.bias": (64,), "hh.weight": (64, 64),
                      "head.weight": (vocab, 64), "head.bias": (vocab,)}
    assert torch.equal(rnn.init(torch.Generator().manual_seed(0))["hh.weight"], torch.eye(64))  # IRNN
    tf = cached_task("transformer-shakespeare")
    cfg = tf.model.config
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head) == (2, 32, 4) and (tf.batch_size, tf.seq_len) == (8, 8)
    assert "lm.lm_head.weight" not in tf.param_shapes  # tied to the input embedding
    x, y = tf.sample_batch(torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 8)
    # with random parameters near zero the model predicts roughly uniformly
    assert abs(float(tf.loss(tf.init(torch.Generator().manual_seed(0)), (x, y))) - math.log(vocab)) < 0.5


def test_synthetic_lm_task_is_a_smaller_gpt2_on_another_corpus():
    tf = cached_task("transformer-synthwords-d16")
    assert (tf.model.config.n_layer, tf.model.config.n_embd, tf.model.config.n_head) == (2, 16, 4)
    assert tf.data.name == "synthetic-words-0"
    def words(data, n):
        text = data.tokenizer.decode(data.train[:n]).lower()
        return {w.strip(",.?!;:'-") for w in text.split()} - {""}

    synthetic, shakespeare = words(tf.data, 20_000), words(cached_task("transformer-shakespeare").data, 200_000)
    # another corpus: pseudo-words, a few of which happen to be short English words
    assert len(synthetic) > 100 and len(synthetic & shakespeare) < 0.2 * len(synthetic)


def test_tasks_on_real_formats(tmp_path):
    fm = write_fashion_mnist(tmp_path / "fashion", n_train=40)
    task = get_task("mlp-fashion8", data_dir=str(fm), batch_size=16)
    assert task.data.input_shape == (1, 8, 8) and task.param_shapes["1.weight"] == (32, 64)
    params = task.init(torch.Generator().manual_seed(0))
    assert math.isfinite(float(task.loss(params, task.sample_batch(torch.Generator().manual_seed(0)))))
    cifar = write_cifar10(tmp_path / "cifar")
    ctask = get_task("cnn-cifar16", data_dir=str(cifar), batch_size=8)
    assert ctask.data.input_shape == (3, 16, 16) and ctask.param_shapes["features.0.weight"] == (16, 3, 3, 3)
    assert derive_quietly(ctask) is not None
    with pytest.raises(ValueError, match="needs data_dir"):
        get_task("mlp-fashion8")


def test_accuracy_and_splits():
    task = cached_task("mlp-digits")
    g = torch.Generator().manual_seed(0)
    params = task.init(g)
    start = task.accuracy(params)
    trained = sgd(task, params, 100, 0.1, g)
    assert task.accuracy(trained) > max(0.6, start + 0.3)
    with pytest.raises(ValueError, match="split must be"):
        task.sample_batch(g, split="validation")


def test_registry():
    assert set(OFFLINE_TASKS + ["mlp-fashion8", "cnn-cifar16"]) <= set(list_tasks())
    assert {"mlp", "cnn", "rnn-lm", "transformer-lm", "all"} <= set(list_families())
    with pytest.raises(KeyError, match="unknown task 'nope'"):
        get_task("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_task("mlp-digits", mlp_task)
    assert get_task("mlp-digits", activation="gelu").config["activation"] == "gelu"
    with pytest.raises(ValueError, match="unknown activation"):
        mlp_task(activation="swish-ish")


# ----------------------------------------------------------------------------------------------------------------
# families
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", [
    MLPFamily(),
    CNNFamily(batch_sizes=(16,)),
    RNNLMFamily(batch_sizes=(8,)),
    TransformerLMFamily(batch_sizes=(4,)),
], ids=["mlp", "cnn", "rnn", "transformer"])
def test_family_samples_are_seeded_diverse_and_valid(family):
    names = [family.sample(torch.Generator().manual_seed(s)).name for s in range(8)]
    again = [family.sample(torch.Generator().manual_seed(s)).name for s in range(8)]
    assert names == again and len(set(names)) >= 4
    for s in range(2):
        task = family.sample(torch.Generator().manual_seed(s))
        g = torch.Generator().manual_seed(s)
        params = task.init(g)
        assert math.isfinite(float(task.loss(params, task.sample_batch(g))))
        assert derive_quietly(task).entries


def test_mixture_family():
    family = get_family("all")
    kinds = {family.sample(torch.Generator().manual_seed(s)).config["kind"] for s in range(12)}
    assert kinds == {"mlp", "cnn", "rnn_lm", "transformer_lm"}
    only_mlp = MixtureFamily((MLPFamily(), CNNFamily()), weights=(1.0, 0.0))
    assert all(only_mlp.sample(torch.Generator().manual_seed(s)).config["kind"] == "mlp" for s in range(5))
    with pytest.raises(ValueError, match="non-negative"):
        MixtureFamily((MLPFamily(),), weights=(-1.0,)).sample()
    narrowed = get_family("mlp", widths=(8,), depths=(2,), datasets=("mnist1d",))
    task = narrowed.sample(torch.Generator().manual_seed(0))
    assert task.config["hidden"] == [8, 8] and task.config["dataset"] == "mnist1d"
