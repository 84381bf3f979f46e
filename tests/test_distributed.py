"""Data-parallel training (minigpt.distributed): single-process behaviour and launch errors always;
under MPI (mpi4py + an mpiexec that matches it, e.g. `pip install -e ".[mpi]"`) the gradient allreduce,
N=2 x B against N=1 x 2B, a killed rank and ranks that disagree. Skipped cleanly without MPI."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minigpt import distributed
from minigpt.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
MPI_VARS = ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "PMIX_RANK")


@functools.lru_cache(maxsize=1)
def mpi_skip_reason() -> str | None:
    """Why the MPI tests cannot run here, or None when `mpiexec -n 2` runs two mpi4py ranks."""
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py not installed (pip install -e '.[mpi]')"
    if shutil.which("mpiexec") is None:
        return "no mpiexec on PATH"
    probe = "from mpi4py import MPI; print(MPI.COMM_WORLD.Get_size())"
    try:
        proc = subprocess.run(
            ["mpiexec", "-n", "2", sys.executable, "-c", probe], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"mpiexec does not run: {e}"
    if proc.returncode != 0 or proc.stdout.split() != ["2", "2"]:
        return f"mpiexec -n 2 does not give two mpi4py ranks: {(proc.stdout + proc.stderr).strip()[:200]}"
    return None


needs_mpi = pytest.mark.skipif("mpi_skip_reason() is not None", reason="MPI unavailable (see mpi_skip_reason)")


def mpi_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in MPI_VARS}
    env["PYTHONPATH"] = str(ROOT)
    env["MINIGPT_NUM_THREADS"] = "1"  # two ranks on a small machine: one thread each
    return env


def mpirun(n: int, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["mpiexec", "-n", str(n), sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=mpi_env()
    )


# ---------------------------------------------------------------------------------------------- no MPI needed


def test_a_single_process_is_rank_0_of_1_and_collectives_are_identities(monkeypatch):
    for var in MPI_VARS:
        monkeypatch.delenv(var, raising=False)
    assert distributed.launched_size() == 1
    with distributed.session() as dist:
        assert (dist.rank, dist.world_size, dist.is_main, dist.comm) == (0, 1, True, None)
        grads = [np.ones(3, np.float32)]

        class P:
            data, grad = np.zeros(3, np.float32), grads[0]

        assert dist.average_gradients([P()], 2.5, True) == (2.5, True)
        assert dist.gather({"a": 1}) == [{"a": 1}] and dist.broadcast(3) == 3
        dist.check_same("settings", {"x": 1})
        assert distributed.current() is not None


def test_launched_without_mpi4py_is_one_line_with_the_fix(monkeypatch):
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import fails as if not installed
    with pytest.raises(UserError, match=r"2 MPI ranks, but mpi4py is not installed; install the MPI extra"):
        with distributed.session():
            pass


def test_more_ranks_than_gpus_is_refused():
    distributed.check_gpu_count(2, 2)
    with pytest.raises(distributed.RanksDisagree, match="4 ranks on this machine but only 2 GPU"):
        distributed.check_gpu_count(4, 2)


# ---------------------------------------------------------------------------------------------- under MPI

ALLREDUCE_SCRIPT = """
import json, sys
import numpy as np
from minigpt import distributed

class P:
    def __init__(self, shape, grad):
        self.data, self.grad = np.zeros(shape, np.float32), grad

with distributed.session() as dist:
    r = dist.rank
    params = [P((2, 3), np.full((2, 3), r + 1.0, np.float32)), P((4,), None)]
    params.append(P((5,), np.arange(5, dtype=np.float32) * r))
    loss, stop = dist.average_gradients(params, np.float32(10.0 * (r + 1)), stop=(r == 1))
    out = {"g0": params[0].grad.tolist(), "g1": params[1].grad, "g2": params[2].grad.tolist(),
           "loss": float(loss), "stop": stop}
    everyone = dist.gather(out)
    if dist.is_main:
        json.dump(everyone, open(sys.argv[1], "w"))
"""


@needs_mpi
def test_one_allreduce_averages_gradients_and_loss_and_ors_the_stop_flag(tmp_path):
    script = tmp_path / "allreduce.py"
    script.write_text(ALLREDUCE_SCRIPT)
    proc = mpirun(2, [str(script), str(tmp_path / "out.json")])
    assert proc.returncode == 0, proc.stderr
    ranks = json.loads((tmp_path / "out.json").read_text())
    for out in ranks:
        assert out["g0"] == [[1.5] * 3] * 2 and out["g1"] is None
        assert out["g2"] == [0.0, 0.5, 1.0, 1.5, 2.0]
        assert out["loss"] == 15.0 and out["stop"] is True
