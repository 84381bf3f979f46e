"""Text in, text out: minigpt.load + minigpt.generate_text, as the README shows them."""

import io
import shutil

import numpy as np
import pytest

import minigpt
from minigpt.errors import UserError
from minigpt.gpt import GPTConfig
from minigpt.inference import find_checkpoint
from minigpt.lm import RunConfig, train_lm


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory, corpus):
    tmp = tmp_path_factory.mktemp("run")
    (tmp / "input.txt").write_text(corpus[:20_000])
    cfg = RunConfig(
        data=str(tmp / "input.txt"), out_dir=str(tmp / "out"), max_iters=4, eval_interval=2, eval_iters=1,
        batch_size=2, model=GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16), quiet=True, plot=False,
        sample_tokens=0,
    )  # fmt: skip
    train_lm(cfg, log=lambda s: None)
    return tmp / "out"


def test_three_lines_from_the_readme(out_dir, monkeypatch):
    monkeypatch.chdir(out_dir.parent)  # the README's "out" is relative
    model, tokenizer = minigpt.load("out")
    text = minigpt.generate_text(model, tokenizer, "ROMEO:", max_new_tokens=20)
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 20  # one character per token


def test_generation_is_repeatable_greedy_and_streams(out_dir):
    model, tokenizer = minigpt.load(out_dir / "ckpt.npz")
    a = minigpt.generate_text(model, tokenizer, "The", 15, seed=3)
    assert a == minigpt.generate_text(model, tokenizer, "The", 15, seed=3)
    greedy = minigpt.generate_text(model, tokenizer, "The", 15, temperature=0)
    ids = model.generate(np.array(tokenizer.encode("The")), 15, temperature=0)[0]
    assert greedy == tokenizer.decode(ids)
    stream = io.StringIO()
    assert minigpt.generate_text(model, tokenizer, "The", 15, seed=3, stream=stream) == "The" + stream.getvalue()


def test_which_checkpoint(out_dir, tmp_path):
    assert find_checkpoint(out_dir) == (out_dir / "ckpt.npz", "")
    only_last = tmp_path / "only_last"
    only_last.mkdir()
    shutil.copy(out_dir / "last.npz", only_last / "last.npz")
    path, note = find_checkpoint(only_last)
    assert path == only_last / "last.npz" and "no ckpt.npz" in note
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no checkpoint in"):
        minigpt.load(tmp_path / "empty")
    with pytest.raises(UserError, match="no checkpoint at"):
        minigpt.load(tmp_path / "nope.npz")


def test_text_to_generate_says_what_to_use(out_dir):
    model, _ = minigpt.load(out_dir)
    with pytest.raises(TypeError, match="minigpt.generate_text"):
        model.generate("ROMEO:", 5)
