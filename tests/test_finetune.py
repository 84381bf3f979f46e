"""--init-from (fine-tuning from other weights), sample.py --init-from, and weights-only export."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from minigpt import GPTConfig
from minigpt.checkpoint import load_checkpoint
from minigpt.lm import RunConfig, load_model, train_lm

ROOT = Path(__file__).resolve().parents[1]
TEXT = "".join(f"Line {i}: The quick brown fox jumps over the lazy dog.\n" for i in range(300))
SMALL = dict(n_layer=2, n_head=2, n_embd=32, block_size=32)


sys.path.insert(0, str(ROOT / "scripts"))
import export as export_script  # noqa: E402
import sample as sample_script  # noqa: E402
import train_gpt as train_script  # noqa: E402

MAINS = {"export.py": export_script.main, "sample.py": sample_script.main, "train_gpt.py": train_script.main}


@pytest.fixture
def run_script(run_main):
    """scripts/<script> run in this process, in `cwd`; training runs skip the loss plot."""

    def run(script, *args, cwd):
        plot = ["--no-plot"] if script == "train_gpt.py" else []
        return run_main(MAINS[script], *args, *plot, cwd=cwd)

    return run


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A small character model trained here (stands in for pretrained weights), its text and checkpoint."""
    tmp = tmp_path_factory.mktemp("pretrained")
    (tmp / "input.txt").write_text(TEXT)
    cfg = RunConfig(
        data=str(tmp / "input.txt"), out_dir=str(tmp / "out"), max_iters=60, eval_interval=60, eval_iters=4,
        batch_size=8, learning_rate=3e-3, warmup_iters=5, quiet=True, plot=False, sample_tokens=0,
        model=GPTConfig(**SMALL),
    )  # fmt: skip
    summary = train_lm(cfg, log=lambda s: None)
    return tmp, summary.val_loss


def test_init_from_an_hf_export_fine_tunes_from_its_weights(pretrained, tmp_path, run_script):
    src, trained_val = pretrained
    r = run_script("export.py", src / "out" / "ckpt.npz", tmp_path / "hf", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    args = ["--data", src / "input.txt", "--max-iters", "6", "--eval-interval", "3", "--eval-iters", "4"]
    args += ["--batch-size", "8", "--learning-rate", "1e-4", "--warmup-iters", "0", "--sample-tokens", "0"]
    r = run_script("train_gpt.py", "--init-from", tmp_path / "hf", "--out-dir", "ft", *args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    start = [line for line in r.stdout.splitlines() if line.startswith("step 0 (the --init-from weights)")]
    assert start and float(start[0].rsplit(" ", 1)[1]) < 0.5 * np.log(len(set(TEXT)))  # not a fresh model
    _, optim, meta = load_checkpoint(tmp_path / "ft" / "last.npz")
    assert meta["step"] == 6 and meta["run_config"]["init_from"] == str(tmp_path / "hf")
    assert np.all(optim["step/transformer.wte.weight"] == 6)  # a fresh optimizer: 6 steps, not 66
    # The fine-tuned run resumes like any other, and samples with its tokenizer.
    r = run_script("train_gpt.py", "--out-dir", "ft", "--resume", "--max-iters", "9", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_script("sample.py", "--init-from", tmp_path / "hf", "--start", "Line", "--max-new-tokens", "20",
                   "--temperature", "0", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0 and r.stdout.startswith("Line"), r.stderr


def test_init_from_crops_block_size_and_refuses_other_shapes(pretrained, tmp_path, run_script):
    src, _ = pretrained
    common = ["--data", src / "input.txt", "--max-iters", "2", "--eval-iters", "1", "--sample-tokens", "0"]
    r = run_script("train_gpt.py", "--init-from", src / "out" / "ckpt.npz", "--block-size", "16", *common,
                   "--out-dir", "crop", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert load_model(tmp_path / "crop" / "ckpt.npz")[0].config.block_size == 16
    for flags, message in (
        (["--block-size", "64"], "--block-size 64 (theirs: 32; it can only shrink)"),
        (["--n-layer", "3"], "--n-layer 3 (theirs: 2)"),
        (["--tokenizer", "gpt2"], "--tokenizer gpt2 (theirs: char)"),
        (["--resume"], "--init-from starts a new run"),
    ):
        r = run_script("train_gpt.py", "--init-from", src / "out" / "ckpt.npz", *flags, *common, "--out-dir", "x",
                       cwd=tmp_path)  # fmt: skip
        assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, (flags, r.stderr)
    r = run_script("sample.py", "--init-from", tmp_path / "nowhere", cwd=tmp_path)
    assert r.returncode == 2 and "no such folder" in r.stderr, r.stderr


def test_weights_only_export_is_smaller_loads_and_stores_the_tied_weight_once(pretrained, tmp_path, run_script):
    src, _ = pretrained
    r = run_script("export.py", src / "out" / "ckpt.npz", tmp_path / "w.npz", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    state, optim, meta = load_checkpoint(tmp_path / "w.npz")
    assert optim is None and meta["weights_only"] and "rng" not in meta
    with np.load(tmp_path / "w.npz") as npz:
        assert "model/lm_head.weight" not in npz.files
    full, _, _ = load_model(src / "out" / "ckpt.npz")
    light, tokenizer, _ = load_model(tmp_path / "w.npz")
    ids = np.array([tokenizer.encode("Line 7: The quick")])
    np.testing.assert_array_equal(light(ids, ids)[0].data, full(ids, ids)[0].data)
    size = (tmp_path / "w.npz").stat().st_size
    assert size < 0.4 * (src / "out" / "ckpt.npz").stat().st_size  # no AdamW moments
