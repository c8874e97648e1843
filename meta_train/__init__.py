"""Meta-training of learned optimizers: offline datasets (:mod:`meta_train.data`), functional training tasks
and task families (:mod:`meta_train.tasks`), meta-gradient estimators (:mod:`meta_train.estimators`: BPTT, ES,
PES), an imitation warm start (:mod:`meta_train.imitate`), and the loop (:mod:`meta_train.loop`: atomic
checkpoints, exact resume)."""

from .data import (
    WORK_SEPARATOR,
    ByteTokenizer,
    CharTokenizer,
    ClassificationData,
    TextData,
    Tokenizer,
    cifar10_16x16,
    fashion_mnist_8x8,
    load_cifar10,
    load_digits,
    load_fashion_mnist,
    load_shakespeare,
    load_text,
    make_mnist1d,
    read_idx,
    resize_images,
    shakespeare_slice_path,
)
from .estimators import PES, FlatProblem, bptt, es, unroll
from .imitate import ScheduledNormalizedMomentum, teacher_snapshots  # (imitate() itself: meta_train.imitate.imitate)
from .loop import MetaTrainConfig, meta_train
from .tasks import (
    ACTIVATIONS,
    MLP,
    Batch,
    CausalTransformerLM,
    ClassificationTask,
    CNNFamily,
    ConvNet,
    LanguageModelTask,
    MixtureFamily,
    MLPFamily,
    Params,
    RecurrentLM,
    RNNLMFamily,
    Task,
    TaskFamily,
    TransformerLMFamily,
    cnn_task,
    get_family,
    get_task,
    list_families,
    list_tasks,
    load_classification_data,
    load_text_data,
    mlp_task,
    register_family,
    register_task,
    rnn_lm_task,
    transformer_lm_task,
)

__all__ = [
    "MetaTrainConfig",
    "meta_train",
    "FlatProblem",
    "unroll",
    "bptt",
    "es",
    "PES",
    "ScheduledNormalizedMomentum",
    "teacher_snapshots",
    # data
    "ClassificationData", "TextData", "CharTokenizer", "ByteTokenizer", "Tokenizer", "WORK_SEPARATOR",
    "load_digits", "make_mnist1d", "read_idx", "load_fashion_mnist", "load_cifar10", "fashion_mnist_8x8",
    "cifar10_16x16", "resize_images", "load_text", "load_shakespeare", "shakespeare_slice_path",
    # tasks
    "Params", "Batch", "Task", "ClassificationTask", "LanguageModelTask", "MLP", "ConvNet", "RecurrentLM",
    "CausalTransformerLM", "ACTIVATIONS", "load_classification_data", "load_text_data", "mlp_task", "cnn_task",
    "rnn_lm_task", "transformer_lm_task", "TaskFamily", "MLPFamily", "CNNFamily", "RNNLMFamily",
    "TransformerLMFamily", "MixtureFamily", "register_task", "get_task", "list_tasks", "register_family",
    "get_family", "list_families",
]
