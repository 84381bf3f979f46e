"""CPU parallelism: minigpt's own threads run GEMM slices and kernels' row blocks side by side.

NumPy's ufuncs and minigpt's Numba kernels (which release the GIL) run on the calling thread, and
OpenBLAS's threads spin for ~0.1 s after each GEMM, so a kernel between two GEMMs could neither use
the other cores nor share them. Instead minigpt splits the work itself: a GEMM into row (or batch)
slices, run with BLAS at one thread, and a kernel into row blocks, which the threads (the caller's
among them) take as they come free. Idle workers sleep on a lock, so nothing spins while another
pool works. Measured on 2 cores: split GEMMs run as fast as OpenBLAS's own two threads. A hand-off
costs ~50 µs here, so small work stays on the caller's thread.

Importing minigpt changes nothing process-wide. BLAS is held at one thread only while minigpt
multiplies (threadpoolctl finds the library: OpenBLAS, MKL, BLIS...), and set back right after, so
a user's own NumPy code keeps its threads; generation lends minigpt's threads to BLAS instead
(`blas_threads`). Workers start on first use. Where the BLAS cannot be controlled, minigpt keeps
one thread and BLAS threads as it likes. `set_num_threads` / MINIGPT_NUM_THREADS choose the count.
Where the `mkl` extra is installed, the 2-D products run on MKL's GEMM instead, sequential, on the
same threads (mkl.py).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from minigpt.autograd import mkl
from minigpt.autograd.backend import get_array_module

# ----------------------------------------------------------------------------- BLAS threads

_blas: list[Any] | None = None  # threadpoolctl's controllers of the BLAS libraries NumPy loaded


def _blas_libraries() -> list[Any]:
    """The loaded BLAS libraries whose thread count can be set (found once, on first use)."""
    global _blas
    if _blas is None:
        try:
            from threadpoolctl import ThreadpoolController

            _blas = list(ThreadpoolController().select(user_api="blas").lib_controllers)
        except Exception:  # threadpoolctl missing or unable to inspect this process: leave BLAS alone
            _blas = []
    return _blas


_blas_lock = threading.Lock()
_blas_holders = 0  # threads inside minigpt's GEMMs: the first sets BLAS to one thread, the last restores it
_blas_saved: list[int] = []


def _hold_blas_at_one() -> None:
    global _blas_holders, _blas_saved
    with _blas_lock:
        if _blas_holders == 0:
            _blas_saved = [lib.num_threads for lib in _blas]
            for lib in _blas:
                lib.set_num_threads(1)
        _blas_holders += 1


def _release_blas() -> None:
    global _blas_holders
    with _blas_lock:
        _blas_holders -= 1
        if _blas_holders == 0:
            for lib, n in zip(_blas, _blas_saved):
                lib.set_num_threads(n)


@contextlib.contextmanager
def blas_at_one() -> Iterator[None]:
    """Within: BLAS at one thread, for tasks that call GEMMs side by side on minigpt's threads."""
    if not _blas_libraries():
        yield
        return
    _hold_blas_at_one()
    try:
        yield
    finally:
        _release_blas()


def blas_num_threads() -> int | None:
    """The thread count of NumPy's BLAS now (None where it cannot be read)."""
    libs = _blas_libraries()
    return libs[0].num_threads if libs else None


# ----------------------------------------------------------------------------- the thread pool


class _Worker:
    """One thread that runs a job per start() and signals its end; it sleeps on a lock in between.

    Two plain locks as semaphores are the cheapest hand-off CPython has (~17 µs round trip here,
    against ~65 µs through a queue and an Event): it matters for the many small ops of a small model.
    """

    def __init__(self) -> None:
        self.go, self.done = threading.Lock(), threading.Lock()
        self.go.acquire()
        self.done.acquire()
        self.job: Any = None
        self.error: BaseException | None = None
        threading.Thread(target=self._run, daemon=True, name="minigpt-worker").start()

    def _run(self) -> None:
        _local.in_worker = True
        while True:
            self.go.acquire()
            try:
                self.job()
            except BaseException as e:  # re-raised in the caller's thread
                self.error = e
            self.job = None
            self.done.release()

    def start(self, job: Any) -> None:
        self.job = job
        self.go.release()

    def wait(self) -> None:
        interrupted = None
        while True:  # a Ctrl-C must not leave the worker's job unaccounted for: wait, then raise it
            try:
                self.done.acquire()
                break
            except KeyboardInterrupt as e:
                interrupted = e
        error, self.error = self.error, None
        if interrupted is not None:
            raise interrupted
        if error is not None:
            raise error


_local = threading.local()  # in_worker: a task that dispatches again runs its tasks itself
_dispatch = threading.Lock()  # one dispatcher at a time: a second (another user thread) runs serially


def _after_fork_in_child() -> None:
    """A forked child has only the forking thread: it starts workers of its own (and has a free dispatch lock)."""
    global _dispatch
    _dispatch = threading.Lock()
    _workers.clear()


_workers: list[_Worker] = []


def set_num_threads(n: int) -> None:
    """Use n CPU threads for GEMMs and kernels (like torch.set_num_threads); workers start on first use."""
    global _num_threads
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"set_num_threads: n must be a positive integer, got {n!r}")
    _num_threads = n


def get_num_threads() -> int:
    """minigpt's CPU threads now: 1 where BLAS cannot be held at one thread, or while lent to BLAS."""
    return 1 if _lent_to_blas or not _blas_libraries() else _num_threads


_lent_to_blas = False


@contextlib.contextmanager
def blas_threads() -> Iterator[None]:
    """Within: BLAS threads itself and minigpt's pool idles, for work that is all small GEMMs.

    Generation multiplies one token's vector by every weight matrix in turn: each GEMV is too short
    for a hand-off to our threads, but OpenBLAS's spinning threads split it at once (at config M
    a decode step goes from 4.2 to 3.5 ms).
    """
    global _lent_to_blas
    lent, _lent_to_blas = _lent_to_blas, True
    try:
        yield
    finally:
        _lent_to_blas = lent


def _default_threads() -> int:
    for var in ("MINIGPT_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_parallel(tasks: list[Any]) -> list[Any]:
    """[task() for task in tasks], the threads taking the next task as they come free.

    The caller's thread works too, so a worker that wakes late takes fewer tasks instead of
    holding everyone up: more tasks than threads balance better.
    """
    results: list[Any] = [None] * len(tasks)
    order = itertools.count()  # next() is atomic under the GIL: each task is taken once

    def drain() -> None:
        for i in order:
            if i >= len(tasks):
                return
            results[i] = tasks[i]()

    helpers = min(get_num_threads(), len(tasks)) - 1
    if helpers <= 0 or getattr(_local, "in_worker", False) or not _dispatch.acquire(blocking=False):
        drain()
        return results
    while len(_workers) < helpers:
        _workers.append(_Worker())
    try:
        for worker in _workers[:helpers]:
            worker.start(drain)
        try:
            drain()
        finally:
            for worker in _workers[:helpers]:
                worker.wait()
    finally:
        _dispatch.release()
    return results


def splits(n: int, parts: int) -> list[tuple[int, int]]:
    bounds = [n * i // parts for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts) if bounds[i] < bounds[i + 1]]


# ----------------------------------------------------------------------------- GEMMs

MIN_SLICE_ROWS = 256  # thinner row slices lose GEMM efficiency (measured at config S: 2 slices of 384 beat 4)
MIN_SLICE_FLOOR = 32  # on many cores, no slice thinner than this
MIN_SPLIT_FLOPS = 2e7  # below this a GEMM runs whole: a thread hand-off costs ~50 µs on this VM


def matmul(a: Any, b: Any, out: Any = None) -> Any:
    """a @ b (NumPy semantics, batched); large NumPy GEMMs are split over the threads.

    A 2-D product splits a's rows; a batched one splits the leading batch dim when both operands
    have it, else a's rows. Each slice writes its part of `out` in place.
    """
    if not isinstance(a, np.ndarray) or _lent_to_blas or not _blas_libraries():
        return get_array_module(a).matmul(a, b, out=out)
    _hold_blas_at_one()
    try:
        return _split_matmul(a, b, out)
    finally:
        _release_blas()


def matmuls(*products: tuple[Any, Any] | None) -> list[Any]:
    """[a @ b for each (a, b)] (None for None) for independent GEMMs of about equal work.

    With as many threads as products (Linear's two gradients on two threads), each runs whole on
    a thread of its own: one hand-off instead of one per product, and whole GEMMs run faster than
    slices. Otherwise they run in turn, each split by matmul.
    """
    pairs = [p for p in products if p is not None]
    a, b = pairs[0] if pairs else (None, None)
    whole = (
        len(pairs) == get_num_threads() > 1
        and isinstance(a, np.ndarray)
        and min(2.0 * x.size * y.shape[-1] for x, y in pairs) >= MIN_SPLIT_FLOPS
    )
    if not whole:
        return [None if p is None else matmul(*p) for p in products]
    with blas_at_one():
        results = iter(run_parallel([lambda p=p: mkl.matmul(*p) for p in pairs]))
    return [None if p is None else next(results) for p in products]


def _split_matmul(a: Any, b: Any, out: Any) -> Any:
    parts = _num_threads
    if parts == 1 or a.ndim < 2 or b.ndim < 2:
        return mkl.matmul(a, b, out=out)
    rows, cols = a.shape[-2], b.shape[-1]
    if 2.0 * max(a.size * cols, b.size * rows) < MIN_SPLIT_FLOPS:  # the FLOPs, batch dims broadcast
        return mkl.matmul(a, b, out=out)
    if out is None:
        shape = (*np.broadcast_shapes(a.shape[:-2], b.shape[:-2]), rows, cols)
        out = np.empty(shape, dtype=np.result_type(a, b))
    if a.ndim > 2 and b.ndim == a.ndim and a.shape[0] == b.shape[0] and a.shape[0] >= parts:
        spans = splits(a.shape[0], a.shape[0])  # one task per batch entry
        tasks = [lambda s=s, e=e: mkl.matmul(a[s:e], b[s:e], out=out[s:e]) for s, e in spans]
    else:
        # two slices per thread where they stay MIN_SLICE_ROWS thick, else one (MIN_SLICE_FLOOR rows at least)
        slices = 2 * parts if rows >= 2 * parts * MIN_SLICE_ROWS else min(parts, rows // MIN_SLICE_FLOOR)
        if slices < 2:
            return mkl.matmul(a, b, out=out)
        spans = splits(rows, slices)  # row slices of a (and out)
        tasks = [lambda s=s, e=e: mkl.matmul(a[..., s:e, :], b, out=out[..., s:e, :]) for s, e in spans]
    run_parallel(tasks)
    return out


# ----------------------------------------------------------------------------- CPU row blocks

# NumPy streams whole arrays through memory once per ufunc. A kernel that makes several passes
# (GELU, layer norm, softmax) therefore runs over blocks of rows small enough that its arrays stay
# in cache between passes, which also keeps its temporaries block-sized.
BLOCK_ELEMENTS = 1 << 18  # per array and block: 1 MB of float32 (measured best of 64K..whole array)
MIN_SPLIT_ELEMENTS = 1 << 17  # smaller arrays run on the caller's thread alone (measured at config S)


def map_row_blocks(kernel: Any, *arrays: Any, **constants: Any) -> list[Any]:
    """[kernel(*blocks, **constants) for consecutive row blocks of `arrays`], which share their first dim.

    Blocks are views, so a kernel writes its outputs in place. The blocks are shared out among the
    threads. CuPy arrays (and small NumPy ones) go through in one call. Results come back in block
    order.
    """
    first = arrays[0]
    rows = first.shape[0] if first.ndim else 0
    if not isinstance(first, np.ndarray) or rows < 2 or first.size <= MIN_SPLIT_ELEMENTS:
        return [kernel(*arrays, **constants)]
    step = max(1, BLOCK_ELEMENTS * rows // first.size)
    threads = get_num_threads()
    if threads == 1:
        return [kernel(*(a[i : i + step] for a in arrays), **constants) for i in range(0, rows, step)]
    step = min(step, -(-rows // threads))  # at least one block per thread
    blocks = range(0, rows, step)
    return run_parallel([lambda i=i: kernel(*(a[i : i + step] for a in arrays), **constants) for i in blocks])


_num_threads = _default_threads()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
