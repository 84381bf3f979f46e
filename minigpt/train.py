"""The one training loop: toy MLPs, the tests and GPT training all run through `train()`.

One step = `grad_accum` micro-batches (each loss scaled by 1/grad_accum and backpropagated), an
optional gradient clip, and one optimizer step with the scheduled learning rate. Around it: periodic
evaluation, callbacks for checkpointing, a progress bar or plain log lines, a JSONL metrics log,
a clean stop on Ctrl-C, and a hard stop on a NaN/inf loss.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from tqdm import tqdm

from minigpt.autograd.backend import is_array, to_device
from minigpt.autograd.function import no_grad
from minigpt.autograd.tensor import Tensor
from minigpt.errors import UserError, raise_signal_interrupt
from minigpt.local_parallel import LocalDataParallel, WorkerDied, processes_for
from minigpt.nn import Module
from minigpt.optim import Optimizer, clip_grad_norm_


class TrainingDiverged(UserError):
    """The loss (or gradient norm) became NaN or infinite."""


@dataclass
class TrainState:
    """What the loop knows, handed to every callback. `step` counts completed optimizer steps.

    `loss` is the mean training loss over the last logging window as a float (None before the first
    one is read: on the GPU it is read only every `log_interval` steps, to avoid a sync per step).
    """

    step: int
    max_steps: int
    lr: float = 0.0
    loss: float | None = None
    grad_norm: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # from the latest evaluation
    elapsed: float = 0.0  # seconds since this call of train() began


@dataclass
class TrainResult:
    step: int  # completed steps: pass it back as start_step to resume
    loss: float | None  # the last logged training loss
    interrupted: bool
    stop_signal: int | None  # the signal that interrupted the run (KeyboardInterrupt counts as SIGINT)
    metrics: dict[str, float]  # the latest evaluation's
    elapsed: float
    history: list[dict[str, Any]]  # every record also written to the JSONL log


Callback = Callable[[TrainState], Any]


class _Reporter:
    """Where progress goes: a tqdm bar on a terminal, plain lines otherwise, nothing when quiet; plus JSONL."""

    def __init__(
        self,
        state: TrainState,
        desc: str,
        quiet: bool,
        log_path: str | Path | None,
        time_offset: float,
        tokens_per_step: int | None = None,
    ) -> None:
        self.quiet, self.desc, self.history, self.time_offset = quiet, desc, [], time_offset
        self.tokens_per_step = tokens_per_step
        self.bar = None
        if not quiet and sys.stdout.isatty():
            self.bar = tqdm(
                total=state.max_steps, initial=state.step, desc=desc, file=sys.stdout, dynamic_ncols=True, leave=True
            )
        self.log: TextIO | None = None
        if log_path is not None:
            Path(log_path).parent.mkdir(parents=True, exist_ok=True)
            self.log = open(log_path, "a", encoding="utf-8")  # appended: a resumed run continues the file

    def record(self, rec: dict[str, Any]) -> None:
        """Append `rec` to the history and the JSONL log; its "time" counts from the run's start (across
        resumes), and "wall" is the Unix time it was written."""
        rec["time"] = round(rec["time"] + self.time_offset, 4)
        if self.tokens_per_step:
            rec["tokens"] = rec["step"] * self.tokens_per_step  # tokens seen: the x axis of a loss plot
        rec["wall"] = round(time.time(), 3)
        self.history.append(rec)
        if self.log is not None:
            self.log.write(json.dumps(rec, default=float) + "\n")
            self.log.flush()

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def train_log(self, state: TrainState, steps_per_s: float, tokens_per_step: int | None) -> None:
        """One JSONL record and one progress update for a logged step."""
        rec: dict[str, Any] = {"step": state.step, "loss": state.loss, "lr": state.lr, "time": round(state.elapsed, 4)}
        if tokens_per_step:
            rec["tokens_per_s"] = round(steps_per_s * tokens_per_step, 1)
            rate = f"{steps_per_s * tokens_per_step:,.0f} tok/s"
        else:
            rec["steps_per_s"] = round(steps_per_s, 3)
            rate = f"{steps_per_s:.2f} it/s"
        parts = [f"loss {state.loss:.4f}", f"lr {state.lr:.2e}"]
        if tokens_per_step or self.bar is None:  # the bar shows it/s itself
            parts.append(rate)
        if state.grad_norm is not None:
            rec["grad_norm"] = state.grad_norm
            parts.insert(2, f"norm {state.grad_norm:.2f}")
        self.record(rec)
        if self.bar is not None:
            self.bar.set_postfix_str(", ".join(parts), refresh=False)
        elif not self.quiet:
            print(f"{self.desc} step {state.step}/{state.max_steps} | " + " | ".join(parts), flush=True)

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        elif not self.quiet:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.log is not None:
            self.log.close()


class _StopSignals:
    """While active, the first SIGINT (Ctrl-C) or SIGTERM (what schedulers and containers send) only
    sets a flag, so the step in progress finishes; a second one raises KeyboardInterrupt. Installed
    only in the main thread, and for each signal only if it has its default handler (or the command's,
    `raise_signal_interrupt`)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, on_first: Callable[[int], None]) -> None:
        self.signum: int | None = None
        self.on_first = on_first
        self.installed: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        self.on_first(signum)

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                previous = signal.getsignal(signum)
                if previous in (signal.default_int_handler, signal.SIG_DFL, raise_signal_interrupt):
                    self.installed[signum] = previous
                    signal.signal(signum, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self.installed.items():
            signal.signal(signum, previous)


def _to_device(batch: Any, device: str) -> Any:
    """The batch's arrays (also inside tuples/lists) on `device`; anything else as it is."""
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(b, device) for b in batch)
    return to_device(batch, device) if is_array(batch) else batch


def _forward_backward(
    model: Module,
    get_batch: Callable[[], Any],
    loss_fn: Callable[[Module, Any], Tensor],
    grad_accum: int,
    device: str,
    split: LocalDataParallel | None = None,
) -> Any:
    """Backpropagate grad_accum micro-batches, each loss scaled by 1/grad_accum so the summed grads are
    the big batch's mean (each shared out among `split`'s processes where given). Returns the step's
    loss, left on the device (reading it would sync a GPU)."""
    step_loss: Any = 0.0
    for _ in range(grad_accum):
        batch = _to_device(get_batch(), device)  # the one place batches move to the device
        if split is not None:
            step_loss = step_loss + split.forward_backward(batch, 1.0 / grad_accum)
            continue
        loss = loss_fn(model, batch)
        if grad_accum > 1:
            loss = loss * (1.0 / grad_accum)
        loss.backward()
        step_loss = step_loss + loss.data
    return step_loss


def is_eval_step(step: int, eval_interval: int, max_steps: int) -> bool:
    """Whether `train` evaluates after `step` completed steps: every eval_interval steps, and at the end."""
    return bool(eval_interval and step % eval_interval == 0) or step == max_steps


def train(
    model: Module,
    optimizer: Optimizer,
    get_batch: Callable[[], Any],
    loss_fn: Callable[[Module, Any], Tensor],
    *,
    max_steps: int,
    start_step: int = 0,
    lr_schedule: Callable[[int], float] | None = None,
    grad_clip: float | None = None,
    grad_accum: int = 1,
    eval_fn: Callable[[], dict[str, float]] | None = None,
    eval_interval: int = 0,
    log_interval: int = 10,
    on_step_end: Callback | None = None,
    on_eval: Callback | None = None,
    on_interrupt: Callback | None = None,
    on_diverge: Callback | None = None,
    log_path: str | Path | None = None,
    quiet: bool = False,
    tokens_per_step: int | None = None,
    desc: str = "train",
    time_offset: float = 0.0,
    grad_sync: Callable[[Any, bool], tuple[Any, bool]] | None = None,
    processes: int | None = None,
) -> TrainResult:
    """Train `model` from step `start_step` until `max_steps` optimizer steps are done.

    get_batch() -> batch; loss_fn(model, batch) -> scalar loss Tensor. `lr_schedule(step)` (step
    counted from 0) sets every param group's lr before each step. `eval_fn()` -> metrics runs under
    no_grad and model.eval() every `eval_interval` steps and after the last step (only then when
    `eval_interval` is 0). Callbacks get the TrainState: `on_step_end` after every step (after any
    evaluation), `on_eval` after an evaluation, `on_interrupt` on Ctrl-C (the step in progress is
    finished, or abandoned if it cannot be), `on_diverge` before TrainingDiverged is raised.
    `tokens_per_step` turns the throughput shown from steps/s into tokens/s. `time_offset` (seconds
    trained before, e.g. by the run this one resumes) is added to the logged times. SIGINT and SIGTERM
    finish the step in progress, call `on_interrupt` and return (`stop_signal` says which).
    Data-parallel training passes `grad_sync(step_loss, stop) -> (step_loss, stop)`, run after each
    backward: it averages the gradients and the loss over the processes and tells whether any of them
    was signalled, so all stop at the same step (see minigpt.distributed).
    On the CPU each batch is shared out among `processes` processes (default: one per minigpt thread,
    where that gives the same result; see minigpt.local_parallel); 1 keeps the step in this process.
    """
    if grad_accum < 1:
        raise ValueError(f"train: grad_accum must be >= 1, got {grad_accum}")
    if start_step < 0 or max_steps < 0:
        raise ValueError(f"train: need 0 <= start_step and 0 <= max_steps (got {start_step}, {max_steps})")
    state = TrainState(step=start_step, max_steps=max_steps, lr=float(optimizer.param_groups[0]["lr"]))
    report = _Reporter(state, desc, quiet, log_path, time_offset, tokens_per_step)
    loop = _Loop(
        model, optimizer, get_batch, loss_fn, state, report,
        lr_schedule=lr_schedule, grad_clip=grad_clip, grad_accum=grad_accum, eval_fn=eval_fn,
        eval_interval=eval_interval, log_interval=log_interval, on_step_end=on_step_end, on_eval=on_eval,
        on_diverge=on_diverge, tokens_per_step=tokens_per_step, desc=desc, grad_sync=grad_sync,
        processes=processes,
    )  # fmt: skip
    interrupted = False
    model.train()
    try:
        # Non-finite values are caught by `check` (and named there), so NumPy's warnings would only
        # repeat them as extra lines: silenced while training.
        with _StopSignals(loop.interrupt_notice) as stop, np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            try:
                while state.step < max_steps:
                    if loop.step(stop):
                        raise KeyboardInterrupt
            except KeyboardInterrupt:
                interrupted = True
                loop.interrupted(on_interrupt)
    finally:
        loop.close()
        report.close()
    return TrainResult(
        step=state.step,
        loss=state.loss,
        interrupted=interrupted,
        stop_signal=(stop.signum or signal.SIGINT) if interrupted else None,
        metrics=state.metrics,
        elapsed=time.perf_counter() - loop.t0,
        history=report.history,
    )


@dataclass
class _Loop:
    """The steps of one `train` call (its arguments are documented there) and the state between them."""

    model: Module
    optimizer: Optimizer
    get_batch: Callable[[], Any]
    loss_fn: Callable[[Module, Any], Tensor]
    state: TrainState
    report: _Reporter
    lr_schedule: Callable[[int], float] | None
    grad_clip: float | None
    grad_accum: int
    eval_fn: Callable[[], dict[str, float]] | None
    eval_interval: int
    log_interval: int
    on_step_end: Callback | None
    on_eval: Callback | None
    on_diverge: Callback | None
    tokens_per_step: int | None
    desc: str
    grad_sync: Callable[[Any, bool], tuple[Any, bool]] | None
    processes: int | None

    def __post_init__(self) -> None:
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.device = self.params[0].device if self.params else "cpu"
        n = self.processes
        if n is None:
            n = processes_for(self.model, self.device, data_parallel=self.grad_sync is not None)
        self.split = LocalDataParallel(self.model, self.loss_fn, n) if n > 1 else None
        # Reading a value on the CPU is free, so the loss and gradient norm are checked at every step,
        # before the update; on the GPU a read waits for the device, so they are read once per log window.
        self.check_every_step = self.device == "cpu"
        self.t0 = time.perf_counter()
        self.window_start, self.window_steps = self.t0, 0
        self.running: Any = 0.0  # summed step losses since the last log, left on the device until read

    def step(self, stop: _StopSignals) -> bool:
        """One optimizer step, then its log line, evaluation and callbacks. True: stop now (signalled)."""
        state, optimizer = self.state, self.optimizer
        if self.lr_schedule is not None:
            state.lr = float(self.lr_schedule(state.step))
            for group in optimizer.param_groups:
                group["lr"] = state.lr
        optimizer.zero_grad()
        try:
            step_loss = _forward_backward(
                self.model, self.get_batch, self.loss_fn, self.grad_accum, self.device, self.split
            )
        except WorkerDied:
            if stop.signum is not None:  # a signal to the whole process group: abandon the step, save
                raise KeyboardInterrupt from None
            raise
        if self.grad_sync is not None:  # data parallel: every rank gets the same grads, loss and stop
            step_loss, stop_all = self.grad_sync(step_loss, stop.signum is not None)
        self.running = self.running + step_loss
        self.window_steps += 1
        grad_norm = clip_grad_norm_(self.params, self.grad_clip) if self.grad_clip is not None else None
        log_now = (state.step + 1) % max(self.log_interval, 1) == 0 or state.step + 1 == state.max_steps
        if self.check_every_step or log_now:
            self.check(grad_norm)  # before the update: on the CPU the weights stay good
        optimizer.step()
        state.step += 1
        self.report.advance()

        if log_now:
            now = time.perf_counter()
            state.elapsed = now - self.t0
            self.report.train_log(state, self.window_steps / max(now - self.window_start, 1e-9), self.tokens_per_step)
            self.running, self.window_start, self.window_steps = 0.0, now, 0

        if self.eval_fn is not None and is_eval_step(state.step, self.eval_interval, state.max_steps):
            self.evaluate()
        state.elapsed = time.perf_counter() - self.t0
        if self.on_step_end is not None:
            self.on_step_end(state)
        return stop_all if self.grad_sync is not None else stop.signum is not None

    def close(self) -> None:
        if self.split is not None:
            self.split.close()

    def check(self, grad_norm: Any) -> None:
        """Read the window's mean loss and the step's gradient norm; raise if either is not finite."""
        state = self.state
        state.loss = float(self.running) / self.window_steps  # the one host read per window on the GPU
        state.grad_norm = None if grad_norm is None else float(grad_norm)
        step = state.step + 1
        when = f"at step {step}" if self.check_every_step else f"in steps {step - self.window_steps + 1}-{step}"
        for what, value in (("loss", state.loss), ("gradient norm", state.grad_norm)):
            if value is not None and not math.isfinite(value):
                raise self.diverged(what, value, when)

    def evaluate(self) -> None:
        state, model = self.state, self.model
        was_training = model.training
        model.eval()
        try:
            with no_grad():
                metrics = self.eval_fn() if self.eval_fn is not None else {}
        finally:
            model.train(was_training)
        state.metrics = {k: float(v) for k, v in metrics.items()}
        state.elapsed = time.perf_counter() - self.t0
        self.report.record({"step": state.step, "time": round(state.elapsed, 4), "metrics": state.metrics})
        scores = ", ".join(f"{k} {v:.4f}" for k, v in state.metrics.items())
        self.report.message(f"{self.desc} step {state.step}: {scores}")
        for name, value in state.metrics.items():  # never hand a broken state to on_eval (a checkpoint)
            if not math.isfinite(value):
                raise self.diverged(f"evaluation's {name}", value, f"at step {state.step}")
        if self.on_eval is not None:
            self.on_eval(state)

    def diverged(self, what: str, value: float, when: str) -> TrainingDiverged:
        state = self.state
        state.elapsed = time.perf_counter() - self.t0
        if what == "loss":
            state.loss = value
        self.optimizer.zero_grad()
        if self.on_diverge is not None:
            self.on_diverge(state)
        return TrainingDiverged(
            f"training diverged: the {what} is {value} {when}. Lower the learning rate "
            f"(it was {state.lr:.3g}) or clip gradients (grad_clip), then restart from the last good checkpoint"
        )

    def interrupt_notice(self, signum: int) -> None:
        name = signal.Signals(signum).name
        self.report.message(f"{name}: finishing the current step, then saving ({name} again to abandon the step)")

    def interrupted(self, on_interrupt: Callback | None) -> None:
        # A step cut short leaves partial gradients; parameters are only touched by
        # optimizer.step(), which the signal flag lets finish.
        self.optimizer.zero_grad()
        self.state.elapsed = time.perf_counter() - self.t0
        self.report.message(f"{self.desc}: interrupted after step {self.state.step}")
        if on_interrupt is not None:
            on_interrupt(self.state)


__all__ = ["TrainResult", "TrainState", "TrainingDiverged", "is_eval_step", "train"]
