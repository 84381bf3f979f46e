"""A language-model run: corpus -> tokenizer -> token files -> GPT -> the one training loop -> checkpoints.

`scripts/train_gpt.py` is argparse around `train_lm`, and `scripts/sample.py` around `load_model`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from minigpt.autograd.backend import normalize_device, to_device, to_numpy
from minigpt.checkpoint import load_checkpoint, save_checkpoint
from minigpt.config import InvalidSetting, check_fields, flat_fields, setting, to_flat
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

TOKENIZERS = ("char", "bpe", "gpt2")
# Our BPE's smallest vocabulary: the 256 byte tokens plus the end-of-text special token.
BPE_MIN_VOCAB = 256 + 1
# Vocabularies larger than this are padded to a multiple of 64 in the model (see `model_vocab_size`).
PAD_VOCAB_ABOVE = 4096
POSITIVE = dict(low=0, low_open=True)
NON_NEGATIVE = dict(low=0)


@dataclass
class RunConfig:
    """Every setting of a training run, each declared once with its help text and range.

    Defaults are nanoGPT's CPU Shakespeare run (shakespeare_char). The model's fields live in
    `model` (a GPTConfig); the command line and config files see one flat namespace
    (`--n-layer`, `max_iters = 500`), see minigpt.config.
    """

    data: str | None = setting(
        None, "UTF-8 text file to train on (default: Tiny Shakespeare; offline: Python's own sources)"
    )
    out_dir: str = setting("out", "where checkpoints, token files and metrics.jsonl go")
    tokenizer: str = setting("char", "char, bpe (trained here) or gpt2 (tiktoken)", choices=TOKENIZERS)
    vocab_size: int = setting(512, "vocabulary size for --tokenizer bpe", low=BPE_MIN_VOCAB)
    model: GPTConfig = setting(help="the model's shape", default_factory=GPTConfig)
    max_iters: int = setting(2000, "total optimizer steps", **POSITIVE)
    eval_interval: int = setting(250, "evaluate (and checkpoint) every N steps", **POSITIVE)
    eval_iters: int = setting(20, "batches per evaluation", **POSITIVE)
    log_interval: int = setting(10, "log the training loss every N steps", **POSITIVE)
    batch_size: int = setting(12, "sequences per micro-batch", **POSITIVE)
    learning_rate: float = setting(1e-3, "peak learning rate (after warmup)", **POSITIVE)
    min_lr: float = setting(1e-4, "learning rate at the end of the cosine decay", **NON_NEGATIVE)
    warmup_iters: int = setting(100, "linear warmup steps", **NON_NEGATIVE)
    lr_decay_iters: int = setting(0, "cosine decay length; past it the lr is min_lr (0: max_iters)", **NON_NEGATIVE)
    weight_decay: float = setting(0.1, "AdamW weight decay", **NON_NEGATIVE)
    beta1: float = setting(0.9, "AdamW beta1", low=0, high=1, high_open=True)
    beta2: float = setting(0.99, "AdamW beta2", low=0, high=1, high_open=True)
    grad_clip: float = setting(1.0, "clip the global gradient norm (0: off)", **NON_NEGATIVE)
    grad_accum: int = setting(1, "micro-batches per optimizer step", **POSITIVE)
    seed: int = setting(1337, "seed of the weights, batches and dropout", **NON_NEGATIVE)
    device: str = setting("cpu", "cpu or cuda")
    resume: bool = setting(False, "continue from out_dir/last.npz (model, optimizer, step, RNG state)")
    sample_tokens: int = setting(200, "length of the sample printed at the end (0: none)", **NON_NEGATIVE)
    quiet: bool = setting(False, "no progress output")

    def __post_init__(self) -> None:
        check_fields(self)  # types and ranges, as declared; raises InvalidSetting (a ValueError)
        try:
            normalize_device(self.device)
        except (ValueError, RuntimeError) as e:
            raise InvalidSetting("device", f"is unusable: {e}") from None


# Settings that fix the model's shape: a checkpoint decides them on --resume.
MODEL_SETTINGS = tuple(flat_fields(GPTConfig))


def build_tokenizer(cfg: RunConfig, text: str) -> Tokenizer:
    """The run's tokenizer: the text's characters, our BPE trained on the training split, or GPT-2's."""
    if cfg.tokenizer == "char":
        return CharTokenizer.from_text(text)
    if cfg.tokenizer == "gpt2":
        return TiktokenTokenizer("gpt2")
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
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: not a minigpt GPT checkpoint ({e})") from None
    model.load_state_dict(state)
    return model.to(device).eval(), tokenizer, meta


# ----------------------------------------------------------------------------- the steps of a run


@dataclass
class Corpus:
    """The run's data: tokenizer, token ids of both splits (memmaps of out_dir/data) and their metadata."""

    tokenizer: Tokenizer
    train_ids: np.ndarray
    val_ids: np.ndarray
    meta: dict[str, Any]
    source: str  # where the text came from, one line
    prompt: str  # what the end-of-run sample starts from


def prepare_data(cfg: RunConfig, data_dir: Path) -> Corpus:
    """Find the text, build the tokenizer and write data_dir/{train,val}.bin; check both are long enough."""
    text, source = resolve_corpus(cfg.data)
    tokenizer = build_tokenizer(cfg, text)
    meta = prepare(text, tokenizer, data_dir)
    train_ids, val_ids = load_tokens(data_dir, "train"), load_tokens(data_dir, "val")
    block_size = cfg.model.block_size
    for split, ids in (("training text", train_ids), ("validation text (the last 10%)", val_ids)):
        if len(ids) < block_size + 1:  # checked now, not at the first evaluation
            raise UserError(
                f"the {split} is {len(ids)} tokens, shorter than block_size + 1 = {block_size + 1}; "
                "use a smaller --block-size or more text"
            )
    prompt = "\n" if "\n" in text else text[0]
    return Corpus(tokenizer, train_ids, val_ids, meta, source, prompt)


@dataclass
class Resumed:
    """What --resume reads from out_dir/last.npz."""

    path: Path
    state: dict[str, np.ndarray]
    optim: dict[str, np.ndarray] | None
    meta: dict[str, Any]


def read_resume(cfg: RunConfig, explicit: set[str], path: Path) -> tuple[RunConfig, Resumed]:
    """The checkpoint to resume, and `cfg` with the checkpoint's model shape where the user set none."""
    if not path.exists():
        raise UserError(f"--resume: no checkpoint at {path}; train without --resume first (same --out-dir)")
    state, optim_state, meta = load_checkpoint(path)
    saved = meta.get("model_config", {})
    model = {name: saved[name] for name in MODEL_SETTINGS if name not in explicit and name in saved}
    cfg = replace(cfg, model=replace(cfg.model, **model))
    return cfg, Resumed(path, state, optim_state, meta)


def _check_resumable(resumed: Resumed, cfg: RunConfig, explicit: set[str], tokenizer: Tokenizer) -> None:
    saved = resumed.meta.get("model_config", {})
    clashes = [
        f"--{name.replace('_', '-')} {getattr(cfg.model, name)} (checkpoint: {saved.get(name)})"
        for name in MODEL_SETTINGS
        if name in explicit and saved.get(name) != getattr(cfg.model, name)
    ]
    if clashes:
        raise UserError(
            f"{resumed.path} was trained with a different model: {'; '.join(clashes)}. "
            "Drop those flags to resume it, or pass a new --out-dir to start a new run"
        )
    if resumed.meta.get("tokenizer") != tokenizer.to_dict():
        raise UserError(
            f"{resumed.path} was trained on a different vocabulary than this data gives; "
            "resume with the same --data and --tokenizer, or pass a new --out-dir"
        )


@dataclass
class Run:
    """The state being trained: model, optimizer, the training batches, the step and the best val loss."""

    model: GPT
    optimizer: AdamW
    batches: BatchSampler
    step: int = 0
    best_val: float = math.inf


def build_run(cfg: RunConfig, corpus: Corpus, resumed: Resumed | None) -> Run:
    """A fresh model (weights from cfg.seed) or the resumed one, on cfg.device."""
    model = GPT(replace(cfg.model, vocab_size=model_vocab_size(corpus.tokenizer)), rng=np.random.default_rng(cfg.seed))
    optimizer = AdamW(
        model.parameters(), lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay
    )
    batches = BatchSampler(corpus.train_ids, cfg.batch_size, cfg.model.block_size, seed=cfg.seed, name="train")
    run = Run(model, optimizer, batches)
    if resumed is not None:
        meta = resumed.meta
        model.load_state_dict(resumed.state)
        if resumed.optim is not None:
            optimizer.load_state_dict(resumed.optim)
        batches.set_state(meta["rng"]["train_batches"])
        model.dropout_rng.bit_generator.state = meta["rng"]["dropout"]
        run.step = int(meta["step"])
        run.best_val = float(meta["best_val_loss"]) if meta.get("best_val_loss") is not None else math.inf
    model.to(cfg.device)
    return run


def make_evaluator(cfg: RunConfig, run: Run, corpus: Corpus) -> Callable[[], dict[str, float]]:
    """Mean train/val loss over eval_iters batches, and val bits per character."""
    # Bits per character: nats per token x tokens per character / ln 2, so tokenizers compare.
    tokens_per_char = corpus.meta["val_tokens"] / max(corpus.meta["val_chars"], 1)

    def evaluate() -> dict[str, float]:
        # The same batches at every evaluation (fixed seeds): losses compare across steps and runs.
        metrics = {}
        for split, ids, seed in (("train", corpus.train_ids, cfg.seed + 1), ("val", corpus.val_ids, cfg.seed + 2)):
            batches = BatchSampler(ids, cfg.batch_size, cfg.model.block_size, seed=seed, name=split)
            losses = []
            for _ in range(cfg.eval_iters):
                x, y = (to_device(a, cfg.device) for a in batches.next())
                losses.append(float(run.model(x, y)[1].data))
            metrics[f"{split}_loss"] = float(np.mean(losses))
        metrics["val_bpc"] = metrics["val_loss"] * tokens_per_char / math.log(2)
        return metrics

    return evaluate


class Checkpoints:
    """Writes out_dir/ckpt.npz (best val loss) and out_dir/last.npz (latest): the run's callbacks."""

    def __init__(self, cfg: RunConfig, run: Run, corpus: Corpus, out_dir: Path, log: Callable[[str], None]):
        self.cfg, self.run, self.corpus, self.log = cfg, run, corpus, log
        self.last, self.best = out_dir / "last.npz", out_dir / "ckpt.npz"

    def save(self, path: Path, step: int) -> None:
        run = self.run
        save_checkpoint(
            path,
            model={name: to_numpy(p.data) for name, p in run.model.named_parameters()},
            optimizer=run.optimizer.state_dict(),
            meta={
                "model_config": run.model.config.to_dict(),
                "run_config": to_flat(self.cfg),
                "tokenizer": self.corpus.tokenizer.to_dict(),
                "step": step,
                "best_val_loss": None if math.isinf(run.best_val) else run.best_val,
                "rng": {"train_batches": run.batches.state(), "dropout": run.model.dropout_rng.bit_generator.state},
                "data": self.corpus.source,
            },
        )

    def on_eval(self, state: TrainState) -> None:
        val = state.metrics["val_loss"]
        if val < self.run.best_val:
            self.run.best_val = val
            self.save(self.best, state.step)
        self.save(self.last, state.step)

    def on_interrupt(self, state: TrainState) -> None:
        self.save(self.last, state.step)
        self.log(f"interrupted at step {state.step}: saved {self.last}; continue with --resume")


def train_lm(cfg: RunConfig, explicit: set[str] | None = None, log: Callable[[str], None] = print) -> RunSummary:
    """Train a GPT as `cfg` says.

    `explicit` names the settings the user set on purpose: on --resume the model's must agree with
    the checkpoint, while the others take the checkpoint's values.
    """
    explicit = set(explicit or ())
    if "vocab_size" in explicit and cfg.tokenizer != "bpe":
        raise UserError(f"--vocab-size only applies to --tokenizer bpe (the {cfg.tokenizer} vocabulary is fixed)")
    out_dir = Path(cfg.out_dir)
    resumed = None
    if cfg.resume:
        cfg, resumed = read_resume(cfg, explicit, out_dir / "last.npz")
    corpus = prepare_data(cfg, out_dir / "data")
    if resumed is not None:
        _check_resumable(resumed, cfg, explicit, corpus.tokenizer)
    run = build_run(cfg, corpus, resumed)
    start_step = run.step
    tok = corpus.tokenizer
    log(
        f"data: {corpus.source}; tokenizer {tok.kind}, vocab {tok.vocab_size}; "
        f"{corpus.meta['train_tokens']:,} train / {corpus.meta['val_tokens']:,} val tokens"
    )
    log(f"model: {run.model.num_parameters() / 1e6:.2f}M parameters, {run.model.config}")
    if start_step:
        log(f"resuming from {resumed.path} at step {start_step}")

    checkpoints = Checkpoints(cfg, run, corpus, out_dir, log)
    tokens_per_step = cfg.batch_size * cfg.model.block_size * cfg.grad_accum
    schedule = CosineSchedule(cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, cfg.lr_decay_iters or cfg.max_iters)
    result = train(
        run.model,
        run.optimizer,
        run.batches.next,
        lambda m, batch: m(*batch)[1],
        max_steps=cfg.max_iters,
        start_step=start_step,
        lr_schedule=schedule,
        grad_clip=cfg.grad_clip or None,
        grad_accum=cfg.grad_accum,
        eval_fn=make_evaluator(cfg, run, corpus),
        eval_interval=cfg.eval_interval,
        log_interval=cfg.log_interval,
        on_eval=checkpoints.on_eval,
        on_interrupt=checkpoints.on_interrupt,
        log_path=out_dir / "metrics.jsonl",
        quiet=cfg.quiet,
        tokens_per_step=tokens_per_step,
    )
    sample = ""
    if not result.interrupted and cfg.sample_tokens > 0:
        sample = corpus.prompt + sample_text(run.model, tok, corpus.prompt, cfg.sample_tokens, seed=cfg.seed)
    return RunSummary(
        step=result.step,
        val_loss=result.metrics.get("val_loss"),
        best_val_loss=None if math.isinf(run.best_val) else run.best_val,
        val_bpc=result.metrics.get("val_bpc"),
        elapsed=result.elapsed,
        tokens_per_s=(result.step - start_step) * tokens_per_step / max(result.elapsed, 1e-9),
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
