"""Tokenizers: char, tiktoken (GPT-2 from the shared offline cache, CI only) and our own byte-level BPE."""

from __future__ import annotations

import json
import os
import re
import string
import subprocess
import sys
from pathlib import Path

import pytest
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minigpt.errors import UserError
from minigpt.tokenizers import (
    ENDOFTEXT,
    GPT2_PATTERN,
    BPETokenizer,
    CharTokenizer,
    TiktokenTokenizer,
    compile_pattern,
    padded_vocab_size,
    tiktoken_files,
    tokenizer_from_dict,
)

REPO = Path(__file__).resolve().parents[1]
PARAGRAPH = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n\n"
    "First Citizen:\nFirst, you know Caius Marcius is chief enemy to the people.\n\n"
    "All:\nWe know't, we know't.\n\nFirst Citizen:\nLet us kill him, and we'll have corn at our own price.\n"
    "Is't a verdict?\n\nAll:\nNo more talking on't; let it be done: away, away!\n\n"
    "Second Citizen:\nOne word, good citizens. It's 1,234 miles; they'll pay 56 pence in 1600 AD.\n"
)


@pytest.fixture(scope="module")
def bpe(corpus: str) -> BPETokenizer:
    return BPETokenizer.train(corpus[:50_000], 400)


def reference_encode(tok: BPETokenizer, text: str) -> list[int]:
    """Plain BPE: cut out special tokens, split with the pattern, then apply the merges in training order."""
    assert tok.merges is not None
    rank = {pair: 256 + i for i, pair in enumerate(tok.merges)}
    specials = tok.special_tokens
    pieces = re.split("(" + "|".join(map(re.escape, specials)) + ")", text) if specials else [text]
    ids: list[int] = []
    for piece in pieces:
        if piece in specials:
            ids.append(specials[piece])
            continue
        for chunk in compile_pattern(tok.pattern).findall(piece):
            ids += _merge_chunk(list(chunk.encode("utf-8")), tok.merges, rank)
    return ids


def _merge_chunk(word: list[int], merges: list[tuple[int, int]], rank: dict[tuple[int, int], int]) -> list[int]:
    while len(word) > 1:
        best = min(rank.get(pair, sys.maxsize) for pair in zip(word, word[1:]))
        if best == sys.maxsize:
            return word
        a, b = merges[best - 256]
        out, i = [], 0
        while i < len(word):
            if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                out.append(best)
                i += 2
            else:
                out.append(word[i])
                i += 1
        word = out
    return word


# ---- char ----


def test_char_round_trip_and_vocab() -> None:
    tok = CharTokenizer.from_text("hello world\n")
    assert tok.vocab_size == 9 and tok.chars[0] == "\n"
    assert tok.decode(tok.encode("hello\nworld")) == "hello\nworld"
    assert tok.eot_token is None


def test_char_unknown_characters_are_listed() -> None:
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(UserError, match=r"2 character\(s\) not in the vocabulary: 'x', 'z'"):
        tok.encode("abxcz")


# ---- tiktoken ----


def test_padded_vocab_size() -> None:
    assert padded_vocab_size(50257) == 50304
    assert padded_vocab_size(64) == 64 and padded_vocab_size(65) == 128
    assert padded_vocab_size(300, multiple=8) == 304


def test_gpt2_known_ids(tiktoken_cache: Path) -> None:
    assert {key for key, _ in tiktoken_files("gpt2")} <= {f.name for f in tiktoken_cache.iterdir()}
    tok = TiktokenTokenizer("gpt2")
    assert tok.encode("Hello world") == [15496, 995]
    assert (tok.vocab_size, tok.eot_token) == (50257, 50256)
    # The end-of-text marker becomes its id; other special-token text is plain text, never an error.
    assert tok.encode(f"a{ENDOFTEXT}") == [64, 50256]
    text = f"x{ENDOFTEXT}<|fim_prefix|> é 中"
    assert tok.decode(tok.encode(text)) == text


def test_tiktoken_missing_files_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import requests

    def offline_get(url: str, **kwargs: object) -> None:
        assert kwargs.get("timeout"), "downloads must not wait forever"
        raise requests.ConnectionError("no network")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(requests, "get", offline_get)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # forget encodings loaded by other tests
    with pytest.raises(UserError, match="set TIKTOKEN_CACHE_DIR") as e:
        TiktokenTokenizer("gpt2")
    message = str(e.value)
    assert "\n" not in message and str(tmp_path) in message and "shared" not in message
    # the exact files (tiktoken names them by the SHA-1 of their URL) and the command that fetches them
    assert "6d1cbeee0f20b3d9449abfede4726ed8212e3aee (vocab.bpe)" in message
    assert "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6 (encoder.json)" in message
    assert "tiktoken.get_encoding('gpt2')" in message
    with pytest.raises(UserError, match="unknown tiktoken encoding 'nope'"):
        TiktokenTokenizer("nope")


# ---- BPE ----

# Building blocks for hard strings: emoji (multi-codepoint too), scripts, combining marks, whitespace runs.
_EMOJI = ["😀", "👩\u200d👩\u200d👧", "🇫🇷", "\U0010ffff"]
_SCRIPTS = ["中文", "漢字かなカナ", "한국어", "Ωμέγα", "Привет", "Hello", " world", "123", "4567", "'s", "'LL"]
_MARKS = ["e\u0301", "\u0301\u0308", "\ufeff", "\x00"]
_SPACES = [" ", "   ", "\t", "\n", "\r\n", " \n\n  ", "\u00a0", "\u3000"]
_PIECES = st.sampled_from([*_EMOJI, *_SCRIPTS, *_MARKS, *_SPACES, ENDOFTEXT, "<|"])
_TEXTS = st.one_of(st.text(), st.lists(st.one_of(_PIECES, st.text(max_size=3)), max_size=30).map("".join))


@pytest.fixture(scope="module")
def multilingual_bpe() -> BPETokenizer:
    """Trained on multi-byte text, so some tokens hold parts of UTF-8 characters."""
    text = (PARAGRAPH + "".join(_EMOJI + _SCRIPTS + _MARKS + _SPACES) + "🙂🙃 مرحبا नमस्ते\n") * 20
    return BPETokenizer.train(text, 400, pattern="gpt4")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_TEXTS)
def test_bpe_round_trip(bpe: BPETokenizer, multilingual_bpe: BPETokenizer, text: str) -> None:
    for tok in (bpe, multilingual_bpe):
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_bpe_round_trip_edge_cases(bpe: BPETokenizer, multilingual_bpe: BPETokenizer) -> None:
    # Some merged tokens hold only part of a UTF-8 character; decoding still joins them correctly.
    assert any(not _is_utf8(r) for r in multilingual_bpe.ranks[256:])
    for text in ["", " ", "\n" * 50, " " * 1000, "e\u0301" * 10, "😀" * 5, f"{ENDOFTEXT}{ENDOFTEXT}"]:
        assert bpe.decode(bpe.encode(text)) == text
        assert multilingual_bpe.decode(multilingual_bpe.encode(text)) == text
    assert bpe.encode(ENDOFTEXT) == [bpe.eot_token] and bpe.eot_token == bpe.vocab_size - 1


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_tiktoken_agrees_with_reference_encoder(corpus: str, pattern: str) -> None:
    tok = BPETokenizer.train(corpus[:50_000], 440, pattern=pattern)
    assert len(tok.merges or []) == 440 - 257
    for text in (corpus[:50_000], corpus[50_000:]):  # seen and unseen text
        assert tok.encode(text) == reference_encode(tok, text)
    assert len(tok.encode(corpus)) < 0.7 * len(corpus.encode("utf-8"))  # it does compress


def test_bpe_on_shakespeare_agrees_with_reference_encoder(shakespeare: str) -> None:
    tok = BPETokenizer.train(shakespeare[:100_000], 512)
    unseen = shakespeare[100_000:200_000]
    assert tok.encode(unseen) == reference_encode(tok, unseen)
    assert len(tok.encode(unseen)) < 0.6 * len(unseen.encode("utf-8"))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    text=st.text(alphabet=string.printable, max_size=200)
    | st.lists(st.sampled_from(_SCRIPTS + _SPACES + [ENDOFTEXT])).map("".join)
)
def test_tiktoken_agrees_with_reference_on_random_text(bpe: BPETokenizer, text: str) -> None:
    assert bpe.encode(text) == reference_encode(bpe, text)


def test_training_is_deterministic(corpus: str, bpe: BPETokenizer) -> None:
    again = BPETokenizer.train(corpus[:50_000], 400)
    assert again.ranks == bpe.ranks and again.merges == bpe.merges
    # Also across processes with different string hashing (set/dict order must not leak into ties).
    code = (
        "import sys, hashlib; from minigpt.tokenizers import BPETokenizer; "
        "t = BPETokenizer.train(sys.stdin.read(), 400); print(hashlib.sha256(b''.join(t.ranks)).hexdigest())"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", code],
            input=corpus[:20_000],
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout
        for seed in ("1", "2")
    }
    assert len(digests) == 1


def test_special_token_text_is_not_merged_into(corpus: str) -> None:
    tok = BPETokenizer.train((corpus[:5_000] + ENDOFTEXT) * 4, 400)
    assert not any(b"<|" in r or b"|>" in r for r in tok.ranks)
    assert tok.special_tokens == {ENDOFTEXT: 399}


def test_bpe_vocab_size_errors() -> None:
    with pytest.raises(UserError, match=r"vocab_size 200 is too small.*>= 257"):
        BPETokenizer.train("hello", 200)
    with pytest.raises(UserError, match=r">= 256"):
        BPETokenizer.train("hello", 255, special_tokens=())
    with pytest.raises(UserError, match="non-empty"):
        BPETokenizer.train("hello", 300, special_tokens=("",))
    # "abab abab": pairs ab, abab... run out after a handful of merges.
    with pytest.raises(UserError, match=r"vocab_size 1000 is more than this text supports.*<= 26[0-9]"):
        BPETokenizer.train("abab abab", 1000)


def test_bpe_custom_pattern_and_bad_pattern() -> None:
    tok = BPETokenizer.train("aaa bbb aaa bbb", 260, pattern=r"\S+|\s+", special_tokens=())
    assert tok.decode(tok.encode("aaab bba")) == "aaab bba"
    with pytest.raises(UserError):
        BPETokenizer.train("hello", 300, pattern=r"\p{Bogus}")


# ---- JSON round trips ----


def _json_round_trip(tok: object) -> object:
    d = tok.to_dict()  # type: ignore[attr-defined]
    return tokenizer_from_dict(json.loads(json.dumps(d)))


def test_to_dict_round_trip_char_and_bpe(bpe: BPETokenizer) -> None:
    char = CharTokenizer.from_text("hello world")
    again = _json_round_trip(char)
    assert isinstance(again, CharTokenizer) and again.chars == char.chars

    back = _json_round_trip(bpe)
    assert isinstance(back, BPETokenizer)
    assert back.ranks == bpe.ranks and back.special_tokens == bpe.special_tokens
    assert (back.vocab_size, back.eot_token) == (bpe.vocab_size, bpe.eot_token)
    text = f"To be, or not to be{ENDOFTEXT} 😀"
    assert back.encode(text) == bpe.encode(text)
    d = bpe.to_dict()
    assert set(d) == {"kind", "pattern", "ranks", "special_tokens"} and d["pattern"] == GPT2_PATTERN
    assert d["ranks"][:2] == ["AA==", "AQ=="]  # base64 of bytes 0 and 1, in rank order


def test_to_dict_round_trip_tiktoken(tiktoken_cache: Path) -> None:
    tok = TiktokenTokenizer("gpt2")
    assert tok.to_dict() == {"kind": "tiktoken", "name": "gpt2"}
    back = _json_round_trip(tok)
    assert isinstance(back, TiktokenTokenizer) and back.encode("Hello world") == [15496, 995]


def test_from_dict_errors() -> None:
    with pytest.raises(UserError, match="unknown tokenizer kind 'sentencepiece'"):
        tokenizer_from_dict({"kind": "sentencepiece"})
    with pytest.raises(UserError, match="malformed bpe tokenizer"):
        tokenizer_from_dict({"kind": "bpe", "pattern": "gpt2"})
