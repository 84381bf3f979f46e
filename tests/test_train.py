"""minigpt.train: the one loop — accumulation, schedules, eval, callbacks, logs, NaN stop, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import minigpt
from minigpt import nn, optim
from minigpt.errors import UserError
from minigpt.train import TrainingDiverged, TrainState, train


def _data(n: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3))
    return x, x @ np.array([[1.0], [-2.0], [0.5]]) + 0.3


def _mse(model: nn.Module, batch: tuple[np.ndarray, np.ndarray]) -> minigpt.Tensor:
    x, y = batch
    w = model.layers[0].weight
    diff = model(minigpt.tensor(x, dtype=w.dtype, device=w.device)) - minigpt.tensor(y, dtype=w.dtype, device=w.device)
    return (diff * diff).mean()


def _model(dtype: type = np.float64) -> nn.MLP:
    return nn.MLP(3, [8, 1], rng=np.random.default_rng(0), dtype=dtype)


def test_grad_accumulation_equals_one_big_batch() -> None:
    x, y = _data(32)
    big, small = _model(), _model()
    opt_big, opt_small = optim.SGD(big.parameters(), lr=0.1), optim.SGD(small.parameters(), lr=0.1)
    train(big, opt_big, lambda: (x, y), _mse, max_steps=1, quiet=True)
    chunks = iter([(x[i : i + 8], y[i : i + 8]) for i in range(0, 32, 8)])
    train(small, opt_small, lambda: next(chunks), _mse, max_steps=1, grad_accum=4, quiet=True)
    for p, q in zip(big.parameters(), small.parameters()):
        np.testing.assert_allclose(p.numpy(), q.numpy(), rtol=1e-12, atol=1e-12)


def test_schedule_clip_and_result() -> None:
    x, y = _data()
    model = _model()
    opt = optim.AdamW(model.parameters(), lr=1.0)
    seen: list[float] = []
    result = train(
        model,
        opt,
        lambda: (x, y),
        _mse,
        max_steps=5,
        lr_schedule=lambda step: 0.01 * (step + 1),
        grad_clip=0.5,
        log_interval=1,
        on_step_end=lambda s: seen.append(opt.param_groups[1]["lr"]),
        quiet=True,
    )
    assert seen == pytest.approx([0.01, 0.02, 0.03, 0.04, 0.05])
    assert result.step == 5 and not result.interrupted and result.loss is not None
    assert [r["lr"] for r in result.history] == pytest.approx(seen)
    assert all(r["grad_norm"] > 0 for r in result.history)


def test_resume_from_start_step_continues_exactly() -> None:
    x, y = _data()
    sched = optim.CosineSchedule(lr=0.05, min_lr=0.005, warmup_iters=2, decay_iters=8)

    def run(model: nn.Module, opt: optim.Optimizer, start: int, stop: int) -> Any:
        return train(model, opt, lambda: (x, y), _mse, max_steps=stop, start_step=start, lr_schedule=sched, quiet=True)

    a = _model()
    opt_a = optim.AdamW(a.parameters())
    run(a, opt_a, 0, 10)
    b = _model()
    opt_b = optim.AdamW(b.parameters())
    first = run(b, opt_b, 0, 4)
    c = nn.MLP(3, [8, 1], rng=np.random.default_rng(9), dtype=np.float64)  # a fresh process, as it were
    opt_c = optim.AdamW(c.parameters())
    c.load_state_dict(b.state_dict())
    opt_c.load_state_dict(opt_b.state_dict())
    second = run(c, opt_c, first.step, 10)
    assert second.step == 10 and second.history[0]["step"] == 10
    for p, q in zip(a.parameters(), c.parameters()):
        np.testing.assert_array_equal(p.numpy(), q.numpy())


def test_eval_runs_under_no_grad_in_eval_mode_and_logs_jsonl(tmp_path: Path) -> None:
    x, y = _data()
    model = _model()
    modes: list[tuple[bool, bool]] = []
    evals: list[tuple[int, dict[str, float]]] = []

    def eval_fn() -> dict[str, float]:
        modes.append((model.training, minigpt.is_grad_enabled()))
        return {"val_loss": _mse(model, (x, y)).item()}

    log = tmp_path / "logs" / "metrics.jsonl"
    result = train(
        model,
        optim.SGD(model.parameters(), lr=0.05),
        lambda: (x, y),
        _mse,
        max_steps=7,
        eval_fn=eval_fn,
        eval_interval=3,
        log_interval=2,
        on_eval=lambda s: evals.append((s.step, dict(s.metrics))),
        log_path=log,
        tokens_per_step=32,
        quiet=True,
    )
    assert [s for s, _ in evals] == [3, 6, 7]  # every 3 steps, and after the last
    assert modes == [(False, False)] * 3
    assert model.training
    assert result.metrics == evals[-1][1] and result.metrics["val_loss"] < evals[0][1]["val_loss"]
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert records == result.history
    train_recs = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_recs] == [2, 4, 6, 7]
    assert all({"step", "loss", "lr", "time", "tokens_per_s"} <= set(r) for r in train_recs)
    assert [r["step"] for r in records if "metrics" in r] == [3, 6, 7]


def test_plain_lines_when_not_a_terminal_and_quiet_silences(capsys: pytest.CaptureFixture[str]) -> None:
    x, y = _data()
    model = _model()
    train(model, optim.SGD(model.parameters(), lr=0.01), lambda: (x, y), _mse, max_steps=4, log_interval=2)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("train step 2/4 | loss ") and "lr 1.00e-02" in out[0] and "it/s" in out[0]
    assert len(out) == 2
    train(model, optim.SGD(model.parameters(), lr=0.01), lambda: (x, y), _mse, max_steps=4, quiet=True)
    assert capsys.readouterr().out == ""


def test_nan_loss_stops_with_callback_and_clear_error() -> None:
    x, y = _data()
    model = _model()
    calls: list[TrainState] = []
    count = {"n": 0}

    def get_batch() -> tuple[np.ndarray, np.ndarray]:  # the 4th batch's targets are NaN
        count["n"] += 1
        return x, y * float("nan") if count["n"] == 4 else y

    before: dict[str, np.ndarray] = {}
    with pytest.raises(TrainingDiverged) as err:
        train(
            model,
            optim.SGD(model.parameters(), lr=0.01),
            get_batch,
            _mse,
            max_steps=10,
            on_step_end=lambda s: before.update(model.state_dict()),
            on_diverge=calls.append,
            quiet=True,
        )
    msg = str(err.value)
    assert "at step 4" in msg and "learning rate" in msg
    assert isinstance(err.value, UserError)
    assert len(calls) == 1 and calls[0].step == 3 and np.isnan(calls[0].loss)
    for k, v in model.state_dict().items():  # the bad step never updated the weights
        np.testing.assert_array_equal(v, before[k])
        assert np.isfinite(v).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_infinite_grad_norm_stops_when_clipping() -> None:
    x, y = _data()
    model = _model()

    def loss_fn(m: nn.Module, batch: Any) -> minigpt.Tensor:
        b = m.layers[0].bias
        return _mse(m, batch) + (b - b.detach()).sqrt().sum()  # sqrt(0) = 0, but its slope is infinite

    with pytest.raises(TrainingDiverged, match="gradient norm is inf at step 1"):
        train(
            model,
            optim.SGD(model.parameters(), lr=0.01),
            lambda: (x, y),
            loss_fn,
            max_steps=3,
            grad_clip=1.0,
            quiet=True,
        )


def test_keyboard_interrupt_in_get_batch_abandons_the_step() -> None:
    x, y = _data()
    model = _model()
    saved: list[int] = []
    n = {"batches": 0}

    def get_batch() -> Any:
        n["batches"] += 1
        if n["batches"] == 6:  # second micro-batch of step 3
            raise KeyboardInterrupt
        return x, y

    opt = optim.SGD(model.parameters(), lr=0.01)
    result = train(
        model, opt, get_batch, _mse, max_steps=10, grad_accum=2, on_interrupt=lambda s: saved.append(s.step), quiet=True
    )
    assert result.interrupted and result.step == 2 and saved == [2]
    assert all(p.grad is None for p in model.parameters())  # the half step's gradients are dropped


def test_keyboard_interrupt_in_a_callback() -> None:
    x, y = _data()
    model = _model()

    def on_step_end(s: TrainState) -> None:
        if s.step == 3:
            raise KeyboardInterrupt

    result = train(
        model,
        optim.SGD(model.parameters(), lr=0.01),
        lambda: (x, y),
        _mse,
        max_steps=10,
        on_step_end=on_step_end,
        quiet=True,
    )
    assert result.interrupted and result.step == 3


def test_sigint_finishes_the_current_step() -> None:
    x, y = _data()
    model = _model()
    n = {"batches": 0}
    interrupted_at: list[int] = []

    def get_batch() -> Any:
        n["batches"] += 1
        if n["batches"] == 3:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C during step 3
        return x, y

    result = train(
        model,
        optim.SGD(model.parameters(), lr=0.01),
        get_batch,
        _mse,
        max_steps=10,
        on_interrupt=lambda s: interrupted_at.append(s.step),
        quiet=True,
    )
    assert result.interrupted and result.step == 3 and interrupted_at == [3]  # step 3 completed
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


def test_nothing_to_do_and_bad_arguments() -> None:
    model = _model()
    opt = optim.SGD(model.parameters(), lr=0.01)
    result = train(model, opt, lambda: None, _mse, max_steps=5, start_step=5, quiet=True)
    assert result.step == 5 and result.loss is None and result.history == []
    with pytest.raises(ValueError, match="grad_accum"):
        train(model, opt, lambda: None, _mse, max_steps=5, grad_accum=0)


@pytest.mark.gpu
def test_cuda_training_reads_loss_per_window_and_catches_nan() -> None:
    x, y = _data()
    model = _model().to("cuda")
    opt = optim.AdamW(model.parameters(), lr=0.01)
    result = train(model, opt, lambda: (x, y), _mse, max_steps=6, log_interval=3, grad_clip=1.0, quiet=True)
    assert [r["step"] for r in result.history] == [3, 6] and np.isfinite(result.loss)
    assert all(p.device == "cuda" for p in model.parameters())

    def nan_loss(m: nn.Module, batch: Any) -> minigpt.Tensor:
        return _mse(m, batch) * float("nan")

    with pytest.raises(TrainingDiverged, match="in steps 1-3"):
        train(model, opt, lambda: (x, y), nan_loss, max_steps=6, log_interval=3, quiet=True)
