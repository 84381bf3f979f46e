"""A run never loses work: safe out-dirs, no broken checkpoints, resume from the checkpoint alone,
signals, and every fault one line with exit 2."""

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import minigpt.corpus as corpus
import minigpt.lm as lm
from minigpt.checkpoint import load_checkpoint, save_checkpoint
from minigpt.optim import CosineSchedule
from minigpt.outdir import OutDir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import sample as sample_script  # noqa: E402
import train_gpt as train_script  # noqa: E402

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "8", "--batch-size", "2"]


def args(out, data, *extra, iters=4):
    return ["--data", str(data), "--out-dir", str(out), "--max-iters", str(iters), "--eval-interval", "2",
            "--eval-iters", "1", "--log-interval", "1", "--warmup-iters", "1", *TINY, "--quiet", "--no-plot",
            "--sample-tokens", "0", *map(str, extra)]  # fmt: skip


def exit_2(capsys, main, argv):
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def snapshot(out):
    return {p.name: p.read_bytes() for p in Path(out).iterdir() if p.is_file()}


def records(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


_children: list[subprocess.Popen] = []
# The few tests that need a process of their own (signals, kill -9) are not about kernels: their runs
# use the array code, which spares each process Numba's start-up (and the in-process half of a
# comparison does the same, so both sides run the same code).
PROCESS_ENV = {"MINIGPT_OFFLINE": "1", "PYTHONPATH": str(ROOT), "MINIGPT_NO_CPU_KERNELS": "1"}


def run_cli(script, *argv, **kwargs):
    env = {**os.environ, **PROCESS_ENV}
    cmd = [sys.executable, str(ROOT / "scripts" / script), *map(str, argv)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    _children.append(proc)
    return proc


@pytest.fixture(autouse=True)
def _reap_children():
    """A test that fails half-way must not leave its training run behind (some run for 10**6 steps)."""
    yield
    while _children:
        proc = _children.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def trained(tmp_path, text_file, capsys):
    """An out-dir holding a finished 4-step run."""
    out = tmp_path / "out"
    train_script.main(args(out, text_file))
    capsys.readouterr()
    return out


# ----------------------------------------------------------------------------- out-dirs


def test_a_second_run_into_a_used_out_dir_is_refused(trained, text_file, capsys):
    before = snapshot(trained)
    err = exit_2(capsys, train_script.main, args(trained, text_file))
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert snapshot(trained) == before  # byte-identical: nothing replaced, nothing appended
    err = exit_2(capsys, train_script.main, args(trained, text_file, "--overwrite", "--resume"))
    assert "--overwrite cannot be combined with --resume" in err
    train_script.main(args(trained, text_file, "--overwrite", iters=2))
    assert [r["step"] for r in records(trained) if "loss" in r] == [1, 2]  # a new run, not appended


def test_a_concurrent_run_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path, text_file, capsys):
    out = tmp_path / "out"
    with OutDir(out):  # another run holds the out-dir
        err = exit_2(capsys, train_script.main, args(out, text_file))
        assert f"in use by another run (pid {os.getpid()} on host" in err
        assert not (out / "last.npz").exists()
    # A lock file left by a killed run (its flock died with it) does not stop the next run.
    (out / ".lock").write_text(json.dumps({"pid": 999999999, "host": "gone", "started": "long ago"}))
    train_script.main(args(out, text_file, iters=2))
    assert (out / "last.npz").exists() and not (out / ".lock").exists()


def test_out_dir_that_is_a_file_or_a_symlink_loop(tmp_path, text_file, capsys):
    file = tmp_path / "file"
    file.write_text("x")
    assert "is not a directory" in exit_2(capsys, train_script.main, args(file, text_file))
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    assert "symlink loop" in exit_2(capsys, train_script.main, args(loop, text_file))
    assert "symlink loop" in exit_2(capsys, train_script.main, args(loop / "sub", text_file))


# ----------------------------------------------------------------------------- never save a broken state


def test_a_nan_evaluation_leaves_the_checkpoints_byte_identical(trained, text_file, capsys, monkeypatch):
    before = snapshot(trained)

    def broken_evaluator(*a):
        return lambda: {"train_loss": 1.0, "val_loss": float("nan"), "val_bpc": float("nan")}

    monkeypatch.setattr(lm, "make_evaluator", broken_evaluator)
    err = exit_2(capsys, train_script.main, args(trained, text_file, "--resume", iters=6))
    assert "val_loss is nan at step 6" in err and "last.npz (step 4), is kept" in err
    for name in ("last.npz", "ckpt.npz"):
        assert (trained / name).read_bytes() == before[name]


def test_a_diverging_resume_keeps_the_last_good_files(trained, text_file, capsys):
    before = snapshot(trained)
    flags = ["--resume", "--learning-rate", "1e30", "--lr-decay-iters", "40"]
    err = exit_2(capsys, train_script.main, args(trained, text_file, *flags, iters=40))
    assert "diverged" in err and "is kept" in err
    for name in ("last.npz", "ckpt.npz"):
        assert (trained / name).read_bytes() == before[name]


def test_non_finite_weights_are_never_saved(tmp_path, text_file, capsys, monkeypatch):
    out = tmp_path / "out"
    real = lm.Checkpoints.on_interrupt

    def poison_then_save(self, state):
        self.run.model.lm_head.weight.data[0, 0] = np.inf
        real(self, state)

    monkeypatch.setattr(lm.Checkpoints, "on_interrupt", poison_then_save)
    monkeypatch.setattr(lm.BatchSampler, "next", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
    err = exit_2(capsys, train_script.main, args(out, text_file))
    assert "not saving" in err and "NaN or inf" in err and not (out / "last.npz").exists()


# ----------------------------------------------------------------------------- resume from the checkpoint alone


def test_resume_needs_only_the_out_dir(trained, text_file, capsys, monkeypatch):
    text_file.unlink()  # the text is gone: the token files of the out-dir are all a resume needs

    def no_tokenizing(*a, **k):
        raise AssertionError("resume re-read or re-tokenized the text")

    for name in ("resolve_corpus", "prepare", "build_tokenizer"):
        monkeypatch.setattr(corpus, name, no_tokenizing)
    train_script.main(["--out-dir", str(trained), "--resume", "--max-iters", "6", "--quiet", "--no-plot"])
    _, _, meta = load_checkpoint(trained / "last.npz")
    assert meta["step"] == 6 and meta["run_config"]["data"] == str(text_file)
    assert meta["run_config"]["n_embd"] == 16 and meta["run_config"]["eval_interval"] == 2


def test_resumed_lr_follows_the_fixed_schedule_and_times_continue(trained, capsys):
    train_script.main(["--out-dir", str(trained), "--resume", "--max-iters", "10", "--quiet", "--no-plot"])
    logged = {r["step"]: r for r in records(trained) if "loss" in r}
    assert sorted(logged) == list(range(1, 11))  # no step twice, none missing
    _, _, meta = load_checkpoint(trained / "last.npz")
    cfg = meta["run_config"]
    assert cfg["lr_decay_iters"] == 4  # the first run's horizon, kept
    schedule = CosineSchedule(cfg["learning_rate"], cfg["min_lr"], cfg["warmup_iters"], 4)
    for step, rec in logged.items():
        assert rec["lr"] == schedule(step - 1), step
    assert [logged[s]["lr"] for s in range(5, 11)] == [cfg["min_lr"]] * 6  # past the horizon: min_lr
    times = [r["time"] for r in records(trained)]
    assert times == sorted(times)  # the resumed run's times continue the first run's
    walls = [r["wall"] for r in records(trained)]
    assert walls == sorted(walls) and walls[0] > 1.6e9


def train_gpt_process(patch: str, argv: list[str]) -> subprocess.CompletedProcess:
    """scripts/train_gpt.py with `argv` in a process of its own, after the Python code `patch` ran there."""
    script = (
        f"{patch}import sys\n"
        + f"sys.argv = ['train_gpt.py'] + {argv!r}\n"
        + f"sys.path.insert(0, {str(ROOT / 'scripts')!r})\n"
        + "import train_gpt; train_gpt.main()\n"
    )
    env = {**os.environ, **PROCESS_ENV}
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)


def test_resume_after_kill_9_during_a_checkpoint_write_is_bit_exact(tmp_path, text_file, monkeypatch):
    monkeypatch.setenv("MINIGPT_NO_CPU_KERNELS", "1")  # the same code as the killed process
    full, split = tmp_path / "full", tmp_path / "split"
    train_script.main(args(full, text_file, iters=8))
    # Die with SIGKILL in the middle of the second write of a checkpoint (step 4's).
    killer = (
        "import os, signal, sys, numpy as np\n"
        "calls, savez = [], np.savez\n"
        "def dying_savez(f, **arrays):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 3:\n"
        "        f.write(b'PK partial'); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
        "    savez(f, **arrays)\n"
        "np.savez = dying_savez\n"
    )
    died = train_gpt_process(killer, args(split, text_file, iters=8))
    assert died.returncode == -signal.SIGKILL, died.stderr
    assert list(split.glob(".*.tmp")), "the killed write left no temporary file"
    _, _, meta = load_checkpoint(split / "last.npz")
    assert meta["step"] == 2
    train_script.main(["--out-dir", str(split), "--resume", "--quiet", "--no-plot"])  # only the kill needs a process
    assert not list(split.glob(".*.tmp"))  # removed at the start
    a, _, _ = load_checkpoint(full / "last.npz")
    b, _, _ = load_checkpoint(split / "last.npz")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])  # bit-exact
    losses = [{r["step"]: r["loss"] for r in records(d) if "loss" in r} for d in (full, split)]
    assert losses[0] == losses[1]


# ----------------------------------------------------------------------------- signals


@pytest.mark.parametrize("to_group", [False, True])
@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_last_npz_and_exits_128_plus_it(tmp_path, text_file, signum, code, to_group):
    """To the process, or to its group as a terminal's Ctrl-C or `kill -TERM -PGID` (which reaches the
    training's worker processes as well: none is left behind)."""
    out = tmp_path / "out"
    proc = run_cli(
        "train_gpt.py", *args(out, text_file, "--eval-interval", "100000", iters=10**6), start_new_session=True
    )
    deadline = time.monotonic() + 60
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.05)
    if to_group:
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    assert proc.wait(timeout=60) == code, proc.stderr.read()
    deadline = time.monotonic() + 10
    while True:  # no process of the run's group is left (a worker that died is reaped in a moment)
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "a process of the run's group outlived it"
        time.sleep(0.05)
    err = proc.stderr.read().strip().splitlines()[-1]
    _, _, meta = load_checkpoint(out / "last.npz")
    assert f"interrupted by {signal.Signals(signum).name} at step {meta['step']}: saved {out / 'last.npz'}" in err
    assert meta["step"] >= 1


def test_sigterm_while_preparing_the_data_exits_143_and_leaves_no_temporary_file(tmp_path, text_file):
    out = tmp_path / "out"
    sigterm_mid_write = (  # SIGTERM while a file of the data preparation is written (before its fsync)
        "import os, signal, sys\n"
        "fsync = os.fsync\n"
        "def fsync_after_sigterm(fd):\n"
        "    if os.readlink(f'/proc/self/fd/{fd}').endswith('.tmp'):\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    fsync(fd)\n"
        "os.fsync = fsync_after_sigterm\n"
    )
    done = train_gpt_process(sigterm_mid_write, args(out, text_file))
    assert done.returncode == 143, done.stderr
    assert done.stderr.strip() == "interrupted by SIGTERM before training started; nothing was saved"
    assert not list(out.rglob("*.tmp")) and not (out / "data" / "meta.json").exists()
    train_script.main(args(out, text_file))  # the same command again prepares the data and trains
    assert (out / "last.npz").exists()


def test_ctrl_c_in_the_final_sample_says_the_run_is_saved(tmp_path, text_file, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("minigpt.lm.sample_text", interrupted)
    with pytest.raises(SystemExit) as exc:
        train_script.main(args(tmp_path / "out", text_file, "--sample-tokens", "5"))
    err = capsys.readouterr().err.strip()
    assert (
        exc.value.code == 130
        and err
        == f"interrupted by SIGINT during the final sample; the run finished (step 4), saved in {tmp_path / 'out'}"
    )


def test_ctrl_c_in_sample_exits_130(trained, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("minigpt.inference.sample_text", interrupted)  # what `minigpt sample` (and sample.py) calls
    with pytest.raises(SystemExit) as exc:
        sample_script.main(["--out-dir", str(trained)])
    assert exc.value.code == 130 and capsys.readouterr().err.strip() == "interrupted"


# ----------------------------------------------------------------------------- file-system faults


@contextlib.contextmanager
def mounted_tmpfs(path, options):
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_a_full_disk_is_one_line_and_leaves_no_temporary_file(tmp_path, text_file, capsys):
    with mounted_tmpfs(tmp_path / "small", "size=160k") as disk:
        err = exit_2(capsys, train_script.main, args(disk / "out", text_file, "--n-embd", "64", "--n-layer", "2"))
        assert "No space left on device" in err and "free some space" in err
        assert not list((disk / "out").rglob(".*.tmp"))


def test_a_read_only_out_dir_is_one_line(tmp_path, text_file, capsys):
    if os.geteuid() == 0:  # root writes through permissions: use a read-only mount
        context = mounted_tmpfs(tmp_path / "ro", "ro,size=1m")
    else:
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o555)
        context = contextlib.nullcontext(tmp_path / "ro")
    with context as ro:
        err = exit_2(capsys, train_script.main, args(ro / "out", text_file))
    assert ("Read-only file system" in err or "Permission denied" in err) and str(ro / "out") in err


def test_os_errors_become_one_line_with_a_fix(tmp_path, text_file, capsys, monkeypatch):
    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "out" / "last.npz"))

    monkeypatch.setattr(lm, "save_checkpoint", no_space)
    err = exit_2(capsys, train_script.main, args(tmp_path / "out", text_file))
    assert err == f"error: cannot use {tmp_path / 'out' / 'last.npz'}: No space left on device; " + (
        "free some space or pass another --out-dir"
    )


# ----------------------------------------------------------------------------- bad numbers and metadata


@pytest.mark.parametrize(
    "flags,words",
    [
        (["--n-layer", "1000000000000"], "GiB"),
        (["--batch-size", "100000000", "--block-size", "8"], "GiB"),
        (["--seed", "-1"], "--seed must be non-negative"),
        (["--grad-clip", "nan"], "--grad-clip must be a finite number"),
    ],
)
def test_absurd_numbers_are_refused_before_allocating(tmp_path, text_file, capsys, flags, words):
    err = exit_2(capsys, train_script.main, args(tmp_path / "out", text_file, *flags))
    assert words in err and "vocab" not in err  # refused before the text is read: no vocabulary to name
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flags,words",
    [
        (["--temperature", "nan"], "--temperature must be a finite number"),
        (["--temperature", "-1"], "--temperature must be non-negative"),
        (["--top-p", "nan"], "--top-p must be a finite number"),
        (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
        (["--top-k", "0"], "--top-k must be positive"),
        (["--seed", "-1"], "--seed must be non-negative"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be positive"),
    ],
)
def test_bad_sample_flags(trained, capsys, flags, words):
    assert words in exit_2(capsys, sample_script.main, ["--out-dir", str(trained), *flags])


MALFORMED = [
    ("model_config", "big", "model_config must be an object"),
    ("model_config", {"n_layer": "two"}, "model_config.n_layer must be an integer"),
    ("model_config", {"n_layer": True}, "model_config.n_layer must be an integer"),
    ("model_config", {"depth": 3}, "model_config has an unknown field"),
    ("tokenizer", 5, "tokenizer must be an object"),
    ("tokenizer", {"kind": "words"}, "tokenizer is unusable"),
    ("step", "ten", "step must be an integer"),
    ("step", -1, "step must be a finite non-negative number"),
    ("step", True, "step must be an integer"),
    ("best_val_loss", "low", "best_val_loss must be a number or null"),
    ("elapsed", None, "elapsed must be a number"),
    ("rng", {"train_batches": 3, "dropout": {}}, "rng.train_batches must be an object"),
    ("run_config", [], "run_config must be an object"),
    ("run_config", {"max_iters": "many"}, "run_config.max_iters must be an integer"),
    ("run_config", {"learning_rate": float("nan")}, "run_config.learning_rate must be a finite number"),
    ("run_config", {"shiny": 1}, "run_config.shiny is not a setting"),
    ("data", 7, "data must be a string"),
    ("run_config", None, "run_config must be an object"),
]


@pytest.mark.parametrize("key,value,words", MALFORMED)
def test_malformed_metadata_is_one_line(trained, capsys, key, value, words):
    state, optim, meta = load_checkpoint(trained / "last.npz")
    if isinstance(value, dict) and isinstance(meta.get(key), dict) and key != "rng":
        meta[key] = {**meta[key], **value}
    else:
        meta[key] = value
    save_checkpoint(trained / "last.npz", model=state, optimizer=optim, meta=meta)
    err = exit_2(capsys, train_script.main, ["--out-dir", str(trained), "--resume", "--quiet", "--no-plot"])
    assert "malformed metadata" in err and words in err, err


# ----------------------------------------------------------------------------- library misuse: clear exceptions


def test_load_state_dict_is_all_or_nothing():
    from minigpt.gpt import GPT, GPTConfig
    from minigpt.nn import StateDictError

    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16))
    before = model.state_dict()
    state = {k: np.zeros_like(v) for k, v in before.items()}
    state["transformer.ln_f.weight"] = np.array(["x"] * 16)  # fails only when converted
    with pytest.raises(StateDictError, match="not numbers: transformer.ln_f.weight"):
        model.load_state_dict(state)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k])  # nothing was written


def test_gpt_rejects_1d_or_empty_idx():
    from minigpt.gpt import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16))
    for idx in (np.array([1, 2, 3]), np.zeros((1, 0), dtype=np.int64), np.zeros((0, 3), dtype=np.int64)):
        with pytest.raises(ValueError, match=r"\(B, T\) integer token ids"):
            model(idx)
    with pytest.raises(ValueError, match="integer token ids"):
        model(np.ones((1, 3)))


def test_float_token_file_is_refused(tmp_path):
    from minigpt.data import load_tokens
    from minigpt.errors import UserError

    np.ones(8, dtype=np.float16).tofile(tmp_path / "train.bin")
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 5, "dtype": "float16", "train_tokens": 8}))
    with pytest.raises(UserError, match="'float16'.*integer ids"):
        load_tokens(tmp_path, "train")


def test_mean_of_an_empty_tensor_is_nan():
    import minigpt

    assert np.isnan(minigpt.tensor(np.zeros(0, dtype=np.float32)).mean().item())
    assert np.isnan(minigpt.tensor(np.zeros((2, 0))).mean(dim=1).numpy()).all()


def test_optimizer_load_state_dict_changes_nothing_when_it_fails():
    from minigpt import nn, optim

    model = nn.MLP(3, [4, 1], rng=np.random.default_rng(0))
    opt = optim.AdamW(model.parameters(), lr=0.1)
    for p in model.parameters():
        p.grad = np.ones_like(p.data)
    opt.step()
    saved = opt.state_dict()
    bad = dict(saved)
    last = sorted(k for k in bad if k.startswith("exp_avg/"))[-1]
    bad[last] = np.full(bad[last].shape, "x")
    with pytest.raises(ValueError):
        opt.load_state_dict(bad)
    for k, v in opt.state_dict().items():
        np.testing.assert_array_equal(v, saved[k])
