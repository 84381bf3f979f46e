"""The GPT model: shapes, causality, positional encodings, gradients, learning, KV-cached generation."""

import numpy as np
import pytest

import minigpt
from minigpt import optim
from minigpt.autograd import gradcheck
from minigpt.checkpoint import load_checkpoint, save_checkpoint
from minigpt.gpt import GPT, GPTConfig, KVCache, sample_next

TINY = dict(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16)


def tiny(**overrides):
    return GPT(GPTConfig(**{**TINY, **overrides}), rng=np.random.default_rng(0))


def ids(*shape, vocab=11, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=shape)


@pytest.mark.parametrize("pos_encoding", ["learned", "sinusoidal"])
def test_shapes_and_loss(pos_encoding):
    model = tiny(pos_encoding=pos_encoding)
    x, y = ids(3, 8), ids(3, 8, seed=1)
    logits, loss = model(x, y)
    assert logits.shape == (3, 8, 11) and loss.ndim == 0
    assert abs(loss.item() - np.log(11)) < 0.3  # near-uniform at init
    logits, loss = model(x)
    assert logits.shape == (3, 1, 11) and loss is None


def test_parameter_names_follow_gpt2_and_weights_are_tied():
    model = tiny(bias=True)
    names = [n for n, _ in model.named_parameters()]
    assert names[:2] == ["transformer.wte.weight", "transformer.wpe.weight"]
    assert "transformer.h.1.attn.c_attn.weight" in names and "transformer.h.0.mlp.c_proj.bias" in names
    assert "lm_head.weight" not in names  # tied: listed once
    state = model.state_dict()
    assert "lm_head.weight" in state and state["transformer.h.0.attn.c_attn.weight"].shape == (48, 16)
    assert model.lm_head.weight is model.transformer.wte.weight
    sinusoidal = tiny(pos_encoding="sinusoidal")
    assert "transformer.wpe.weight" not in dict(sinusoidal.named_parameters())


def test_init_follows_nanogpt():
    model = GPT(GPTConfig(vocab_size=500, block_size=64, n_layer=4, n_head=4, n_embd=128, bias=True))
    params = dict(model.named_parameters())
    assert abs(params["transformer.h.0.attn.c_attn.weight"].data.std() - 0.02) < 0.002
    assert abs(params["transformer.h.0.mlp.c_proj.weight"].data.std() - 0.02 / np.sqrt(8)) < 0.001
    assert (params["transformer.h.0.mlp.c_fc.bias"].data == 0).all()
    assert (params["transformer.h.0.ln_1.weight"].data == 1).all()


@pytest.mark.parametrize("pos_encoding", ["learned", "sinusoidal"])
def test_causality(pos_encoding):
    model = tiny(pos_encoding=pos_encoding)
    x = ids(2, 8)
    y = np.zeros_like(x)
    full, _ = model(x, y)
    x2 = x.copy()
    x2[:, 5] = (x2[:, 5] + 1) % 11
    changed, _ = model(x2, y)
    np.testing.assert_allclose(full.data[:, :5], changed.data[:, :5], rtol=1e-6, atol=1e-7)
    assert not np.allclose(full.data[:, 5:], changed.data[:, 5:])


def test_sinusoidal_and_learned_differ_only_in_positions():
    a, b = tiny(pos_encoding="learned"), tiny(pos_encoding="sinusoidal")
    assert set(a.state_dict()) - set(b.state_dict()) == {"transformer.wpe.weight"}


@pytest.mark.parametrize("pos_encoding", ["learned", "sinusoidal"])
def test_gradcheck_through_a_tiny_gpt_in_float64(pos_encoding):
    model = GPT(
        GPTConfig(vocab_size=5, block_size=4, n_layer=1, n_head=2, n_embd=4, bias=True, pos_encoding=pos_encoding),
        rng=np.random.default_rng(0),
    )
    for p in model.parameters():
        p.data = p.data.astype(np.float64) * 5  # larger weights: gradients well above the noise floor
    for _, buf in model.named_buffers():
        buf.data = buf.data.astype(np.float64)
    x, y = ids(2, 4, vocab=5), ids(2, 4, vocab=5, seed=1)
    y[0, 1] = -1  # an ignored target
    params = list(model.parameters())
    assert gradcheck(lambda *_: model(x, y)[1], params, atol=1e-6)


def test_tiny_model_memorises_a_short_text():
    text = "the quick brown fox jumps over the lazy dog"
    chars = sorted(set(text))
    data = np.array([chars.index(c) for c in text])
    model = GPT(GPTConfig(vocab_size=len(chars), block_size=len(text) - 1, n_layer=2, n_head=2, n_embd=32))
    opt = optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    x, y = data[None, :-1], data[None, 1:]
    for _ in range(150):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1
    out = model.generate(data[:1], len(text) - 1, temperature=0)
    assert "".join(chars[i] for i in out[0]) == text


@pytest.mark.parametrize("pos_encoding", ["learned", "sinusoidal"])
def test_cached_generation_equals_recomputation(pos_encoding):
    model = tiny(pos_encoding=pos_encoding, vocab_size=40)
    prompt = ids(2, 3, vocab=40)
    # 30 new tokens with block 8: the window slides (and the cache is rebuilt) several times.
    greedy = model.generate(prompt, 30, temperature=0)
    assert greedy.shape == (2, 33)
    np.testing.assert_array_equal(greedy, model.generate(prompt, 30, temperature=0, use_cache=False))
    kwargs = dict(temperature=1.3, top_k=20, top_p=0.9, seed=5)
    sampled = model.generate(prompt, 30, **kwargs)
    np.testing.assert_array_equal(sampled, model.generate(prompt, 30, use_cache=False, **kwargs))
    np.testing.assert_array_equal(sampled, model.generate(prompt, 30, **kwargs))  # the seed repeats
    assert not np.array_equal(sampled, greedy)


@pytest.mark.parametrize("pos_encoding", ["learned", "sinusoidal"])
def test_cached_forward_equals_uncached_forward_in_float64(pos_encoding):
    model = tiny(pos_encoding=pos_encoding, vocab_size=40, bias=True)
    rng = np.random.default_rng(3)
    for p in model.parameters():  # float64, biases and LayerNorm weights away from their 0/1 init
        p.data = (p.data + rng.normal(0.0, 0.05, p.shape)).astype(np.float64)
    for _, buf in model.named_buffers():
        buf.data = buf.data.astype(np.float64)
    model.eval()
    tokens = ids(2, 8, vocab=40)
    with minigpt.no_grad():
        reference = [model(tokens[:, : t + 1])[0].data[:, -1, :] for t in range(8)]
    cache = KVCache(model.config, 2, model.lm_head.weight.data)
    assert cache.k.dtype == np.float64
    logits, loss = model(tokens[:, :3], cache=cache)  # a prompt of 3, then one token at a time
    assert logits.shape == (2, 1, 40) and loss is None and not logits.requires_grad  # no graph, even outside no_grad
    np.testing.assert_allclose(logits.data[:, -1], reference[2], rtol=1e-12, atol=1e-12)
    for t in range(3, 8):
        logits, _ = model(tokens[:, t : t + 1], cache=cache)
        np.testing.assert_allclose(logits.data[:, -1], reference[t], rtol=1e-12, atol=1e-12)
    assert cache.length == 8
    with pytest.raises(ValueError, match="longer than block_size"):
        model(tokens[:, :1], cache=cache)
    cache = KVCache(model.config, 2, model.lm_head.weight.data)  # targets too: the loss of the new tokens
    model(tokens[:, :5], cache=cache)
    logits, loss = model(tokens[:, 5:7], tokens[:, 6:8], cache=cache)
    with minigpt.no_grad():
        full_logits, _ = model(tokens[:, :7], tokens[:, 1:8])
    np.testing.assert_allclose(logits.data, full_logits.data[:, 5:7], rtol=1e-12, atol=1e-12)


def test_generation_options():
    model = tiny(vocab_size=40)
    long_prompt = ids(20, vocab=40)  # longer than the block: cropped like nanoGPT
    assert model.generate(long_prompt, 4, temperature=0).shape == (1, 24)
    first = int(model.generate(ids(1, 3, vocab=40), 1, temperature=0)[0, -1])
    out = model.generate(ids(1, 3, vocab=40), 10, temperature=0, stop_token=first)
    assert out.shape == (1, 4) and out[0, -1] == first
    out = model.generate(ids(1, 3, vocab=40), 50, temperature=2.0, seed=0, vocab_limit=7)
    assert out[0, 3:].max() < 7


def test_sample_next_filters():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    rng = np.random.default_rng(0)
    assert sample_next(logits, rng, temperature=0)[0] == 0
    draws = [sample_next(logits, rng, top_k=2)[0] for _ in range(300)]
    assert set(draws) == {0, 1}
    draws = [sample_next(logits, rng, top_p=0.75)[0] for _ in range(300)]
    assert set(draws) == {0, 1}
    draws = [sample_next(logits, rng, top_p=0.4)[0] for _ in range(50)]
    assert set(draws) == {0}
    with pytest.raises(ValueError, match="temperature"):
        sample_next(logits, rng, temperature=-1)


def test_checkpoint_round_trip_gives_identical_logits(tmp_path):
    model = tiny()
    x = ids(2, 8)
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, model=model.state_dict(), optimizer=None, meta={"config": model.config.to_dict()})
    state, _, meta = load_checkpoint(path)
    restored = GPT(GPTConfig(**meta["config"]), rng=np.random.default_rng(99))
    restored.load_state_dict(state)
    np.testing.assert_array_equal(model(x)[0].data, restored(x)[0].data)


def test_config_errors():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=10, n_head=4)
    with pytest.raises(ValueError, match="positive"):
        GPTConfig(n_layer=0)
    with pytest.raises(ValueError, match="pos_encoding"):
        GPTConfig(pos_encoding="rotary")
    with pytest.raises(ValueError, match="n_layer must be an integer"):
        GPTConfig(n_layer=True)  # a bool is not an int
    with pytest.raises(ValueError, match="dropout must be a finite number"):
        GPTConfig(dropout=float("nan"))
    assert GPTConfig(dropout=0).dropout == 0.0 and isinstance(GPTConfig(dropout=0).dropout, float)
    with pytest.raises(ValueError, match="block_size"):
        tiny()(ids(1, 9))


def test_slide_moves_a_full_window_in_jumps_with_the_same_tokens_cached_or_not():
    model = tiny(vocab_size=40)
    prompt = ids(1, 3, vocab=40)
    jumpy = model.generate(prompt, 30, temperature=0, slide=4)
    np.testing.assert_array_equal(jumpy, model.generate(prompt, 30, temperature=0, slide=4, use_cache=False))
    exact = model.generate(prompt, 30, temperature=0)  # slide 1: always the last block_size tokens
    np.testing.assert_array_equal(exact[:, :10], jumpy[:, :10])  # the same until the window first moves
    with pytest.raises(ValueError, match="slide"):
        model.generate(prompt, 3, slide=0)


@pytest.mark.parametrize("bias", [False, True])
def test_from_state_dict_draws_no_random_weights_and_needs_every_one(bias):
    config = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, bias=bias)
    state = GPT(config, rng=np.random.default_rng(3)).state_dict()
    model = GPT.from_state_dict(config, state)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, state[name], err_msg=name)
    assert minigpt.nn.init_enabled()  # off only within from_state_dict
    rng, expected = np.random.default_rng(5), np.random.default_rng(5)
    with minigpt.nn.no_init():
        GPT(config, rng=rng)
    expected.integers(2**63)  # the dropout generator's seed is the one draw left
    assert rng.bit_generator.state == expected.bit_generator.state
    incomplete = {k: v for k, v in state.items() if k != "transformer.h.1.mlp.c_fc.weight"}
    with pytest.raises(ValueError, match="missing"):  # no uninitialised weight can survive a load
        GPT.from_state_dict(config, incomplete)
