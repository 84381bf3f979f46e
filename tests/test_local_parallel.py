"""minigpt.local_parallel: a batch shared out among forked processes trains as one process does."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys

import numpy as np
import pytest

from minigpt import nn, optim
from minigpt.autograd import parallel
from minigpt.autograd.tensor import Tensor
from minigpt.errors import UserError
from minigpt.gpt import GPT, GPTConfig
from minigpt.local_parallel import LocalDataParallel, WorkerDied, processes_for
from minigpt.train import train

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forks workers only on Linux")

CONFIG = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16)


def gpt_loss(model, batch):
    return model(*batch)[1]


def batches(n: int, rows: int = 4, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    shape = (2, rows, CONFIG.block_size)  # inputs and targets
    return [tuple(rng.integers(0, CONFIG.vocab_size, shape)) for _ in range(n)]


def run(processes: int, steps: int = 5, rows: int = 4, grad_accum: int = 1, loss_fn=gpt_loss, reload=None):
    """A 2-layer GPT trained `steps` AdamW steps; returns (model, losses logged per step). `reload`:
    (step, state dict) whose arrays replace the parameters' after that step."""
    model = GPT(CONFIG, rng=np.random.default_rng(0))
    opt = optim.AdamW(model.parameters(), lr=1e-2)
    data = iter(batches(steps * grad_accum, rows))
    losses = []

    def on_step_end(state):
        losses.append(state.loss)
        if reload is not None and state.step == reload[0]:
            for name, p in model.named_parameters():
                p.data = reload[1][name].copy()

    train(
        model, opt, lambda: next(data), loss_fn, max_steps=steps, grad_clip=1.0, grad_accum=grad_accum,
        log_interval=1, quiet=True, processes=processes, on_step_end=on_step_end,
    )  # fmt: skip
    return model, losses


def assert_same_training(a, b) -> None:
    (model_a, losses_a), (model_b, losses_b) = a, b
    np.testing.assert_allclose(losses_a, losses_b, rtol=1e-5)
    for (name, p), q in zip(model_a.named_parameters(), model_b.parameters()):
        np.testing.assert_allclose(p.data, q.data, rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("processes, rows, grad_accum", [(2, 4, 1), (3, 7, 1), (2, 4, 2)])
def test_split_batch_trains_as_one_process(processes, rows, grad_accum):
    """Uneven parts (7 rows over 3 processes) are weighted by their rows; accumulation splits each micro-batch."""
    blas_threads = parallel.blas_num_threads()
    one = run(1, rows=rows, grad_accum=grad_accum)
    assert_same_training(run(processes, rows=rows, grad_accum=grad_accum), one)
    assert one[1][0] != one[1][-1]  # it trained
    assert not multiprocessing.active_children()  # the workers are gone
    assert parallel.blas_num_threads() == blas_threads  # held at one only while a part runs


def test_workers_see_weights_replaced_between_steps():
    """New arrays assigned to p.data between steps reach the workers too."""
    reload = (2, GPT(CONFIG, rng=np.random.default_rng(1)).state_dict())
    assert_same_training(run(2, reload=reload), run(1, reload=reload))


def test_fewer_rows_than_processes_fork_as_many_workers_as_rows_allow(monkeypatch):
    assert_same_training(run(3, rows=2), run(1, rows=2))
    monkeypatch.setattr("minigpt.autograd.parallel.get_num_threads", lambda: 4)
    split = LocalDataParallel(GPT(CONFIG, rng=np.random.default_rng(0)), gpt_loss, processes=4)
    try:
        split.forward_backward(batches(1, rows=2)[0])
        assert split.processes == 2 and split.threads_each == 2  # the 4 threads shared by 2 processes
    finally:
        split.close()


def worker_fails(parent: int, kind: str):
    def loss_fn(model, batch):
        if os.getpid() != parent:
            if kind == "exit":
                os._exit(3)
            raise ValueError("bad part")
        return gpt_loss(model, batch)

    return loss_fn


def test_a_worker_error_stops_the_run():
    with pytest.raises(RuntimeError, match="ValueError: bad part"):
        run(2, loss_fn=worker_fails(os.getpid(), "raise"))
    assert not multiprocessing.active_children()


def test_a_dead_worker_is_one_clear_error():
    with pytest.raises(WorkerDied, match="died in a step .*exit code 3.*MINIGPT_NO_PROCESSES=1") as e:
        run(2, loss_fn=worker_fails(os.getpid(), "exit"))
    assert isinstance(e.value, UserError)  # the command lines print it as one line, exit 2
    assert not multiprocessing.active_children()


def test_when_processes_share_the_batch(monkeypatch):
    model = GPT(CONFIG, rng=np.random.default_rng(0))
    monkeypatch.setattr("minigpt.autograd.parallel.get_num_threads", lambda: 2)
    assert processes_for(model, "cpu", data_parallel=False) == 2
    assert processes_for(model, "cuda", data_parallel=False) == 1
    assert processes_for(model, "cpu", data_parallel=True) == 1  # MPI ranks: one process each
    dropout = GPT(GPTConfig(**{**CONFIG.__dict__, "dropout": 0.1}), rng=np.random.default_rng(0))
    assert processes_for(dropout, "cpu", data_parallel=False) == 1
    monkeypatch.setenv("MINIGPT_NO_PROCESSES", "1")
    assert processes_for(model, "cpu", data_parallel=False) == 1


def test_other_batches_and_models_run_here():
    """An MLP on a dict batch: nothing to split, the loss is this process's."""
    model = nn.MLP(3, [4, 1], rng=np.random.default_rng(0))
    split = LocalDataParallel(model, lambda m, b: m(Tensor(b["x"])).mean(), processes=2)
    try:
        loss = split.forward_backward({"x": np.ones((4, 3), np.float32)})
        assert np.isfinite(float(loss)) and all(p.grad is not None for p in model.parameters())
    finally:
        split.close()
    assert not multiprocessing.active_children()


def test_a_worker_killed_between_steps_is_one_clear_error():
    """As under `kill -TERM -PGID`: the worker is gone before the parent hands out the next step's rows."""
    model = GPT(CONFIG, rng=np.random.default_rng(0))
    split = LocalDataParallel(model, gpt_loss, processes=2)
    try:
        split.forward_backward(batches(1)[0])
        process = split.workers[0][0]
        os.kill(process.pid, signal.SIGKILL)
        process.join()
        with pytest.raises(WorkerDied, match="exit code -9"):
            split.forward_backward(batches(1)[0])
    finally:
        split.close()


def test_a_worker_ends_on_sigterm_whatever_handler_it_inherited():
    """The command's SIGTERM handler raises in Python; a worker must not inherit it (it would report an
    error instead of ending, and the run would stop with a traceback instead of saving)."""

    def raising(signum, frame):
        raise RuntimeError("the command's handler")

    previous = signal.signal(signal.SIGTERM, raising)
    try:
        split = LocalDataParallel(GPT(CONFIG, rng=np.random.default_rng(0)), gpt_loss, processes=2)
    finally:
        signal.signal(signal.SIGTERM, previous)
    try:
        split.forward_backward(batches(1)[0])  # the worker is in its loop
        os.kill(split.workers[0][0].pid, signal.SIGTERM)
        with pytest.raises(WorkerDied, match="exit code -15"):
            split.forward_backward(batches(1)[0])
    finally:
        split.close()
