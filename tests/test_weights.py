"""GPT-2 weights in Hugging Face's layout: round trips, the Conv1D transposes, bad folders; transformers as oracle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from minigpt import GPT, GPTConfig
from minigpt.errors import UserError
from minigpt.weights import load_hf, state_to_hf

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(vocab_size=97, block_size=24, n_layer=2, n_head=4, n_embd=32)


def full_logits(model: GPT, ids: np.ndarray) -> np.ndarray:
    logits, _ = model(ids, np.zeros_like(ids))  # with targets: every position's logits
    return logits.data


def perturbed(config: GPTConfig, seed: int = 0) -> GPT:
    """A random model whose LayerNorms and biases are not at their init (so a dropped one shows)."""
    model = GPT(config, rng=np.random.default_rng(seed))
    rng = np.random.default_rng(seed + 1)
    for name, p in model.named_parameters():
        if ".ln_" in name or name.endswith(".bias"):
            p.data[...] += rng.normal(0, 0.3, p.shape).astype(np.float32)
    return model


def ids_for(config: GPTConfig, T: int = 16) -> np.ndarray:
    return np.random.default_rng(5).integers(0, config.vocab_size, (2, T))


@pytest.mark.parametrize(
    "extra", [dict(bias=True), dict(bias=False), dict(bias=False, pos_encoding="sinusoidal")], ids=str
)
def test_save_then_load_gives_identical_logits_and_config(tmp_path, extra):
    config = GPTConfig(**SMALL, **extra)
    model = perturbed(config)
    model.save_pretrained(str(tmp_path / "hf"))
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert "lm_head.weight" not in tensors and tensors["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)
    loaded = GPT.from_pretrained(str(tmp_path / "hf"))
    assert loaded.config == config  # the exact config comes back (zero biases dropped, table recognised)
    ids = ids_for(config)
    np.testing.assert_array_equal(full_logits(loaded, ids), full_logits(model, ids))


def _write_hf(folder: Path, tensors: dict[str, np.ndarray], config: GPTConfig, **changes) -> Path:
    """An HF GPT-2 folder written by hand, as the openai-community/gpt2 repo lays it out (no prefix, mask buffers)."""
    folder.mkdir(parents=True, exist_ok=True)
    hf = dict(
        model_type="gpt2",
        vocab_size=config.vocab_size,
        n_positions=config.block_size,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        activation_function="gelu_new",
    )
    hf.update(changes)
    (folder / "config.json").write_text(json.dumps(hf))
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def _gpt2_repo_tensors(model: GPT) -> dict[str, np.ndarray]:
    tensors = {k.removeprefix("transformer."): v for k, v in state_to_hf(model).items()}
    T = model.config.block_size
    for i in range(model.config.n_layer):  # the causal-mask buffer old GPT-2 files carry
        tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, T, T), np.float32))
    return tensors


def test_loads_the_gpt2_repo_layout_and_catches_a_missing_transpose(tmp_path):
    config = GPTConfig(**SMALL, bias=True)
    model = perturbed(config)
    tensors = _gpt2_repo_tensors(model)
    good, _ = load_hf(_write_hf(tmp_path / "good", tensors, config))
    ids = ids_for(config)
    np.testing.assert_array_equal(full_logits(good, ids), full_logits(model, ids))

    # The square attn.c_proj has the same shape either way round: only the logits can tell.
    bad = dict(tensors)
    bad["h.1.attn.c_proj.weight"] = np.ascontiguousarray(bad["h.1.attn.c_proj.weight"].T)
    wrong, _ = load_hf(_write_hf(tmp_path / "bad", bad, config))
    assert np.abs(full_logits(wrong, ids) - full_logits(model, ids)).max() > 1e-3

    # A non-square Conv1D weight given as (out, in) is refused by shape, naming the layout.
    bad = dict(tensors)
    bad["h.0.mlp.c_fc.weight"] = np.ascontiguousarray(bad["h.0.mlp.c_fc.weight"].T)
    with pytest.raises(UserError, match=r"h\.0\.mlp\.c_fc\.weight is \(128, 32\).*\(in, out\)"):
        load_hf(_write_hf(tmp_path / "bad2", bad, config))


def test_cached_name_is_found_in_the_hf_hub_layout(tmp_path, monkeypatch):
    config = GPTConfig(**SMALL, bias=True)
    model = perturbed(config)
    repo = tmp_path / "hub" / "models--openai-community--gpt2"
    _write_hf(repo / "snapshots" / "0123abc", _gpt2_repo_tensors(model), config)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    ids = ids_for(config)
    np.testing.assert_array_equal(full_logits(GPT.from_pretrained("gpt2"), ids), full_logits(model, ids))


def test_bad_folders_are_one_line_errors(tmp_path, monkeypatch):
    config = GPTConfig(**SMALL, bias=True)
    tensors = _gpt2_repo_tensors(perturbed(config))
    cases = {
        "model_type": (_write_hf(tmp_path / "llama", tensors, config, model_type="llama"), "GPT-2 models only"),
        "shape": (_write_hf(tmp_path / "shape", tensors, config, n_embd=64, n_head=4), "does not match"),
        "inner": (_write_hf(tmp_path / "inner", tensors, config, n_inner=64), "n_inner=64"),
    }
    missing = _write_hf(tmp_path / "missing", tensors, config)
    (missing / "model.safetensors").unlink()
    cases["missing"] = (missing, "has no model.safetensors")
    pickled = _write_hf(tmp_path / "pickled", tensors, config)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    cases["pickle"] = (pickled, "pytorch_model.bin .a pickle.*model.safetensors")
    truncated = _write_hf(tmp_path / "truncated", tensors, config)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    cases["truncated"] = (truncated, "not a readable safetensors file")
    few = {k: v for k, v in tensors.items() if not k.startswith("h.1.")}
    cases["missing tensors"] = (_write_hf(tmp_path / "few", few, config), "missing h.1.")
    for name, (folder, message) in cases.items():
        with pytest.raises(UserError, match=message) as e:
            load_hf(folder)
        assert "\n" not in str(e.value), name

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"gpt2-medium is not .*huggingface.co/openai-community/gpt2-medium"):
        load_hf("gpt2-medium")
    with pytest.raises(UserError, match="no such folder"):
        load_hf(str(tmp_path / "nowhere"))


# ---------------------------------------------------------------- transformers as the oracle

transformers = pytest.importorskip("transformers", reason="transformers + torch check HF compatibility")
torch = pytest.importorskip("torch")


def hf_logits(hf_model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.from_numpy(ids)).logits.numpy()


def random_hf_model(seed: int = 0, **config):
    torch.manual_seed(seed)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config)).eval()
    with torch.no_grad():  # LayerNorms and biases off their init, so a dropped one shows
        for p in hf.parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
    return hf


@pytest.mark.parametrize("activation", ["gelu_new", "gelu"])
def test_hf_save_loads_into_minigpt_with_hf_logits(tmp_path, activation):
    hf = random_hf_model(vocab_size=101, n_positions=32, n_embd=48, n_layer=2, n_head=4, activation_function=activation)
    hf.save_pretrained(tmp_path / "hf")
    model = GPT.from_pretrained(str(tmp_path / "hf"))
    ids = np.random.default_rng(0).integers(0, 101, (2, 32))
    np.testing.assert_allclose(full_logits(model, ids), hf_logits(hf, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("extra", [dict(bias=True), dict(bias=False, pos_encoding="sinusoidal")], ids=str)
def test_minigpt_export_loads_into_transformers_with_minigpt_logits(tmp_path, extra):
    config = GPTConfig(**SMALL, **extra)
    model = perturbed(config)
    model.save_pretrained(str(tmp_path / "hf"))
    hf, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    ids = ids_for(config)
    np.testing.assert_allclose(hf_logits(hf.eval(), ids), full_logits(model, ids), atol=1e-5, rtol=0)


def test_gpt2_124m_shapes_load_with_hf_logits(tmp_path):
    # GPT-2 124M's every tensor shape (vocab 50,257, block 1024, width 768, 12 heads, biases); 2 layers of 12.
    hf = random_hf_model(n_layer=2)
    hf.save_pretrained(tmp_path / "hf")
    model, tokenizer = load_hf(tmp_path / "hf")
    assert tokenizer == {"kind": "tiktoken", "name": "gpt2"}
    assert model.config == GPTConfig(vocab_size=50257, block_size=1024, n_layer=2, n_head=12, n_embd=768, bias=True)
    ids = np.random.default_rng(0).integers(0, 50257, (1, 16))
    np.testing.assert_allclose(full_logits(model, ids), hf_logits(hf, ids), atol=1e-4, rtol=0)
