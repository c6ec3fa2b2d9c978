"""Line-by-line ports of `tests/nn/torch_models.py` with `flax_registry.nn`.

Same class names, same submodule names in the same order, same forward. What changes is what
must change in flax: constructor arguments are dataclass fields, `__init__` is `setup()`,
`forward` is `__call__` with an explicit `train` flag passed on to the layers that use it
(BatchNorm, Dropout, LSTM, attention), and `torch.*` tensor functions are `jnp.*`.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

import flax_registry as fr
from flax_registry import nn as frnn

Array = jax.Array

# --- ResNet-18 (torchvision's topology: BasicBlock, layer1..layer4, downsample Sequential) ------


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> frnn.Conv2d:
    return frnn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> frnn.Conv2d:
    return frnn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class BasicBlock(fr.Module):
    inplanes: int
    planes: int
    stride: int = 1
    downsample: nn.Module | None = None

    def setup(self) -> None:
        self.conv1 = conv3x3(self.inplanes, self.planes, self.stride)
        self.bn1 = frnn.BatchNorm2d(self.planes)
        self.relu = frnn.ReLU(inplace=True)
        self.conv2 = conv3x3(self.planes, self.planes)
        self.bn2 = frnn.BatchNorm2d(self.planes)
        if self.downsample is not None:  # a constructor argument that is also a child
            self.register_module("downsample", self.downsample)

    def __call__(self, x: Array, *, train: bool = False) -> Array:
        identity = x
        out = self.relu(self.bn1(self.conv1(x), train=train))
        out = self.bn2(self.conv2(out), train=train)
        if self.downsample is not None:
            identity = self.downsample(x, train=train)
        return self.relu(out + identity)


class ResNet(fr.Module):
    layers: tuple[int, ...] = (2, 2, 2, 2)
    widths: tuple[int, ...] = (64, 128, 256, 512)
    num_classes: int = 1000

    def setup(self) -> None:
        widths, layers = self.widths, self.layers
        self.inplanes = widths[0]
        self.conv1 = frnn.Conv2d(3, self.inplanes, 7, stride=2, padding=3, bias=False)
        self.bn1 = frnn.BatchNorm2d(self.inplanes)
        self.relu = frnn.ReLU(inplace=True)
        self.maxpool = frnn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(widths[0], layers[0])
        self.layer2 = self._make_layer(widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(widths[3], layers[3], stride=2)
        self.avgpool = frnn.AdaptiveAvgPool2d((1, 1))
        self.fc = frnn.Linear(widths[3], self.num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> frnn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = frnn.Sequential(
                conv1x1(self.inplanes, planes, stride), frnn.BatchNorm2d(planes)
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        for _ in range(1, blocks):
            layers.append(BasicBlock(self.inplanes, planes))
        return frnn.Sequential(*layers)

    def __call__(self, x: Array, *, train: bool = False) -> Array:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x), train=train)))
        x = self.layer1(x, train=train)
        x = self.layer4(self.layer3(self.layer2(x, train=train), train=train), train=train)
        x = self.avgpool(x).reshape(x.shape[0], -1)  # torch.flatten(x, 1)
        return self.fc(x)


# --- MobileNet-style depthwise-separable blocks -------------------------------------------------


class DepthwiseSeparable(fr.Module):
    in_channels: int
    out_channels: int
    stride: int = 1

    def setup(self) -> None:
        c = self.in_channels
        self.depthwise = frnn.Conv2d(c, c, 3, self.stride, 1, groups=c, bias=False)
        self.bn1 = frnn.BatchNorm2d(c)
        self.relu1 = frnn.ReLU6(inplace=True)
        self.pointwise = frnn.Conv2d(c, self.out_channels, 1, bias=False)
        self.bn2 = frnn.BatchNorm2d(self.out_channels)
        self.relu2 = frnn.ReLU6(inplace=True)

    def __call__(self, x: Array, *, train: bool = False) -> Array:
        x = self.relu1(self.bn1(self.depthwise(x), train=train))
        return self.relu2(self.bn2(self.pointwise(x), train=train))


class MobileNet(fr.Module):
    width: int = 8
    num_classes: int = 10

    def setup(self) -> None:
        width = self.width
        self.features = frnn.Sequential(
            frnn.Sequential(
                frnn.Conv2d(3, width, 3, 2, 1, bias=False), frnn.BatchNorm2d(width), frnn.ReLU6()
            ),
            DepthwiseSeparable(width, 2 * width),
            DepthwiseSeparable(2 * width, 4 * width, stride=2),
        )
        self.pool = frnn.AdaptiveAvgPool2d(1)
        self.classifier = frnn.Linear(4 * width, self.num_classes)

    def __call__(self, x: Array, *, train: bool = False) -> Array:
        x = self.pool(self.features(x, train=train))
        return self.classifier(x.reshape(x.shape[0], -1))


# --- U-Net (ConvTranspose2d upsampling, skip connections by concatenation) ----------------------


class DoubleConv(fr.Module):
    in_channels: int
    out_channels: int

    def setup(self) -> None:
        cin, cout = self.in_channels, self.out_channels
        self.net = frnn.Sequential(
            frnn.Conv2d(cin, cout, 3, padding=1, bias=False),
            frnn.BatchNorm2d(cout),
            frnn.ReLU(inplace=True),
            frnn.Conv2d(cout, cout, 3, padding=1, bias=False),
            frnn.BatchNorm2d(cout),
            frnn.ReLU(inplace=True),
        )

    def __call__(self, x: Array, *, train: bool = False) -> Array:
        return self.net(x, train=train)


class UNet(fr.Module):
    in_channels: int = 3
    num_classes: int = 2
    width: int = 8

    def setup(self) -> None:
        w = self.width
        self.inc = DoubleConv(self.in_channels, w)
        self.down1 = frnn.Sequential(frnn.MaxPool2d(2), DoubleConv(w, 2 * w))
        self.down2 = frnn.Sequential(frnn.MaxPool2d(2), DoubleConv(2 * w, 4 * w))
        self.up1 = frnn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2)
        self.conv1 = DoubleConv(4 * w, 2 * w)
        self.up2 = frnn.ConvTranspose2d(2 * w, w, 2, stride=2)
        self.conv2 = DoubleConv(2 * w, w)
        self.outc = frnn.Conv2d(w, self.num_classes, 1)

    def __call__(self, x: Array, *, train: bool = False) -> Array:
        x1 = self.inc(x, train=train)
        x2 = self.down1(x1, train=train)
        x3 = self.down2(x2, train=train)
        u = self.conv1(jnp.concatenate([x2, self.up1(x3)], axis=1), train=train)
        u = self.conv2(jnp.concatenate([x1, self.up2(u)], axis=1), train=train)
        return self.outc(u)


# --- Transformer encoder classifier -------------------------------------------------------------


def sinusoidal(max_len: int, d_model: int) -> Array:
    position = jnp.arange(max_len, dtype=jnp.float32)[:, None]
    div = jnp.exp(jnp.arange(0, d_model, 2, dtype=jnp.float32) * (-math.log(1e4) / d_model))
    pe = jnp.zeros((max_len, d_model))
    pe = pe.at[:, 0::2].set(jnp.sin(position * div))
    return pe.at[:, 1::2].set(jnp.cos(position * div))


class TransformerClassifier(fr.Module):
    vocab: int
    d_model: int
    nhead: int
    num_layers: int
    num_classes: int
    max_len: int

    def setup(self) -> None:
        d_model = self.d_model
        self.embedding = frnn.Embedding(self.vocab, d_model, padding_idx=0)
        self.register_buffer("pe", sinusoidal(self.max_len, d_model), persistent=False)
        layer = frnn.TransformerEncoderLayer(
            d_model, self.nhead, dim_feedforward=2 * d_model, dropout=0.1, batch_first=True
        )
        self.encoder = frnn.TransformerEncoder(
            layer, self.num_layers, norm=frnn.LayerNorm(d_model), enable_nested_tensor=False
        )
        self.classifier = frnn.Linear(d_model, self.num_classes)

    def __call__(self, tokens: Array, *, train: bool = False) -> Array:
        pad = tokens == 0
        x = self.embedding(tokens) * math.sqrt(self.d_model) + self.pe[: tokens.shape[1]]
        x = self.encoder(x, src_key_padding_mask=pad, train=train)
        keep = (~pad)[..., None].astype(x.dtype)
        return self.classifier((x * keep).sum(1) / keep.sum(1))


# --- bidirectional 2-layer LSTM tagger ----------------------------------------------------------


class LSTMTagger(fr.Module):
    vocab: int
    embed_dim: int
    hidden: int
    num_tags: int

    def setup(self) -> None:
        self.embedding = frnn.Embedding(self.vocab, self.embed_dim)
        self.lstm = frnn.LSTM(
            self.embed_dim,
            self.hidden,
            num_layers=2,
            bidirectional=True,
            batch_first=True,
            dropout=0.1,
        )
        self.head = frnn.Linear(2 * self.hidden, self.num_tags)

    def __call__(self, tokens: Array, *, train: bool = False) -> Array:
        out, _ = self.lstm(self.embedding(tokens), train=train)
        return self.head(out)


# --- GPT-style decoder with a tied output layer -------------------------------------------------


class GPTBlock(fr.Module):
    d_model: int
    nhead: int
    dropout: float

    def setup(self) -> None:
        d_model = self.d_model
        self.ln1 = frnn.LayerNorm(d_model)
        self.attn = frnn.MultiheadAttention(
            d_model, self.nhead, dropout=self.dropout, batch_first=True
        )
        self.ln2 = frnn.LayerNorm(d_model)
        self.mlp = frnn.Sequential(
            frnn.Linear(d_model, 4 * d_model),
            frnn.GELU(),
            frnn.Linear(4 * d_model, d_model),
            frnn.Dropout(self.dropout),
        )

    def __call__(self, x: Array, mask: Array, *, train: bool = False) -> Array:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False, train=train)[0]
        return x + self.mlp(self.ln2(x), train=train)


class GPT(fr.Module):
    vocab: int
    d_model: int
    nhead: int
    num_layers: int
    max_len: int

    def setup(self) -> None:
        d_model = self.d_model
        self.tok_emb = frnn.Embedding(self.vocab, d_model)
        self.pos_emb = frnn.Embedding(self.max_len, d_model)
        self.drop = frnn.Dropout(0.1)
        self.blocks = frnn.ModuleList(
            [GPTBlock(d_model, self.nhead, 0.1) for _ in range(self.num_layers)]
        )
        self.ln_f = frnn.LayerNorm(d_model)
        self.lm_head = frnn.Linear(d_model, self.vocab, bias=False)
        self.tie_parameters("lm_head.weight", "tok_emb.weight")  # weight tying
        causal = jnp.triu(jnp.ones((self.max_len, self.max_len), dtype=bool), k=1)
        self.register_buffer("causal_mask", causal, persistent=False)

    def __call__(self, tokens: Array, *, train: bool = False) -> Array:
        t = tokens.shape[1]
        x = self.drop(self.tok_emb(tokens) + self.pos_emb(jnp.arange(t)), train=train)
        mask = self.causal_mask[:t, :t]
        for block in self.blocks:
            x = block(x, mask, train=train)
        return self.lm_head(self.ln_f(x))
