"""minigpt.optim: SGD and AdamW against plain NumPy update rules, state dicts, clipping, schedules."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest

import minigpt
from minigpt import nn, optim


def _model(seed: int = 0, dtype: type = np.float32) -> nn.Module:
    return nn.Sequential(
        nn.Linear(3, 4, rng=np.random.default_rng(seed), dtype=dtype),
        nn.Tanh(),
        nn.Linear(4, 2, rng=np.random.default_rng(seed + 1), dtype=dtype),
    )


def _grads(step: int, params: list[nn.Parameter]) -> list[np.ndarray]:
    """Deterministic fake gradients, different per step."""
    rng = np.random.default_rng(100 + step)
    return [rng.standard_normal(p.shape).astype(p.dtype) for p in params]


def _run(opt: optim.Optimizer, params: list[nn.Parameter], steps: range) -> None:
    for t in steps:
        for p, g in zip(params, _grads(t, params)):
            p.grad = g
        opt.step()


def test_sgd_momentum_matches_numpy() -> None:
    model = _model()
    params = list(model.parameters())
    ref = [p.numpy().astype(np.float64) for p in params]
    lr, mom, wd = 0.1, 0.9, 0.01
    opt = optim.SGD(model.parameters(), lr=lr, momentum=mom, weight_decay=wd)
    _run(opt, params, range(5))
    bufs: list[np.ndarray | None] = [None] * len(ref)
    for t in range(5):
        for i, g in enumerate(_grads(t, params)):
            d = g.astype(np.float64) + wd * ref[i]
            bufs[i] = d if bufs[i] is None else mom * bufs[i] + d
            ref[i] = ref[i] - lr * bufs[i]
    for p, r in zip(params, ref):
        np.testing.assert_allclose(p.numpy(), r, atol=1e-6, rtol=0)


def test_plain_sgd_step() -> None:
    p = nn.Parameter(np.array([1.0, 2.0]))
    opt = optim.SGD([p], lr=0.5)
    p.grad = np.array([2.0, -2.0], dtype=np.float32)
    opt.step()
    assert p.numpy().tolist() == [0.0, 3.0]
    assert opt.state_dict() == {}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adamw_matches_numpy(dtype: type) -> None:
    model = _model(dtype=dtype)
    params = list(model.parameters())
    ref = [p.numpy().astype(np.float64) for p in params]
    lr, (b1, b2), eps, wd = 1e-2, (0.9, 0.95), 1e-8, 0.1
    opt = optim.AdamW(model.parameters(), lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    _run(opt, params, range(5))
    m = [np.zeros_like(r) for r in ref]
    v = [np.zeros_like(r) for r in ref]
    for t in range(1, 6):
        for i, g in enumerate(_grads(t - 1, params)):
            g = g.astype(np.float64)
            decay = wd if ref[i].ndim >= 2 else 0.0  # biases do not decay by default
            ref[i] = ref[i] * (1 - lr * decay)
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            mhat, vhat = m[i] / (1 - b1**t), v[i] / (1 - b2**t)
            ref[i] = ref[i] - lr * mhat / (np.sqrt(vhat) + eps)
    for p, r in zip(params, ref):
        assert p.dtype == dtype
        np.testing.assert_allclose(p.numpy(), r, atol=1e-6, rtol=0)


def test_adamw_default_groups_decay_only_matrices() -> None:
    model = _model()
    opt = optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert opt.param_groups[0]["names"] == ["0.weight", "2.weight"]
    assert opt.param_groups[1]["names"] == ["0.bias", "2.bias"]
    assert all(g["lr"] == 1e-3 and g["betas"] == (0.9, 0.999) for g in opt.param_groups)


def test_explicit_groups_and_named_pairs() -> None:
    model = _model()
    named = dict(model.named_parameters())
    opt = optim.AdamW(
        [
            {"params": [named["0.weight"], named["0.bias"]], "weight_decay": 0.5},
            {"params": [("head.w", named["2.weight"]), ("head.b", named["2.bias"])], "lr": 0.1},
        ],
        lr=1e-3,
        weight_decay=0.01,
    )
    g0, g1 = opt.param_groups
    assert (g0["weight_decay"], g0["lr"], g1["weight_decay"], g1["lr"]) == (0.5, 1e-3, 0.01, 0.1)
    assert g1["names"] == ["head.w", "head.b"]
    _run(opt, list(model.parameters()), range(1))
    assert set(opt.state) == {"0.weight", "0.bias", "head.w", "head.b"}
    pairs = optim.SGD(model.named_parameters(), lr=0.1)  # (name, param) pairs straight from a model
    assert pairs.param_groups[0]["names"] == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_bad_optimizer_inputs() -> None:
    p = nn.Parameter(np.zeros(2))
    with pytest.raises(ValueError, match="empty"):
        optim.AdamW([])
    with pytest.raises(ValueError, match="twice"):
        optim.SGD([p, p], lr=0.1)
    with pytest.raises(ValueError, match="betas"):
        optim.AdamW([p], betas=(0.9, 1.0))
    with pytest.raises(TypeError):
        optim.SGD([np.zeros(2)], lr=0.1)


def test_updates_in_place_and_skip_params_without_grad() -> None:
    model = _model()
    params = list(model.parameters())
    arrays = [p.data for p in params]
    opt = optim.AdamW(model.parameters(), lr=0.1)
    _run(opt, params, range(1))
    bufs = {k: (s["exp_avg"], s["exp_avg_sq"]) for k, s in opt.state.items()}
    before = params[1].numpy().copy()
    _run(opt, params, range(1, 3))
    params[1].grad = None
    params[0].grad = _grads(9, params)[0]
    opt.step()
    assert all(p.data is a for p, a in zip(params, arrays))  # the parameters' own arrays
    assert all(opt.state[k]["exp_avg"] is m and opt.state[k]["exp_avg_sq"] is v for k, (m, v) in bufs.items())
    assert opt.state["0.weight"]["step"] == 4 and opt.state["0.bias"]["step"] == 3
    assert not np.array_equal(before, params[1].numpy())
    assert len(opt._scratch) == 1  # one scratch buffer for all float32 CPU parameters
    opt.zero_grad()
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize("make", [lambda ps: optim.AdamW(ps, lr=0.05), lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9)])
def test_optimizer_state_dict_resumes_exactly(make: object) -> None:
    # one run of 5 steps ...
    model_a = _model()
    opt_a = make(model_a.parameters())
    _run(opt_a, list(model_a.parameters()), range(5))
    # ... equals 3 steps, a save through .npz, a fresh model and optimizer, and 2 more steps
    model_b = _model()
    opt_b = make(model_b.parameters())
    _run(opt_b, list(model_b.parameters()), range(3))
    buf = io.BytesIO()
    np.savez(buf, **{"model/" + k: v for k, v in model_b.state_dict().items()}, **opt_b.state_dict())
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as npz:
        saved = {k: npz[k] for k in npz.files}
    model_c = _model(seed=7)
    opt_c = make(model_c.parameters())
    model_c.load_state_dict({k[6:]: v for k, v in saved.items() if k.startswith("model/")})
    opt_c.load_state_dict({k: v for k, v in saved.items() if not k.startswith("model/")})
    _run(opt_c, list(model_c.parameters()), range(3, 5))
    for p, q in zip(model_a.parameters(), model_c.parameters()):
        np.testing.assert_array_equal(p.numpy(), q.numpy())


def test_optimizer_state_dict_keys_and_copies() -> None:
    model = _model()
    opt = optim.AdamW(model.parameters())
    _run(opt, list(model.parameters()), range(2))
    sd = opt.state_dict()
    assert "exp_avg/0.weight" in sd and "exp_avg_sq/2.bias" in sd
    assert sd["step/0.weight"].dtype == np.int64 and int(sd["step/0.weight"]) == 2
    assert len(sd) == 3 * 4
    sd["exp_avg/0.weight"][...] = 99  # host copies, not views of the live state
    assert not np.any(opt.state["0.weight"]["exp_avg"] == 99)


def test_optimizer_load_errors() -> None:
    model = _model()
    opt = optim.AdamW(model.parameters())
    _run(opt, list(model.parameters()), range(1))
    sd = opt.state_dict()
    bad = dict(sd)
    bad["exp_avg/0.weight"] = np.zeros((9, 9), np.float32)
    bad["exp_avg/nope"] = np.zeros(1, np.float32)
    del bad["exp_avg_sq/2.bias"]
    with pytest.raises(nn.StateDictError) as err:
        optim.AdamW(model.parameters()).load_state_dict(bad)
    msg = str(err.value)
    assert "exp_avg/0.weight (given (9, 9), parameter (4, 3))" in msg
    assert "unexpected: exp_avg/nope" in msg
    assert "incomplete state" in msg and "2.bias" in msg


def test_clip_grad_norm() -> None:
    a, b = nn.Parameter(np.zeros(2)), nn.Parameter(np.zeros((2, 2)))
    a.grad = np.array([3.0, 0.0], dtype=np.float32)
    b.grad = np.array([[0.0, 4.0], [0.0, 0.0]], dtype=np.float32)
    norm = optim.clip_grad_norm_([a, b], 1.0)
    assert norm == pytest.approx(5.0)
    np.testing.assert_allclose(a.grad, [0.6, 0.0], rtol=1e-5)
    np.testing.assert_allclose(b.grad, [[0.0, 0.8], [0.0, 0.0]], rtol=1e-5)
    assert optim.clip_grad_norm_([a, b], 10.0) == pytest.approx(1.0, rel=1e-5)  # under the limit: untouched
    np.testing.assert_allclose(a.grad, [0.6, 0.0], rtol=1e-5)
    assert optim.clip_grad_norm_([nn.Parameter(np.zeros(1))], 1.0) == 0.0  # no grads at all
    a.grad[0] = np.inf
    assert math.isinf(optim.clip_grad_norm_([a, b], 1.0))


def test_cosine_schedule_values() -> None:
    kw = dict(lr=6e-4, min_lr=6e-5, warmup_iters=100, decay_iters=1000)
    sched = optim.CosineSchedule(**kw)
    assert sched(0) == pytest.approx(6e-4 * 1 / 101)  # warmup start
    assert sched(99) == pytest.approx(6e-4 * 100 / 101)  # warmup end
    assert sched(100) == pytest.approx(6e-4)  # decay start: the peak
    assert sched(550) == pytest.approx((6e-4 + 6e-5) / 2)  # halfway: cos(pi/2) = 0
    assert sched(1000) == pytest.approx(6e-5)
    assert sched(5000) == 6e-5  # after decay
    assert optim.cosine_lr(550, **kw) == sched(550)
    values = [sched(i) for i in range(100, 1001)]
    assert all(x >= y for x, y in zip(values, values[1:]))  # monotone decay
    assert optim.cosine_lr(0, lr=1.0, min_lr=0.1, warmup_iters=0, decay_iters=0) == 0.1  # no division by zero


def test_constant_and_linear_schedules() -> None:
    const = optim.constant_lr(3e-4)
    assert const(0) == const(10**6) == 3e-4
    lin = optim.linear_lr(1.0, 0.1, 100)
    assert lin(0) == 1.0 and lin(50) == pytest.approx(0.55) and lin(100) == pytest.approx(0.1)
    assert lin(200) == pytest.approx(0.1)


def test_schedule_sets_group_lr_and_training_moves_params() -> None:
    p = nn.Parameter(np.array([1.0]))
    opt = optim.SGD([p], lr=0.0)
    for group in opt.param_groups:
        group["lr"] = 0.5
    p.grad = np.array([1.0], dtype=np.float32)
    opt.step()
    assert p.item() == 0.5


@pytest.mark.gpu
def test_adamw_on_cuda_matches_cpu_and_follows_model_moves() -> None:
    cpu, gpu = _model(), _model().to("cuda")
    opt_cpu, opt_gpu = optim.AdamW(cpu.parameters(), lr=0.01), optim.AdamW(gpu.parameters(), lr=0.01)
    for t in range(3):
        for p, q, g in zip(cpu.parameters(), gpu.parameters(), _grads(t, list(cpu.parameters()))):
            p.grad = g
            q.grad = minigpt.tensor(g, device="cuda").data
        opt_cpu.step()
        opt_gpu.step()
        assert float(optim.clip_grad_norm_(gpu.parameters(), 1e9)) == pytest.approx(  # a 0-d device array
            optim.clip_grad_norm_(cpu.parameters(), 1e9), rel=1e-5
        )
    for p, q in zip(cpu.parameters(), gpu.parameters()):
        assert q.device == "cuda"
        np.testing.assert_allclose(p.numpy(), q.numpy(), atol=1e-6)
    sd = opt_gpu.state_dict()
    assert all(type(v) is np.ndarray for v in sd.values())
    gpu.to("cpu")  # state follows the parameters on the next step
    _run(opt_gpu, list(gpu.parameters()), range(3, 4))
    assert all(type(s["exp_avg"]) is np.ndarray for s in opt_gpu.state.values())
