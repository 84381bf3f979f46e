"""A language-model run: corpus -> tokenizer -> token files -> GPT -> the one training loop -> checkpoints.

`scripts/train_gpt.py` is argparse around `train_lm`, and `scripts/sample.py` around `load_model`.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from minigpt import distributed
from minigpt.autograd import no_grad
from minigpt.autograd.backend import cupy_module, normalize_device, to_device, to_numpy
from minigpt.checkpoint import check_meta, load_checkpoint, meta_error, save_checkpoint
from minigpt.config import InvalidSetting, check_fields, flag, flat_fields, from_flat, setting, to_flat
from minigpt.data import BatchSampler, load_meta, load_tokens, prepare, resolve_corpus
from minigpt.errors import UserError
from minigpt.gpt import GPT, GPTConfig
from minigpt.optim import AdamW, CosineSchedule
from minigpt.outdir import OutDir
from minigpt.plot import INSTALL_HINT, PLOT_FILE, have_matplotlib, plot_run
from minigpt.prepare import check_token_dir, prepare_corpus
from minigpt.tokenizers import (
    BPETokenizer,
    CharTokenizer,
    StreamDecoder,
    TiktokenTokenizer,
    Tokenizer,
    padded_vocab_size,
    tokenizer_from_dict,
)
from minigpt.train import TrainingDiverged, TrainState, is_eval_step, train

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
        None,
        "UTF-8 text to train on: a file, a folder of files or a quoted glob, of any size, tokenized in chunks "
        "into out_dir/data (default: Tiny Shakespeare; offline: Python's own sources)",
    )
    data_dir: str | None = setting(
        None, "train on token files from scripts/prepare.py (train.bin, val.bin, meta.json); no text is read"
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
    resume: bool = setting(
        False, "continue from out_dir/last.npz: its settings, token files, model, optimizer, step and RNG state"
    )
    init_from: str | None = setting(
        None,
        "start a new run from these weights with a fresh optimizer: a minigpt .npz, nanoGPT's ckpt.pt, or a "
        "Hugging Face GPT-2 folder or name (gpt2); the model's shape and tokenizer are theirs",
    )
    overwrite: bool = setting(False, "start a new run in an --out-dir that holds one, deleting its checkpoints")
    sample_tokens: int = setting(200, "length of the sample printed at the end (0: none)", **NON_NEGATIVE)
    quiet: bool = setting(False, "no progress output")

    def __post_init__(self) -> None:
        check_fields(self)  # types and ranges, as declared; raises InvalidSetting (a ValueError)
        try:
            normalize_device(self.device)
        except (ValueError, RuntimeError) as e:
            raise InvalidSetting("device", f"is unusable: {e}") from None
        if self.resume and self.overwrite:
            raise InvalidSetting("overwrite", "cannot be combined with --resume (it would delete what to resume)")
        if self.resume and self.init_from:
            raise InvalidSetting("init_from", "starts a new run; --resume continues one from its own checkpoint")


# Settings that fix the model's shape: a checkpoint decides them on --resume.
MODEL_SETTINGS = tuple(flat_fields(GPTConfig))
# On --resume these must match the checkpoint (the token files of the out-dir depend on them) ...
FIXED_ON_RESUME = ("data", "data_dir", "tokenizer", "vocab_size", *MODEL_SETTINGS)
# ... these are this invocation's own, never taken from the checkpoint; every other setting is the
# checkpoint's unless the user sets it again (e.g. a larger --max-iters).
NOT_RESUMED = ("out_dir", "resume", "overwrite", "quiet", "device", "init_from")


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


def estimate_train_bytes(model: GPTConfig, batch_size: int) -> int:
    """A lower bound on the memory a training step needs: float32 weights, gradients and AdamW's two
    moments, plus the activations backward keeps (about 16 C-wide rows per layer and token, the
    attention probabilities, and the logits with their gradient). Plain Python ints: never overflows."""
    C, L, T, V = model.n_embd, model.n_layer, model.block_size, model.vocab_size
    params = L * (12 * C * C + 13 * C) + V * C + T * C + 2 * C
    activations = batch_size * T * (L * (16 * C + 2 * model.n_head * T) + 2 * V)
    return 4 * (4 * params + activations)


def available_bytes(device: str) -> int | None:
    """Total memory of `device` (RAM, or the GPU's), or None when it cannot be told."""
    try:
        if normalize_device(device) == "cuda":
            return int(cupy_module().cuda.Device().mem_info[1])
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError, RuntimeError):
        return None


def check_fits(cfg: RunConfig, vocab_size: int) -> None:
    """Refuse, before allocating anything, a model and batch that cannot fit in the device's memory."""
    need = estimate_train_bytes(replace(cfg.model, vocab_size=vocab_size), cfg.batch_size)
    have = available_bytes(cfg.device)
    if have is not None and need > have:
        m = cfg.model
        raise UserError(
            f"the model and batch need at least {need / 2**30:,.3g} GiB (n_layer {m.n_layer}, n_embd {m.n_embd}, "
            f"block_size {m.block_size}, batch_size {cfg.batch_size}, vocab {vocab_size}) but the {cfg.device} "
            f"has {have / 2**30:,.3g} GiB; use a smaller --n-layer, --n-embd, --block-size or --batch-size"
        )


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
    stop_signal: int | None = None  # SIGINT or SIGTERM when interrupted
    message: str = ""  # what happened when interrupted: the step and what was saved


def load_model(path: str | Path, device: str = "cpu") -> tuple[GPT, Tokenizer, dict[str, Any]]:
    """A GPT, its tokenizer and metadata from a minigpt checkpoint (a run's or weights-only .npz),
    nanoGPT's ckpt.pt (needs PyTorch), or a Hugging Face GPT-2 folder or cached name (`gpt2`)."""
    from minigpt import nanogpt, weights  # they import this module's neighbours, not it

    if str(path).endswith(".pt"):
        model, tokenizer_dict, meta = nanogpt.read_nanogpt(path)
        meta = {**meta, "tokenizer": tokenizer_dict}
    elif str(path).endswith(".npz") or (Path(path).is_file() and not str(path).endswith(".safetensors")):
        state, _, meta = load_checkpoint(path)
        config, tokenizer = read_model_meta(path, meta)
        model = GPT(config)
        model.load_state_dict(state)
        return model.to(device).eval(), tokenizer, meta
    else:
        model, tokenizer_dict = weights.load_hf(path)
        if tokenizer_dict is None:
            raise UserError(
                f"{path}: no tokenizer is known for its {model.config.vocab_size}-id vocabulary "
                "(GPT-2's has 50,257; a minigpt export records its own in config.json)"
            )
        meta = {"tokenizer": tokenizer_dict, "source": str(path)}
    meta["model_config"] = model.config.to_dict()
    return model.to(device).eval(), tokenizer_from_dict(meta["tokenizer"]), meta


def read_init(cfg: RunConfig, explicit: set[str]) -> tuple[RunConfig, GPT, Tokenizer]:
    """--init-from: the weights and tokenizer to start from, and `cfg` with their model shape.

    As nanoGPT's init_from, only dropout and a smaller block_size may be chosen (the position
    table is cropped); a different tokenizer or shape is an error.
    """
    model, tokenizer, _ = load_model(cfg.init_from)
    source = model.config
    kinds = {"char": "char", "bpe": "bpe", "tiktoken": "gpt2" if getattr(tokenizer, "name", "") == "gpt2" else ""}
    clashes = [
        f"{flag(name)} {getattr(cfg.model, name)} (theirs: {getattr(source, name)})"
        for name in MODEL_SETTINGS
        if name in explicit
        and name not in ("dropout", "block_size")
        and getattr(cfg.model, name) != getattr(source, name)
    ]
    if "tokenizer" in explicit and cfg.tokenizer != kinds.get(tokenizer.kind):
        clashes.append(f"--tokenizer {cfg.tokenizer} (theirs: {tokenizer.kind})")
    block_size = cfg.model.block_size if "block_size" in explicit else source.block_size
    if block_size > source.block_size:
        clashes.append(f"--block-size {block_size} (theirs: {source.block_size}; it can only shrink)")
    if clashes:
        raise UserError(f"--init-from {cfg.init_from} fixes the model and vocabulary: {'; '.join(clashes)}")
    config = replace(source, block_size=block_size, dropout=cfg.model.dropout)
    if config != source:  # a new model with the cropped position table (and the run's dropout)
        state = model.state_dict()
        if "transformer.wpe.weight" in state:
            state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:block_size]
        model = GPT(config)
        model.load_state_dict(state)
    cfg = replace(cfg, model=config, tokenizer=kinds.get(tokenizer.kind) or cfg.tokenizer)
    if tokenizer.kind == "bpe":
        cfg = replace(cfg, vocab_size=tokenizer.vocab_size)
    return cfg, model, tokenizer


def read_model_meta(path: str | Path, meta: dict[str, Any]) -> tuple[GPTConfig, Tokenizer]:
    """The model config and tokenizer a checkpoint's metadata describes, each checked."""
    check_meta(path, meta)
    try:
        config = GPTConfig(**meta["model_config"])
    except TypeError as e:  # an unknown key
        raise meta_error(path, "model_config", f"has an unknown field ({e})") from None
    except InvalidSetting as e:
        raise meta_error(path, f"model_config.{e.name}", e.problem) from None
    try:
        tokenizer = tokenizer_from_dict(meta["tokenizer"])
    except UserError as e:
        raise meta_error(path, "tokenizer", f"is unusable ({e})") from None
    return config, tokenizer


# ----------------------------------------------------------------------------- the steps of a run


@dataclass
class Corpus:
    """The run's data: tokenizer, token ids of both splits (memmaps of out_dir/data) and their metadata."""

    tokenizer: Tokenizer
    train_ids: np.ndarray
    val_ids: np.ndarray
    meta: dict[str, Any]
    source: str  # where the text came from, one line

    @property
    def prompt(self) -> str:
        """What the end-of-run sample starts from: a newline if the vocabulary has one, else the first token."""
        try:
            if self.tokenizer.encode("\n"):
                return "\n"
        except UserError:  # a character vocabulary without "\n"
            pass
        return self.tokenizer.decode([int(self.train_ids[0])])


def prepare_data(
    cfg: RunConfig, data_dir: Path, tokenizer: Tokenizer | None = None, log: Callable[[str], None] = print
) -> Corpus:
    """Find the text, build the tokenizer (unless given) and write data_dir/{train,val}.bin.

    --data-dir: the token files prepared there are used as they are. --data: streamed in chunks by
    worker processes (minigpt.prepare), so the text may be larger than memory.
    """
    if cfg.data_dir is not None:
        return read_prepared(Path(cfg.data_dir), cfg.model.block_size, tokenizer)
    if cfg.data is not None:
        kwargs = dict(vocab_size=cfg.vocab_size, overwrite=True, quiet=cfg.quiet, log=log)
        meta = prepare_corpus(cfg.data, data_dir, tokenizer or cfg.tokenizer, **kwargs)
        source = f"{cfg.data} ({meta['source_bytes']:,} bytes in {len(meta['fingerprint']['sources'])} file(s))"
        tokenizer = tokenizer or tokenizer_from_dict(meta["tokenizer"])
        return read_token_files(data_dir, tokenizer, source, cfg.model.block_size)
    text, source = resolve_corpus(cfg.data)
    tokenizer = tokenizer or build_tokenizer(cfg, text)
    prepare(text, tokenizer, data_dir)
    return read_token_files(data_dir, tokenizer, source, cfg.model.block_size)


def read_prepared(data_dir: Path, block_size: int, tokenizer: Tokenizer | None = None) -> Corpus:
    """The token files of a prepared directory, with the tokenizer its meta.json names (or `tokenizer`)."""
    tokenizer = tokenizer or tokenizer_from_dict(load_meta(data_dir).get("tokenizer", {}))
    return read_token_files(data_dir, tokenizer, f"{data_dir} (prepared token files)", block_size)


def read_token_files(data_dir: Path, tokenizer: Tokenizer, source: str, block_size: int) -> Corpus:
    """The token files of `data_dir`, checked against `tokenizer` and long enough for `block_size`."""
    meta = load_meta(data_dir)
    if meta.get("tokenizer") != tokenizer.to_dict():
        raise UserError(f"the token files in {data_dir} were made with another tokenizer than the checkpoint's")
    train_ids, val_ids = load_tokens(data_dir, "train"), load_tokens(data_dir, "val")
    for split, ids in (("training text", train_ids), ("validation text (the last 10%)", val_ids)):
        if len(ids) < block_size + 1:  # checked now, not at the first evaluation
            raise UserError(
                f"the {split} is {len(ids)} tokens, shorter than block_size + 1 = {block_size + 1}; "
                "use a smaller --block-size or more text"
            )
    return Corpus(tokenizer, train_ids, val_ids, meta, source)


@dataclass
class Resumed:
    """What --resume reads from out_dir/last.npz."""

    path: Path
    state: dict[str, np.ndarray]
    optim: dict[str, np.ndarray] | None
    meta: dict[str, Any]
    tokenizer: Tokenizer


def read_resume(cfg: RunConfig, explicit: set[str], path: Path) -> tuple[RunConfig, Resumed]:
    """The checkpoint to resume and the run's settings: the checkpoint's, overridden by what the user
    set explicitly (settings that fix the model or the token files must agree with the checkpoint)."""
    state, optim_state, meta = load_checkpoint(path)
    config, tokenizer = read_model_meta(path, meta)
    check_meta(path, meta, required=("run_config", "step", "rng"))
    saved = {**meta["run_config"], **{name: getattr(config, name) for name in MODEL_SETTINGS}}
    if saved.get("lr_decay_iters") == 0:  # a checkpoint from before the horizon was stored
        saved["lr_decay_iters"] = saved.get("max_iters", 0)
    mine = to_flat(cfg)
    clashes = [
        f"{flag(name)} {mine[name]} (checkpoint: {saved.get(name)})"
        for name in FIXED_ON_RESUME
        if name in explicit and mine[name] != saved.get(name)
    ]
    if clashes:
        raise UserError(
            f"{path} was trained with other settings: {'; '.join(clashes)}. Drop those flags to resume it, "
            "or pass a new --out-dir to start a new run"
        )
    merged = {k: v for k, v in saved.items() if k not in NOT_RESUMED}
    merged.update({k: v for k, v in mine.items() if k in explicit or k in NOT_RESUMED})
    try:
        cfg = from_flat(RunConfig, merged)
    except InvalidSetting as e:
        if e.name in explicit:
            raise
        raise meta_error(path, f"run_config.{e.name}", e.problem) from None
    return cfg, Resumed(path, state, optim_state, meta, tokenizer)


def resume_data(cfg: RunConfig, resumed: Resumed, data_dir: Path, log: Callable[[str], None]) -> Corpus:
    """The out-dir's token files, as they are (no re-tokenizing); re-made from the run's text with the
    checkpoint's tokenizer only if they are gone or damaged."""
    source = resumed.meta.get("data", str(cfg.data))
    try:
        return read_token_files(data_dir, resumed.tokenizer, source, cfg.model.block_size)
    except UserError as e:
        if cfg.data_dir is not None:  # prepared elsewhere: not ours to re-make
            raise
        log(f"notice: cannot reuse the token files ({e}); tokenizing the text again")
        return prepare_data(cfg, data_dir, tokenizer=resumed.tokenizer, log=log)


@dataclass
class Run:
    """The state being trained: model, optimizer, the training batches, the step, the best val loss,
    and the seconds trained before this process (so logged times continue across resumes)."""

    model: GPT
    optimizer: AdamW
    batches: BatchSampler
    step: int = 0
    best_val: float = math.inf
    elapsed: float = 0.0
    resumed_meta: dict[str, Any] = field(default_factory=dict)  # the checkpoint's metadata, if resumed


def build_run(cfg: RunConfig, corpus: Corpus, resumed: Resumed | None, init: GPT | None = None, rank: int = 0) -> Run:
    """A fresh model (weights from cfg.seed, or `init`'s) or the resumed one, on cfg.device.

    Data-parallel rank `rank` draws batches from a stream of its own; rank 0's is the single-process one.
    """
    vocab_size = model_vocab_size(corpus.tokenizer)
    if resumed is not None:  # a model started from other weights keeps their vocabulary (GPT-2's: unpadded)
        vocab_size = resumed.meta["model_config"].get("vocab_size", vocab_size)
    model = init or GPT(replace(cfg.model, vocab_size=vocab_size), rng=np.random.default_rng(cfg.seed))
    optimizer = AdamW(
        model.parameters(), lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay
    )
    seed = cfg.seed if rank == 0 else np.random.SeedSequence([cfg.seed, rank])
    batches = BatchSampler(corpus.train_ids, cfg.batch_size, cfg.model.block_size, seed=seed, name="train")
    run = Run(model, optimizer, batches)
    if resumed is not None:
        meta = resumed.meta
        model.load_state_dict(resumed.state)
        if resumed.optim is not None:
            optimizer.load_state_dict(resumed.optim)
        streams = meta["rng"].get("train_batches_ranks") or [meta["rng"]["train_batches"]]
        if rank < len(streams):  # a rank the saved run did not have starts its stream afresh
            batches.set_state(streams[rank])
        try:
            model.dropout_rng.bit_generator.state = meta["rng"]["dropout"]
        except (TypeError, ValueError, KeyError) as e:
            raise meta_error(resumed.path, "rng.dropout", f"is not a NumPy generator state ({e})") from None
        run.step, run.elapsed, run.resumed_meta = meta["step"], float(meta.get("elapsed", 0.0)), meta
        run.best_val = math.inf if meta.get("best_val_loss") is None else float(meta["best_val_loss"])
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


class NotSaved(TrainingDiverged):
    """A checkpoint was due but the weights are not finite; nothing was written."""


class Checkpoints:
    """Writes out_dir/ckpt.npz (best val loss) and out_dir/last.npz (latest): the run's callbacks.

    Nothing is written from a broken state: the loop raises before on_eval on a non-finite
    evaluation, and `save` refuses non-finite weights, so the last good files stay as they were.
    Data parallel (N > 1 ranks): rank 0 writes them, with every rank's batch-stream state, gathered
    from all ranks after each evaluation step (`on_step_end`) and on an interrupt.
    """

    def __init__(self, cfg: RunConfig, run: Run, corpus: Corpus, out: OutDir):
        self.cfg, self.run, self.corpus, self.out = cfg, run, corpus, out
        self.saved_step: int | None = run.step if run.step else None  # of last.npz, if there is one
        self.dist = distributed.current()
        self.streams: list[dict[str, Any]] | None = None  # every rank's batch-stream state (N > 1)

    def save(self, path: Path, state: TrainState) -> None:
        run = self.run
        weights = {name: to_numpy(p.data) for name, p in run.model.named_parameters()}
        bad = [name for name, w in weights.items() if not np.isfinite(w).all()]
        if bad:
            raise NotSaved(
                f"not saving {path} at step {state.step}: the weights hold NaN or inf ({', '.join(bad[:3])}). "
                f"{self.kept()}; lower the learning rate or clip gradients (--grad-clip)"
            )
        save_checkpoint(
            path,
            model=weights,
            optimizer=run.optimizer.state_dict(),
            meta={
                "model_config": run.model.config.to_dict(),
                "run_config": to_flat(self.cfg),
                "tokenizer": self.corpus.tokenizer.to_dict(),
                "step": state.step,
                "best_val_loss": None if math.isinf(run.best_val) else run.best_val,
                "elapsed": run.elapsed + state.elapsed,
                "rng": {
                    "train_batches": run.batches.state(),
                    "dropout": run.model.dropout_rng.bit_generator.state,
                    **({"train_batches_ranks": self.streams} if self.streams else {}),
                },
                "world_size": self.dist.world_size,
                "data": self.corpus.source,
            },
        )
        if path == self.out.last:
            self.saved_step = state.step

    def kept(self) -> str:
        if self.saved_step is None:
            return "No checkpoint was saved yet"
        return f"The last good checkpoint, {self.out.last} (step {self.saved_step}), is kept"

    def on_eval(self, state: TrainState) -> None:
        if self.dist.world_size == 1:  # else in on_step_end, once every rank's batch state is gathered
            self.save_evaluated(state)

    def on_step_end(self, state: TrainState) -> None:
        if is_eval_step(state.step, self.cfg.eval_interval, self.cfg.max_iters):
            self.streams = self.dist.gather(self.run.batches.state())  # a collective: every rank is here
            if self.dist.is_main:
                self.save_evaluated(state)

    def save_evaluated(self, state: TrainState) -> None:
        val = state.metrics["val_loss"]
        if val < self.run.best_val:
            self.run.best_val = val
            self.save(self.out.best, state)
        self.save(self.out.last, state)

    def on_interrupt(self, state: TrainState) -> None:
        if self.dist.world_size > 1:  # every rank stops at the same step (train's grad_sync agrees on it)
            self.streams = self.dist.gather(self.run.batches.state())
            if not self.dist.is_main:
                return
        self.save(self.out.last, state)


def train_lm(cfg: RunConfig, explicit: set[str] | None = None, log: Callable[[str], None] = print) -> RunSummary:
    """Train a GPT as `cfg` says, in cfg.out_dir (created and locked for the run).

    `explicit` names the settings the user set on purpose. On --resume every other setting comes
    from the checkpoint, and those that fix the model or the token files must agree with it.
    Under mpiexec (minigpt.distributed) every rank runs this; rank 0 alone writes (out-dir, token
    files, checkpoints, metrics), and its refusals (one line) stop every rank.
    """
    explicit = set(explicit or ())
    dist = distributed.current()
    if not dist.is_main:
        log = _silent
    dist.check_same("the settings", to_flat(cfg))
    dist.main_first(lambda: _check_new_run(cfg, explicit))
    with contextlib.ExitStack() as stack:
        out = OutDir(cfg.out_dir, resume=cfg.resume, overwrite=cfg.overwrite)
        dist.main_first(lambda: stack.enter_context(out), others=lambda: out)  # rank 0 creates and locks it
        resumed, init, tokenizer = None, None, None
        if cfg.resume:
            cfg, resumed = dist.main_first(lambda: read_resume(cfg, explicit, out.last))
        else:  # the LR schedule's horizon is fixed now, so a resumed run with a larger --max-iters keeps it
            cfg = replace(cfg, lr_decay_iters=cfg.lr_decay_iters or cfg.max_iters)
            if cfg.init_from:
                cfg, init, tokenizer = dist.main_first(lambda: read_init(cfg, explicit))
                log(f"init from {cfg.init_from}: weights and tokenizer ({tokenizer.kind}), a fresh optimizer")
        token_dir = Path(cfg.data_dir) if cfg.data_dir is not None else out.data
        corpus = dist.main_first(
            lambda: _main_data(cfg, resumed, tokenizer, out, log),
            others=lambda: read_prepared(token_dir, cfg.model.block_size, tokenizer),  # what rank 0 prepared
        )
        if cfg.data_dir is not None and "tokenizer" in explicit:
            check_token_dir(cfg.data_dir, expected=cfg.tokenizer)
        dist.check_same("the data (meta.json of the token files)", corpus.meta)
        dist.main_first(lambda: check_fits(cfg, model_vocab_size(corpus.tokenizer)))
        run = build_run(cfg, corpus, resumed, init, rank=dist.rank)
        dist.check_same("the initial weights", _weights_digest(run.model))
        if init is not None and dist.is_main:  # the starting point, on the same batches as every later evaluation
            with no_grad():
                run.model.eval()
                metrics = make_evaluator(cfg, run, corpus)()
                run.model.train()
            train_loss, val_loss = metrics["train_loss"], metrics["val_loss"]
            log(f"step 0 (the --init-from weights): train loss {train_loss:.4f}, val loss {val_loss:.4f}")
        return _train(cfg, run, corpus, out, log)


def _check_new_run(cfg: RunConfig, explicit: set[str]) -> None:
    check_fits(cfg, vocab_size=1)  # the vocabulary is not known yet; absurd sizes are refused already
    if cfg.data is not None and cfg.data_dir is not None:
        raise UserError("--data and --data-dir both given: train on text (--data) or on prepared tokens (--data-dir)")
    if not cfg.resume and "vocab_size" in explicit and cfg.tokenizer != "bpe":
        raise UserError(f"--vocab-size only applies to --tokenizer bpe (the {cfg.tokenizer} vocabulary is fixed)")


def _main_data(
    cfg: RunConfig, resumed: Resumed | None, tokenizer: Tokenizer | None, out: OutDir, log: Callable[[str], None]
) -> Corpus:
    """The run's token files (rank 0): reused on --resume, else prepared."""
    if resumed is None:
        return prepare_data(cfg, out.data, tokenizer=tokenizer, log=log)
    corpus = resume_data(cfg, resumed, Path(cfg.data_dir) if cfg.data_dir is not None else out.data, log)
    out.trim_metrics(resumed.meta["step"])
    return corpus


def _silent(message: str) -> None:
    """The log of a data-parallel rank other than 0."""


def _weights_digest(model: GPT) -> str:
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        digest.update(name.encode())
        digest.update(to_numpy(p.data).tobytes())
    return digest.hexdigest()


def _resume_notice(meta: dict[str, Any], path: Path, cfg: RunConfig, world_size: int) -> str | None:
    """What resuming on a different number of ranks than the checkpoint's run means (None: the same)."""
    saved = int(meta.get("world_size", 1))
    if saved == world_size:
        return None
    kept = min(saved, world_size)
    return (
        f"notice: {path} was written by a {saved}-rank run and resumes on {world_size} rank(s). The weights, "
        "optimizer state and step continue; "
        + ("rank 0 continues its batch stream" if kept == 1 else f"ranks 0-{kept - 1} continue their batch streams")
        + (f", ranks {saved}-{world_size - 1} start new ones" if world_size > saved else "")
        + f"; a step now takes {world_size} x {cfg.batch_size} sequences (was {saved} x {cfg.batch_size}), so the "
        f"run will not repeat an uninterrupted {saved}-rank run. Resume on {saved} rank(s) for that"
    )


def _train(cfg: RunConfig, run: Run, corpus: Corpus, out: OutDir, log: Callable[[str], None]) -> RunSummary:
    """Run the loop with its callbacks, then sample; the interrupt message says what was saved."""
    start_step, tok = run.step, corpus.tokenizer
    log(
        f"data: {corpus.source}; tokenizer {tok.kind}, vocab {tok.vocab_size}; "
        f"{corpus.meta['train_tokens']:,} train / {corpus.meta['val_tokens']:,} val tokens"
    )
    log(f"model: {run.model.num_parameters() / 1e6:.2f}M parameters, {run.model.config}")
    dist = distributed.current()
    if start_step:
        log(f"resuming from {out.last} at step {start_step}")
        if notice := _resume_notice(run.resumed_meta, out.last, cfg, dist.world_size):
            log(notice)
    parallel = dist.world_size > 1
    if parallel:
        log(
            f"data parallel: {dist.world_size} ranks x batch {cfg.batch_size} x {cfg.grad_accum} micro-batch(es) "
            f"= {dist.world_size * cfg.batch_size * cfg.grad_accum} sequences per step"
        )
    checkpoints = Checkpoints(cfg, run, corpus, out)
    on_eval = checkpoints.on_eval
    if have_matplotlib() and dist.is_main:  # redraw out/loss.png after each evaluation's checkpoint

        def on_eval(state: TrainState) -> None:
            checkpoints.on_eval(state)
            plot_run(out.path)

    elif not start_step:
        log(f"note: {out.path / PLOT_FILE} (a loss plot) is drawn at each evaluation with {INSTALL_HINT}")
    tokens_per_step = cfg.batch_size * cfg.model.block_size * cfg.grad_accum * dist.world_size
    params = list(run.model.parameters())
    try:
        result = train(
            run.model,
            run.optimizer,
            run.batches.next,
            lambda m, batch: m(*batch)[1],
            max_steps=cfg.max_iters,
            start_step=start_step,
            lr_schedule=CosineSchedule(cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, cfg.lr_decay_iters),
            grad_clip=cfg.grad_clip or None,
            grad_accum=cfg.grad_accum,
            eval_fn=make_evaluator(cfg, run, corpus) if dist.is_main else None,  # rank 0 alone evaluates, logs
            eval_interval=cfg.eval_interval,
            log_interval=cfg.log_interval,
            on_eval=on_eval,
            on_step_end=checkpoints.on_step_end if parallel else None,
            on_interrupt=checkpoints.on_interrupt,
            log_path=out.metrics if dist.is_main else None,
            quiet=cfg.quiet or not dist.is_main,
            tokens_per_step=tokens_per_step,
            time_offset=run.elapsed,
            grad_sync=(lambda loss, stop: dist.average_gradients(params, loss, stop)) if parallel else None,
        )
    except NotSaved:
        raise
    except TrainingDiverged as e:
        raise TrainingDiverged(f"{e}. {checkpoints.kept()}") from None
    summary = RunSummary(
        step=result.step,
        val_loss=result.metrics.get("val_loss"),
        best_val_loss=None if math.isinf(run.best_val) else run.best_val,
        val_bpc=result.metrics.get("val_bpc"),
        elapsed=result.elapsed,
        tokens_per_s=(result.step - start_step) * tokens_per_step / max(result.elapsed, 1e-9),
        interrupted=result.interrupted,
        sample="",
        stop_signal=result.stop_signal,
    )
    if result.interrupted:
        name = signal.Signals(result.stop_signal or signal.SIGINT).name
        summary.message = (
            f"interrupted by {name} at step {result.step}: saved {out.last} (step {result.step}); "
            "continue with --resume"
        )
    elif cfg.sample_tokens > 0 and dist.is_main:
        summary.sample = corpus.prompt + sample_text(run.model, tok, corpus.prompt, cfg.sample_tokens, seed=cfg.seed)
    return summary


def sample_text(
    model: GPT, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, stream: Any = None, **kwargs: Any
) -> str:
    """Generate from `prompt` and return the new text; with `stream` (a file), write it as it comes.

    Ids are decoded as they come (`StreamDecoder`, constant cost per token), and a multi-byte character
    split across BPE tokens is written once its last byte arrives. Only ids below the tokenizer's
    vocab_size are sampled, never the model's padding rows.
    """
    if not prompt:
        raise UserError("the prompt is empty; pass --start with at least one character")
    prompt_ids = tokenizer.encode(prompt)
    if not prompt_ids:
        raise UserError(f"the prompt {prompt!r} encodes to no tokens; use a different --start")
    decoder = StreamDecoder(tokenizer)
    pieces: list[str] = []
    for ids in model.generate_tokens(
        np.array([prompt_ids]), max_new_tokens, vocab_limit=tokenizer.vocab_size, **kwargs
    ):
        pieces.append(decoder.step([int(ids[0])]))
        if stream is not None and pieces[-1]:
            stream.write(pieces[-1])
            stream.flush()
    pieces.append(decoder.finish())  # a character cut short by the end shows as U+FFFD
    if stream is not None and pieces[-1]:
        stream.write(pieces[-1])
        stream.flush()
    return "".join(pieces)


__all__ = ["RunConfig", "RunSummary", "load_model", "sample_text", "train_lm"]
