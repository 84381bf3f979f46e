"""Tokenizers with one interface: encode, decode, vocab_size, eot_token, to_dict/from_dict (JSON)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from minigpt.errors import UserError


class Tokenizer:
    """The interface every tokenizer implements. `to_dict()` is JSON-serialisable (meta.json, checkpoints)."""

    kind: str = ""
    vocab_size: int
    eot_token: int | None = None  # id of the end-of-text special token, if the tokenizer has one

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError


class CharTokenizer(Tokenizer):
    """One id per distinct character of the training text, in sorted order (as nanoGPT's shakespeare_char)."""

    kind = "char"

    def __init__(self, chars: Iterable[str]):
        self.chars = sorted(set(chars))
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars)

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(set(text))

    def encode(self, text: str) -> list[int]:
        stoi = self.stoi
        try:
            return [stoi[c] for c in text]
        except KeyError:
            unknown = sorted(set(text) - set(stoi))
            shown = ", ".join(repr(c) for c in unknown[:20]) + (" ..." if len(unknown) > 20 else "")
            raise UserError(
                f"{len(unknown)} character(s) not in the vocabulary: {shown}; "
                "use only characters from the training text"
            ) from None

    def decode(self, ids: Iterable[int]) -> str:
        chars = self.chars
        return "".join(chars[int(i)] for i in ids)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "chars": "".join(self.chars)}


def tokenizer_from_dict(d: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer from its `to_dict()` form."""
    kind = d.get("kind")
    if kind == "char":
        return CharTokenizer(d["chars"])
    raise UserError(f"unknown tokenizer kind {kind!r} in metadata; expected one of: char")
