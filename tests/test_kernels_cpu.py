"""The Numba CPU kernels (minigpt.autograd.kernels_cpu) against their array twins, and the dispatch switches.

Every op runs on the same random inputs with the kernels on and off (MINIGPT_NO_CPU_KERNELS), and the
outputs and gradients must agree: max|kernel - array| / max|array| at most 1e-5 in float32 and 1e-12 in
float64. The graph node's type shows which form ran.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import minigpt
from minigpt import functional as F
from minigpt.autograd import dispatch, fused, gradcheck
from minigpt.gpt import GPT, GPTConfig
from minigpt.optim import AdamW, clip_grad_norm_

kernels_cpu = pytest.importorskip("minigpt.autograd.kernels_cpu", reason="needs Numba")

DTYPES = [np.float32, np.float64]
TOL = {np.float32: 1e-5, np.float64: 1e-12}
ROOT = Path(__file__).resolve().parents[1]


def rel_err(got, ref):
    assert got.shape == ref.shape and got.dtype == ref.dtype, (got.shape, got.dtype, ref.shape, ref.dtype)
    scale = max(float(np.abs(ref).max(initial=0.0)), float(np.finfo(ref.dtype).tiny))
    return float(np.abs(got.astype(np.float64) - ref).max(initial=0.0)) / scale


def run(fn, arrays, monkeypatch, kernels):
    """fn's output and the gradients of Σ out·w (w fixed random) for every input, kernels on or off."""
    if kernels:
        monkeypatch.delenv(dispatch.SWITCHES["cpu"], raising=False)
    else:
        monkeypatch.setenv(dispatch.SWITCHES["cpu"], "1")
    inputs = [minigpt.tensor(a.copy(), requires_grad=True) for a in arrays]
    out = fn(*inputs)
    weights = np.random.default_rng(99).standard_normal(out.shape).astype(out.dtype)
    (out * minigpt.tensor(weights)).sum().backward()
    return out, [t.grad for t in inputs]


def compare(fn, arrays, dtype, monkeypatch, kernel_class=None):
    arrays = [a.astype(dtype) for a in arrays]
    out_k, grads_k = run(fn, arrays, monkeypatch, kernels=True)
    out_a, grads_a = run(fn, arrays, monkeypatch, kernels=False)
    if kernel_class is not None:  # the graph shows which form ran
        assert type(out_k._ctx) is kernel_class and type(out_a._ctx) is kernel_class.__base__
    assert rel_err(out_k.data, out_a.data) <= TOL[dtype], "output"
    for i, (gk, ga) in enumerate(zip(grads_k, grads_a)):
        assert rel_err(gk, ga) <= TOL[dtype], f"gradient {i}"


def randn(*shape, seed=0, scale=1.0):
    return np.random.default_rng(seed).standard_normal(shape) * scale


# ----------------------------------------------------------------------------- the exp helper


def test_exp_over_the_whole_float32_range():
    x = np.concatenate(
        [np.linspace(-110, 95, 2_000_001, dtype=np.float32), [np.nan, np.inf, -np.inf, 0.0, -0.0, 88.72, -87.33]]
    ).astype(np.float32)
    out = np.empty_like(x)
    kernels_cpu.exp_array(x, out)
    with np.errstate(over="ignore", under="ignore"):
        ref = np.exp(x.astype(np.float64))
    normal = (ref >= np.finfo(np.float32).tiny) & (ref <= np.finfo(np.float32).max)
    assert (np.abs(out[normal] - ref[normal]) / ref[normal]).max() < 2 * 2.0**-24  # within 2 ulp
    subnormal = (ref > 0) & (ref < np.finfo(np.float32).tiny)
    assert np.abs(out[subnormal] - ref[subnormal]).max() < 2.0**-149 * 4  # gradual underflow, then 0
    assert (out[x > 88.73] == np.inf).all() and (out[x < -104] == 0).all()  # the clamps
    assert np.isnan(out[np.isnan(x)]).all() and (out[x == 0] == 1.0).all() and (x == 0).sum() >= 2


# ----------------------------------------------------------------------------- each kernel against its array twin


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 17, 40), (5,)])
def test_gelu(dtype, approximate, shape, monkeypatch):
    fn = lambda x: F.gelu(x, approximate=approximate)
    compare(fn, [randn(*shape, scale=2.5)], dtype, monkeypatch, kernels_cpu.Gelu)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 8), (4, 33, 96), (2, 768)])
def test_layer_norm(dtype, bias, shape, monkeypatch):
    x = randn(*shape, scale=3.0) + 5.0
    x[0, ..., :] = 0.7  # an all-equal row
    args = [x, randn(shape[-1], seed=1), randn(shape[-1], seed=2)][: 3 if bias else 2]
    compare(lambda *t: F.layer_norm(*t), args, dtype, monkeypatch, kernels_cpu.LayerNorm)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [65, 50304])
def test_cross_entropy_with_ignored_targets(dtype, vocab, monkeypatch):
    rows = 6 if vocab > 1000 else 40
    targets = np.random.default_rng(3).integers(0, vocab, (2, rows // 2))
    targets[0, 1] = targets[1, 0] = -1  # ignored
    fn = lambda x: F.cross_entropy(x, targets, ignore_index=-1)
    compare(fn, [randn(2, rows // 2, vocab, scale=4.0)], dtype, monkeypatch, kernels_cpu.CrossEntropy)


@pytest.mark.parametrize("dtype", DTYPES)
def test_row_max_at_every_length_and_position(dtype):
    """_row_max keeps 8 running maxima and a tail: the maximum in each lane and in the tail, ±inf too."""
    row = np.random.default_rng(6).standard_normal(43).astype(dtype)
    for n in range(1, 41):
        for where in range(n):
            for top in (100.0, np.inf):
                r = row.copy()
                r[where] = top
                r[n] = 1e6  # past n: not seen
                assert kernels_cpu._row_max(r, n) == r[:n].max(), (n, where, top)
    assert kernels_cpu._row_max(np.full(11, -np.inf, dtype), 11) == -np.inf


def test_a_nan_or_inf_in_a_row_gives_the_array_codes_nans(monkeypatch):
    x = randn(4, 21)
    x[1, 13], x[2, 0], x[3, 20] = np.nan, np.nan, np.inf  # mid-row (a lane), first, tail
    for i in range(4):  # each row's loss alone: the mean would hide which row is NaN
        fn = lambda x: F.cross_entropy(x, np.array([0]))
        out_k, _ = run(fn, [x[i : i + 1]], monkeypatch, kernels=True)
        with np.errstate(invalid="ignore"):  # the array code's inf - inf
            out_a, _ = run(fn, [x[i : i + 1]], monkeypatch, kernels=False)
        assert np.isnan(out_k.data) == np.isnan(out_a.data) == (i > 0), i
    att = x[None].copy()  # attention's softmax kernel, every key seen
    kernels_cpu.causal_softmax_rows(att, False)
    with np.errstate(invalid="ignore"):
        ref = np.exp(x - x.max(axis=1, keepdims=True))
    np.testing.assert_array_equal(np.isnan(att[0]), np.isnan(ref / ref.sum(axis=1, keepdims=True)))


def test_cross_entropy_checks_targets_and_ignores_a_custom_index(monkeypatch):
    monkeypatch.delenv(dispatch.SWITCHES["cpu"], raising=False)
    x = minigpt.tensor(randn(4, 7).astype(np.float32), requires_grad=True)
    with pytest.raises(IndexError, match="outside"):
        F.cross_entropy(x, np.array([0, 1, 7, 2]))
    fn = lambda x: F.cross_entropy(x, np.array([0, 5, 5, 2]), ignore_index=5)
    compare(fn, [randn(4, 7)], np.float64, monkeypatch)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "tq, tk, causal",
    [(1, 1, True), (1, 9, True), (5, 12, True), (16, 16, True), (16, 16, False), (300, 300, True), (200, 260, True)],
)
def test_attention(dtype, tq, tk, causal, monkeypatch):
    q, k, v = randn(2, 3, tq, 8), randn(2, 3, tk, 8, seed=1), randn(2, 3, tk, 8, seed=2)
    fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    compare(fn, [q, k, v], dtype, monkeypatch, kernels_cpu.ScaledDotProductAttention)


def test_attention_dropout_draws_as_the_array_code(monkeypatch):
    """With dropout the kernel attends in the array code's chunks, so the same rng gives the same mask."""
    q, k, v = (randn(2, 3, 150, 8, seed=s) for s in range(3))  # 150 rows: 2 chunks of 75 in 64-row chunks, 1 in 128
    fn = lambda q, k, v: F.scaled_dot_product_attention(
        q, k, v, is_causal=True, dropout_p=0.3, rng=np.random.default_rng(5)
    )
    compare(fn, [q, k, v], np.float64, monkeypatch, kernels_cpu.ScaledDotProductAttention)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_rows", [11, 700])
def test_embedding_backward_with_repeated_ids(dtype, n_rows, monkeypatch):
    ids = np.random.default_rng(4).integers(0, n_rows, (3, 50))
    ids[0, :5] = 2  # repeats
    compare(lambda w: F.embedding(ids, w), [randn(n_rows, 24)], dtype, monkeypatch, kernels_cpu.Embedding)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_update(dtype, weight_decay, monkeypatch):
    from minigpt.optim import adamw_update

    arrays = [randn(1000, seed=i).astype(dtype) for i in range(3)] + [np.abs(randn(1000, seed=3)).astype(dtype)]
    kernel = dispatch.implementation("adamw_update", arrays[0], adamw_update)
    assert kernel is kernels_cpu.adamw
    ours, twin = [a.copy() for a in arrays], [a.copy() for a in arrays]
    for step in (1, 2, 7):
        kernel(ours[0], ours[1], ours[2], ours[3], 3e-3, 0.9, 0.99, 1e-8, weight_decay, step)
        adamw_update(twin[0], twin[1], twin[2], twin[3], 3e-3, 0.9, 0.99, 1e-8, weight_decay, step)
    for i in (0, 2, 3):
        assert rel_err(ours[i], twin[i]) <= TOL[dtype]
    strided = arrays[0].copy()[::2]  # not contiguous: updated all the same
    before = strided.copy()
    kernel(strided, arrays[1][::2], arrays[2][::2].copy(), arrays[3][::2].copy(), 0.1, 0.9, 0.99, 1e-8, 0.0, 1)
    assert not np.allclose(strided, before)


@pytest.mark.parametrize("dtype", DTYPES)
def test_squared_norm(dtype):
    g = randn(37, 53).astype(dtype)
    assert abs(kernels_cpu.squared_norm_of(g) - float((g.astype(np.float64) ** 2).sum())) <= 1e-12 * g.size


# ----------------------------------------------------------------------------- gradcheck through the kernels


def test_gradcheck_through_the_kernels(monkeypatch):
    monkeypatch.delenv(dispatch.SWITCHES["cpu"], raising=False)
    r = lambda *s, seed=0: minigpt.tensor(randn(*s, seed=seed), requires_grad=True)
    assert gradcheck(lambda x: F.gelu(x, approximate="tanh"), [r(3, 5)])
    assert gradcheck(lambda x: F.gelu(x, approximate="none"), [r(3, 5)])
    assert gradcheck(F.layer_norm, [r(3, 6), r(6, seed=1), r(6, seed=2)])
    targets = np.array([[1, -1, 3]])
    assert gradcheck(lambda x: F.cross_entropy(x, targets), [r(1, 3, 5)])
    assert gradcheck(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), [r(1, 2, 3, 4, seed=i) for i in range(3)])
    assert gradcheck(lambda w: F.embedding(np.array([0, 2, 2]), w), [r(4, 3)])


# ----------------------------------------------------------------------------- whole model, switches


def train_losses(steps=4):
    config = GPTConfig(vocab_size=23, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=True)
    model = GPT(config, rng=np.random.default_rng(0))
    opt = AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.99), weight_decay=0.1)
    data = np.random.default_rng(1).integers(0, 23, (4, 17))
    losses = []
    for _ in range(steps):
        _, loss = model(data[:, :-1], data[:, 1:])
        opt.zero_grad()
        loss.backward()
        clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    return losses


def test_training_with_kernels_on_and_off_gives_the_same_losses(monkeypatch):
    monkeypatch.delenv(dispatch.SWITCHES["cpu"], raising=False)
    on = train_losses()
    monkeypatch.setenv(dispatch.SWITCHES["cpu"], "1")
    off = train_losses()
    np.testing.assert_allclose(on, off, rtol=1e-5)
    assert on[-1] < on[0]


def test_the_switch_picks_the_array_code(monkeypatch):
    x = minigpt.tensor(np.ones((2, 3), np.float32), requires_grad=True)
    monkeypatch.setenv(dispatch.SWITCHES["cpu"], "1")
    assert type(F.gelu(x)._ctx) is fused.Gelu
    monkeypatch.setenv(dispatch.SWITCHES["cpu"], "0")
    assert type(F.gelu(x)._ctx) is kernels_cpu.Gelu
    assert dispatch.implementation(fused.Gelu, np.ones(3, np.int64)) is fused.Gelu  # floats only


def test_without_numba_the_array_code_runs_and_says_so_once():
    code = (
        "import sys; sys.modules['numba'] = None\n"
        "import numpy as np, minigpt\n"
        "from minigpt import functional as F\n"
        "x = minigpt.tensor(np.ones((2, 3)), requires_grad=True)\n"
        "F.gelu(x).sum().backward(); F.layer_norm(x, minigpt.tensor(np.ones(3))).sum().backward()\n"
        "print(type(F.gelu(x)._ctx).__module__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == "minigpt.autograd.fused"
    assert done.stderr.count("Numba could not be imported") == 1
