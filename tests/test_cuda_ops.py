"""The op suite on CuPy arrays: every op's forward and backward on the GPU match the CPU.

Skipped cleanly when CuPy or a GPU is absent (CI runs on CPU machines).
"""

import numpy as np
import pytest

import minigpt
from minigpt import functional as F

pytestmark = pytest.mark.gpu  # skipped without CuPy and a GPU (tests/conftest.py)

rng = np.random.default_rng(0)
IDS = rng.integers(0, 7, size=(2, 5))
TARGETS = np.array([1, -1, 4, 0, 2, 6, -1, 3, 3, 5])
MASK = np.triu(np.ones((5, 7), dtype=bool), k=1)

CASES = {
    "add_broadcast": ([(2, 5, 7), (7,)], lambda a, b: a + b),
    "mul_div_pow": ([(5, 7), (5, 7)], lambda a, b: a * b / (b * b + 1) + (a * a + 1) ** 0.5),
    "scalar_ops": ([(5, 7)], lambda a: 2 * a - 1 + 3 / (a * a + 1) + 2.0**a),
    "unary": ([(5, 7)], lambda a: a.exp() + (a * a + 1).log() + (a * a + 1).sqrt() + a.tanh() + a.sigmoid() + a.relu()),
    "matmul": ([(2, 5, 7), (7, 3)], lambda a, b: a @ b),
    "reductions": ([(2, 5, 7)], lambda a: a.sum(dim=1) + a.mean(dim=1) + a.max(dim=1) + a.var(dim=1)),
    "shape_ops": ([(2, 5, 7)], lambda a: a.reshape(10, 7).permute(1, 0).transpose(0, 1)[3:, ::2]),
    "getitem_repeats": ([(5, 7)], lambda a: a[np.array([0, 0, 3, 3, 3])]),
    "cat_stack_split": (
        [(5, 7), (5, 7)],
        lambda a, b: minigpt.cat([minigpt.stack([a, b], 1)[:, 1], a.split([2, 3])[1]]),
    ),
    "where": ([(5, 7), (5, 7)], lambda a, b: minigpt.where(MASK, a, b).masked_fill(~MASK, 0.5)),
    "linear": ([(2, 5, 7), (3, 7), (3,)], F.linear),
    "softmax": ([(5, 7)], lambda a: F.softmax(a) + F.log_softmax(a, 0)),
    "cross_entropy": ([(2, 5, 7)], lambda a: F.cross_entropy(a, TARGETS.reshape(2, 5))),
    "layer_norm": ([(2, 5, 7), (7,), (7,)], F.layer_norm),
    "gelu": ([(5, 7)], F.gelu),
    "embedding": ([(7, 4)], lambda w: F.embedding(IDS, w)),
    "attention": ([(2, 3, 5, 4)] * 3, F.scaled_dot_product_attention),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_op_matches_cpu(name):
    shapes, fn = CASES[name]
    datas = [rng.standard_normal(s) for s in shapes]
    results = []
    for device in ("cpu", "cuda"):
        inputs = [minigpt.tensor(d, requires_grad=True, device=device) for d in datas]
        out = fn(*inputs)
        assert out.device == device
        weights = minigpt.tensor(np.cos(np.arange(out.numel())).reshape(out.shape), device=device)
        (out * weights).sum().backward()
        results.append([out.numpy()] + [t.grad.get() if device == "cuda" else t.grad for t in inputs])
    for cpu, gpu in zip(*results):
        np.testing.assert_allclose(gpu, cpu, rtol=1e-9, atol=1e-11)


def test_mixing_devices_raises():
    a = minigpt.tensor(np.ones(3))
    b = minigpt.tensor(np.ones(3), device="cuda")
    with pytest.raises(RuntimeError, match="different devices"):
        a + b


def test_dropout_on_gpu_with_a_numpy_generator():
    x = minigpt.tensor(np.ones((100, 100)), device="cuda")
    y = F.dropout(x, 0.5, training=True, rng=np.random.default_rng(0))
    assert y.device == "cuda" and 0.4 < float((y.data != 0).mean()) < 0.6
