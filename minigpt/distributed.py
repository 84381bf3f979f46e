"""Data-parallel training over MPI: `mpirun -n N python scripts/train_gpt.py ...` runs N ranks.

Every rank holds the same model and optimizer state. Each step, every rank backpropagates its own
batches (its own seeded stream), then ONE allreduce over one flat buffer sums the gradients, the
step's loss and a stop flag across ranks; dividing by N gives the mean over the global batch of
N x batch_size sequences, so every rank applies the identical update. Rank 0 alone evaluates, logs
and writes checkpoints.

The transport is mpi4py on CPUs. On GPUs (one per rank, chosen by the rank's index on its node) the
allreduce runs in NCCL through CuPy, with MPI only to hand out NCCL's id at start-up; that path is
written but UNTESTED here (no GPU on the development machine) and is marked so below.

Without mpirun nothing here imports mpi4py: `current()` is a single-process `Distributed` whose
collectives are no-ops, so everything works without the `mpi` extra.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np

from minigpt.autograd.backend import to_numpy
from minigpt.errors import UserError, signal_of
from minigpt.train import TrainingDiverged

T = TypeVar("T")
# Environment variables by which MPI launchers announce the world size (MPICH/Hydra, Open MPI, PMIx, Slurm).
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")
INSTALL_HINT = 'install the MPI extra: pip install -e ".[mpi]" (mpi4py and the mpich runtime)'


class CollectiveError(UserError):
    """Bad input found by (or for) every rank at once: rank 0 reports it, and every rank exits with code 2."""


class RanksDisagree(CollectiveError):
    """The ranks were started with different settings or data."""


def launched_size() -> int:
    """The world size an MPI launcher announced in the environment (1 when not launched by one)."""
    for var in _SIZE_VARS[:3]:
        value = os.environ.get(var)
        if value and value.isdigit():
            return int(value)
    return 1


class Distributed:
    """This process's place among the ranks, and the collectives training needs.

    Single process (`world_size == 1`, no `comm`): every collective returns its input.
    """

    def __init__(self, comm: Any = None, device: str = "cpu"):
        self.comm = comm
        self.rank = comm.Get_rank() if comm is not None else 0
        self.world_size = comm.Get_size() if comm is not None else 1
        self.local_rank, self.local_size = 0, 1
        if comm is not None:
            from mpi4py import MPI

            node = comm.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks on this machine
            self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
            node.Free()
        self.device = device
        self._buffer: Any = None
        self._nccl: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ----------------------------------------------------------------------------- agreement

    def check_same(self, what: str, value: Any) -> None:
        """Raise RanksDisagree on every rank unless all ranks hold the same JSON-able `value`."""
        if self.comm is None:
            return
        digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
        digests = self.comm.allgather(digest)
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        if differ:
            raise RanksDisagree(
                f"the {self.world_size} ranks disagree on {what} (rank {differ[0]} differs from rank 0); "
                "start every rank with the same command, settings and data files"
            )

    def check_same_weights(self, model: Any) -> None:
        """Raise RanksDisagree on every rank unless all ranks hold the same parameters (names and values)."""
        if self.comm is None:
            return
        digest = hashlib.sha256()
        for name, p in model.named_parameters():
            digest.update(name.encode())
            digest.update(to_numpy(p.data).tobytes())
        self.check_same("the initial weights", digest.hexdigest())

    def main_first(self, fn: Callable[[], T], others: Callable[[], T] | None = None) -> T:
        """fn() on rank 0; then, if it succeeded, `others()` (default: fn) on the other ranks.

        A UserError on rank 0 (a refusal: the out-dir is taken, a file is bad) is raised on every rank
        as a CollectiveError, so the job stops with rank 0's one line instead of leaving the others
        waiting. Work that writes (the out-dir, token files) thus happens once, before anyone reads it.
        """
        if self.comm is None:
            return fn()
        result: Any = None
        error = None
        if self.is_main:
            try:
                result = fn()
            except UserError as e:  # CollectiveError included
                error = str(e)
        error = self.broadcast(error)
        if error is not None:
            raise CollectiveError(error)
        return result if self.is_main else (others or fn)()

    def gather(self, value: Any) -> list[Any] | None:
        """Every rank's `value` as a list on rank 0 (None elsewhere)."""
        return [value] if self.comm is None else self.comm.gather(value, root=0)

    def broadcast(self, value: Any) -> Any:
        return value if self.comm is None else self.comm.bcast(value, root=0)

    # ----------------------------------------------------------------------------- gradients

    def average_gradients(self, params: list[Any], step_loss: Any, stop: bool) -> tuple[Any, bool]:
        """Average every parameter's gradient, the step's loss and OR the stop flag across ranks, in place.

        One allreduce over one flat float32 buffer: [grads of all params | loss | stop]. Returns the mean
        loss (as a 0-d array on the parameters' device) and whether any rank asked to stop.
        """
        if self.comm is None:
            return step_loss, stop
        grads = [p.grad for p in params]
        sizes = [p.data.size for p in params]
        xp = _array_module(params[0].data)
        n = sum(sizes) + 2
        if self._buffer is None or self._buffer.size != n or _array_module(self._buffer) is not xp:
            self._buffer = xp.empty(n, dtype=xp.float32)
        buf, offset = self._buffer, 0
        for g, size in zip(grads, sizes):
            if g is None:  # the same on every rank (same model): stays None after
                buf[offset : offset + size] = 0
            else:
                buf[offset : offset + size] = g.reshape(-1)
            offset += size
        buf[offset] = step_loss  # a device scalar: no host read here
        buf[offset + 1] = 1.0 if stop else 0.0
        self._allreduce_sum(buf)
        scale, offset = 1.0 / self.world_size, 0
        for g, size in zip(grads, sizes):
            if g is not None:  # the mean, written straight into the gradient (one pass over memory)
                xp.multiply(buf[offset : offset + size].reshape(g.shape), scale, out=g)
            offset += size
        return buf[offset] * scale, bool(buf[offset + 1] > 0)

    def grad_sync(self, params: list[Any]) -> Callable[[Any, bool], tuple[Any, bool]] | None:
        """`train`'s hook after each backward: `average_gradients` over `params` (None for one process, whose
        loop stops at the end of the step a signal came in, not at the next step's agreement)."""
        if self.comm is None:
            return None
        return lambda step_loss, stop: self.average_gradients(params, step_loss, stop)

    def _allreduce_sum(self, buf: Any) -> None:
        if isinstance(buf, np.ndarray):
            from mpi4py import MPI

            self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            return
        # UNTESTED (no GPU here): NCCL through CuPy, one GPU per rank.
        from cupy.cuda import nccl

        stream = _cupy().cuda.get_current_stream()
        self._nccl_comm().allReduce(buf.data.ptr, buf.data.ptr, buf.size, nccl.NCCL_FLOAT32, nccl.NCCL_SUM, stream.ptr)

    def _nccl_comm(self) -> Any:
        # UNTESTED (no GPU here): rank 0 makes NCCL's unique id and MPI hands it to the others.
        if self._nccl is None:
            from cupy.cuda import nccl

            uid = self.broadcast(nccl.get_unique_id() if self.is_main else None)
            self._nccl = nccl.NcclCommunicator(self.world_size, uid, self.rank)
        return self._nccl

    # ----------------------------------------------------------------------------- devices

    def share_cores(self) -> None:
        """Give each rank on this machine its share of the cores (unless MINIGPT_NUM_THREADS says otherwise)."""
        if self.comm is None or os.environ.get("MINIGPT_NUM_THREADS", "").isdigit():
            return
        from minigpt.autograd.parallel import set_num_threads

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        set_num_threads(max(1, cores // self.local_size))

    def claim_device(self, device: str) -> None:
        """On `cuda`, make this rank's GPU (its index on the node) the current one; check there are enough."""
        from minigpt.autograd.backend import normalize_device

        self.device = normalize_device(device)
        if self.device != "cuda" or self.comm is None:
            return
        cp = _cupy()
        n_gpus = cp.cuda.runtime.getDeviceCount()
        check_gpu_count(self.local_size, n_gpus)
        cp.cuda.Device(self.local_rank).use()


def check_gpu_count(ranks_on_node: int, n_gpus: int) -> None:
    if n_gpus < ranks_on_node:
        raise CollectiveError(
            f"--device cuda with {ranks_on_node} ranks on this machine but only {n_gpus} GPU(s): "
            f"start at most {n_gpus} ranks per machine (one GPU each), or use --device cpu"
        )


def _cupy() -> Any:
    import cupy

    return cupy


def _array_module(a: Any) -> Any:
    return np if isinstance(a, np.ndarray) else _cupy()


# ----------------------------------------------------------------------------- the process's session

_current = Distributed()


def current() -> Distributed:
    """The running session's Distributed (single process unless inside `session()` under mpirun)."""
    return _current


def _connect() -> Any:
    """COMM_WORLD when launched under mpirun with more than one rank, else None; one-line errors otherwise."""
    size = launched_size()
    if size <= 1:
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        raise UserError(f"started as one of {size} MPI ranks, but mpi4py is not installed; {INSTALL_HINT}") from None
    except RuntimeError as e:  # mpi4py found no MPI library to load
        raise UserError(f"mpi4py cannot load an MPI library ({e}); {INSTALL_HINT}") from None
    comm = MPI.COMM_WORLD
    if comm.Get_size() != size:
        raise UserError(
            f"the launcher announced {size} ranks but MPI sees {comm.Get_size()}: mpirun comes from a different "
            f"MPI than mpi4py's ({MPI.Get_library_version().splitlines()[0].strip()}); use the mpirun of that "
            "MPI (with the mpi extra: the mpiexec that pip installed beside python)"
        )
    return comm


@contextlib.contextmanager
def session() -> Iterator[Distributed]:
    """Join the MPI job if there is one, for the duration of a training run.

    A failure on one rank must not leave the others waiting in an allreduce forever: it is printed on
    one line (rank-prefixed) and MPI_Abort ends the whole job. Disagreement found by `check_same`
    happens on every rank at once, so rank 0 alone reports it and all ranks exit with code 2.
    """
    global _current
    dist = Distributed(_connect())
    if dist.comm is None:
        yield dist
        return
    _current = dist
    try:
        dist.share_cores()
        yield dist
    except (CollectiveError, TrainingDiverged) as e:  # found on every rank at once (divergence: maybe rank 0 alone)
        if not dist.is_main:
            sys.exit(2)
        if isinstance(e, CollectiveError):
            raise  # every rank exits with code 2; rank 0 says why
        print(f"error: {e}", file=sys.stderr, flush=True)
        dist.comm.Abort(2)
    except BaseException as e:  # any failure must end every rank
        if isinstance(e, SystemExit) and not e.code:
            raise
        if isinstance(e, UserError):
            print(f"error: rank {dist.rank} of {dist.world_size}: {e}", file=sys.stderr, flush=True)
            code = 2
        elif isinstance(e, KeyboardInterrupt):  # Ctrl-C, or SIGTERM (errors.sigterm_raises)
            print(f"rank {dist.rank}: interrupted; ending all ranks", file=sys.stderr, flush=True)
            code = 128 + signal_of(e)
        else:
            traceback.print_exc()
            code = 1
        sys.stderr.flush()
        dist.comm.Abort(code)
    finally:
        _current = Distributed()


__all__ = ["CollectiveError", "Distributed", "RanksDisagree", "current", "launched_size", "session"]
