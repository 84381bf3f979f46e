"""Public functional ops, like torch.nn.functional."""

from minigpt.autograd.fused import (
    cross_entropy,
    dropout,
    embedding,
    gelu,
    layer_norm,
    linear,
    log_softmax,
    scaled_dot_product_attention,
    softmax,
)
from minigpt.autograd.ops import relu, sigmoid, tanh

__all__ = [
    "cross_entropy",
    "dropout",
    "embedding",
    "gelu",
    "layer_norm",
    "linear",
    "log_softmax",
    "relu",
    "scaled_dot_product_attention",
    "sigmoid",
    "softmax",
    "tanh",
]
