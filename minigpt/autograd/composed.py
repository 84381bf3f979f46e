"""The fused ops' maths composed from primitive ops only: references for tests and benchmarks.

Each function has the signature of its fused twin in minigpt.functional, so a model can be run on
either (tests check that training gives the same losses; bench_ops.py compares time and memory).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from minigpt.autograd import ops
from minigpt.autograd.fused import normal_cdf
from minigpt.autograd.tensor import Tensor


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    out = x @ weight.T
    return out if bias is None else out + bias


def softmax(x: Tensor, dim: int = -1) -> Tensor:
    e = (x - x.max(dim=dim, keepdim=True)).exp()
    return e / e.sum(dim=dim, keepdim=True)


def log_softmax(x: Tensor, dim: int = -1) -> Tensor:
    shifted = x - x.max(dim=dim, keepdim=True)
    return shifted - shifted.exp().sum(dim=dim, keepdim=True).log()


def cross_entropy(logits: Tensor, targets: Any, ignore_index: int = -1) -> Tensor:
    targets = np.asarray(targets.data if isinstance(targets, Tensor) else targets).reshape(-1)
    flat = logits.reshape(-1, logits.shape[-1])
    keep = np.flatnonzero(targets != ignore_index)
    return -log_softmax(flat)[keep, targets[keep]].mean()


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    centered = x - x.mean(dim=-1, keepdim=True)
    var = (centered * centered).mean(dim=-1, keepdim=True)
    out = centered / (var + eps).sqrt() * weight
    return out if bias is None else out + bias


def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    if approximate == "none":  # x Φ(x); Φ has no primitive, so its value enters as a constant and its
        # derivative, the normal pdf, through a term that is 0 in value: (x - x.detach()) x φ(x)
        cdf = Tensor(normal_cdf(x.data))
        x_pdf = Tensor(x.data * np.exp(-0.5 * x.data * x.data) / math.sqrt(2 * math.pi))
        return x * cdf + (x - x.detach()) * x_pdf
    return 0.5 * x * (1 + (math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)).tanh())


def embedding(ids: Any, weight: Tensor) -> Tensor:
    return weight[ids.data if isinstance(ids, Tensor) else ids]


def scaled_dot_product_attention(
    q: Tensor, k: Tensor, v: Tensor, is_causal: bool = True, dropout_p: float = 0.0, rng: Any = None
) -> Tensor:
    if dropout_p:
        raise NotImplementedError("the composed reference has no attention dropout")
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    if is_causal:
        tq, tk = q.shape[-2], k.shape[-2]
        att = ops.masked_fill(att, np.triu(np.ones((tq, tk), dtype=bool), k=tk - tq + 1), -np.inf)
    return softmax(att, dim=-1) @ v
