"""Numerics found against PyTorch: exact (erf) GELU, huge-|x| GELU gradients, zero-variance layer norm."""

import math

import numpy as np
import pytest

import minigpt
from minigpt import functional as F
from minigpt import nn
from minigpt.autograd import composed, fused, gradcheck
from minigpt.gpt import GPT, GPTConfig


def rand(*shape, scale=1.0, seed=0, dtype=np.float64):
    data = (np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)
    return minigpt.tensor(data, requires_grad=True)


def test_erfc_matches_math_erfc_over_the_line():
    z = np.concatenate([np.linspace(-8, 8, 20001), np.linspace(8, 27, 2001), [0.0, 1.99999, 2.0, 2.00001, 40, -40]])
    ref = np.array([math.erfc(v) for v in z])
    np.testing.assert_allclose(fused.erfc(z), ref, rtol=1e-12, atol=0)


def test_exact_gelu_against_values_worked_out_by_hand():
    # gelu(x) = x Φ(x); Φ(1) = 0.841344746068543, Φ(-1) = 1 - Φ(1), Φ(2) = 0.977249868051821
    x = minigpt.tensor(np.array([0.0, 1.0, -1.0, 2.0]), requires_grad=True)
    y = F.gelu(x, approximate="none")
    expected = [0.0, 0.841344746068543, -0.158655253931457, 2 * 0.977249868051821]
    np.testing.assert_allclose(y.data, expected, rtol=1e-14, atol=1e-15)
    y.sum().backward()
    # d/dx = Φ(x) + x φ(x), φ(1) = exp(-1/2)/√(2π) = 0.241970724519143
    phi1, phi2 = 0.241970724519143, 0.053990966513188
    expected_grad = [0.5, 0.841344746068543 + phi1, 0.158655253931457 - phi1, 0.977249868051821 + 2 * phi2]
    np.testing.assert_allclose(x.grad, expected_grad, rtol=1e-13)


def test_gelu_default_is_exact_as_in_pytorch_and_bad_names_are_refused():
    x = rand(9)
    np.testing.assert_array_equal(F.gelu(x).data, F.gelu(x, approximate="none").data)
    np.testing.assert_array_equal(nn.GELU()(x).data, F.gelu(x).data)
    np.testing.assert_array_equal(nn.GELU("tanh")(x).data, F.gelu(x, approximate="tanh").data)
    with pytest.raises(ValueError, match="approximate"):
        F.gelu(x, approximate="erf")


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_gradcheck_and_composed_twin(approximate):
    x = rand(4, 5, scale=3)
    assert gradcheck(lambda a: F.gelu(a, approximate=approximate), [x])
    np.testing.assert_allclose(F.gelu(x, approximate).data, composed.gelu(x, approximate).data, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gelu_on_huge_inputs_is_x_or_0_with_gradient_1_or_0(approximate, dtype):
    big = np.array([-3e38, -1e20, -1.4e13, -1e6, -50, 50, 1e6, 1.4e13, 1e20, 3e38], dtype=dtype)
    x = minigpt.tensor(big, requires_grad=True)
    with np.errstate(over="raise", invalid="raise"):  # no overflow on the way, either
        y = F.gelu(x, approximate=approximate)
        y.sum().backward()
    positive = big > 0
    np.testing.assert_array_equal(y.data, np.where(positive, big, 0.0))
    np.testing.assert_array_equal(x.grad, np.where(positive, 1.0, 0.0))


def test_layer_norm_of_equal_rows_is_exactly_the_bias_in_float32():
    C = 768
    rows = np.array([[0.1] * C, [-3.7e4] * C, [1e-30] * C, [5.0] * C], dtype=np.float32)
    x = minigpt.tensor(rows, requires_grad=True)
    w = minigpt.tensor(np.random.default_rng(0).standard_normal(C).astype(np.float32), requires_grad=True)
    b = minigpt.tensor(np.random.default_rng(1).standard_normal(C).astype(np.float32), requires_grad=True)
    out = F.layer_norm(x, w, b)
    np.testing.assert_array_equal(out.data, np.broadcast_to(b.data, rows.shape))
    (out * minigpt.tensor(np.ones(rows.shape, np.float32))).sum().backward()
    assert np.isfinite(x.grad).all() and np.isfinite(w.grad).all()
    np.testing.assert_array_equal(w.grad, 0.0)  # x̂ is 0


def test_gpt_config_gelu_field():
    assert GPTConfig().gelu == "tanh"
    with pytest.raises(ValueError, match="gelu"):
        GPTConfig(gelu="erf")


# ----------------------------------------------------------------------------- against PyTorch


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_matches_pytorch(approximate):
    torch = pytest.importorskip("torch")
    x = rand(1000, scale=4)
    F.gelu(x, approximate=approximate).sum().backward()
    xt = torch.tensor(x.data, requires_grad=True)
    yt = torch.nn.functional.gelu(xt, approximate=approximate)
    yt.sum().backward()
    np.testing.assert_allclose(F.gelu(x, approximate=approximate).data, yt.detach().numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(x.grad, xt.grad.numpy(), rtol=1e-12, atol=1e-14)


def test_layer_norm_of_equal_rows_matches_pytorch():
    torch = pytest.importorskip("torch")
    rows = np.full((3, 768), 0.1, dtype=np.float32) * np.array([[1.0], [-7.0], [3e3]], dtype=np.float32)
    w, b = np.linspace(-1, 1, 768, dtype=np.float32), np.linspace(2, 3, 768, dtype=np.float32)
    ours = F.layer_norm(minigpt.tensor(rows), minigpt.tensor(w), minigpt.tensor(b)).data
    theirs = torch.nn.functional.layer_norm(torch.tensor(rows), (768,), torch.tensor(w), torch.tensor(b)).numpy()
    np.testing.assert_array_equal(ours, theirs)


def torch_gpt_loss(torch, state, config, idx, targets):
    """nanoGPT's model.py forward, written with torch ops over minigpt's state dict (bias=False, no dropout)."""
    TF = torch.nn.functional
    p = {k: torch.tensor(v, requires_grad=True) for k, v in state.items()}
    B, T = idx.shape
    C, nh = config.n_embd, config.n_head
    x = p["transformer.wte.weight"][idx] + p["transformer.wpe.weight"][:T]
    for i in range(config.n_layer):
        h = f"transformer.h.{i}."
        q, k, v = TF.linear(TF.layer_norm(x, (C,), p[h + "ln_1.weight"]), p[h + "attn.c_attn.weight"]).split(C, dim=2)
        q, k, v = (t.view(B, T, nh, C // nh).transpose(1, 2) for t in (q, k, v))
        y = TF.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + TF.linear(y, p[h + "attn.c_proj.weight"])
        m = TF.gelu(TF.linear(TF.layer_norm(x, (C,), p[h + "ln_2.weight"]), p[h + "mlp.c_fc.weight"]))  # exact
        x = x + TF.linear(m, p[h + "mlp.c_proj.weight"])
    logits = TF.linear(TF.layer_norm(x, (C,), p["transformer.ln_f.weight"]), p["transformer.wte.weight"])
    loss = TF.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
    loss.backward()
    return logits.detach().numpy(), {k: t.grad.numpy() for k, t in p.items() if t.grad is not None}


@pytest.mark.parametrize("gelu", ["none", "tanh"])
def test_gpt_with_exact_gelu_matches_nanogpt_forward_and_gradients(gelu):
    torch = pytest.importorskip("torch")
    config = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32, gelu=gelu)
    model = GPT(config, rng=np.random.default_rng(0))
    data = np.random.default_rng(1).integers(0, 50, (3, 17))
    idx, targets = data[:, :-1], data[:, 1:]
    logits, loss = model(idx, targets)
    loss.backward()
    state = model.state_dict()
    their_logits, their_grads = torch_gpt_loss(torch, state, config, torch.tensor(idx), torch.tensor(targets))
    gap = np.abs(logits.data - their_logits).max()
    if gelu == "tanh":  # the approximation shows: nanoGPT's model uses the exact form
        assert gap > 1e-6
        return
    assert gap < 1e-6
    for name, p in model.named_parameters():
        np.testing.assert_allclose(p.grad, their_grads[name], rtol=1e-3, atol=2e-7, err_msg=name)
