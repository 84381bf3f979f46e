"""The `minigpt` command (python -m minigpt): subcommands, nanoGPT's flag spellings, help for every flag."""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from minigpt import cli
from minigpt.lm import RunConfig, load_model

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "8", "--batch-size", "2"]


def minigpt_command(*argv, cwd):
    # About the process (the entry point, its exit codes), not the kernels: the array code spares it Numba's start-up.
    env = {**os.environ, "MINIGPT_OFFLINE": "1", "PYTHONPATH": str(ROOT), "MINIGPT_NO_CPU_KERNELS": "1"}
    return subprocess.run([sys.executable, "-m", "minigpt", *argv], cwd=cwd, env=env, capture_output=True, text=True)


def test_python_m_minigpt_trains_samples_and_plots(tmp_path, text_file, run_main):
    # The process itself once (python -m minigpt, drawing loss.png at each evaluation); the rest in-process.
    train = minigpt_command("train", "--data", str(text_file), "--max-iters", "2", "--eval-interval", "2",
                            "--eval-iters", "1", *TINY, "--sample-tokens", "0", cwd=tmp_path)  # fmt: skip
    assert train.returncode == 0, train.stderr
    sample = run_main(cli.main, "sample", "--start", "The", "--max-new-tokens", "5", cwd=tmp_path)
    assert sample.returncode == 0 and sample.stdout.startswith("The"), sample.stderr
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "out" / "loss.png").exists()  # drawn by the training run
        (tmp_path / "out" / "loss.png").unlink()
    plot = run_main(cli.main, "plot", cwd=tmp_path)
    if importlib.util.find_spec("matplotlib"):
        assert plot.returncode == 0, plot.stderr
        assert (tmp_path / "out" / "loss.png").exists() and "loss.png" in plot.stdout
    else:  # no matplotlib: one line saying how to get it
        assert plot.returncode == 2 and '".[plot]"' in plot.stderr
    usage = run_main(cli.main, "--help", cwd=tmp_path)
    assert usage.returncode == 0 and all(name in usage.stdout for name in ("train", "sample", "plot", "bench"))
    unknown = run_main(cli.main, "fly", cwd=tmp_path)
    assert unknown.returncode == 2 and unknown.stderr.strip() == "error: unknown command 'fly'; use one of: " + (
        "train, sample, plot, bench"
    )
    bench = run_main(cli.main, "bench", "--device", "tpu", cwd=tmp_path)
    assert bench.returncode == 2 and bench.stderr.startswith("error: --device tpu") and "\n" not in bench.stderr.strip()


def test_nanogpt_spellings(tmp_path, text_file, capsys):
    out = tmp_path / "out"
    cli.train([f"--data={text_file}", f"--out_dir={out}", "--max_iters=2", "--eval_interval=2", "--eval_iters=1",
               "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=8", "--batch_size=2", "--bias=True",
               "--quiet=True", "--sample_tokens=0", "--plot=false"])  # fmt: skip
    _, _, meta = load_model(out / "last.npz")
    assert meta["model_config"]["n_layer"] == 1 and meta["model_config"]["bias"] is True
    assert meta["run_config"]["max_iters"] == 2 and meta["run_config"]["quiet"] is True
    args = cli.settings_parser(RunConfig, None, "").parse_args(["--bias=false", "--n_embd", "8"])
    assert args.bias is False and args.n_embd == 8


def test_sample_takes_last_npz_when_there_is_no_best(tmp_path, text_file, capsys):
    cli.train(["--data", str(text_file), "--out-dir", str(tmp_path / "run"), "--max-iters", "2", "--eval-iters", "1",
               *TINY, "--quiet", "--no-plot", "--sample-tokens", "0"])  # fmt: skip
    only_last = tmp_path / "only_last"
    only_last.mkdir()
    shutil.copy(tmp_path / "run" / "last.npz", only_last / "last.npz")
    capsys.readouterr()
    cli.sample(["--out-dir", str(only_last), "--start", "The", "--max-new-tokens", "3"])
    out, err = capsys.readouterr()
    assert out.startswith("The") and err.strip() == (
        f"note: no ckpt.npz in {only_last} (no evaluation finished yet): using {only_last / 'last.npz'}"
    )


@pytest.mark.parametrize("cls", [RunConfig, cli.SampleConfig])
def test_every_flag_has_a_real_help_line_and_its_default_once(cls, capsys):
    parser = cli.settings_parser(cls, "minigpt x", "")
    for action in parser._actions:
        if action.dest in ("help",):
            continue
        name = action.dest
        assert action.help and action.help.split(" (default")[0] != name.replace("_", " "), name
        assert action.help.count("(default") <= 1, name
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "(default: 0.8)" in text if cls is cli.SampleConfig else "(default: 2000)" in text
