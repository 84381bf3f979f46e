"""Modules, the GPT and whole runs on CuPy arrays, against the same code on NumPy.

Float64 copies of each module run forward and backward on both devices from the same weights and
inputs; outputs and every parameter gradient must agree to 1e-9. Then generation (greedy, cached
and not), checkpoints moving between devices, and train_gpt.py / sample.py with --device cuda.
Skipped cleanly without CuPy or a GPU.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import minigpt
from minigpt import nn
from minigpt.autograd.backend import to_numpy
from minigpt.gpt import GPT, Block, CausalSelfAttention, GPTConfig
from minigpt.lm import RunConfig, load_model, train_lm

pytestmark = pytest.mark.gpu  # skipped without CuPy and a GPU (tests/conftest.py)

ROOT = Path(__file__).resolve().parents[2]
CFG = GPTConfig(vocab_size=37, block_size=12, n_layer=2, n_head=2, n_embd=16)


def float64(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.data = p.data.astype(np.float64)
    return module


def make_modules():
    """name -> (module factory, input factory); each factory builds the same thing every call."""
    rng = np.random.default_rng

    def floats(*shape):
        return minigpt.tensor(rng(1).standard_normal(shape), requires_grad=True)

    ids = rng(2).integers(0, CFG.vocab_size, size=(3, CFG.block_size))
    return {
        "linear": (lambda: nn.Linear(16, 8, rng=rng(0)), lambda: floats(3, 5, 16)),
        "embedding": (lambda: nn.Embedding(CFG.vocab_size, 8, rng=rng(0)), lambda: ids),
        "layer_norm": (lambda: nn.LayerNorm(16), lambda: floats(3, 5, 16)),
        "mlp": (lambda: nn.MLP(16, [32, 4], activation="relu", rng=rng(0)), lambda: floats(6, 16)),
        "attention": (lambda: CausalSelfAttention(CFG, rng(0), rng(3)), lambda: floats(3, 7, 16)),
        "block": (lambda: Block(CFG, rng(0), rng(3)), lambda: floats(3, 7, 16)),
        "gpt_learned": (lambda: GPT(CFG, rng=rng(0)), lambda: ids),
        "gpt_sinusoidal": (lambda: GPT(GPTConfig(**{**CFG.to_dict(), "pos_encoding": "sinusoidal"}), rng=rng(0)),
                           lambda: ids),
    }  # fmt: skip


@pytest.mark.parametrize("name", sorted(make_modules()))
def test_module_forward_and_backward_match_cpu(name):
    make_module, make_input = make_modules()[name]
    results = {}
    for device in ("cpu", "cuda"):
        module = float64(make_module()).to(device)
        x = make_input()
        if isinstance(x, minigpt.Tensor):
            x = x.to(device)
            x.requires_grad = True
        out = module(x)
        if isinstance(out, tuple):  # the GPT: (logits, loss); ask for the loss too
            out, loss = module(x, x)
            out = out + loss
        assert out.device == device
        weights = minigpt.tensor(np.cos(np.arange(out.numel())).reshape(out.shape), device=device)
        (out * weights).sum().backward()
        grads = {n: to_numpy(p.grad) for n, p in module.named_parameters()}
        if isinstance(x, minigpt.Tensor):
            grads["input"] = to_numpy(x.grad)
        results[device] = (out.numpy(), grads)
    (cpu_out, cpu_grads), (gpu_out, gpu_grads) = results["cpu"], results["cuda"]
    np.testing.assert_allclose(gpu_out, cpu_out, rtol=1e-9, atol=1e-11)
    assert gpu_grads.keys() == cpu_grads.keys()
    for key, ref in cpu_grads.items():
        np.testing.assert_allclose(gpu_grads[key], ref, rtol=1e-9, atol=1e-11, err_msg=key)


def test_generation_on_cuda_matches_cpu_and_the_cache_changes_nothing():
    cfg = GPTConfig(vocab_size=37, block_size=8, n_layer=2, n_head=2, n_embd=16)
    outs = {}
    for device in ("cpu", "cuda"):
        model = float64(GPT(cfg, rng=np.random.default_rng(0))).to(device)
        for use_cache in (True, False):
            outs[device, use_cache, "greedy"] = model.generate([1, 2, 3], 20, temperature=0, use_cache=use_cache)
            outs[device, use_cache, "sampled"] = model.generate([1, 2, 3], 20, seed=5, top_k=10, use_cache=use_cache)
    for key, ref in outs.items():
        assert isinstance(ref, np.ndarray) and ref.shape == (1, 23)
        np.testing.assert_array_equal(ref, outs[("cpu", True, key[2])], err_msg=str(key))


def test_dropout_trains_on_cuda():
    model = GPT(GPTConfig(**{**CFG.to_dict(), "dropout": 0.3}), rng=np.random.default_rng(0)).to("cuda")
    ids = np.random.default_rng(1).integers(0, CFG.vocab_size, size=(2, CFG.block_size))
    a, _ = model(ids)
    b, _ = model(ids)
    assert not np.allclose(a.numpy(), b.numpy())  # different masks each call
    model.eval()
    c, _ = model(ids)
    d, _ = model(ids)
    np.testing.assert_array_equal(c.numpy(), d.numpy())


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text("".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(300)))
    return path


def test_a_cuda_run_learns_and_its_checkpoint_loads_on_either_device(tmp_path, text_file):
    cfg = RunConfig(
        data=str(text_file), out_dir=str(tmp_path / "out"), max_iters=150, eval_interval=75, eval_iters=4,
        model=GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32), batch_size=8, learning_rate=3e-3,
        warmup_iters=5, quiet=True, sample_tokens=0, device="cuda",
    )  # fmt: skip
    summary = train_lm(cfg, log=lambda s: None)
    assert summary.step == 150 and summary.val_loss < 2.5
    ids = np.random.default_rng(0).integers(0, 20, size=(2, 32))
    logits = {}
    for device in ("cpu", "cuda"):
        model, _, _ = load_model(tmp_path / "out" / "ckpt.npz", device=device)
        assert model.lm_head.weight.device == device
        logits[device] = model(ids, ids)[0].numpy()
    np.testing.assert_allclose(logits["cuda"], logits["cpu"], rtol=1e-4, atol=1e-4)


def test_cli_train_and_sample_with_device_cuda(tmp_path, text_file):
    env = {**os.environ, "MINIGPT_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    small = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "16", "--batch-size", "4"]

    def run(script, *args):
        cmd = [sys.executable, str(ROOT / "scripts" / script), *args, "--device", "cuda"]
        return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)

    train = run("train_gpt.py", "--data", str(text_file), "--max-iters", "20", "--eval-interval", "10",
                "--eval-iters", "2", *small, "--sample-tokens", "10")  # fmt: skip
    assert train.returncode == 0, train.stderr
    assert "val loss" in train.stdout and "--- sample ---" in train.stdout
    sample = run("sample.py", "--start", "Line", "--max-new-tokens", "15")
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout.count("Line") >= 1
