"""`flax_registry.nn`'s torch.nn-compatible layers as NNX modules.

Each layer class takes its PyTorch constructor arguments plus `rngs=` (an `nnx.Rngs`, for the
initial values and for dropout), runs `flax_registry.nn`'s own implementation (one copy of the
math for both front-ends), starts in training mode as a torch module does, and follows
`model.train()` / `model.eval()`. The containers are NNX modules of their own, so their
children may be any NNX modules; they name them `0`, `1`, ... as `torch.nn.Sequential` does.
"""

from __future__ import annotations

from .. import nn as _nn
from .._nnx.containers import ModuleDict as ModuleDict
from .._nnx.containers import ModuleList as ModuleList
from .._nnx.containers import Sequential as Sequential
from .._nnx.lifted import LinenLayer as LinenLayer
from .._nnx.lifted import lift as lift

CELU = lift(_nn.CELU)
ELU = lift(_nn.ELU)
GELU = lift(_nn.GELU)
GLU = lift(_nn.GLU)
SELU = lift(_nn.SELU)
Hardsigmoid = lift(_nn.Hardsigmoid)
Hardswish = lift(_nn.Hardswish)
Hardtanh = lift(_nn.Hardtanh)
LeakyReLU = lift(_nn.LeakyReLU)
LogSigmoid = lift(_nn.LogSigmoid)
LogSoftmax = lift(_nn.LogSoftmax)
Mish = lift(_nn.Mish)
PReLU = lift(_nn.PReLU)
ReLU = lift(_nn.ReLU)
ReLU6 = lift(_nn.ReLU6)
Sigmoid = lift(_nn.Sigmoid)
SiLU = lift(_nn.SiLU)
Softmax = lift(_nn.Softmax)
Softmin = lift(_nn.Softmin)
Softplus = lift(_nn.Softplus)
Softsign = lift(_nn.Softsign)
Tanh = lift(_nn.Tanh)
Tanhshrink = lift(_nn.Tanhshrink)
Threshold = lift(_nn.Threshold)
MultiheadAttention = lift(_nn.MultiheadAttention)
BatchNorm1d = lift(_nn.BatchNorm1d)
BatchNorm2d = lift(_nn.BatchNorm2d)
BatchNorm3d = lift(_nn.BatchNorm3d)
Conv1d = lift(_nn.Conv1d)
Conv2d = lift(_nn.Conv2d)
Conv3d = lift(_nn.Conv3d)
ConvTranspose1d = lift(_nn.ConvTranspose1d)
ConvTranspose2d = lift(_nn.ConvTranspose2d)
ConvTranspose3d = lift(_nn.ConvTranspose3d)
Dropout = lift(_nn.Dropout)
Dropout1d = lift(_nn.Dropout1d)
Dropout2d = lift(_nn.Dropout2d)
Dropout3d = lift(_nn.Dropout3d)
Embedding = lift(_nn.Embedding)
InstanceNorm1d = lift(_nn.InstanceNorm1d)
InstanceNorm2d = lift(_nn.InstanceNorm2d)
InstanceNorm3d = lift(_nn.InstanceNorm3d)
Flatten = lift(_nn.Flatten)
Identity = lift(_nn.Identity)
Linear = lift(_nn.Linear)
Unflatten = lift(_nn.Unflatten)
GroupNorm = lift(_nn.GroupNorm)
LayerNorm = lift(_nn.LayerNorm)
AdaptiveAvgPool1d = lift(_nn.AdaptiveAvgPool1d)
AdaptiveAvgPool2d = lift(_nn.AdaptiveAvgPool2d)
AdaptiveMaxPool1d = lift(_nn.AdaptiveMaxPool1d)
AdaptiveMaxPool2d = lift(_nn.AdaptiveMaxPool2d)
AvgPool1d = lift(_nn.AvgPool1d)
AvgPool2d = lift(_nn.AvgPool2d)
AvgPool3d = lift(_nn.AvgPool3d)
MaxPool1d = lift(_nn.MaxPool1d)
MaxPool2d = lift(_nn.MaxPool2d)
MaxPool3d = lift(_nn.MaxPool3d)
GRU = lift(_nn.GRU)
LSTM = lift(_nn.LSTM)
TransformerEncoder = lift(_nn.TransformerEncoder)
TransformerEncoderLayer = lift(_nn.TransformerEncoderLayer)

__all__ = [
    "CELU",
    "ELU",
    "GELU",
    "GLU",
    "GRU",
    "LSTM",
    "SELU",
    "AdaptiveAvgPool1d",
    "AdaptiveAvgPool2d",
    "AdaptiveMaxPool1d",
    "AdaptiveMaxPool2d",
    "AvgPool1d",
    "AvgPool2d",
    "AvgPool3d",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "ConvTranspose1d",
    "ConvTranspose2d",
    "ConvTranspose3d",
    "Dropout",
    "Dropout1d",
    "Dropout2d",
    "Dropout3d",
    "Embedding",
    "Flatten",
    "GroupNorm",
    "Hardsigmoid",
    "Hardswish",
    "Hardtanh",
    "Identity",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "LeakyReLU",
    "Linear",
    "LinenLayer",
    "LogSigmoid",
    "LogSoftmax",
    "MaxPool1d",
    "MaxPool2d",
    "MaxPool3d",
    "Mish",
    "ModuleDict",
    "ModuleList",
    "MultiheadAttention",
    "PReLU",
    "ReLU",
    "ReLU6",
    "Sequential",
    "SiLU",
    "Sigmoid",
    "Softmax",
    "Softmin",
    "Softplus",
    "Softsign",
    "Tanh",
    "Tanhshrink",
    "Threshold",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "Unflatten",
    "lift",
]
