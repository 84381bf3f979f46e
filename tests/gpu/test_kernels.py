"""The CUDA kernels of minigpt.autograd.kernels_cuda against their NumPy twins in fused.py and optim.py.

Every test feeds the same random inputs to an op on NumPy arrays and on CuPy arrays (where fused.py
and optim.py dispatch to the kernels) and compares them: relative error max|gpu - cpu| / max|cpu|
at most 1e-5 in float32 and 1e-12 in float64. A spy checks that the kernels really ran. Ends with
a tiny GPT trained 3 AdamW steps on each device from the same weights.

Skipped cleanly without CuPy or a GPU (tests/test_kernels_cuda_cpu.py covers that side).
"""

import os

import numpy as np
import pytest

import minigpt
from minigpt.autograd import backend, fused, kernels_cuda
from minigpt.gpt import GPT, GPTConfig
from minigpt.optim import AdamW, clip_grad_norm_

pytestmark = pytest.mark.gpu  # skipped without CuPy and a GPU (tests/conftest.py)

DTYPES = [np.float32, np.float64]
TOL = {np.float32: 1e-5, np.float64: 1e-12}
KERNEL_FUNCTIONS = kernels_cuda.KERNEL_FUNCTIONS


@pytest.fixture(autouse=True)
def calls(monkeypatch):
    """Kernels on (whatever the environment says), and the names of the kernel functions called."""
    monkeypatch.delenv(kernels_cuda.DISABLE_ENV, raising=False)
    seen: list[str] = []
    for name in KERNEL_FUNCTIONS:
        fn = getattr(kernels_cuda, name)

        def spy(*args, _fn=fn, _name=name, **kwargs):
            seen.append(_name)
            return _fn(*args, **kwargs)

        monkeypatch.setattr(kernels_cuda, name, spy)
    return seen


def gpu(a):
    return backend.to_device(a, "cuda") if isinstance(a, np.ndarray) else a


def rel_err(got, ref) -> float:
    got, ref = backend.to_numpy(got), np.asarray(ref)
    assert got.shape == ref.shape and got.dtype == ref.dtype, (got.shape, got.dtype, ref.shape, ref.dtype)
    if ref.size == 0:
        return 0.0
    scale = max(float(np.abs(ref).max()), float(np.finfo(ref.dtype).tiny))
    return float(np.abs(got.astype(np.float64) - ref).max()) / scale


def assert_close(got, ref, dtype, what=""):
    err = rel_err(got, ref)
    assert err <= TOL[dtype], f"{what}: relative error {err:.3g} > {TOL[dtype]:g}"


def run_op(cls, arrays, **kwargs):
    """Forward and backward of one fused op on raw arrays: (out, tuple of input gradients)."""
    fn = cls()
    fn.needs_input_grad = [True] * len(arrays)
    out = fn.forward(*arrays, **kwargs)
    g = np.cos(np.arange(out.size) * 0.7).reshape(out.shape).astype(out.dtype)
    grads = fn.backward(backend.to_device(g, backend.device_of(out)))
    return out, grads if isinstance(grads, tuple) else (grads,)


def compare_op(cls, arrays, dtype, **kwargs):
    cpu_out, cpu_grads = run_op(cls, arrays, **kwargs)
    gpu_out, gpu_grads = run_op(cls, [gpu(a) for a in arrays], **{k: gpu(v) for k, v in kwargs.items()})
    assert backend.device_of(gpu_out) == "cuda"
    assert_close(gpu_out, cpu_out, dtype, f"{cls.__name__} forward")
    for i, (g_gpu, g_cpu) in enumerate(zip(gpu_grads, cpu_grads)):
        if g_cpu is None:
            assert g_gpu is None
        else:
            assert_close(g_gpu, g_cpu, dtype, f"{cls.__name__} gradient {i}")
    return cpu_out, gpu_out, cpu_grads, gpu_grads


def randn(rng, *shape, dtype, scale=1.0, shift=0.0):
    return (rng.standard_normal(shape) * scale + shift).astype(dtype)


# ----------------------------------------------------------------------------- one op at a time


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu(dtype, calls):
    rng = np.random.default_rng(0)
    compare_op(fused.Gelu, [randn(rng, 4, 33, 70, dtype=dtype, scale=3.0)], dtype)
    assert calls == ["gelu_forward", "gelu_backward"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("c", [7, 384, 1000])  # one partial warp, a 256-thread block looping, several loops
def test_layer_norm(dtype, bias, c, calls):
    rng = np.random.default_rng(c)
    x = randn(rng, 3, 5, c, dtype=dtype, scale=2.0, shift=0.5)
    w = randn(rng, c, dtype=dtype, shift=1.0)
    arrays = [x, w] + ([randn(rng, c, dtype=dtype)] if bias else [])
    compare_op(fused.LayerNorm, arrays, dtype, eps=1e-5)
    assert calls == ["layer_norm_forward", "layer_norm_backward"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [5, 300, 1000])
@pytest.mark.parametrize("ignore", ["none", "some", "custom_index"])
def test_cross_entropy(dtype, vocab, ignore, calls):
    rng = np.random.default_rng(vocab)
    logits = randn(rng, 4, 9, vocab, dtype=dtype, scale=3.0)
    targets = rng.integers(0, vocab, size=(4, 9))
    ignore_index = -1
    if ignore == "some":
        targets[rng.random((4, 9)) < 0.3] = -1
    elif ignore == "custom_index":
        ignore_index = 3
        targets[0, :4] = 3
    _, _, _, gpu_grads = compare_op(fused.CrossEntropy, [logits], dtype, targets=targets, ignore_index=ignore_index)
    assert calls == ["cross_entropy_forward", "cross_entropy_backward"]
    ignored = targets.reshape(-1) == ignore_index
    assert (backend.to_numpy(gpu_grads[0]).reshape(-1, vocab)[ignored] == 0).all()


def test_cross_entropy_out_of_range_target_gives_nan_not_a_wrapped_index():
    logits = gpu(np.zeros((2, 5), dtype=np.float32))
    loss = fused.CrossEntropy().forward(logits, gpu(np.array([1, 7])), ignore_index=-1)
    assert np.isnan(float(backend.to_numpy(loss)))


ATTENTION_SHAPES = {
    "square": ((2, 3, 5, 4), (2, 3, 5, 4)),
    "one_token": ((2, 3, 1, 4), (2, 3, 1, 4)),
    "kv_cached_step": ((2, 3, 1, 8), (2, 3, 7, 8)),  # Tq = 1 < Tk: sees every cached key
    "tq_lt_tk": ((2, 3, 3, 8), (2, 3, 7, 8)),
    "long_rows": ((1, 2, 300, 16), (1, 2, 300, 16)),  # rows longer than one 256-thread block
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", sorted(ATTENTION_SHAPES))
@pytest.mark.parametrize("is_causal", [True, False])
def test_attention(dtype, shapes, is_causal, calls):
    q_shape, kv_shape = ATTENTION_SHAPES[shapes]
    rng = np.random.default_rng(len(shapes))
    q, k, v = randn(rng, *q_shape, dtype=dtype), randn(rng, *kv_shape, dtype=dtype), randn(rng, *kv_shape, dtype=dtype)
    compare_op(fused.ScaledDotProductAttention, [q, k, v], dtype, is_causal=is_causal, dropout_p=0.0, rng=None)
    # one softmax and one softmax backward per query chunk (long causal rows come in two chunks)
    assert set(calls) == {"masked_softmax_", "softmax_backward_"}
    assert calls.count("masked_softmax_") == calls.count("softmax_backward_")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tq,tk", [(4, 6), (6, 6), (1, 9), (6, 4)])  # (6, 4): the first 2 queries see no key
def test_masked_softmax_matches_the_causal_bias(dtype, tq, tk):
    rng = np.random.default_rng(tq * 10 + tk)
    att = randn(rng, 2, 3, tq, tk, dtype=dtype, scale=4.0)
    ref = att + fused.causal_bias(np, tq, tk, dtype)
    with np.errstate(invalid="ignore"):
        ref = np.exp(ref - ref.max(axis=-1, keepdims=True))
        ref /= ref.sum(axis=-1, keepdims=True)
    got = backend.to_numpy(kernels_cuda.masked_softmax_(gpu(att), True))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    seen = ~np.isnan(ref)
    assert_close(got[seen], ref[seen], dtype, "masked softmax")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_rows", [7, 300])
def test_embedding_backward(dtype, n_rows, calls):
    rng = np.random.default_rng(n_rows)
    weight = randn(rng, n_rows, 5, dtype=dtype)
    ids = rng.integers(0, n_rows, size=(4, 90))  # many repeats: atomics must sum them
    compare_op(fused.Embedding, [weight], dtype, ids=ids)
    assert calls == ["embedding_backward"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_step(dtype, weight_decay, calls):
    rng = np.random.default_rng(3)
    shapes = [(6, 5), (5,), (3, 4), (7,), (2, 2)]  # two groups: 3 matrices decay, 2 vectors do not
    start = [randn(rng, *s, dtype=dtype) for s in shapes]
    grads = [[randn(rng, *s, dtype=dtype, scale=0.1) for s in shapes] for _ in range(4)]
    results = {}
    for device in ("cpu", "cuda"):
        params = [minigpt.tensor(p, requires_grad=True, device=device) for p in start]
        opt = AdamW(params, lr=1e-2, betas=(0.9, 0.99), weight_decay=weight_decay)
        for i, step_grads in enumerate(grads):
            for p, g in zip(params, step_grads):
                p.grad = backend.to_device(g.copy(), device)
            opt.step()
            if i == 1:  # replaces every moment array: the GPU's flat buffers must be rebuilt
                opt.load_state_dict(opt.state_dict())
        results[device] = [p.data for p in params] + [a for s in opt.state.values() for a in s.values()]
    assert calls.count("adamw_step") == 4 * 2  # one kernel per group and step over its flat buffer
    for got, ref in zip(results["cuda"], results["cpu"]):
        if isinstance(ref, int):
            assert got == ref
        else:
            assert_close(got, ref, dtype, "AdamW")


def test_the_switch_turns_the_kernels_off(monkeypatch, calls):
    monkeypatch.setenv(kernels_cuda.DISABLE_ENV, "1")
    rng = np.random.default_rng(5)
    x = randn(rng, 3, 16, dtype=np.float32)
    compare_op(fused.Gelu, [x], np.float32)
    compare_op(fused.LayerNorm, [x, randn(rng, 16, dtype=np.float32)], np.float32, eps=1e-5)
    compare_op(fused.CrossEntropy, [x], np.float32, targets=rng.integers(0, 16, size=3), ignore_index=-1)
    assert calls == []


# ----------------------------------------------------------------------------- a whole training step


@pytest.mark.skipif(os.environ.get("CUPY_TF32", "0") not in ("", "0"), reason="TF32 GEMMs are not float32-exact")
@pytest.mark.parametrize("kernels", ["on", "off"])
def test_gpt_training_steps_match_cpu(kernels, monkeypatch, calls):
    if kernels == "off":
        monkeypatch.setenv(kernels_cuda.DISABLE_ENV, "1")
    cfg = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, 50, size=(4, 16)), rng.integers(0, 50, size=(4, 16))) for _ in range(3)]
    batches[1][1][0, :5] = -1  # some ignored targets
    losses, weights = {}, {}
    for device in ("cpu", "cuda"):
        model = GPT(cfg, rng=np.random.default_rng(1)).to(device)
        params = list(model.parameters())
        opt = AdamW(params, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
        losses[device] = []
        for x, y in batches:
            _, loss = model(x, y)
            opt.zero_grad()
            loss.backward()
            clip_grad_norm_(params, 1.0)
            opt.step()
            losses[device].append(loss.item())
        weights[device] = model.state_dict()
    np.testing.assert_allclose(losses["cuda"], losses["cpu"], rtol=1e-5)
    for name, ref in weights["cpu"].items():
        assert rel_err(weights["cuda"][name], ref) <= 1e-4, name
    if kernels == "on":
        assert set(calls) == set(KERNEL_FUNCTIONS)  # every kernel served the GPU run
    else:
        assert calls == []
