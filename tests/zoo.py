"""Architectures the compiler is tested on; each factory returns (model, example_inputs) in float64."""

from __future__ import annotations

import torch
from torch import nn

from unf import models, randomize_


class RNNHead(nn.Module):
    def __init__(self, cell: type[nn.Module], bidirectional: bool = False):
        super().__init__()
        self.rnn = cell(4, 6, num_layers=2, batch_first=True, bidirectional=bidirectional)
        self.fc = nn.Linear(12 if bidirectional else 6, 3)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.fc(out[:, -1])


class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.mha(x, x, x, need_weights=False)[0])


class EncoderClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, dropout=0.1)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.enc(x).mean(1))


class Conv1dNet(nn.Module):
    """1-D convolutions: a grouped conv, a depthwise conv, GroupNorm, global pooling."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 8, 3, padding=1)
        self.c2 = nn.Conv1d(8, 8, 3, padding=1, groups=4)
        self.gn = nn.GroupNorm(2, 8)
        self.dw = nn.Conv1d(8, 8, 5, padding=2, groups=8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = torch.relu(self.gn(self.c2(h)))
        return self.fc(torch.tanh(self.dw(h)).mean(-1))


class LogitsOnly(nn.Module):
    """HF models return ModelOutput; the spec of the wrapped model is the model's own (prefix 'model.')."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).logits


def gpt2(layers=2, heads=2):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=layers, n_head=heads, n_embd=16, vocab_size=50, n_positions=16)
    return GPT2LMHeadModel(cfg), torch.randint(0, 50, (2, 6))


def bert():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     vocab_size=50, max_position_embeddings=32, num_labels=3)
    return BertForSequenceClassification(cfg), torch.randint(0, 50, (2, 6))


def bert_base_model():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     vocab_size=50, max_position_embeddings=32)
    return BertModel(cfg), torch.randint(0, 50, (2, 6))


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=50, max_position_embeddings=32)
    return LlamaForCausalLM(cfg), torch.randint(0, 50, (2, 6))


ARCHITECTURES = {
    "mlp": lambda: (models.MLP((6, 8, 7, 3)), torch.randn(5, 6)),
    "mlp_nobias": lambda: (models.MLP((6, 8, 7, 3), bias=False), torch.randn(5, 6)),
    "cnn_bn": lambda: (models.SmallCNN(3, (4, 6), 5, image_size=8), torch.randn(2, 3, 8, 8)),
    "conv1d_grouped": lambda: (Conv1dNet(), torch.randn(2, 3, 10)),
    "resnet": lambda: (models.TinyResNet(3, (4, 6), 5), torch.randn(2, 3, 8, 8)),
    "lstm": lambda: (RNNHead(nn.LSTM), torch.randn(2, 5, 4)),
    "gru": lambda: (RNNHead(nn.GRU), torch.randn(2, 5, 4)),
    "lstm_bidirectional": lambda: (RNNHead(nn.LSTM, bidirectional=True), torch.randn(2, 5, 4)),
    "mha": lambda: (SelfAttention(), torch.randn(2, 5, 8)),
    "transformer_encoder": lambda: (EncoderClassifier(), torch.randn(2, 5, 8)),
    "transformer_lm": lambda: (models.TransformerLM(vocab=20, d=16, heads=2, layers=2, mlp=32, context=8),
                               torch.randint(0, 20, (2, 8))),
    "gpt2": gpt2,
    "bert": bert,
    "llama": llama,
}


def build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model, x = ARCHITECTURES[name]()
    model = model.double()
    randomize_(model, torch.Generator().manual_seed(seed))
    return model, (x.double() if x.is_floating_point() else x)
