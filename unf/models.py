"""Small reference architectures in plain PyTorch, used by ``unf demo``, the CLI and the tests.

Each ``*_example()`` factory returns ``(model, example_inputs)``, the form ``unf spec MODULE:FACTORY`` takes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MLP", "SmallCNN", "TinyResNet", "TransformerLM", "mlp_example", "cnn_example", "resnet_example",
           "transformer_example"]


class MLP(nn.Module):
    """Fully connected network ``sizes[0] -> ... -> sizes[-1]`` with an activation between layers."""

    def __init__(self, sizes: tuple[int, ...] = (64, 32, 10), bias: bool = True, act: type[nn.Module] = nn.ReLU):
        super().__init__()
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b, bias=bias))
            if i < len(sizes) - 2:
                layers.append(act())
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class SmallCNN(nn.Module):
    """Conv-BN-ReLU-pool blocks, then flatten and a linear classifier (spatial axes kept to the head)."""

    def __init__(self, in_channels: int = 3, widths: tuple[int, ...] = (8, 16), classes: int = 10,
                 image_size: int = 8):
        super().__init__()
        blocks: list[nn.Module] = []
        c = in_channels
        for w in widths:
            blocks += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2)]
            c = w
        self.features = nn.Sequential(*blocks)
        side = image_size // 2 ** len(widths)
        self.head = nn.Linear(c * side * side, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:  # 1x1 projection shortcut
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class TinyResNet(nn.Module):
    """A ResNet with identity and 1x1-projection shortcuts, global average pooling and a linear head."""

    def __init__(self, in_channels: int = 3, widths: tuple[int, ...] = (8, 16), classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, c = [], widths[0]
        for i, w in enumerate(widths):
            blocks += [_Block(c, w, 1 if i == 0 else 2), _Block(w, w, 1)]
            c = w
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


class _Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=-1)
        q, k, v = (t.view(B, T, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class _TransformerBlock(nn.Module):
    def __init__(self, d: int, heads: int, mlp: int):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(d), _Attention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, mlp), nn.GELU(), nn.Linear(mlp, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TransformerLM(nn.Module):
    """A pre-LN causal transformer language model (nanoGPT-style, fused qkv, learned positions)."""

    def __init__(self, vocab: int = 50, d: int = 32, heads: int = 4, layers: int = 2, mlp: int = 64,
                 context: int = 16):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(context, d)
        self.blocks = nn.ModuleList(_TransformerBlock(d, heads, mlp) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        for p in self.parameters():  # scaled init keeps logits O(1)
            if p.dim() > 1:
                nn.init.normal_(p, std=1 / math.sqrt(p.shape[-1]))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def mlp_example() -> tuple[nn.Module, torch.Tensor]:
    return MLP((64, 32, 10)), torch.randn(4, 64)


def cnn_example() -> tuple[nn.Module, torch.Tensor]:
    return SmallCNN(), torch.randn(2, 3, 8, 8)


def resnet_example() -> tuple[nn.Module, torch.Tensor]:
    return TinyResNet(), torch.randn(2, 3, 8, 8)


def transformer_example() -> tuple[nn.Module, torch.Tensor]:
    return TransformerLM(), torch.randint(0, 50, (2, 16))
