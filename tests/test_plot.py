"""out/loss.png: drawn at each evaluation when matplotlib is installed, on demand, one line without it."""

import json

import pytest

from minigpt import plot
from minigpt.errors import UserError
from minigpt.gpt import GPTConfig
from minigpt.lm import RunConfig, train_lm

TINY = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8)


def tiny_run(tmp_path, text_file, log=lambda s: None, plot=False):
    cfg = RunConfig(data=str(text_file), out_dir=str(tmp_path / "out"), max_iters=6, eval_interval=3,
                    eval_iters=1, log_interval=1, batch_size=2, model=TINY, quiet=True, sample_tokens=0,
                    plot=plot)  # fmt: skip
    train_lm(cfg, log=log)
    return tmp_path / "out"


def test_records_count_tokens_seen(tmp_path, text_file):
    out = tiny_run(tmp_path, text_file)
    steps, evals = plot.read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in evals] == [3, 6] and len(steps) == 6
    assert all(r["tokens"] == r["step"] * 2 * 8 for r in steps + evals)  # batch 2 x block 8


def test_training_draws_the_plot_at_each_evaluation(tmp_path, text_file, monkeypatch):
    pytest.importorskip("matplotlib")
    drawn = []
    monkeypatch.setattr("minigpt.lm.plot_run", lambda out_dir: drawn.append(plot.plot_run(out_dir)))
    out = tiny_run(tmp_path, text_file, plot=True)
    assert drawn == [out / "loss.png"] * 2
    assert (out / "loss.png").read_bytes().startswith(b"\x89PNG")
    (out / "loss.png").unlink()
    assert plot.plot_run(out, tmp_path / "again.png") == tmp_path / "again.png"  # on demand
    assert (tmp_path / "again.png").stat().st_size > 10_000


def test_no_plot_draws_nothing_and_says_nothing(tmp_path, text_file, monkeypatch):
    pytest.importorskip("matplotlib")
    drawn, lines = [], []
    monkeypatch.setattr("minigpt.lm.plot_run", drawn.append)
    out = tiny_run(tmp_path, text_file, plot=False)
    assert drawn == [] and not (out / "loss.png").exists()
    assert (out / "ckpt.npz").exists()  # evaluations (and their checkpoints) still happen
    monkeypatch.setattr("minigpt.lm.have_matplotlib", lambda: False)  # no note on how to get the plot either
    tiny_run(tmp_path / "without", text_file, log=lines.append, plot=False)
    assert lines and not [line for line in lines if "loss.png" in line]


def test_without_matplotlib_one_line_says_how_to_get_it(tmp_path, text_file, monkeypatch):
    monkeypatch.setattr(plot, "have_matplotlib", lambda: False)
    monkeypatch.setattr("minigpt.lm.have_matplotlib", lambda: False)
    lines = []
    out = tiny_run(tmp_path, text_file, log=lines.append, plot=True)
    assert not (out / "loss.png").exists()
    assert [line for line in lines if "loss.png" in line and '".[plot]"' in line]
    with pytest.raises(UserError, match=r'plotting needs matplotlib: pip install -e "\.\[plot\]"'):
        plot.plot_run(out)


def test_bad_metrics_are_user_errors(tmp_path):
    pytest.importorskip("matplotlib")
    with pytest.raises(UserError, match="no metrics.jsonl"):
        plot.plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0, "lr": 0.1}\n{"step": 2, "lo')  # cut short
    assert plot.read_metrics(tmp_path / "metrics.jsonl") == ([{"step": 1, "loss": 2.0, "lr": 0.1}], [])
    plot.plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"unrelated": 1}) + "\n")
    with pytest.raises(UserError, match="no records"):
        plot.plot_run(tmp_path)
