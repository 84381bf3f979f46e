"""Streaming corpus preparation (minigpt.prepare, scripts/prepare.py): chunked tokenization gives the
whole text's tokens, folders/globs are documents, interruption resumes, bad input is one line."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minigpt import prepare as prep
from minigpt.data import load_meta, load_tokens
from minigpt.errors import UserError
from minigpt.prepare import find_cut, plan_chunks, prepare_corpus
from minigpt.tokenizers import BPETokenizer, CharTokenizer, TiktokenTokenizer, tokenizer_from_dict

ROOT = Path(__file__).resolve().parents[1]

sys.path.insert(0, str(ROOT / "scripts"))
import prepare as prepare_cli  # noqa: E402  (scripts/prepare.py)
import train_gpt as train_script  # noqa: E402

# Indented lines, blank lines, trailing spaces, non-ASCII, digits and punctuation: every way a
# pre-tokenizer could join text across a newline.
LINES = [
    "First Citizen:\n",
    "    Before we proceed any further, hear me speak.  \n",
    "\n",
    "All:\tSpeak, speak.\n",
    "naïve café — 日本語のテキスト。 😀 123456 !!?\n",
    "  \n",
    "def f(x):\n",
    "    return x ** 2  # comment\n",
    "\n\n\n",
]
TEXT = "".join(LINES[i % len(LINES)] + ("" if i % 3 else f"line {i}\n") for i in range(600))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))
    return path


def tokens(out: Path) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(load_tokens(out, "train")), np.asarray(load_tokens(out, "val"))


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(TEXT, 300)


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_small_chunks_give_the_whole_texts_bpe_tokens(tmp_path, monkeypatch, pattern):
    tok = BPETokenizer.train(TEXT, 300, pattern=pattern)
    monkeypatch.setattr(prep, "build_corpus_tokenizer", lambda *a: tok)
    src = write(tmp_path / "in.txt", TEXT)
    meta = prepare_corpus(src, tmp_path / "out", "bpe", chunk_bytes=300, workers=1, quiet=True)
    train, val = tokens(tmp_path / "out")
    assert meta["inexact_cuts"] == 0
    cut = meta["train_chars"]
    assert train.tolist() == tok.encode(TEXT[:cut]) and val.tolist() == tok.encode(TEXT[cut:])
    assert np.concatenate([train, val]).tolist() == tok.encode(TEXT)  # the split itself is an exact cut
    assert meta["train_chars"] + meta["val_chars"] == len(TEXT)


def prepare_script(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """scripts/prepare.py in its own process (worker processes are forked from it, not from pytest)."""
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "prepare.py"), *argv, "--quiet"],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", **(env or {})},
    )


def test_gpt2_in_worker_processes_matches_tiktoken(tmp_path, tiktoken_cache):
    src = write(tmp_path / "in.txt", TEXT)
    args = (str(src), "--out-dir", str(tmp_path / "out"), "--tokenizer", "gpt2", "--chunk-mb", "0.002")
    args += ("--workers", "2")
    proc = prepare_script(*args, env={"TIKTOKEN_CACHE_DIR": str(tiktoken_cache)})
    assert proc.returncode == 0, proc.stderr
    meta = load_meta(tmp_path / "out")
    train, val = tokens(tmp_path / "out")
    assert meta["dtype"] == "uint16" and meta["tokenizer"] == {"kind": "tiktoken", "name": "gpt2"}
    assert np.concatenate([train, val]).tolist() == TiktokenTokenizer("gpt2").encode(TEXT)


def test_char_vocabulary_comes_from_a_streaming_pass(tmp_path):
    src = write(tmp_path / "in.txt", TEXT)
    proc = prepare_script(str(src), "--out-dir", str(tmp_path / "out"), "--chunk-mb", "0.0005", "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    meta = load_meta(tmp_path / "out")
    tok = tokenizer_from_dict(meta["tokenizer"])
    assert tok.to_dict() == CharTokenizer.from_text(TEXT).to_dict()
    train, val = tokens(tmp_path / "out")
    assert np.concatenate([train, val]).tolist() == tok.encode(TEXT)


def test_a_folder_is_sorted_documents_separated_by_end_of_text(tmp_path, bpe, monkeypatch):
    monkeypatch.setattr(prep, "build_corpus_tokenizer", lambda *a: bpe)
    docs = {"b/2.txt": "second document\n" * 50, "a.txt": "first document\n" * 50, "c.txt": "third\n" * 150}
    for name, text in docs.items():
        write(tmp_path / "corpus" / name, text)
    write(tmp_path / "corpus" / ".hidden", "never read\n")
    meta = prepare_corpus(tmp_path / "corpus", tmp_path / "out", "bpe", chunk_bytes=100, workers=1, quiet=True)
    order = ["a.txt", "b/2.txt", "c.txt"]
    assert [
        Path(s["path"]).relative_to((tmp_path / "corpus").resolve()).as_posix() for s in meta["fingerprint"]["sources"]
    ] == order
    ids = np.concatenate(tokens(tmp_path / "out")).tolist()
    eot = bpe.eot_token
    expected = bpe.encode(docs["a.txt"]) + [eot] + bpe.encode(docs["b/2.txt"]) + [eot] + bpe.encode(docs["c.txt"])
    # The val split starts inside c.txt at an exact cut, so concatenating the splits gives the documents.
    assert ids == expected
    # A glob names the same files.
    meta2 = prepare_corpus(str(tmp_path / "corpus" / "**" / "*.txt"), tmp_path / "out2", "bpe", workers=1, quiet=True)
    assert meta2["train_tokens"] + meta2["val_tokens"] == len(expected)


def test_an_interrupted_preparation_continues_where_it_stopped(tmp_path, monkeypatch):
    src = write(tmp_path / "in.txt", TEXT)
    reference = prepare_corpus(src, tmp_path / "ref", "char", chunk_bytes=400, workers=1, quiet=True)
    real_encode, calls = prep._encode, []

    def failing(chunk):
        calls.append(chunk)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real_encode(chunk)

    monkeypatch.setattr(prep, "_encode", failing)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus(src, out, "char", chunk_bytes=400, workers=1, quiet=True)
    progress = json.loads((out / prep.PROGRESS_FILE).read_text())
    assert progress["done"]["train"]["chunks"] == 6 and not (out / "meta.json").exists()
    with open(out / "train.bin.partial", "ab") as f:  # a chunk appended but not committed when it stopped
        f.write(b"\x01\x02\x03")
    monkeypatch.setattr(prep, "_encode", real_encode)
    log = io.StringIO()
    meta = prepare_corpus(src, out, "char", chunk_bytes=400, workers=1, log=lambda s: log.write(s))
    assert "continuing" in log.getvalue()
    assert meta == reference | {"fingerprint": meta["fingerprint"]}
    for a, b in zip(tokens(out), tokens(tmp_path / "ref")):
        assert np.array_equal(a, b)
    assert not (out / prep.PROGRESS_FILE).exists() and not list(out.glob("*.partial"))


def test_reruns_reuse_finished_output_and_never_overwrite_other_output(tmp_path):
    src = write(tmp_path / "in.txt", TEXT)
    out = tmp_path / "out"
    prepare_corpus(src, out, "char", workers=1, quiet=True)
    before = (out / "train.bin").stat().st_mtime_ns
    messages = []
    prepare_corpus(src, out, "char", workers=1, quiet=True, log=messages.append)
    assert "nothing to do" in messages[0] and (out / "train.bin").stat().st_mtime_ns == before
    other = write(tmp_path / "other.txt", TEXT.upper())
    with pytest.raises(UserError, match="--overwrite"):
        prepare_corpus(other, out, "char", workers=1, quiet=True)
    assert (out / "train.bin").stat().st_mtime_ns == before  # nothing saved is lost
    meta = prepare_corpus(other, out, "char", workers=1, quiet=True, overwrite=True)
    assert load_meta(out) == meta and "a" not in tokenizer_from_dict(meta["tokenizer"]).stoi


def test_exact_cuts_sit_between_non_whitespace_around_a_newline():
    data = b"abc  \n  def\n\nghi\nj\xc3\xa9\n\xe6\x97\xa5k"
    f = io.BytesIO(data)
    assert find_cut(f, 1, len(data)) == (data.index(b"ghi\nj") + 4, True)
    assert find_cut(f, data.index(b"j") + 1, len(data)) == (data.index(b"\xe6"), True)  # é before, 日 after
    assert find_cut(f, 0, len(data)) == (0, True) and find_cut(f, 99, len(data)) == (len(data), True)


def test_crlf_text_still_splits_and_counts_inexact_cuts(tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "SCAN_BYTES", 64)
    src = write(tmp_path / "in.txt", "line one\r\nline two\r\n" * 200)
    chunks, inexact = plan_chunks([src], 0.1, 100)
    assert inexact > 0
    assert all(a.end == b.start for a, b in zip(chunks["train"], chunks["train"][1:]))
    assert chunks["train"][-1].end == chunks["val"][0].start and chunks["val"][-1].end == src.stat().st_size
    one_line = write(tmp_path / "one.txt", "é" * 1000)  # no newline at all: cut at character boundaries
    chunks, _ = plan_chunks([one_line], 0.1, 99)
    for chunk in chunks["train"] + chunks["val"]:
        prep.read_chunk(chunk)  # each decodes: no character is cut in two


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: d / "missing.txt", "not found"),
        (lambda d: write(d / "bad.txt", "ok\n").with_name("bad.txt"), "not UTF-8"),
        (lambda d: write(d / "empty.txt", ""), "empty"),
        (lambda d: str(d / "nothing*.txt"), "matches no files"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, setup, message, run_main):
    src = setup(tmp_path)
    if Path(src).name == "bad.txt":
        Path(src).write_bytes(b"good text\n" * 10 + b"\xff\xfe bad\n" + b"more\n" * 50)
    proc = run_main(prepare_cli.main, str(src), "--out-dir", str(tmp_path / "o"), "--quiet")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and message in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------- train_gpt.py

TRAIN_ARGS = "--max-iters 2 --eval-interval 2 --eval-iters 1 --n-layer 1 --n-head 2 --n-embd 16 --block-size 8"
TRAIN_ARGS = [*TRAIN_ARGS.split(), "--batch-size", "2", "--quiet", "--no-plot", "--sample-tokens", "5"]


@pytest.fixture
def train_gpt(run_main, monkeypatch):
    """scripts/train_gpt.py with TRAIN_ARGS, run in this process."""
    monkeypatch.setenv("MINIGPT_NUM_THREADS", "1")
    return lambda *argv: run_main(train_script.main, *argv, *TRAIN_ARGS)


def test_train_gpt_trains_on_a_prepared_directory_without_the_text(tmp_path, train_gpt):
    src = write(tmp_path / "in.txt", TEXT)
    prepare_corpus(src, tmp_path / "tokens", "char", workers=1, quiet=True)
    src.unlink()  # the text is gone: only the token files remain
    proc = train_gpt("--data-dir", str(tmp_path / "tokens"), "--out-dir", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    from minigpt.checkpoint import load_checkpoint

    _, _, meta = load_checkpoint(tmp_path / "out" / "last.npz")
    assert meta["tokenizer"] == load_meta(tmp_path / "tokens")["tokenizer"] and meta["step"] == 2
    assert not (tmp_path / "out" / "data").exists()  # nothing was re-tokenized


def test_train_gpt_data_streams_a_folder_and_reuses_its_tokens(tmp_path, train_gpt):
    write(tmp_path / "corpus" / "a.txt", TEXT)
    write(tmp_path / "corpus" / "b.txt", TEXT.upper())
    out = tmp_path / "out"
    assert train_gpt("--data", str(tmp_path / "corpus"), "--out-dir", str(out)).returncode == 0
    stamp = (out / "data" / "train.bin").stat().st_mtime_ns
    proc = train_gpt("--data", str(tmp_path / "corpus"), "--out-dir", str(out), "--resume")
    assert proc.returncode == 0, proc.stderr
    assert (out / "data" / "train.bin").stat().st_mtime_ns == stamp  # --resume reused the token files


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--tokenizer", "bpe"], "holds tokens from the char tokenizer, not bpe"),
        (["--data", "x.txt"], "--data and --data-dir both given"),
    ],
)
def test_train_gpt_data_dir_bad_input_is_one_line(tmp_path, flags, message, train_gpt):
    prepare_corpus(write(tmp_path / "in.txt", TEXT), tmp_path / "tokens", "char", workers=1, quiet=True)
    proc = train_gpt("--data-dir", str(tmp_path / "tokens"), "--out-dir", str(tmp_path / "out"), *flags)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "out" / "last.npz").exists()
