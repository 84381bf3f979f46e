"""A language-model run: corpus -> tokenizer -> token files -> GPT -> the one training loop -> checkpoints.

`scripts/train_gpt.py` is argparse around `train_lm`. The steps live beside it: minigpt.corpus (tokenizer
and token files), minigpt.run_state (fresh, --init-from or --resume state), minigpt.inference (loading
any model format, sampling).
"""

from __future__ import annotations

import contextlib
import math
import signal
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from minigpt import distributed
from minigpt.autograd import no_grad
from minigpt.autograd.backend import normalize_device, to_device, to_numpy
from minigpt.checkpoint import save_checkpoint
from minigpt.config import InvalidSetting, check_fields, setting, to_flat
from minigpt.corpus import Corpus, model_vocab_size, prepare_data, read_prepared
from minigpt.data import BatchSampler
from minigpt.errors import Interrupted, UserError, signal_of
from minigpt.gpt import GPTConfig
from minigpt.inference import load_model, sample_text
from minigpt.optim import CosineSchedule
from minigpt.outdir import OutDir
from minigpt.plot import INSTALL_HINT, PLOT_FILE, have_matplotlib, plot_run
from minigpt.prepare import check_token_dir
from minigpt.run_state import Resumed, Run, build_run, check_fits, read_init, read_resume, resume_data, resume_notice
from minigpt.tokenizers import Tokenizer
from minigpt.train import Callback, TrainingDiverged, TrainResult, TrainState, is_eval_step, train

TOKENIZERS = ("char", "bpe", "gpt2")
# Our BPE's smallest vocabulary: the 256 byte tokens plus the end-of-text special token.
BPE_MIN_VOCAB = 256 + 1
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
    plot: bool = setting(True, "redraw out_dir/loss.png at each evaluation when matplotlib is installed")

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


# ----------------------------------------------------------------------------- the steps of a run


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
        if self.dist.world_size > 1 and is_eval_step(state.step, self.cfg.eval_interval, self.cfg.max_iters):
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
        dist.check_same_weights(run.model)
        if init is not None and dist.is_main:  # the starting point, on the same batches as every later evaluation
            with no_grad():
                run.model.eval()
                metrics = make_evaluator(cfg, run, corpus)()
                run.model.train()
            train_loss, val_loss = metrics["train_loss"], metrics["val_loss"]
            log(f"step 0 (the --init-from weights): train loss {train_loss:.4f}, val loss {val_loss:.4f}")
        return _train(cfg, run, corpus, out, log)


def _check_new_run(cfg: RunConfig, explicit: set[str]) -> None:
    check_fits(cfg, vocab_size=None)  # the vocabulary is not known yet: absurd sizes are refused already
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


def _train(cfg: RunConfig, run: Run, corpus: Corpus, out: OutDir, log: Callable[[str], None]) -> RunSummary:
    """Run the loop with its callbacks, then sample; the interrupt message says what was saved."""
    dist = distributed.current()
    _log_start(cfg, run, corpus, out, log)
    checkpoints = Checkpoints(cfg, run, corpus, out)
    tokens_per_step = cfg.batch_size * cfg.model.block_size * cfg.grad_accum * dist.world_size
    try:
        result = train(
            run.model,
            run.optimizer,
            run.batches.next,
            lambda m, batch: m(*batch)[1],
            max_steps=cfg.max_iters,
            start_step=run.step,
            lr_schedule=CosineSchedule(cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, cfg.lr_decay_iters),
            grad_clip=cfg.grad_clip or None,
            grad_accum=cfg.grad_accum,
            eval_fn=make_evaluator(cfg, run, corpus) if dist.is_main else None,  # rank 0 alone evaluates, logs
            eval_interval=cfg.eval_interval,
            log_interval=cfg.log_interval,
            on_eval=_on_eval(checkpoints, out, log, first_run=not run.step, plot=cfg.plot),
            on_step_end=checkpoints.on_step_end,
            on_interrupt=checkpoints.on_interrupt,
            log_path=out.metrics if dist.is_main else None,
            quiet=cfg.quiet or not dist.is_main,
            tokens_per_step=tokens_per_step,
            time_offset=run.elapsed,
            grad_sync=dist.grad_sync(list(run.model.parameters())),
        )
    except NotSaved:
        raise
    except TrainingDiverged as e:
        raise TrainingDiverged(f"{e}. {checkpoints.kept()}") from None
    return _summary(cfg, run, corpus, out, result, tokens_per_step)


def _log_start(cfg: RunConfig, run: Run, corpus: Corpus, out: OutDir, log: Callable[[str], None]) -> None:
    """What is trained on what: the data, the model, where a resumed run continues, the ranks."""
    tok, dist = corpus.tokenizer, distributed.current()
    log(
        f"data: {corpus.source}; tokenizer {tok.kind}, vocab {tok.vocab_size}; "
        f"{corpus.meta['train_tokens']:,} train / {corpus.meta['val_tokens']:,} val tokens"
    )
    log(f"model: {run.model.num_parameters() / 1e6:.2f}M parameters, {run.model.config}")
    if run.step:
        log(f"resuming from {out.last} at step {run.step}")
        if notice := resume_notice(run.resumed_meta, out.last, cfg, dist.world_size):
            log(notice)
    if dist.world_size > 1:
        log(
            f"data parallel: {dist.world_size} ranks x batch {cfg.batch_size} x {cfg.grad_accum} micro-batch(es) "
            f"= {dist.world_size * cfg.batch_size * cfg.grad_accum} sequences per step"
        )


def _on_eval(
    checkpoints: Checkpoints, out: OutDir, log: Callable[[str], None], first_run: bool, plot: bool
) -> Callback:
    """After an evaluation: the checkpoints, then out/loss.png redrawn (rank 0, with matplotlib, unless --no-plot)."""
    if not plot:
        return checkpoints.on_eval
    if not (have_matplotlib() and distributed.current().is_main):
        if first_run:
            log(f"note: {out.path / PLOT_FILE} (a loss plot) is drawn at each evaluation with {INSTALL_HINT}")
        return checkpoints.on_eval

    def on_eval(state: TrainState) -> None:
        checkpoints.on_eval(state)
        plot_run(out.path)

    return on_eval


def _summary(
    cfg: RunConfig, run: Run, corpus: Corpus, out: OutDir, result: TrainResult, tokens_per_step: int
) -> RunSummary:
    """What the run did; a sample of the model (rank 0) unless interrupted, else what was saved."""
    summary = RunSummary(
        step=result.step,
        val_loss=result.metrics.get("val_loss"),
        best_val_loss=None if math.isinf(run.best_val) else run.best_val,
        val_bpc=result.metrics.get("val_bpc"),
        elapsed=result.elapsed,
        tokens_per_s=(result.step - run.step) * tokens_per_step / max(result.elapsed, 1e-9),
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
    elif cfg.sample_tokens > 0 and distributed.current().is_main:
        prompt = corpus.prompt
        try:
            summary.sample = prompt + sample_text(run.model, corpus.tokenizer, prompt, cfg.sample_tokens, seed=cfg.seed)
        except KeyboardInterrupt as e:  # the run is complete and saved: only its sample is cut short
            name = signal.Signals(signal_of(e)).name
            done = f"the run finished (step {result.step}), saved in {out.path}"
            raise Interrupted(f"interrupted by {name} during the final sample; {done}", signal_of(e)) from None
    return summary


__all__ = ["RunConfig", "RunSummary", "load_model", "sample_text", "train_lm"]
