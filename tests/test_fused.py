"""Fused ops: gradchecks over several shapes, and agreement with the same maths composed from primitives."""

import math

import numpy as np
import pytest

import minigpt
from minigpt import functional as F
from minigpt.autograd import gradcheck

rng = np.random.default_rng(1)


def rand(*shape, requires_grad=True, scale=1.0):
    return minigpt.tensor(rng.standard_normal(shape) * scale, requires_grad=requires_grad)


@pytest.mark.parametrize("x_shape", [(4,), (3, 4), (2, 3, 4)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_gradcheck(x_shape, bias):
    w, b = rand(5, 4), (rand(5) if bias else None)
    args = [rand(*x_shape), w] + ([b] if bias else [])
    assert gradcheck(F.linear, args)


def test_linear_matches_composition_and_checks_shapes():
    x, w, b = rand(2, 3, 4), rand(5, 4), rand(5)
    np.testing.assert_allclose(F.linear(x, w, b).data, (x @ w.T + b).data, rtol=1e-12)
    with pytest.raises(ValueError, match=r"linear.*4 features.*\(5, 3\)"):
        F.linear(x, rand(5, 3))


@pytest.mark.parametrize("shape,dim", [((5,), 0), ((3, 4), -1), ((3, 4), 0), ((2, 3, 4), 1)])
def test_softmax_and_log_softmax_gradcheck(shape, dim):
    assert gradcheck(lambda t: F.softmax(t, dim), [rand(*shape)])
    assert gradcheck(lambda t: F.log_softmax(t, dim), [rand(*shape)])


def test_softmax_matches_composition_and_is_stable():
    x = rand(3, 4, scale=50)
    e = (x - x.max(dim=-1, keepdim=True)).exp()
    np.testing.assert_allclose(F.softmax(x).data, (e / e.sum(dim=-1, keepdim=True)).data, rtol=1e-12)
    np.testing.assert_allclose(F.log_softmax(x).data, np.log(F.softmax(x).data), rtol=1e-9, atol=1e-9)
    big = minigpt.tensor(np.array([1000.0, 0.0]))
    assert np.isfinite(F.log_softmax(big).data).all()


@pytest.mark.parametrize("shape", [(4, 5), (2, 3, 7)])
def test_cross_entropy_gradcheck(shape):
    targets = rng.integers(0, shape[-1], size=shape[:-1])
    assert gradcheck(lambda t: F.cross_entropy(t, targets), [rand(*shape)])


def test_cross_entropy_with_ignored_targets():
    logits = rand(6, 5)
    targets = np.array([1, -1, 4, 0, -1, 2])
    assert gradcheck(lambda t: F.cross_entropy(t, targets), [logits])
    keep = targets != -1
    ref = -F.log_softmax(logits).data[np.arange(6), np.where(keep, targets, 0)][keep].mean()
    assert abs(F.cross_entropy(logits, targets).item() - ref) < 1e-12
    assert gradcheck(lambda t: F.cross_entropy(t, np.array([0, 3, 3, 9, 1, 9]), ignore_index=9), [logits])
    logits.grad = None
    F.cross_entropy(logits, targets).backward()
    assert (logits.grad[~keep] == 0).all()


def test_cross_entropy_rejects_bad_targets():
    with pytest.raises(IndexError, match="outside"):
        F.cross_entropy(rand(2, 3), np.array([0, 3]))
    with pytest.raises(ValueError, match="rows"):
        F.cross_entropy(rand(2, 3), np.array([0, 1, 2]))


def test_cross_entropy_float32_stays_float32():
    logits = minigpt.tensor(rng.standard_normal((4, 3)).astype(np.float32), requires_grad=True)
    loss = F.cross_entropy(logits, np.array([0, 1, 2, 0]))
    loss.backward()
    assert loss.dtype == np.float32 and logits.grad.dtype == np.float32


@pytest.mark.parametrize("shape", [(5,), (3, 5), (2, 3, 5)])
@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_gradcheck(shape, bias):
    args = [rand(*shape), rand(shape[-1])] + ([rand(shape[-1])] if bias else [])
    assert gradcheck(F.layer_norm, args)


def test_layer_norm_matches_composition():
    x, w, b = rand(2, 3, 6), rand(6), rand(6)
    mu = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True, unbiased=False)
    ref = (x - mu) / (var + 1e-5).sqrt() * w + b
    np.testing.assert_allclose(F.layer_norm(x, w, b).data, ref.data, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", [(7,), (3, 4), (2, 3, 4)])
def test_gelu_gradcheck(shape):
    assert gradcheck(F.gelu, [rand(*shape, scale=2)])


def test_gelu_matches_tanh_formula():
    x = rand(50, scale=3)
    d = x.data
    ref = 0.5 * d * (1 + np.tanh(math.sqrt(2 / math.pi) * (d + 0.044715 * d**3)))
    np.testing.assert_allclose(F.gelu(x, approximate="tanh").data, ref, rtol=1e-12, atol=1e-15)  # 1 + tanh cancels


@pytest.mark.parametrize("ids_shape", [(6,), (2, 3), (1, 1)])
def test_embedding_gradcheck_with_repeated_ids(ids_shape):
    ids = rng.integers(0, 3, size=ids_shape)  # 5 rows, only 3 used: repeats guaranteed
    assert gradcheck(lambda w: F.embedding(ids, w), [rand(5, 4)])


def test_embedding_backward_for_a_large_vocabulary_uses_segment_sums():
    w = rand(2000, 3)
    ids = np.array([[5, 1999, 5], [0, 5, 1999]])
    F.embedding(ids, w).sum().backward()
    counts = np.bincount(ids.ravel(), minlength=2000)
    np.testing.assert_allclose(w.grad, np.repeat(counts[:, None], 3, axis=1).astype(float))


def test_embedding_errors():
    with pytest.raises(IndexError, match="out of range"):
        F.embedding(np.array([0, 5]), rand(5, 2))
    with pytest.raises(IndexError, match="out of range"):
        F.embedding(np.array([-1]), rand(5, 2))
    with pytest.raises(TypeError, match="integers"):
        F.embedding(np.array([0.5]), rand(5, 2))


def test_dropout():
    x = rand(200, 100)
    assert F.dropout(x, 0.5, training=False) is x
    gen = np.random.default_rng(3)
    y = F.dropout(x, 0.3, training=True, rng=gen)
    kept = y.data != 0
    assert 0.65 < kept.mean() < 0.75
    np.testing.assert_allclose(y.data[kept], x.data[kept] / 0.7)
    assert gradcheck(lambda t: F.dropout(t, 0.3, True, np.random.default_rng(4)), [rand(3, 4)])
    with pytest.raises(ValueError, match="p must be"):
        F.dropout(x, 1.5)


def _attention_reference(q, k, v, is_causal):
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    if is_causal:
        tq, tk = q.shape[-2], k.shape[-2]
        att = att.masked_fill(np.triu(np.ones((tq, tk), dtype=bool), k=tk - tq + 1), -np.inf)
    return F.softmax(att, dim=-1) @ v


@pytest.mark.parametrize("shape", [(1, 1, 1, 3), (2, 2, 5, 3), (1, 3, 4, 2)])
@pytest.mark.parametrize("is_causal", [True, False])
def test_attention_gradcheck(shape, is_causal):
    q, k, v = rand(*shape), rand(*shape), rand(*shape)
    assert gradcheck(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=is_causal), [q, k, v])
    out = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    np.testing.assert_allclose(out.data, _attention_reference(q, k, v, is_causal).data, rtol=1e-10, atol=1e-12)


def test_attention_with_fewer_queries_than_keys_is_bottom_right_causal():
    q, k, v = rand(1, 2, 2, 3), rand(1, 2, 5, 3), rand(1, 2, 5, 3)
    assert gradcheck(F.scaled_dot_product_attention, [q, k, v])
    out = F.scaled_dot_product_attention(q, k, v)
    np.testing.assert_allclose(out.data, _attention_reference(q, k, v, True).data, rtol=1e-10)
    # The last query sees every key: same as no mask.
    full = F.scaled_dot_product_attention(q, k, v, is_causal=False)
    np.testing.assert_allclose(out.data[..., -1, :], full.data[..., -1, :], rtol=1e-12)


def test_attention_is_causal():
    q, k, v = rand(1, 1, 6, 4), rand(1, 1, 6, 4), rand(1, 1, 6, 4)
    out = F.scaled_dot_product_attention(q, k, v).data
    k.data[..., 4:, :] += 10.0
    v.data[..., 4:, :] -= 3.0
    out2 = F.scaled_dot_product_attention(q, k, v).data
    np.testing.assert_allclose(out[..., :4, :], out2[..., :4, :], rtol=1e-12)


def test_attention_dropout_gradcheck():
    q, k, v = rand(1, 2, 4, 3), rand(1, 2, 4, 3), rand(1, 2, 4, 3)

    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.25, rng=np.random.default_rng(7))

    assert gradcheck(f, [q, k, v])


@pytest.mark.parametrize("tq,tk", [(7, 7), (8, 8), (5, 9)])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_causal_attention_in_query_chunks(monkeypatch, tq, tk, dropout_p):
    from minigpt.autograd import fused

    monkeypatch.setattr(fused, "CAUSAL_CHUNK", 2)  # several chunks even at these tiny sizes
    assert len(fused._query_chunks(tq, tk, True)) > 1
    q, k, v = rand(2, 2, tq, 3), rand(2, 2, tk, 3), rand(2, 2, tk, 3)

    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, rng=np.random.default_rng(3))

    assert gradcheck(f, [q, k, v])
    if dropout_p == 0:
        np.testing.assert_allclose(f(q, k, v).data, _attention_reference(q, k, v, True).data, rtol=1e-10)
