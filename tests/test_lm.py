"""Language-model runs end to end: train_gpt.py and sample.py, exact resume, and every bad input."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from minigpt.data import BatchSampler
from minigpt.gpt import GPTConfig
from minigpt.lm import RunConfig, load_model, train_lm

ROOT = Path(__file__).resolve().parents[1]

sys.path.insert(0, str(ROOT / "scripts"))
import bench_gemm as gemm_script  # noqa: E402
import bench_train as bench_script  # noqa: E402
import profile_train as profile_script  # noqa: E402
import sample as sample_script  # noqa: E402
import train_gpt as train_script  # noqa: E402

SMALL = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "16", "--batch-size", "4"]


def test_cli_smoke_train_then_sample(tmp_path, text_file, run_main):
    train = run_main(
        train_script.main, "--data", str(text_file), "--max-iters", "30", "--eval-interval", "15", "--eval-iters", "2",
        *SMALL, "--sample-tokens", "20", "--no-plot", cwd=tmp_path,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr
    assert "val loss" in train.stdout and "--- sample ---" in train.stdout
    out = tmp_path / "out"
    assert (out / "ckpt.npz").exists() and (out / "last.npz").exists()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r["metrics"] for r in records if "metrics" in r]
    assert len(evals) == 2 and evals[1]["val_loss"] < evals[0]["val_loss"]
    assert {r["step"] for r in records if "loss" in r} >= {10, 20, 30}
    sample = run_main(sample_script.main, "--start", "Th", "--max-new-tokens", "25", "--num-samples", "2", cwd=tmp_path)
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout.count("Th") >= 2 and sample.stdout.count("---------------") == 2


def test_training_lowers_the_loss(tmp_path, text_file):
    cfg = RunConfig(
        data=str(text_file), out_dir=str(tmp_path), max_iters=200, eval_interval=100, eval_iters=4,
        model=GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32), batch_size=8, learning_rate=3e-3,
        warmup_iters=5, quiet=True, plot=False, sample_tokens=0,
    )  # fmt: skip
    summary = train_lm(cfg, log=lambda s: None)
    assert summary.step == 200 and summary.val_loss < 2.7  # uniform over ~60 characters is ~4.1, unigrams ~3.3
    assert summary.val_bpc == pytest.approx(summary.val_loss / np.log(2), rel=1e-6)  # chars: 1 token each


def test_a_shakespeare_run_samples_shakespeare(tmp_path, shakespeare):
    data = tmp_path / "input.txt"
    data.write_text(shakespeare[:60_000])
    cfg = RunConfig(
        data=str(data), out_dir=str(tmp_path / "out"), max_iters=60, eval_interval=60, eval_iters=2,
        model=GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32), batch_size=8, learning_rate=3e-3,
        warmup_iters=5, quiet=True, plot=False, sample_tokens=0,
    )  # fmt: skip
    assert train_lm(cfg, log=lambda s: None).val_loss < 3.3  # uniform over 61 characters is 4.1
    model, tokenizer, _ = load_model(tmp_path / "out" / "ckpt.npz")
    text = tokenizer.decode(model.generate(np.array([tokenizer.encode("ROMEO:")]), 30)[0])
    assert text.startswith("ROMEO:") and len(text) == 36


def _losses(out_dir):
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, text_file, monkeypatch):
    common = dict(
        data=str(text_file), max_iters=10, eval_interval=4, eval_iters=2, log_interval=1, lr_decay_iters=10,
        model=GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, dropout=0.2), batch_size=4, quiet=True,
        plot=False, sample_tokens=0,
    )  # fmt: skip
    train_lm(RunConfig(out_dir=str(tmp_path / "full"), **common), log=lambda s: None)

    calls = {"n": 0, "sampler": None}
    original = BatchSampler.next

    def interrupting_next(self):
        if calls["sampler"] is None and self.name == "train":
            calls["sampler"] = self  # the first batch drawn is a training batch (evaluation comes later)
        if self is calls["sampler"]:
            calls["n"] += 1
            if calls["n"] == 7:  # Ctrl-C while fetching the batch of step 7
                raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(BatchSampler, "next", interrupting_next)
    first = train_lm(RunConfig(out_dir=str(tmp_path / "split"), **common), log=lambda s: None)
    assert first.interrupted and first.step == 6
    monkeypatch.setattr(BatchSampler, "next", original)
    resumed = train_lm(RunConfig(out_dir=str(tmp_path / "split"), resume=True, **common), log=lambda s: None)
    assert resumed.step == 10 and not resumed.interrupted

    full, split = _losses(tmp_path / "full"), _losses(tmp_path / "split")
    assert sorted(split) == list(range(1, 11))
    for step in range(1, 11):
        assert split[step] == pytest.approx(full[step], rel=1e-6), step


def test_checkpoint_loads_for_sampling(tmp_path, text_file):
    cfg = RunConfig(
        data=str(text_file), out_dir=str(tmp_path), max_iters=4, eval_interval=2, eval_iters=1,
        model=GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8), batch_size=2, quiet=True, plot=False,
        sample_tokens=0,
    )  # fmt: skip
    train_lm(cfg, log=lambda s: None)
    model, tokenizer, meta = load_model(tmp_path / "ckpt.npz")
    assert meta["step"] in (2, 4) and model.config.n_embd == 16
    assert len(tokenizer.decode(model.generate(np.array([tokenizer.encode("T")]), 5)[0])) == 6


# ----------------------------------------------------------------------------- bad input: one line, exit 2


def expect_exit_2(capsys, main, *argv):
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def train_args(tmp_path, data, *extra):
    return ("--data", str(data), "--out-dir", str(tmp_path / "out"), "--max-iters", "2", "--eval-interval", "1",
            "--eval-iters", "1", *SMALL, "--quiet", "--no-plot", "--sample-tokens", "0", *map(str, extra))  # fmt: skip


def test_bad_data_files(tmp_path, capsys):
    assert "not found" in expect_exit_2(capsys, train_script.main, *train_args(tmp_path, tmp_path / "nope.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "empty" in expect_exit_2(capsys, train_script.main, *train_args(tmp_path, empty))
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"hello \xff\xfe world" * 10)
    assert "UTF-8" in expect_exit_2(capsys, train_script.main, *train_args(tmp_path, binary))
    short = tmp_path / "short.txt"
    short.write_text("abc" * 5)
    assert "block" in expect_exit_2(capsys, train_script.main, *train_args(tmp_path, short))
    short_val = tmp_path / "short_val.txt"
    short_val.write_text("abcdefgh" * 20)  # 144 train characters, but only 16 for validation
    assert "validation" in expect_exit_2(capsys, train_script.main, *train_args(tmp_path, short_val))


@pytest.mark.parametrize(
    "flags,words",
    [
        (["--n-embd", "30", "--n-head", "4"], "divisible"),
        (["--n-layer", "0"], "positive"),
        (["--max-iters", "-5"], "max-iters"),
        (["--learning-rate", "0"], "learning-rate"),
        (["--batch-size", "0"], "batch-size"),
        (["--tokenizer", "words"], "tokenizer"),
        (["--vocab-size", "300"], "only applies to --tokenizer bpe"),
        (["--grad-clip", "nan"], "--grad-clip must be a finite number"),
        (["--learning-rate", "inf"], "--learning-rate must be a finite number"),
        (["--seed", "-1"], "--seed must be non-negative"),
        (["--dropout", "1"], "--dropout must be in [0, 1)"),
        (["--beta2", "1.5"], "--beta2 must be in [0, 1)"),
        (["--max-iters", "ten"], "invalid int value"),
        (["--no-such-flag"], "unrecognized arguments"),
    ],
)
def test_bad_settings(tmp_path, text_file, capsys, flags, words):
    assert words in expect_exit_2(capsys, train_script.main, *train_args(tmp_path, text_file, *flags))


def test_bad_config_file(tmp_path, text_file, capsys):
    toml = tmp_path / "run.toml"
    cases = [
        ("max_iters = 3\nn_layer = 1\nbogus = 1\n", "bogus is not a setting"),
        ("max_iters = [", "TOML"),
        ("warmup-iters = 3\n", "write it warmup_iters"),  # one spelling per key
        ("warmup_iters = true\n", "warmup_iters must be an integer"),  # a bool is not an int
        ("learning_rate = 'fast'\n", "learning_rate must be a number"),
        ("grad_clip = nan\n", "grad_clip must be a finite number"),
        ("n_layer = 2.0\n", "n_layer must be an integer"),
    ]
    for text, words in cases:
        toml.write_text(text)
        assert words in expect_exit_2(capsys, train_script.main, *train_args(tmp_path, text_file, "--config", toml))
    err = expect_exit_2(capsys, train_script.main, *train_args(tmp_path, text_file, "--config", tmp_path))
    assert "directory" in err


def test_config_file_sets_defaults_and_flags_win(tmp_path, text_file, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text("n_layer = 1\nn_embd = 24\nn_head = 4\nlearning_rate = 1\n")
    train_script.main(
        ["--config", str(toml), "--data", str(text_file), "--out-dir", str(tmp_path / "out"), "--max-iters", "2",
         "--eval-iters", "1", "--block-size", "8", "--quiet", "--no-plot", "--n-embd", "16", "--learning-rate", "0.01"]
    )  # fmt: skip
    _, _, meta = load_model(tmp_path / "out" / "last.npz")
    assert meta["model_config"]["n_layer"] == 1 and meta["model_config"]["n_embd"] == 16
    assert meta["run_config"]["learning_rate"] == 0.01


def test_resume_errors_keep_the_saved_checkpoint(tmp_path, text_file, capsys):
    assert "no checkpoint" in expect_exit_2(capsys, train_script.main, *train_args(tmp_path, text_file, "--resume"))
    train_script.main(list(train_args(tmp_path, text_file)))
    capsys.readouterr()
    last = tmp_path / "out" / "last.npz"
    saved = last.read_bytes()
    err = expect_exit_2(capsys, train_script.main, *train_args(tmp_path, text_file, "--resume", "--n-embd", "64"))
    assert "other settings" in err and "--n-embd 64 (checkpoint: 32)" in err
    other = tmp_path / "other.txt"
    other.write_text("completely different alphabet XYZ!? " * 50)
    assert "--data" in expect_exit_2(capsys, train_script.main, *train_args(tmp_path, other, "--resume"))
    assert last.read_bytes() == saved  # nothing already saved was lost
    last.write_bytes(saved[: len(saved) // 2])
    assert "last.npz" in expect_exit_2(capsys, train_script.main, *train_args(tmp_path, text_file, "--resume"))


def test_sample_errors(tmp_path, text_file, capsys):
    assert "no checkpoint" in expect_exit_2(capsys, sample_script.main, "--out-dir", str(tmp_path / "none"))
    train_script.main(list(train_args(tmp_path, text_file)))
    capsys.readouterr()
    ckpt = str(tmp_path / "out" / "ckpt.npz")
    err = expect_exit_2(capsys, sample_script.main, "--ckpt", ckpt, "--start", "\u00e9\u00e9")
    assert "vocabulary" in err and "é" in err
    assert "temperature" in expect_exit_2(capsys, sample_script.main, "--ckpt", ckpt, "--temperature", "-1")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a checkpoint at all")
    assert "garbage.npz" in expect_exit_2(capsys, sample_script.main, "--ckpt", str(garbage))


@pytest.mark.parametrize("vs_torch", [False, True])
def test_bench_train_smoke(tmp_path, vs_torch, run_main, monkeypatch):
    if vs_torch:
        pytest.importorskip("torch")
    # The command in this process (each engine is still timed in a process of its own); a smoke test
    # needs the GEMM-peak line, not a precise peak, and not the kernels (the children inherit the switch).
    bench_module = sys.modules[bench_script.main.__module__]
    gemm_peak = bench_module.gemm_peak_gflops
    monkeypatch.setattr(bench_module, "gemm_peak_gflops", lambda n, reps=10, device="cpu": gemm_peak(256, 2, device))
    monkeypatch.setenv("MINIGPT_NO_CPU_KERNELS", "1")
    tiny = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "8", "--batch-size", "2"]
    args = [*tiny, "--vocab-size", "11", "--steps", "2", "--warmup", "1", "--rounds", "1"]
    args += ["--sample", "--sample-tokens", "12"]
    bench = run_main(bench_script.main, *args, *(["--vs-torch"] if vs_torch else []), cwd=tmp_path)
    assert bench.returncode == 0, bench.stderr
    assert "minigpt  step" in bench.stdout and "cache speed-up" in bench.stdout
    # the same weights and batches: both engines print the same first loss
    losses = [line.split("loss ")[-1].split(" ->")[0] for line in bench.stdout.splitlines() if "| loss " in line]
    assert len(losses) == (2 if vs_torch else 1) and len(set(losses)) == 1
    assert ("throughput ratio" in bench.stdout) == vs_torch


def test_profile_train_smoke(run_main, monkeypatch):
    from minigpt.autograd import function

    # the script wraps Function.apply for the whole process: put it back afterwards
    monkeypatch.setattr(function.Function, "apply", function.Function.__dict__["apply"])
    profile = run_main(profile_script.main, "--preset", "S", "--steps", "1")
    assert profile.returncode == 0, profile.stderr
    ops = {line.split()[0] for line in profile.stdout.splitlines()[1:]}
    assert {"Linear", "Split", "LayerNorm", "CrossEntropy"} <= ops  # Split: an op with several outputs


def test_bench_gemm_smoke(run_main):
    bench = run_main(gemm_script.main, "--preset", "S", "--processes", "2", "--reps", "1", "--rounds", "1")
    assert bench.returncode == 0, bench.stderr
    assert "384 rows a process" in bench.stdout  # batch 12 x block 64 over 2 processes
    rows = [line for line in bench.stdout.splitlines() if "->" in line]
    assert len(rows) == 15 and all(float(r.split()[-1]) > 0 for r in rows)  # 5 Linears x 3 GEMMs, GFLOP/s


def test_run_settings_are_declared_once():
    from minigpt import config

    flat = config.flat_fields(RunConfig)
    assert "n_layer" in flat and "model" not in flat and flat["vocab_size"][0].metadata["help"].endswith("bpe")
    assert all(f.metadata["help"] for f, _, _ in flat.values())  # every flag has help text
    cfg = config.from_flat(RunConfig, {"n_layer": 2, "learning_rate": 1, "resume": True})
    assert cfg.model.n_layer == 2 and cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)
    assert config.from_flat(RunConfig, config.to_flat(cfg)) == cfg
    with pytest.raises(ValueError, match="warmup_iters must be an integer"):
        RunConfig(warmup_iters=True)
    with pytest.raises(ValueError, match="n_head"):
        config.from_flat(RunConfig, {"n_embd": 30, "n_head": 4})
