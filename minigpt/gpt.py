"""GPT: a decoder-only transformer on the minigpt engine, laid out like nanoGPT's model.py.

Parameter names and (out, in) weight layouts follow GPT-2/nanoGPT, so state dicts map one-to-one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from minigpt import functional as F
from minigpt import nn
from minigpt.autograd import Tensor, fused, is_grad_enabled, no_grad, parallel
from minigpt.autograd.backend import get_array_module, is_array, to_numpy
from minigpt.config import InvalidSetting, check_fields, setting

POS_ENCODINGS = ("learned", "sinusoidal")


@dataclass
class GPTConfig:
    """The model's shape. Fields are declared with their help text and range (minigpt.config)."""

    vocab_size: int = setting(65, "rows of the token embedding and output layer", low=0, low_open=True, cli=False)
    block_size: int = setting(64, "context length in tokens", low=0, low_open=True)
    n_layer: int = setting(4, "transformer blocks", low=0, low_open=True)
    n_head: int = setting(4, "attention heads per block", low=0, low_open=True)
    n_embd: int = setting(128, "embedding width", low=0, low_open=True)
    dropout: float = setting(0.0, "dropout probability", low=0, high=1, high_open=True)
    bias: bool = setting(False, "biases in Linear and LayerNorm layers")
    pos_encoding: str = setting(
        "learned", "positions: learned (GPT-2's wpe) or sinusoidal (a fixed table)", choices=POS_ENCODINGS
    )
    gelu: str = setting(
        "tanh",
        "the MLP's GELU: tanh (GPT-2's approximation) or none (the exact erf form, nanoGPT's)",
        choices=fused.GELU_APPROXIMATIONS,
    )

    def __post_init__(self) -> None:
        check_fields(self)  # raises InvalidSetting, a ValueError
        if self.n_embd % self.n_head:
            raise InvalidSetting(
                "n_embd",
                f"({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"e.g. --n-embd {self.n_embd // self.n_head * self.n_head or self.n_head}",
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sinusoidal_table(block_size: int, n_embd: int) -> np.ndarray:
    """(block_size, n_embd) sin/cos position table of "Attention Is All You Need"."""
    pos = np.arange(block_size)[:, None]
    freq = np.exp(-math.log(10000.0) * np.arange(0, n_embd, 2) / n_embd)
    table = np.zeros((block_size, n_embd))
    table[:, 0::2] = np.sin(pos * freq)
    table[:, 1::2] = np.cos(pos * freq)[:, : n_embd // 2]
    return table.astype(np.float32)


class KVCache:
    """Keys and values of every layer for the tokens seen so far, in buffers of block_size positions:
    (n_layer, B, nh, block_size, hs) each. `GPT.forward(idx, cache=cache)` appends idx's and advances
    `length`. It holds values, not a graph (a cached forward is for inference, under no_grad)."""

    def __init__(self, config: GPTConfig, batch_size: int, like: Any):
        xp = get_array_module(like)
        shape = (config.n_layer, batch_size, config.n_head, config.block_size, config.n_embd // config.n_head)
        self.k = xp.zeros(shape, dtype=like.dtype)
        self.v = xp.zeros(shape, dtype=like.dtype)
        self.length = 0  # positions filled

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new tokens' keys and values (B, nh, T, hs) after the cached ones in `layer`; returns
        all of them, (B, nh, length + T, hs). GPT.forward advances `length` once every layer has its own."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length : end] = k.data
        self.v[layer, :, :, self.length : end] = v.data
        return Tensor(self.k[layer, :, :, :end]), Tensor(self.v[layer, :, :, :end])


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, rng: np.random.Generator, dropout_rng: np.random.Generator):
        super().__init__()
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias, rng=rng)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias, rng=rng)
        self.resid_dropout = nn.Dropout(config.dropout, rng=dropout_rng)
        self.dropout_rng = dropout_rng

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        B, T, C = x.shape
        nh, hs = self.n_head, C // self.n_head
        qkv = self.c_attn(x).view(B, T, 3 * nh, hs).transpose(1, 2)  # (B, 3 nh, T, hs): q's heads, k's, v's
        q, k, v = qkv.split(nh, dim=1)  # (B, nh, T, hs) each
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nh, cached + T, hs): the new queries see every key
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p, rng=self.dropout_rng)
        y = y.transpose(1, 2).reshape(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig, rng: np.random.Generator, dropout_rng: np.random.Generator):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias, rng=rng)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias, rng=rng)
        self.dropout = nn.Dropout(config.dropout, rng=dropout_rng)
        self.gelu = config.gelu

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.gelu)))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig, rng: np.random.Generator, dropout_rng: np.random.Generator):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, rng, dropout_rng)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config, rng, dropout_rng)

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, rng: np.random.Generator | None = None):
        super().__init__()
        self.config = config
        rng = rng if rng is not None else np.random.default_rng(1337)
        # Every dropout draws from this one generator: its state is all a checkpoint needs to
        # make a resumed run drop the same units as an uninterrupted one.
        self.dropout_rng = np.random.default_rng(int(rng.integers(2**63)))
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(config.vocab_size, config.n_embd, rng=rng)))
        if config.pos_encoding == "learned":
            self.transformer["wpe"] = nn.Embedding(config.block_size, config.n_embd, rng=rng)
        else:  # a fixed table, not a parameter: state dicts differ from "learned" only by wpe
            self.register_buffer("pos_table", sinusoidal_table(config.block_size, config.n_embd))
        self.transformer["drop"] = nn.Dropout(config.dropout, rng=self.dropout_rng)
        self.transformer["h"] = nn.ModuleList([Block(config, rng, self.dropout_rng) for _ in range(config.n_layer)])
        self.transformer["ln_f"] = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False, rng=rng)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying: one Parameter, two names

        # nanoGPT's init: N(0, 0.02) for every weight matrix and embedding, zero biases, and the
        # projections into the residual stream scaled by 1/sqrt(2 * n_layer) (GPT-2 paper).
        if nn.init_enabled():
            self._init_weights(rng)

    def _init_weights(self, rng: np.random.Generator) -> None:
        config = self.config
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.data[...] = rng.normal(0.0, 0.02, module.weight.shape)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.data[...] = 0.0
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                p.data[...] = rng.normal(0.0, 0.02 / math.sqrt(2 * config.n_layer), p.shape)

    @classmethod
    def from_state_dict(cls, config: GPTConfig, state: dict[str, Any]) -> GPT:
        """A GPT of `config` holding `state`'s weights, built without drawing the random initial weights
        that `state` replaces (load_state_dict is strict: every weight must be in it)."""
        with nn.no_init():
            model = cls(config)
        model.load_state_dict(state)
        return model

    @classmethod
    def from_pretrained(cls, name_or_path: str) -> GPT:
        """GPT-2 weights from a Hugging Face folder (config.json + model.safetensors) or a cached name ("gpt2")."""
        from minigpt.weights import load_hf

        return load_hf(name_or_path)[0]

    def save_pretrained(self, folder: str, tokenizer: Any = None) -> None:
        """Write config.json + model.safetensors in HF GPT-2's layout (transformers loads it; see weights.py)."""
        from minigpt.weights import save_hf

        save_hf(self, folder, None if tokenizer is None else tokenizer.to_dict())

    def forward(self, idx: Any, targets: Any = None, cache: KVCache | None = None) -> tuple[Tensor, Tensor | None]:
        """Logits (B, T, vocab) and the mean cross-entropy against targets (ignore_index=-1).

        Without targets only the last position's logits are computed: (B, 1, vocab), as nanoGPT's
        inference path. With a KV cache, idx continues the tokens already cached: their keys and
        values are reused, idx's appended, and cache.length advances by T (generation runs this way,
        one token per step). A cached forward records no graph.
        """
        if cache is not None and is_grad_enabled():
            with no_grad():  # the cache holds values, not a graph
                return self.forward(idx, targets, cache)
        ids = idx.data if isinstance(idx, Tensor) else idx if is_array(idx) else np.asarray(idx)
        if ids.ndim != 2 or ids.size == 0 or ids.dtype.kind not in "iu":
            raise ValueError(
                f"GPT expects idx as (B, T) integer token ids with B, T >= 1, got shape {ids.shape} of {ids.dtype}; "
                "a single sequence is idx[None, :]"
            )
        B, T = ids.shape
        start = 0 if cache is None else cache.length  # the position of idx's first token
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size {self.config.block_size}")
        tok_emb = self.transformer.wte(ids)  # (B, T, C)
        positions = self.transformer.wpe.weight if self.config.pos_encoding == "learned" else self.pos_table
        pos_emb = positions[start : start + T]  # (T, C): the rows of idx's positions
        x = self.transformer.drop(tok_emb + pos_emb)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, cache, layer)
        if cache is not None:
            cache.length += T
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, -1:, :]), None  # (B, 1, vocab), as nanoGPT's inference path
        logits = self.lm_head(x)  # (B, T, vocab)
        return logits, F.cross_entropy(logits, targets, ignore_index=-1)

    def generate_tokens(
        self,
        idx: Any,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_token: int | None = None,
        use_cache: bool = True,
        vocab_limit: int | None = None,
        slide: int = 1,
    ) -> Iterator[np.ndarray]:
        """Yield the next token of every row, (B,) int64, one step at a time (see `generate`)."""
        if slide < 1:
            raise ValueError(f"slide must be a positive number of tokens, got {slide}")
        tokens = _as_batch(idx)
        block = self.config.block_size
        rng = np.random.default_rng(seed)
        start = max(0, tokens.shape[1] - block)  # the context is tokens[:, start:]
        cache: KVCache | None = None
        was_training = self.training
        self.eval()
        try:
            for _ in range(max_new_tokens):
                if tokens.shape[1] - start > block:
                    # The window is full: move it on by `slide` tokens and rebuild the cache.
                    start, cache = tokens.shape[1] - max(1, block + 1 - slide), None
                if use_cache and cache is None:
                    cache = KVCache(self.config, tokens.shape[0], self.lm_head.weight.data)
                context = tokens[:, -1:] if cache is not None and cache.length else tokens[:, start:]
                with no_grad(), parallel.blas_threads():  # per step: the caller's code between yields keeps our threads
                    logits, _ = self(context, cache=cache)  # (B, 1, vocab)
                nxt = sample_next(to_numpy(logits.data[:, -1]), rng, temperature, top_k, top_p, vocab_limit)
                tokens = np.concatenate([tokens, nxt[:, None]], axis=1)
                yield nxt
                if stop_token is not None and (tokens[:, -1] == stop_token).all():
                    break
        finally:
            self.train(was_training)

    def generate(self, idx: Any, max_new_tokens: int, **kwargs: Any) -> np.ndarray:
        """Continue idx (B, T) or (T,) by up to max_new_tokens; returns (B, T + new) int64 ids.

        temperature 0 means greedy; top_k / top_p filter the distribution; seed makes sampling
        repeatable; generation stops early once every row has produced stop_token. With the KV
        cache (default) each step feeds one token. Past block_size the model sees the last
        block_size tokens, as nanoGPT's generate (same weights and seed, same tokens); each step
        then recomputes the window. `slide` > 1 moves the full window on by that many tokens at
        once, so the cache serves the steps in between (faster, different tokens past block_size);
        use_cache=False recomputes the same context every step, so it gives the same tokens.
        vocab_limit masks padded vocabulary ids.
        """
        tokens = _as_batch(idx)
        new = list(self.generate_tokens(tokens, max_new_tokens, **kwargs))
        return np.concatenate([tokens] + [t[:, None] for t in new], axis=1) if new else tokens


def _as_batch(idx: Any) -> np.ndarray:
    if isinstance(idx, str):
        raise TypeError("generate takes token ids; for text use minigpt.generate_text(model, tokenizer, text)")
    tokens = np.asarray(to_numpy(idx.data) if isinstance(idx, Tensor) else idx, dtype=np.int64)
    if tokens.ndim == 1:
        tokens = tokens[None, :]
    if tokens.ndim != 2 or tokens.shape[1] == 0:
        raise ValueError(f"generate: idx must be (B, T) token ids with T >= 1, got shape {tokens.shape}")
    return tokens


def sample_next(
    logits: np.ndarray,
    rng: np.random.Generator,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    vocab_limit: int | None = None,
) -> np.ndarray:
    """Draw one token id per row of (B, V) logits: greedy at temperature 0, else softmax sampling."""
    logits = logits.astype(np.float64)
    if vocab_limit is not None:
        logits[:, vocab_limit:] = -np.inf  # padded ids are never emitted
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(axis=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = np.partition(logits, -top_k, axis=-1)[:, -top_k, None]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    if top_p is not None and top_p < 1.0:
        # Keep the smallest set of most likely tokens whose probability reaches top_p.
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        drop_sorted = np.cumsum(sorted_probs, axis=-1) - sorted_probs >= top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        probs = np.where(drop, 0.0, probs)
        probs /= probs.sum(axis=-1, keepdims=True)
    cdf = np.cumsum(probs, axis=-1)
    u = rng.random((probs.shape[0], 1)) * cdf[:, -1:]
    return np.minimum((cdf <= u).sum(axis=-1), probs.shape[-1] - 1).astype(np.int64)
