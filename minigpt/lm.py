"""A language-model run: corpus -> tokenizer -> token files -> GPT -> the one training loop -> checkpoints.

`scripts/train_gpt.py` is argparse around `train_lm`, and `scripts/sample.py` around `load_model`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from minigpt.autograd.backend import normalize_device, to_numpy
from minigpt.checkpoint import load_checkpoint, save_checkpoint
from minigpt.data import BatchSampler, load_tokens, prepare, resolve_corpus
from minigpt.errors import UserError
from minigpt.gpt import GPT, GPTConfig
from minigpt.optim import AdamW, CosineSchedule
from minigpt.tokenizers import (
    BPETokenizer,
    CharTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    padded_vocab_size,
    tokenizer_from_dict,
)
from minigpt.train import TrainState, train

# The model's shape: fixed by a checkpoint, so resuming with different values is an error.
MODEL_FIELDS = ("block_size", "n_layer", "n_head", "n_embd", "dropout", "bias", "pos_encoding")
TOKENIZERS = ("char", "bpe", "gpt2")


@dataclass
class RunConfig:
    """Every setting of a training run. Defaults are nanoGPT's CPU Shakespeare run (shakespeare_char)."""

    data: str | None = None  # a UTF-8 text file; default: Tiny Shakespeare (see minigpt.data.resolve_corpus)
    out_dir: str = "out"
    tokenizer: str = "char"  # char | bpe (our trainer) | gpt2 (tiktoken)
    vocab_size: int = 512  # for --tokenizer bpe
    max_iters: int = 2000
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 10
    batch_size: int = 12
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False
    pos_encoding: str = "learned"
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int = 0  # 0: decay over max_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 disables clipping
    grad_accum: int = 1
    seed: int = 1337
    device: str = "cpu"
    resume: bool = False
    sample_tokens: int = 200  # length of the sample printed at the end (0: none)
    quiet: bool = False

    def validate(self) -> None:
        positive = ("max_iters", "eval_interval", "eval_iters", "log_interval", "batch_size", "grad_accum")
        for name in positive + ("block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("learning_rate", "min_lr", "warmup_iters", "lr_decay_iters", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0 or (name == "learning_rate" and self.learning_rate == 0):
                what = "positive" if name == "learning_rate" else "non-negative"
                raise UserError(f"--{name.replace('_', '-')} must be {what}, got {getattr(self, name)}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise UserError(f"--beta1/--beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if self.tokenizer not in TOKENIZERS:
            raise UserError(f"--tokenizer must be one of {', '.join(TOKENIZERS)}, got {self.tokenizer!r}")
        self.model_config(vocab_size=1)  # n_embd % n_head, dropout range, pos_encoding
        try:
            normalize_device(self.device)
        except (ValueError, RuntimeError) as e:
            raise UserError(str(e)) from None

    def model_config(self, vocab_size: int) -> GPTConfig:
        return GPTConfig(vocab_size=vocab_size, **{name: getattr(self, name) for name in MODEL_FIELDS})


RUN_FIELDS = {f.name for f in fields(RunConfig)}


# Our BPE's smallest vocabulary: the 256 byte tokens plus the end-of-text special token.
BPE_MIN_VOCAB = 256 + 1
# Vocabularies larger than this are padded to a multiple of 64 in the model (see `model_vocab_size`).
PAD_VOCAB_ABOVE = 4096


def build_tokenizer(cfg: RunConfig, text: str) -> Tokenizer:
    """The run's tokenizer: the text's characters, our BPE trained on the training split, or GPT-2's."""
    if cfg.tokenizer == "char":
        return CharTokenizer.from_text(text)
    if cfg.tokenizer == "gpt2":
        return TiktokenTokenizer("gpt2")
    if cfg.vocab_size < BPE_MIN_VOCAB:
        raise UserError(
            f"--vocab-size {cfg.vocab_size} is too small for --tokenizer bpe: it needs the 256 byte tokens "
            f"plus <|endoftext|>; use --vocab-size >= {BPE_MIN_VOCAB}"
        )
    train_text = text[: int(len(text) * 0.9)]  # the BPE merges are learned on the training split only
    try:
        return BPETokenizer.train(train_text, cfg.vocab_size)
    except UserError as e:  # e.g. more merges than the text has pairs for
        raise UserError(f"--vocab-size {cfg.vocab_size}: {e}") from None


def model_vocab_size(tokenizer: Tokenizer) -> int:
    """Rows of the model's embedding and output layer for `tokenizer`.

    Large vocabularies are padded to a multiple of 64 for faster GEMMs, as nanoGPT pads GPT-2's 50,257
    ids to 50,304; the padding ids are never trained on and `sample_text` never emits them. Small
    vocabularies (characters, our BPE up to 4,096) are used as they are.
    """
    n = tokenizer.vocab_size
    return padded_vocab_size(n) if n > PAD_VOCAB_ABOVE else n


@dataclass
class RunSummary:
    step: int
    val_loss: float | None
    best_val_loss: float | None
    val_bpc: float | None
    elapsed: float
    tokens_per_s: float
    interrupted: bool
    sample: str


def load_model(path: str | Path, device: str = "cpu") -> tuple[GPT, Tokenizer, dict[str, Any]]:
    """A GPT and its tokenizer from a checkpoint written by `train_lm`."""
    state, _, meta = load_checkpoint(path)
    try:
        model = GPT(GPTConfig(**meta["model_config"]))
        tokenizer = tokenizer_from_dict(meta["tokenizer"])
    except (KeyError, TypeError) as e:
        raise UserError(f"{path}: not a minigpt GPT checkpoint ({e})") from None
    model.load_state_dict(state)
    return model.to(device).eval(), tokenizer, meta


def _check_resumable(
    meta: dict[str, Any], cfg: RunConfig, explicit: set[str], tokenizer: Tokenizer, path: Path
) -> None:
    saved = meta.get("model_config", {})
    clashes = [
        f"--{name.replace('_', '-')} {getattr(cfg, name)} (checkpoint: {saved.get(name)})"
        for name in MODEL_FIELDS
        if name in explicit and saved.get(name) != getattr(cfg, name)
    ]
    if clashes:
        raise UserError(
            f"{path} was trained with a different model: {'; '.join(clashes)}. "
            "Drop those flags to resume it, or pass a new --out-dir to start a new run"
        )
    if meta.get("tokenizer") != tokenizer.to_dict():
        raise UserError(
            f"{path} was trained on a different vocabulary than this data gives; "
            "resume with the same --data and --tokenizer, or pass a new --out-dir"
        )


def train_lm(cfg: RunConfig, explicit: set[str] | None = None, log: Callable[[str], None] = print) -> RunSummary:
    """Train a GPT as `cfg` says.

    `explicit` names the fields the user set on purpose: on --resume they must agree with the
    checkpoint, while the others take the checkpoint's values.
    """
    explicit = set(explicit or ())
    cfg.validate()
    if "vocab_size" in explicit and cfg.tokenizer != "bpe":
        raise UserError(f"--vocab-size only applies to --tokenizer bpe (the {cfg.tokenizer} vocabulary is fixed)")
    out_dir = Path(cfg.out_dir)
    last_path, best_path = out_dir / "last.npz", out_dir / "ckpt.npz"
    resumed: dict[str, Any] | None = None
    if cfg.resume:
        if not last_path.exists():
            raise UserError(f"--resume: no checkpoint at {last_path}; train without --resume first (same --out-dir)")
        state, optim_state, meta = load_checkpoint(last_path)
        for name in MODEL_FIELDS:  # the checkpoint decides the model's shape
            if name not in explicit and name in meta.get("model_config", {}):
                setattr(cfg, name, meta["model_config"][name])
        resumed = {"state": state, "optim": optim_state, "meta": meta}

    text, source = resolve_corpus(cfg.data)
    tokenizer = build_tokenizer(cfg, text)
    data_dir = out_dir / "data"
    data_meta = prepare(text, tokenizer, data_dir)
    train_ids, val_ids = load_tokens(data_dir, "train"), load_tokens(data_dir, "val")
    for split, ids in (("training text", train_ids), ("validation text (the last 10%)", val_ids)):
        if len(ids) < cfg.block_size + 1:  # checked now, not at the first evaluation
            raise UserError(
                f"the {split} is {len(ids)} tokens, shorter than block_size + 1 = {cfg.block_size + 1}; "
                "use a smaller --block-size or more text"
            )
    if resumed is not None:
        _check_resumable(resumed["meta"], cfg, explicit, tokenizer, last_path)

    model_cfg = cfg.model_config(model_vocab_size(tokenizer))
    model = GPT(model_cfg, rng=np.random.default_rng(cfg.seed))
    optimizer = AdamW(
        model.parameters(), lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay
    )
    train_batches = BatchSampler(train_ids, cfg.batch_size, cfg.block_size, seed=cfg.seed, name="train")
    start_step, best_val = 0, math.inf
    if resumed is not None:
        meta = resumed["meta"]
        model.load_state_dict(resumed["state"])
        if resumed["optim"] is not None:
            optimizer.load_state_dict(resumed["optim"])
        train_batches.set_state(meta["rng"]["train_batches"])
        model.dropout_rng.bit_generator.state = meta["rng"]["dropout"]
        start_step = int(meta["step"])
        best_val = float(meta["best_val_loss"]) if meta.get("best_val_loss") is not None else math.inf
    model.to(cfg.device)

    # Bits per character: nats per token x tokens per character / ln 2, so tokenizers compare.
    tokens_per_char = data_meta["val_tokens"] / max(data_meta["val_chars"], 1)

    def evaluate() -> dict[str, float]:
        # The same batches at every evaluation (fixed seeds): losses compare across steps and runs.
        metrics = {}
        for split, ids, seed in (("train", train_ids, cfg.seed + 1), ("val", val_ids, cfg.seed + 2)):
            batches = BatchSampler(ids, cfg.batch_size, cfg.block_size, seed=seed, name=split)
            losses = [float(model(*batches.next())[1].data) for _ in range(cfg.eval_iters)]
            metrics[f"{split}_loss"] = float(np.mean(losses))
        metrics["val_bpc"] = metrics["val_loss"] * tokens_per_char / math.log(2)
        return metrics

    n_params = model.num_parameters()
    log(
        f"data: {source}; tokenizer {tokenizer.kind}, vocab {tokenizer.vocab_size}; "
        f"{data_meta['train_tokens']:,} train / {data_meta['val_tokens']:,} val tokens"
    )
    log(f"model: {n_params / 1e6:.2f}M parameters, {model_cfg}")
    if start_step:
        log(f"resuming from {last_path} at step {start_step}")

    def save(path: Path, step: int) -> None:
        save_checkpoint(
            path,
            model={name: to_numpy(p.data) for name, p in model.named_parameters()},
            optimizer=optimizer.state_dict(),
            meta={
                "model_config": model_cfg.to_dict(),
                "run_config": asdict(cfg),
                "tokenizer": tokenizer.to_dict(),
                "step": step,
                "best_val_loss": None if math.isinf(best_val) else best_val,
                "rng": {"train_batches": train_batches.state(), "dropout": model.dropout_rng.bit_generator.state},
                "data": source,
            },
        )

    def on_eval(state: TrainState) -> None:
        nonlocal best_val
        val = state.metrics["val_loss"]
        if val < best_val:
            best_val = val
            save(best_path, state.step)
        save(last_path, state.step)

    def on_interrupt(state: TrainState) -> None:
        save(last_path, state.step)
        log(f"interrupted at step {state.step}: saved {last_path}; continue with --resume")

    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum
    schedule = CosineSchedule(cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, cfg.lr_decay_iters or cfg.max_iters)
    result = train(
        model,
        optimizer,
        train_batches.next,
        lambda m, batch: m(*batch)[1],
        max_steps=cfg.max_iters,
        start_step=start_step,
        lr_schedule=schedule,
        grad_clip=cfg.grad_clip or None,
        grad_accum=cfg.grad_accum,
        eval_fn=evaluate,
        eval_interval=cfg.eval_interval,
        log_interval=cfg.log_interval,
        on_eval=on_eval,
        on_interrupt=on_interrupt,
        log_path=out_dir / "metrics.jsonl",
        quiet=cfg.quiet,
        tokens_per_step=tokens_per_step,
    )
    steps_run = result.step - start_step
    tokens_per_s = steps_run * tokens_per_step / max(result.elapsed, 1e-9)
    sample = ""
    if not result.interrupted and cfg.sample_tokens > 0:
        prompt = "\n" if "\n" in text else text[0]
        sample = prompt + sample_text(model, tokenizer, prompt, cfg.sample_tokens, seed=cfg.seed)
    return RunSummary(
        step=result.step,
        val_loss=result.metrics.get("val_loss"),
        best_val_loss=None if math.isinf(best_val) else best_val,
        val_bpc=result.metrics.get("val_bpc"),
        elapsed=result.elapsed,
        tokens_per_s=tokens_per_s,
        interrupted=result.interrupted,
        sample=sample,
    )


def sample_text(
    model: GPT, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, stream: Any = None, **kwargs: Any
) -> str:
    """Generate from `prompt` and return the new text; with `stream` (a file), write it as it comes.

    Text is decoded from all new ids each step and only the new suffix written, so multi-byte
    characters split across BPE tokens come out whole: while the decoded text ends in U+FFFD (a
    character's bytes so far), nothing is written. Only ids below the tokenizer's vocab_size are
    sampled, never the model's padding rows.
    """
    if not prompt:
        raise UserError("the prompt is empty; pass --start with at least one character")
    prompt_ids = tokenizer.encode(prompt)
    if not prompt_ids:
        raise UserError(f"the prompt {prompt!r} encodes to no tokens; use a different --start")
    new_ids: list[int] = []
    shown = ""
    for ids in model.generate_tokens(
        np.array([prompt_ids]), max_new_tokens, vocab_limit=tokenizer.vocab_size, **kwargs
    ):
        new_ids.append(int(ids[0]))
        text = tokenizer.decode(new_ids)
        if stream is not None and not text.endswith("\ufffd"):  # wait for a character's last byte
            stream.write(text[len(shown) :])
            stream.flush()
            shown = text
    text = tokenizer.decode(new_ids)
    if stream is not None and len(text) > len(shown):
        stream.write(text[len(shown) :])
        stream.flush()
    return text


__all__ = ["RunConfig", "RunSummary", "load_model", "sample_text", "train_lm"]
