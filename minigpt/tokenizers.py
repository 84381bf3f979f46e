"""Tokenizers with one interface: encode, decode, vocab_size, eot_token, to_dict/from_dict (JSON).

- `CharTokenizer`: one id per character of the training text (nanoGPT's shakespeare_char).
- `TiktokenTokenizer`: any tiktoken encoding by name (GPT-2 by default), loaded offline from a cache folder.
- `BPETokenizer`: our own byte-level BPE trainer; the trained ranks are handed to `tiktoken.Encoding`, so
  encode/decode run in tiktoken's Rust core.
"""

from __future__ import annotations

import base64
import codecs
import contextlib
import functools
import heapq
import os
import re
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import regex
import tiktoken

from minigpt.errors import UserError

ENDOFTEXT = "<|endoftext|>"

# Pre-split patterns in tiktoken's syntax: GPT-2 (tiktoken's r50k/gpt2) and GPT-4 (cl100k_base).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}

Pair = tuple[int, int]  # two adjacent token ids


def padded_vocab_size(n: int, multiple: int = 64) -> int:
    """Round a vocabulary size up to a multiple (50257 -> 50304) for faster matmuls; extra ids are unused."""
    return -(-n // multiple) * multiple


def _int_list(ids: Iterable[int]) -> list[int]:
    # NumPy arrays (from token files or sampling) convert in C; tiktoken wants plain ints.
    tolist = getattr(ids, "tolist", None)
    return tolist() if tolist is not None else [int(i) for i in ids]


class Tokenizer:
    """The interface every tokenizer implements. `to_dict()` is JSON-serialisable (meta.json, checkpoints)."""

    kind: str = ""
    vocab_size: int  # real ids are 0..vocab_size-1; a model may pad its embedding (padded_vocab_size)
    eot_token: int | None = None  # id of the end-of-text special token, if the tokenizer has one

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The UTF-8 bytes of `ids` (a byte-level BPE token may hold part of a character)."""
        return self.decode(ids).encode("utf-8")

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError


class StreamDecoder:
    """Decodes ids as they arrive, at a constant cost per id (streamed sampling).

    `step(ids)` returns the text of the characters completed so far; a character whose bytes are split
    across tokens waits for its last byte. `finish()` returns what is left (U+FFFD for a truncated
    character). All the pieces joined equal `tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._bytes = tokenizer.decode_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def step(self, ids: Iterable[int]) -> str:
        return self._utf8.decode(self._bytes(ids))

    def finish(self) -> str:
        return self._utf8.decode(b"", final=True)


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
        return "".join(chars[i] for i in _int_list(ids))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "chars": "".join(self.chars)}


class _TiktokenBacked(Tokenizer):
    """Shared encode/decode over a `tiktoken.Encoding`.

    Special tokens: the tokenizer's own specials (`allowed`) in the text become their ids, so a corpus
    joined with "<|endoftext|>" round-trips; any other special-token text is encoded as plain text
    instead of raising (tiktoken's default), so every string encodes.
    """

    _enc: tiktoken.Encoding
    _allowed: frozenset[str]

    def encode(self, text: str) -> list[int]:
        return self._enc.encode(text, allowed_special=self._allowed, disallowed_special=())

    def decode(self, ids: Iterable[int]) -> str:
        # errors="replace": a model may emit a token sequence that splits a multi-byte character.
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        try:
            return self._enc.decode_bytes(_int_list(ids))
        except KeyError as e:
            raise UserError(
                f"token id outside this tokenizer's vocabulary of {self.vocab_size} ({e.args[0]}); "
                "was the checkpoint trained with a different tokenizer?"
            ) from None


@contextlib.contextmanager
def _download_timeout() -> Iterator[None]:
    """Give tiktoken's downloads a timeout while an encoding loads.

    tiktoken fetches missing vocabulary files with `requests.get(url)` and no timeout, so a firewalled
    machine could wait minutes; it offers no setting, hence this short-lived patch.
    """
    import requests  # tiktoken's own download dependency

    saved_get = requests.get
    requests.get = functools.partial(saved_get, timeout=(5, 30))  # (connect, read) seconds
    try:
        yield
    finally:
        requests.get = saved_get


def tiktoken_cache_dir() -> str:
    """Where tiktoken keeps vocabulary files: TIKTOKEN_CACHE_DIR, else DATA_GYM_CACHE_DIR, else <tmp>/data-gym-cache."""
    env = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    return env or os.path.join(tempfile.gettempdir(), "data-gym-cache")


def tiktoken_files(name: str) -> list[tuple[str, str]]:
    """(cache file name, URL) of each file encoding `name` is built from; [] if tiktoken hides them.

    tiktoken names a cached file by the SHA-1 of its URL. The URLs are read by running the encoding's
    constructor with its two file loaders replaced by recorders (no file is read).
    """
    import hashlib

    try:
        tiktoken.list_encoding_names()  # fills the registry
        constructor = tiktoken.registry.ENCODING_CONSTRUCTORS[name]  # type: ignore[index]
    except (AttributeError, KeyError, TypeError):
        return []
    urls: list[str] = []

    def record(*args: Any, **kwargs: Any) -> dict[bytes, int]:
        urls.extend(a for a in (*args, *kwargs.values()) if isinstance(a, str) and "://" in a)
        return {}

    names = ("load_tiktoken_bpe", "data_gym_to_mergeable_bpe_ranks")
    scope = getattr(constructor, "__globals__", {})
    saved = {n: scope[n] for n in names if n in scope}
    try:
        scope.update({n: record for n in saved})
        constructor()
    except Exception:
        return []
    finally:
        scope.update(saved)
    return [(hashlib.sha1(url.encode()).hexdigest(), url) for url in urls]


def _missing_files_message(name: str, cause: BaseException) -> str:
    cache = tiktoken_cache_dir()
    files = ", ".join(f"{key} ({url.rsplit('/', 1)[-1]})" for key, url in tiktoken_files(name))
    return (
        f"cannot load tiktoken encoding {name!r}: its files are not in the cache {cache} and the download failed "
        f"({type(cause).__name__}); it needs {files or 'its vocabulary files'}. On a machine with a network run "
        f"`TIKTOKEN_CACHE_DIR=tiktoken_cache python -c \"import tiktoken; tiktoken.get_encoding('{name}')\"`, "
        "copy the tiktoken_cache folder here and set TIKTOKEN_CACHE_DIR to it"
    )


def _load_tiktoken(name: str) -> tiktoken.Encoding:
    known = tiktoken.list_encoding_names()
    if name not in known:
        raise UserError(f"unknown tiktoken encoding {name!r}; choose one of: {', '.join(known)}")
    try:
        with _download_timeout():
            return tiktoken.get_encoding(name)
    except (OSError, ValueError) as e:  # requests' errors are OSErrors; ValueError: a file's hash is wrong
        raise UserError(_missing_files_message(name, e)) from None


class TiktokenTokenizer(_TiktokenBacked):
    """A pretrained tiktoken encoding by name ("gpt2": 50,257 ids, "<|endoftext|>" = 50256).

    Files come from tiktoken's cache (`tiktoken_cache_dir()`: TIKTOKEN_CACHE_DIR when set) or are downloaded
    once; offline, the error names the files and how to fetch them. Only the end-of-text special token is
    recognised in text (see `_TiktokenBacked`).
    """

    kind = "tiktoken"

    def __init__(self, name: str = "gpt2"):
        self.name = name
        self._enc = _load_tiktoken(name)
        self.vocab_size = self._enc.n_vocab
        self._allowed = frozenset({ENDOFTEXT} & self._enc.special_tokens_set)
        self.eot_token = self._enc.eot_token if self._allowed else None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name}


@functools.cache
def compile_pattern(pattern: str) -> regex.Pattern[str]:
    """A tiktoken pre-split pattern ("gpt2", "gpt4" or a pattern string), compiled for training.

    The `regex` package reads tiktoken's syntax (\\p{L}, possessive quantifiers) as it is; tiktoken itself
    does the splitting when encoding.
    """
    try:
        return regex.compile(PATTERNS.get(pattern, pattern))
    except regex.error as e:
        raise UserError(f"the pre-split pattern does not compile: {e}") from None


def _valid_utf8_text(text: str) -> str:
    # Lone surrogates cannot be UTF-8 encoded; tiktoken replaces them with U+FFFD, and so do we.
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _count_chunks(text: str, pattern: str, special_tokens: Iterable[str]) -> Counter[str]:
    """Unique pre-split chunks with their frequencies; special-token text is cut out, never merged into."""
    pieces = [text]
    specials = sorted(special_tokens, key=len, reverse=True)
    if specials:
        pieces = re.split("|".join(map(re.escape, specials)), text)
    findall = compile_pattern(pattern).findall
    counts: Counter[str] = Counter()
    for piece in pieces:
        counts.update(findall(piece))
    return counts


def _learn_merges(chunk_counts: Counter[str], n_merges: int, min_vocab: int) -> list[Pair]:
    """Byte-level BPE over unique chunks weighted by frequency, updated locally after each merge.

    State: each chunk as a list of token ids; `counts[pair]` = weighted occurrences; `where[pair]` = chunks
    that may contain it (a superset: entries go stale rather than being removed). A max-heap of
    (-count, pair) picks the best pair; counts only grow for pairs containing the newly made token, which
    are pushed afresh, while entries of pairs whose count shrank are fixed when they surface (lazy
    invalidation). Ties go to the smallest pair of ids, so the result depends on the text alone.
    """
    words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]
    freqs = list(chunk_counts.values())
    counts: dict[Pair, int] = {}
    where: dict[Pair, set[int]] = {}
    for idx, (w, f) in enumerate(zip(words, freqs)):
        for pair in zip(w, w[1:]):
            counts[pair] = counts.get(pair, 0) + f
            where.setdefault(pair, set()).add(idx)
    heap = [(-c, pair) for pair, c in counts.items()]
    heapq.heapify(heap)
    token_bytes = [bytes([i]) for i in range(256)]
    known_bytes = set(token_bytes)

    merges: list[Pair] = []
    while len(merges) < n_merges:
        pair = _pop_best(heap, counts)
        if pair is None:
            most = min_vocab + len(merges)
            raise UserError(
                f"vocab_size {min_vocab + n_merges} is more than this text supports: it runs out of pairs to "
                f"merge at {most} tokens; use a vocab_size <= {most} or train on more text"
            )
        a, b = pair
        merged = token_bytes[a] + token_bytes[b]
        if merged in known_bytes:
            # Two merge paths spelling the same bytes would give tiktoken one token two ranks. Not seen even
            # on adversarial texts, but skip such a pair for good: its count only shrinks from here on.
            counts[pair] = 0
            continue
        new = len(token_bytes)
        token_bytes.append(merged)
        known_bytes.add(merged)
        merges.append(pair)
        new_pairs = _apply_merge(pair, new, where.pop(pair), words, freqs, counts, where)
        for q in new_pairs:
            heapq.heappush(heap, (-counts[q], q))
    return merges


def _pop_best(heap: list[tuple[int, Pair]], counts: dict[Pair, int]) -> Pair | None:
    """The pair with the highest count (smallest ids on ties), or None when no pair is left."""
    while heap:
        neg, pair = heapq.heappop(heap)
        c = counts.get(pair, 0)
        if c == -neg:
            return pair
        if c > 0:  # stale entry: its count shrank since it was pushed
            heapq.heappush(heap, (-c, pair))
    return None


def _apply_merge(
    pair: Pair,
    new: int,
    chunk_ids: set[int],
    words: list[list[int]],
    freqs: list[int],
    counts: dict[Pair, int],
    where: dict[Pair, set[int]],
) -> set[Pair]:
    """Replace `pair` by `new` in the given chunks (left to right), updating the pair counts of those chunks
    only. Returns the pairs that contain `new` (the only ones whose counts grew)."""
    a, b = pair
    new_pairs: set[Pair] = set()
    for idx in chunk_ids:
        w = words[idx]
        n = len(w)
        out: list[int] = []
        i = 0
        while i < n:
            if w[i] == a and i + 1 < n and w[i + 1] == b:
                out.append(new)
                i += 2
            else:
                out.append(w[i])
                i += 1
        if len(out) == n:  # stale `where` entry: the pair left this chunk in an earlier merge
            continue
        f = freqs[idx]
        for q in zip(w, w[1:]):
            counts[q] -= f
        for q in zip(out, out[1:]):
            counts[q] = counts.get(q, 0) + f
            if new in q:
                new_pairs.add(q)
                where.setdefault(q, set()).add(idx)
        words[idx] = out
    del counts[pair]  # every occurrence was merged, so its count is now 0
    return new_pairs


class BPETokenizer(_TiktokenBacked):
    """Byte-level BPE: ids 0-255 are the bytes, then one id per merge, then the special tokens.

    Train with `BPETokenizer.train(text, vocab_size)`. Encoding and decoding run in tiktoken: the ranks
    (token bytes in id order) become a `tiktoken.Encoding`. tiktoken merges the adjacent pair whose bytes
    have the lowest rank, which equals applying the merges in training order because every merged token
    ranks after its parts. Every string round-trips: all 256 bytes are tokens. The tokenizer's special
    tokens are recognised in text (see `_TiktokenBacked`).
    """

    kind = "bpe"

    def __init__(
        self,
        ranks: list[bytes],
        pattern: str = "gpt2",
        special_tokens: dict[str, int] | None = None,
        merges: list[Pair] | None = None,
    ):
        if ranks[:256] != [bytes([i]) for i in range(256)] or len(set(ranks)) != len(ranks):
            raise UserError("invalid BPE ranks: the first 256 must be the single bytes in order, all unique")
        specials = special_tokens if special_tokens is not None else {}
        if sorted(specials.values()) != list(range(len(ranks), len(ranks) + len(specials))):
            raise UserError(f"special token ids must follow the {len(ranks)} ranks, got {specials}")
        self.pattern = PATTERNS.get(pattern, pattern)
        self.ranks = list(ranks)
        self.special_tokens = dict(specials)
        self.merges = merges  # (left id, right id) per merge, in rank order; known only after training
        try:
            self._enc = tiktoken.Encoding(
                "minigpt-bpe",
                pat_str=self.pattern,
                mergeable_ranks={tok: rank for rank, tok in enumerate(self.ranks)},
                special_tokens=self.special_tokens,
            )
        except ValueError as e:
            raise UserError(f"tiktoken rejects the pre-split pattern: {str(e).splitlines()[0]}") from None
        self._allowed = frozenset(self.special_tokens)
        self.vocab_size = len(self.ranks) + len(self.special_tokens)
        self.eot_token = self.special_tokens.get(ENDOFTEXT)

    @classmethod
    def train(
        cls,
        text: str,
        vocab_size: int,
        pattern: str = "gpt2",
        special_tokens: Iterable[str] = (ENDOFTEXT,),
    ) -> BPETokenizer:
        """Learn `vocab_size - 256 - len(special_tokens)` merges from `text`.

        `pattern`: "gpt2", "gpt4" or a pre-split regex in tiktoken's syntax. Special tokens get the last
        ids; their text in `text` only separates chunks.
        """
        specials = list(dict.fromkeys(special_tokens))
        if not all(isinstance(s, str) and s for s in specials):
            raise UserError(f"special tokens must be non-empty strings, got {specials}")
        min_vocab = 256 + len(specials)
        if vocab_size < min_vocab:
            raise UserError(
                f"vocab_size {vocab_size} is too small: byte-level BPE needs the 256 bytes plus "
                f"{len(specials)} special token(s); use a vocab_size >= {min_vocab}"
            )
        pattern = PATTERNS.get(pattern, pattern)
        chunk_counts = _count_chunks(_valid_utf8_text(text), pattern, specials)
        merges = _learn_merges(chunk_counts, vocab_size - min_vocab, min_vocab)
        ranks = [bytes([i]) for i in range(256)]
        for a, b in merges:
            ranks.append(ranks[a] + ranks[b])
        special_ids = {s: len(ranks) + i for i, s in enumerate(specials)}
        return cls(ranks, pattern, special_ids, merges=merges)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "pattern": self.pattern,
            "ranks": [base64.b64encode(tok).decode("ascii") for tok in self.ranks],
            "special_tokens": dict(self.special_tokens),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BPETokenizer:
        ranks = [base64.b64decode(s) for s in d["ranks"]]
        return cls(ranks, d["pattern"], {str(k): int(v) for k, v in d["special_tokens"].items()})


def tokenizer_from_dict(d: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer from its `to_dict()` form."""
    kind = d.get("kind")
    try:
        if kind == "char":
            return CharTokenizer(d["chars"])
        if kind == "tiktoken":
            return TiktokenTokenizer(d["name"])
        if kind == "bpe":
            return BPETokenizer.from_dict(d)
    except (KeyError, TypeError, ValueError) as e:  # ValueError covers bad base64 (binascii.Error)
        raise UserError(f"malformed {kind} tokenizer in metadata ({type(e).__name__}: {e})") from None
    raise UserError(f"unknown tokenizer kind {kind!r} in metadata; expected one of: char, tiktoken, bpe")
