"""Data-parallel training (minigpt.distributed): single-process behaviour and launch errors always;
under MPI (mpi4py + an mpiexec that matches it, e.g. `pip install -e ".[mpi]"`) the gradient allreduce,
N=2 x B against N=1 x 2B, a killed rank and ranks that disagree. Skipped cleanly without MPI."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
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
    probe = "from mpi4py import MPI; c = MPI.COMM_WORLD; c.Get_rank() or print(c.Get_size())"
    try:
        proc = subprocess.run(
            ["mpiexec", "-n", "2", sys.executable, "-c", probe], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"mpiexec does not run: {e}"
    if proc.returncode != 0 or proc.stdout.split() != ["2"]:
        return f"mpiexec -n 2 does not give two mpi4py ranks: {(proc.stdout + proc.stderr).strip()[:200]}"
    return None


@pytest.fixture
def mpi() -> None:
    """Skip the test, saying why, unless `mpiexec -n 2` runs two mpi4py ranks here."""
    reason = mpi_skip_reason()
    if reason is not None:
        pytest.skip(reason)


needs_mpi = pytest.mark.usefixtures("mpi")


def mpi_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in MPI_VARS}
    env["PYTHONPATH"] = str(ROOT)
    env["MINIGPT_NUM_THREADS"] = "1"  # two ranks on a small machine: one thread each
    env["MINIGPT_NO_CPU_KERNELS"] = "1"  # the array code spares each rank Numba's start-up (kernels: elsewhere)
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
    with pytest.raises(distributed.CollectiveError, match="4 ranks on this machine but only 2 GPU"):
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


# ---------------------------------------------------------------------------------------------- training

TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "16", "--eval-iters", "1"]
TRAIN = str(ROOT / "scripts" / "train_gpt.py")


@pytest.fixture
def token_dir(tmp_path, corpus):
    from minigpt.prepare import prepare_corpus

    text = tmp_path / "corpus.txt"
    text.write_text(corpus[:60_000])
    return prepare_corpus(text, tmp_path / "tokens", "char", workers=1, quiet=True) and tmp_path / "tokens"


def losses(out_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def run_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [TRAIN, "--data-dir", str(data), "--out-dir", str(out), "--log-interval", "1", "--sample-tokens", "0",
            "--quiet", "--no-plot", *TINY, *extra]  # fmt: skip


@needs_mpi
def test_two_ranks_of_batch_b_match_one_process_of_batch_2b(tmp_path, token_dir, monkeypatch):
    """N=2 x B and N=1 x 2B over the same batches (rank r's stream = rows r*B..(r+1)*B): same losses."""
    from minigpt import lm, run_state
    from minigpt.data import BatchSampler

    out2 = tmp_path / "two"
    proc = mpirun(2, run_args(token_dir, out2, "--batch-size", "2", "--max-iters", "10", "--eval-interval", "10"))
    assert proc.returncode == 0, proc.stderr

    class TwoStreams:
        """The single process's batch of 2B: rank 0's stream's B rows, then rank 1's."""

        def __init__(self, tokens, batch_size, block_size, seed, name):
            seeds = (seed, np.random.SeedSequence([seed, 1]))
            self.parts = [BatchSampler(tokens, batch_size // 2, block_size, seed=s, name=name) for s in seeds]

        def next(self):
            xs, ys = zip(*(part.next() for part in self.parts))
            return np.concatenate(xs), np.concatenate(ys)

        def state(self):
            return self.parts[0].state()

    seed = lm.RunConfig().seed

    def sampler(tokens, batch_size, block_size, seed=0, name="data"):
        if name == "train" and seed == lm.RunConfig().seed:  # the training stream (evaluation uses seed + 1, + 2)
            return TwoStreams(tokens, batch_size, block_size, seed, name)
        return BatchSampler(tokens, batch_size, block_size, seed=seed, name=name)

    monkeypatch.setattr(run_state, "BatchSampler", sampler)  # where the training stream is made
    monkeypatch.setenv("MINIGPT_NUM_THREADS", "1")
    monkeypatch.setenv("MINIGPT_NO_CPU_KERNELS", "1")  # the same code as the ranks (mpi_env)
    sys.path.insert(0, str(ROOT / "scripts"))
    import train_gpt

    out1 = tmp_path / "one"
    train_gpt.main(run_args(token_dir, out1, "--batch-size", "4", "--max-iters", "10", "--eval-interval", "10")[1:])
    two, one = losses(out2), losses(out1)
    assert len(two) == len(one) == 10 and seed == 1337
    np.testing.assert_allclose(two, one, rtol=0, atol=1e-6)


@needs_mpi
def test_resume_on_the_same_ranks_continues_exactly_and_another_count_is_explained(
    tmp_path, token_dir, run_main, monkeypatch
):
    args = ["--batch-size", "2", "--eval-interval", "3"]
    straight = mpirun(2, run_args(token_dir, tmp_path / "straight", *args, "--max-iters", "8"))
    assert straight.returncode == 0, straight.stderr
    first = mpirun(2, run_args(token_dir, tmp_path / "resumed", *args, "--max-iters", "6"))
    assert first.returncode == 0, first.stderr
    again = mpirun(2, run_args(token_dir, tmp_path / "resumed", *args, "--max-iters", "8", "--resume"))
    assert again.returncode == 0, again.stderr
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")  # each rank's stream restored
    # On 1 process (this one, as a plain `python train_gpt.py` would run): it continues, and says what changes.
    sys.path.insert(0, str(ROOT / "scripts"))
    import train_gpt

    monkeypatch.setenv("MINIGPT_NUM_THREADS", "1")
    monkeypatch.setenv("MINIGPT_NO_CPU_KERNELS", "1")
    resume = run_args(token_dir, tmp_path / "resumed", *args, "--max-iters", "9", "--resume")
    single = run_main(train_gpt.main, *resume[1:])
    assert single.returncode == 0, single.stderr
    assert "written by a 2-rank run and resumes on 1 rank(s)" in single.stdout


@needs_mpi
def test_ranks_with_different_settings_stop_with_one_line(tmp_path, token_dir):
    out = tmp_path / "out"
    base = run_args(token_dir, out, "--max-iters", "2")
    cmd = ["mpiexec", "-n", "1", sys.executable, *base, "--learning-rate", "0.001", ":",
           "-n", "1", sys.executable, *base, "--learning-rate", "0.002"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=mpi_env())
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert err.count("\n") == 0 and "ranks disagree on the settings" in err and "Traceback" not in err
    assert not out.exists() or not list(out.glob("*.npz"))


@needs_mpi
def test_a_killed_rank_ends_the_job_and_leaves_a_whole_checkpoint(tmp_path, token_dir):
    from minigpt.checkpoint import load_checkpoint

    out = tmp_path / "out"
    args = run_args(token_dir, out, "--max-iters", "100000", "--eval-interval", "2", "--batch-size", "2")
    job = subprocess.Popen(
        ["mpiexec", "-n", "2", sys.executable, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=mpi_env(),
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "last.npz").exists() and time.monotonic() < deadline and job.poll() is None:
            time.sleep(0.2)
        assert (out / "last.npz").exists(), "training never wrote a checkpoint"
        rank1 = [pid for pid in _pids_of(str(out)) if _environ(pid).get("PMI_RANK") == "1"]
        assert len(rank1) == 1
        os.kill(rank1[0], signal.SIGKILL)
        output, _ = job.communicate(timeout=60)  # mpiexec's own report goes to stdout
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0 and "BAD TERMINATION" in output and "Killed (signal 9)" in output
    _, _, meta = load_checkpoint(out / "last.npz")  # whole: the atomic rename never exposes a partial file
    assert meta["step"] >= 2 and meta["world_size"] == 2


def _pids_of(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)
