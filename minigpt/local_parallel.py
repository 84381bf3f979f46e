"""Data parallel over this machine's cores: each training batch is shared out among processes.

minigpt's threads hand work to each other through the GIL and the OS, tens of µs per hand-off on a
VM, and a small model's step is dozens of such hand-offs: on 2 cores they speed config S's step up
only ~1.2x. Processes need two hand-offs per step. So when `train` runs on the CPU with N > 1
threads, it forks N - 1 workers in its first step, once the parent has done its part (so they
inherit the kernels that loaded); fewer if the batch has fewer rows, each process then getting a
share of the threads. In every step each process runs forward and backward over
its rows of the batch (on one thread, when there are as many processes as threads), and the
parent adds the workers' gradients, weighted by their rows, to its own before clipping and the
update. The parameters live in shared memory, which the parent alone updates, so the workers
always see the current weights; gradients come back through shared memory too, each worker's loss
(or error) over a pipe. Evaluation and sampling stay in the parent, on its threads.

The result is the single process's: the gradient of the batch's mean loss (to float rounding; the
loss must be a mean over rows). The rounding depends on the number of parts, so a run resumed with
another thread count continues the same maths, but not bit for bit. Not used where it could differ
or fail: on a GPU, under MPI (`grad_sync`), with dropout (the workers would need random streams of
their own, restored on resume), outside Linux (fork() without exec is unsafe with macOS's system
libraries), and for a batch that is not a tuple of arrays with a row per example. loss_fn runs in
the workers too: what it changes there (a counter, a log) stays there. MINIGPT_NO_PROCESSES=1 keeps
training in one process, on its threads (to compare the two).
"""

from __future__ import annotations

import mmap
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from minigpt import nn
from minigpt.autograd import parallel
from minigpt.autograd.backend import flat_views
from minigpt.autograd.tensor import Tensor
from minigpt.errors import UserError


class WorkerDied(UserError):
    """A worker process ended in the middle of a step (killed, or out of memory)."""


def processes_for(model: nn.Module, device: str, data_parallel: bool) -> int:
    """How many processes `train` shares each batch among: minigpt's CPU threads, or 1 where it cannot."""
    if device != "cpu" or data_parallel or os.environ.get("MINIGPT_NO_PROCESSES") == "1":
        return 1
    if not sys.platform.startswith("linux"):  # fork() without exec is unsafe with macOS's system libraries
        return 1
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()):
        return 1
    params = [p for p in model.parameters() if p.requires_grad]
    if not params or any(type(p.data) is not np.ndarray or p.dtype != params[0].dtype for p in params):
        return 1
    return parallel.get_num_threads()


def _shared(size: int, dtype: Any) -> np.ndarray:
    """A zeroed flat array in anonymous shared memory: forked children write to the same pages."""
    nbytes = max(size, 1) * np.dtype(dtype).itemsize
    return np.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype)[:size]


class LocalDataParallel:
    """Up to `processes` processes (this one and forked workers) and the shared memory between them.

    The workers are forked at the first batch that can be shared, once this process has done its
    part of it: as many as its rows allow, each process then running on its share of minigpt's
    threads (one each when there are as many processes as threads, the default).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], Tensor], processes: int):
        self.model, self.loss_fn, self.max_processes = model, loss_fn, processes
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.workers: list[tuple[Any, Any, list[np.ndarray]]] = []
        self.weights: list[np.ndarray] = []  # the parameters' views of the shared buffer, once started
        self.started, self.threads_each = False, 1

    @property
    def processes(self) -> int:
        return len(self.workers) + 1

    def _start(self, processes: int) -> None:
        """Put the weights in shared memory and fork processes - 1 workers, on threads_each threads."""
        self.started = True
        size, dtype = sum(p.data.size for p in self.params), self.params[0].dtype
        self.weights = flat_views(_shared(size, dtype), [p.shape for p in self.params])
        self._share_weights()
        context = multiprocessing.get_context("fork")
        for _ in range(processes - 1):
            grads = flat_views(_shared(size, dtype), [p.shape for p in self.params])
            here, there = context.Pipe()
            ours = [pipe for _, pipe, _ in self.workers] + [here]  # the child closes its copies of these
            args = (there, ours, self.model, self.loss_fn, self.params, grads, self.threads_each)
            worker = context.Process(target=_serve, args=args, daemon=True)
            worker.start()
            there.close()
            self.workers.append((worker, here, grads))

    def _share_weights(self) -> None:
        """Make the parameters views of the shared buffer again where something replaced an array (`p.data = ...`)."""
        for p, view in zip(self.params, self.weights):
            if p.data is not view:
                view[...] = p.data
                p.data = view

    def forward_backward(self, batch: Any, scale: float = 1.0) -> Any:
        """loss_fn over `batch` (scaled by `scale`), its gradient added to the parameters' .grad; returns the loss.

        The rows are cut into one part per process; each part's loss is weighted by its share of the rows.
        """
        rows = _rows(batch)
        parts = _split_rows(batch, min(self.processes if self.started else self.max_processes, rows))
        if parts is None:  # nothing to share: this process does it all, on its threads
            loss = self.loss_fn(self.model, batch) * scale
            loss.backward()
            return loss.data
        shares = [scale * len(part[0]) / rows for part in parts]
        workers = self.workers[: len(parts) - 1]
        if self.started:
            self._share_weights()
            _hand_out(workers, parts, shares)
        else:
            self.threads_each = max(1, parallel.get_num_threads() // len(parts))
        threads = parallel.get_num_threads()
        parallel.set_num_threads(self.threads_each)  # the workers have the other cores
        try:
            with parallel.blas_at_one():  # once for the part, not per GEMM (setting BLAS's threads costs µs)
                loss = self.loss_fn(self.model, parts[0]) * shares[0]
                loss.backward()
        except BaseException:
            for worker in workers:  # keep them in step
                self._collect(worker)
            raise
        finally:
            parallel.set_num_threads(threads)
        if not self.started:  # forked after this process's part: the workers inherit the kernels it loaded
            self._start(len(parts))  # (a worker's private memory at config S: 91 -> 33 MB)
            workers = self.workers
            _hand_out(workers, parts, shares)
        results = [self._collect(worker) for worker in workers]
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return loss.data + sum(results)

    def _collect(self, worker: tuple[Any, Any, list[np.ndarray]]) -> float | BaseException:
        """Wait for a worker's part; add its gradients to the parameters' and return its weighted loss
        (or the error that stopped it)."""
        process, pipe, grads = worker
        try:
            ok, value = pipe.recv()
        except (EOFError, OSError):
            process.join(1.0)
            return WorkerDied(
                f"training worker process {process.pid} died in a step (exit code {process.exitcode}; "
                "killed, or out of memory?): train in one process with MINIGPT_NO_PROCESSES=1, or lower batch_size"
            )
        if not ok:
            return RuntimeError(f"in training worker process {process.pid}: {value}")
        for p, g in zip(self.params, grads):
            if p.grad is not None:
                p.grad += g  # in place: backward leaves each leaf a gradient buffer of its own
        return value

    def workers_private_mb(self) -> float:
        """Memory the workers hold apart from this process (their private pages), where Linux tells."""
        total = 0
        for process, _, _ in self.workers:
            try:
                with open(f"/proc/{process.pid}/smaps_rollup") as f:
                    total += sum(
                        int(line.split()[1]) for line in f if line.startswith(("Private_Clean", "Private_Dirty"))
                    )
            except OSError:
                return 0.0
        return total / 1024

    def close(self) -> None:
        """Stop the workers (each finishes the part it has) and wait for them."""
        for _, pipe, _ in self.workers:
            try:
                pipe.send(None)
            except OSError:
                pass
            pipe.close()
        for process, _, _ in self.workers:
            process.join(5.0)
            if process.is_alive():
                process.kill()
                process.join()
        self.workers = []


def _hand_out(workers: list[tuple[Any, Any, Any]], parts: list[Any], shares: list[float]) -> None:
    """Send each worker its part of the batch (parts[0] is this process's) and its share of the loss."""
    for (_, pipe, _), part, share in zip(workers, parts[1:], shares[1:]):
        try:
            pipe.send((part, share))
        except OSError:  # the worker is gone: _collect says so
            pass


def _rows(batch: Any) -> int:
    """The rows of a batch that can be shared out: a tuple or list of NumPy arrays with the same
    number of rows (0 for anything else)."""
    if not isinstance(batch, (tuple, list)) or not batch:
        return 0
    if any(type(a) is not np.ndarray or a.ndim == 0 or len(a) != len(batch[0]) for a in batch):
        return 0
    return len(batch[0])


def _split_rows(batch: Any, parts: int) -> list[Any] | None:
    """The batch's arrays cut into `parts` row ranges, or None for fewer than 2 parts."""
    if parts < 2:
        return None
    return [type(batch)(a[s:e] for a in batch) for s, e in parallel.splits(len(batch[0]), parts)]


def _serve(pipe: Any, parents_pipes: list[Any], model: nn.Module, loss_fn: Callable[[nn.Module, Any], Tensor],
           params: list[Tensor], grads: list[np.ndarray], threads: int) -> None:  # fmt: skip
    """A worker's loop: for each (part, share) the parent sends, backpropagate share x loss_fn(part)
    into the shared gradients and send back (True, weighted loss), or (False, the error). It ends when
    the parent says so or is gone (its pipe closes: hence the parent's ends are closed here)."""
    for end in parents_pipes:
        end.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the command's handler: end here, the parent saves
    parallel.set_num_threads(threads)
    with parallel.blas_at_one():  # BLAS at one thread for the worker's life: its GEMMs run on minigpt's
        while True:
            try:
                message = pipe.recv()
            except (EOFError, OSError):  # the parent is gone
                return
            if message is None:
                return
            part, share = message
            try:
                for p in params:
                    p.grad = None
                loss = loss_fn(model, part) * share
                loss.backward()
                for p, g in zip(params, grads):
                    if p.grad is not None:
                        g[...] = p.grad
                pipe.send((True, float(loss.data)))
            except BaseException as e:  # reported by the parent, which stops the run
                pipe.send((False, f"{type(e).__name__}: {e}"))
