"""Corpus resolution, prepare -> train.bin/val.bin/meta.json, and the batch sampler."""

from __future__ import annotations

import importlib.util
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from minigpt import data
from minigpt.data import BatchSampler, load_meta, load_tokens, prepare, resolve_corpus
from minigpt.errors import UserError
from minigpt.tokenizers import CharTokenizer, tokenizer_from_dict

REPO_ROOT = Path(__file__).resolve().parent.parent
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 20


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never download: any urlopen fails as it would offline, and the repo's data dir is hidden."""

    def offline(*args: Any, **kwargs: Any) -> Any:
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setattr(data, "DEFAULT_DATA_DIR", Path("/nonexistent/minigpt-test-data"))
    monkeypatch.setattr(data, "STDLIB_CORPUS_CHARS", 200_000)  # keep the fallback quick
    monkeypatch.delenv("MINIGPT_OFFLINE", raising=False)


# ---------------------------------------------------------------------------------------------
# resolve_corpus


def test_explicit_file_wins(tmp_path: Path) -> None:
    f = tmp_path / "corpus.txt"
    f.write_text("héllo wörld\n", encoding="utf-8")
    (tmp_path / "input.txt").write_text("the default file", encoding="utf-8")
    text, source = resolve_corpus(str(f), download_dir=tmp_path)
    assert text == "héllo wörld\n"
    assert str(f) in source


def test_default_input_txt_used_when_present(tmp_path: Path) -> None:
    (tmp_path / "input.txt").write_text("to be or not to be", encoding="utf-8")
    text, source = resolve_corpus(None, download_dir=tmp_path)
    assert text == "to be or not to be"
    assert "input.txt" in source


def test_utf8_bom_is_dropped(tmp_path: Path) -> None:
    f = tmp_path / "bom.txt"
    f.write_bytes(b"\xef\xbb\xbfabc")
    assert resolve_corpus(f)[0] == "abc"


@pytest.mark.parametrize(
    "setup, fragment",
    [
        (lambda p: None, "not found"),
        (lambda p: p.write_bytes(b""), "is empty"),
        (lambda p: p.write_bytes(b"abc\xffdef"), "byte offset 3"),
        (lambda p: p.mkdir(), "is a directory"),
    ],
    ids=["missing", "empty", "not-utf8", "directory"],
)
def test_bad_data_file(tmp_path: Path, setup: Any, fragment: str) -> None:
    path = tmp_path / "corpus.txt"
    setup(path)
    with pytest.raises(UserError, match=fragment) as info:
        resolve_corpus(path, download_dir=tmp_path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message


def test_offline_env_falls_back_to_stdlib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def must_not_download(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("MINIGPT_OFFLINE=1 must skip the download")

    monkeypatch.setattr(urllib.request, "urlopen", must_not_download)
    monkeypatch.setenv("MINIGPT_OFFLINE", "1")
    text, source = resolve_corpus(None, download_dir=tmp_path)
    err = capsys.readouterr().err
    assert "standard-library" in source
    assert len(text) >= 200_000 and "def " in text
    assert err.count("\n") == 1 and "--data FILE" in err and "MINIGPT_OFFLINE" in err
    assert resolve_corpus(None, download_dir=tmp_path)[0] == text  # deterministic
    assert not (tmp_path / "input.txt").exists()


def test_failed_download_falls_back(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text, source = resolve_corpus(None, download_dir=tmp_path)  # urlopen fails (fixture)
    assert "standard-library" in source and text
    assert "download failed" in capsys.readouterr().err


def test_download_is_saved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeResponse:
        def __enter__(self) -> FakeResponse:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def read(self) -> bytes:
            return TEXT.encode("utf-8")

    calls: list[str] = []

    def fake_urlopen(url: str, timeout: float) -> FakeResponse:
        calls.append(url)
        assert timeout <= 10
        return FakeResponse()

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    target = tmp_path / "shakespeare"
    text, source = resolve_corpus(None, download_dir=target)
    assert text == TEXT and calls == [data.SHAKESPEARE_URL]
    assert (target / "input.txt").read_text(encoding="utf-8") == TEXT
    assert "downloaded" in source
    # The second call finds the saved file and does not download again.
    assert resolve_corpus(None, download_dir=target)[0] == TEXT and len(calls) == 1


# ---------------------------------------------------------------------------------------------
# prepare / load


def test_prepare_round_trip(tmp_path: Path) -> None:
    tok = CharTokenizer.from_text(TEXT)
    meta = prepare(TEXT, tok, tmp_path)
    assert meta == load_meta(tmp_path)
    assert json.loads((tmp_path / "meta.json").read_text())["dtype"] == "uint16"
    train, val = load_tokens(tmp_path, "train"), load_tokens(tmp_path, "val")
    assert isinstance(train, np.memmap) and train.dtype == np.uint16
    assert len(train) == meta["train_tokens"] and len(val) == meta["val_tokens"]
    assert meta["train_chars"] == int(len(TEXT) * 0.9)
    assert meta["train_chars"] + meta["val_chars"] == len(TEXT)
    tok2 = tokenizer_from_dict(meta["tokenizer"])
    assert tok2.decode(train) + tok2.decode(val) == TEXT
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json", "train.bin", "val.bin"]  # no temps


class BigVocabTokenizer:
    """A stand-in tokenizer whose vocabulary needs uint32 ids."""

    vocab_size = 70_000
    eot_token = None

    def encode(self, text: str) -> list[int]:
        return [69_999 - ord(c) for c in text]  # ids above 65535

    def decode(self, ids: Any) -> str:
        return "".join(chr(69_999 - int(i)) for i in ids)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "fake"}


def test_large_vocab_uses_uint32(tmp_path: Path) -> None:
    tok = BigVocabTokenizer()
    meta = prepare("abcdefghij", tok, tmp_path)  # type: ignore[arg-type]
    assert meta["dtype"] == "uint32"
    ids = np.concatenate([load_tokens(tmp_path, "train"), load_tokens(tmp_path, "val")])
    assert ids.dtype == np.uint32 and ids.max() > 65535
    assert tok.decode(ids) == "abcdefghij"


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="meta.json not found"):
        load_tokens(tmp_path, "train")
    prepare(TEXT, CharTokenizer.from_text(TEXT), tmp_path)
    with pytest.raises(UserError, match="unknown split"):
        load_tokens(tmp_path, "test")
    (tmp_path / "val.bin").write_bytes(b"\x00\x01\x02")  # stale/truncated
    with pytest.raises(UserError, match="does not match meta.json"):
        load_tokens(tmp_path, "val")
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read"):
        load_meta(tmp_path)


def test_prepare_script(tmp_path: Path, run_main: Any) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "out"
    spec = importlib.util.spec_from_file_location(
        "shakespeare_char_prepare", REPO_ROOT / "data" / "shakespeare_char" / "prepare.py"
    )
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    run = run_main(script.main, "--data", corpus, "--out-dir", out, cwd=REPO_ROOT)
    assert run.returncode == 0, run.stderr
    assert "vocab size" in run.stdout
    assert load_meta(out)["train_chars"] + load_meta(out)["val_chars"] == len(TEXT)

    bad = run_main(script.main, "--data", tmp_path / "missing.txt", "--out-dir", out, cwd=REPO_ROOT)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# BatchSampler


def test_sampler_shapes_and_shift() -> None:
    tokens = np.arange(1000, dtype=np.uint16)  # token value == position, so windows are ranges
    sampler = BatchSampler(tokens, batch_size=4, block_size=8, seed=0)
    x, y = sampler.next()
    assert x.shape == y.shape == (4, 8) and x.dtype == y.dtype == np.int64
    np.testing.assert_array_equal(y, x + 1)
    np.testing.assert_array_equal(x, x[:, :1] + np.arange(8))
    assert x.min() >= 0 and y.max() <= 999


def test_sampler_covers_last_token() -> None:
    tokens = np.arange(10, dtype=np.uint16)
    sampler = BatchSampler(tokens, batch_size=64, block_size=9, seed=1)  # only one window fits
    x, y = sampler()
    np.testing.assert_array_equal(x, np.tile(np.arange(9), (64, 1)))
    np.testing.assert_array_equal(y, np.tile(np.arange(1, 10), (64, 1)))


def test_sampler_from_memmap(tmp_path: Path) -> None:
    prepare(TEXT, CharTokenizer.from_text(TEXT), tmp_path)
    train = load_tokens(tmp_path, "train")
    x, y = BatchSampler(train, 2, 16, seed=3, name="train")()
    assert type(x) is np.ndarray and x.shape == (2, 16)


def test_sampler_deterministic_and_resumable() -> None:
    tokens = np.random.default_rng(0).integers(0, 50, size=5000).astype(np.uint16)
    a = BatchSampler(tokens, 3, 5, seed=42)
    b = BatchSampler(tokens, 3, 5, seed=42)
    for _ in range(3):
        np.testing.assert_array_equal(a()[0], b()[0])
    state = json.loads(json.dumps(a.state()))  # survives a trip through JSON (a checkpoint's meta)
    expected = [a() for _ in range(4)]
    c = BatchSampler(tokens, 3, 5, seed=999)
    c.set_state(state)
    for ex, ey in expected:
        x, y = c()
        np.testing.assert_array_equal(x, ex)
        np.testing.assert_array_equal(y, ey)
    other = BatchSampler(tokens, 3, 5, seed=43)
    assert not np.array_equal(other()[0], BatchSampler(tokens, 3, 5, seed=42)()[0])


def test_sampler_bad_state() -> None:
    sampler = BatchSampler(np.arange(100), 2, 4)
    with pytest.raises(UserError, match="PCG64"):
        sampler.set_state({"bit_generator": "MT19937"})


def test_sampler_short_data() -> None:
    with pytest.raises(UserError) as info:
        BatchSampler(np.arange(64, dtype=np.uint16), batch_size=2, block_size=64, name="val")
    message = str(info.value)
    assert "64 tokens" in message and "65" in message and "--block-size" in message and "val" in message
    BatchSampler(np.arange(65, dtype=np.uint16), batch_size=2, block_size=64)  # just enough
