"""A run's data: its tokenizer and the token files of both splits, prepared from text or read as they are."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from minigpt.data import load_meta, load_tokens, prepare, resolve_corpus
from minigpt.errors import UserError
from minigpt.prepare import prepare_corpus
from minigpt.tokenizers import (
    BPETokenizer,
    CharTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    padded_vocab_size,
    tokenizer_from_dict,
)

if TYPE_CHECKING:
    from minigpt.lm import RunConfig

# Vocabularies larger than this are padded to a multiple of 64 in the model (see `model_vocab_size`).
PAD_VOCAB_ABOVE = 4096


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
