"""The state a run trains, and where it comes from: fresh weights, --init-from's, or --resume's last.npz.

Also whether a model and batch fit in the device's memory, checked before anything is allocated.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from minigpt.autograd.backend import cupy_module, normalize_device
from minigpt.checkpoint import check_meta, load_checkpoint, meta_error
from minigpt.config import InvalidSetting, flag, flat_fields, from_flat, to_flat
from minigpt.corpus import Corpus, model_vocab_size, prepare_data, read_token_files
from minigpt.data import BatchSampler
from minigpt.errors import UserError
from minigpt.gpt import GPT, GPTConfig
from minigpt.inference import load_model, read_model_meta
from minigpt.optim import AdamW
from minigpt.tokenizers import Tokenizer

if TYPE_CHECKING:
    from minigpt.lm import RunConfig

# Settings that fix the model's shape: a checkpoint decides them on --resume.
MODEL_SETTINGS = tuple(flat_fields(GPTConfig))
# On --resume these must match the checkpoint (the token files of the out-dir depend on them) ...
FIXED_ON_RESUME = ("data", "data_dir", "tokenizer", "vocab_size", *MODEL_SETTINGS)
# ... these are this invocation's own, never taken from the checkpoint; every other setting is the
# checkpoint's unless the user sets it again (e.g. a larger --max-iters).
NOT_RESUMED = ("out_dir", "resume", "overwrite", "quiet", "plot", "device", "init_from")


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


def check_fits(cfg: RunConfig, vocab_size: int | None) -> None:
    """Refuse, before allocating anything, a model and batch that cannot fit in the device's memory
    (`vocab_size` None: not known yet, counted as 1, so only sizes absurd without it are refused)."""
    need = estimate_train_bytes(replace(cfg.model, vocab_size=vocab_size or 1), cfg.batch_size)
    have = available_bytes(cfg.device)
    if have is not None and need > have:
        m = cfg.model
        vocab = "" if vocab_size is None else f", vocab {vocab_size}"
        raise UserError(
            f"the model and batch need at least {need / 2**30:,.3g} GiB (n_layer {m.n_layer}, n_embd {m.n_embd}, "
            f"block_size {m.block_size}, batch_size {cfg.batch_size}{vocab}) but the {cfg.device} "
            f"has {have / 2**30:,.3g} GiB; use a smaller --n-layer, --n-embd, --block-size or --batch-size"
        )


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
        model = GPT.from_state_dict(config, state)
    cfg = replace(cfg, model=config, tokenizer=kinds.get(tokenizer.kind) or cfg.tokenizer)
    if tokenizer.kind == "bpe":
        cfg = replace(cfg, vocab_size=tokenizer.vocab_size)
    return cfg, model, tokenizer


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
        cfg = from_flat(type(cfg), merged)
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


def resume_notice(meta: dict[str, Any], path: Path, cfg: RunConfig, world_size: int) -> str | None:
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
