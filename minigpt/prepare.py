"""Prepare a corpus of any size: text files -> train.bin/val.bin + meta.json, in chunks, in parallel.

    meta = prepare_corpus("corpus/", "data/mycorpus", "gpt2")   # a file, a folder or a glob

Memory stays bounded by the chunk size, not the corpus: files are read in byte ranges of about
`chunk_bytes`, each range is decoded and tokenized by a worker process (tiktoken's Rust encoder for
BPE; a code-point lookup table for characters, after a streaming first pass that collects the
alphabet), and the parent appends the ids to the split's token file in order.

Chunk boundaries do not change the tokens. A cut is made only just after a newline that sits between
two non-whitespace characters ("...x\\nY..."). No pre-tokenizer pattern we use (GPT-2's, GPT-4's) joins
a newline to a following non-whitespace character or a non-whitespace character to a following
newline run that could continue, so the text on either side splits into the same pieces as the whole
text would, and BPE never merges across pieces. Where no such newline occurs within `SCAN_BYTES`
(CRLF files, one giant line) the cut falls after any newline or, failing that, at a character
boundary; those few cuts may tokenize differently from the whole text and are counted in meta.json
(`inexact_cuts`). Files are separate documents: each file after the first in a split starts with the
tokenizer's end-of-text token when it has one (GPT-2, our BPE); characters are simply concatenated.
The train/val split is the first (1 - val_fraction) of the corpus's bytes, moved to such a cut.

Interruption: ids are appended to `<split>.bin.partial` and `prepare.progress.json` records, after
each chunk, how many chunks and bytes are safely on disk. A rerun with the same sources and settings
truncates the partial file to the recorded length and continues with the next chunk; meta.json is
written last, so its presence means the token files are complete.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from minigpt.data import META_FILE, SPLITS, atomic_write, load_meta, token_dtype
from minigpt.errors import UserError
from minigpt.tokenizers import BPETokenizer, CharTokenizer, TiktokenTokenizer, Tokenizer, tokenizer_from_dict

CHUNK_BYTES = 8 << 20  # text per task: ~8 MB keeps a worker near 100 MB and the pool busy
SCAN_BYTES = 1 << 20  # how far past the nominal end a chunk may grow to find an exact cut
BPE_TRAIN_BYTES = 4 << 20  # our BPE learns its merges from this much of the training split's start
CHAR_SLICE = 1 << 20  # characters looked up at a time by the character tokenizer
PARALLEL_MIN_BYTES = 32 << 20  # below this much text, worker processes cost more than they save
MAX_DEFAULT_WORKERS = 8  # each worker holds ~10x a chunk at its peak: 8 keep the whole under 1 GB
PROGRESS_FILE = "prepare.progress.json"
TOKENIZER_CHOICES = ("char", "bpe", "gpt2")
# Unicode White_Space (what `\s` means in tiktoken's regex): a cut needs a non-member on each side.
_WHITE_SPACE = frozenset([*range(0x09, 0x0E), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B)]) | frozenset(
    [0x2028, 0x2029, 0x202F, 0x205F, 0x3000]
)
_BOM = b"\xef\xbb\xbf"
_MAX_CODE_POINT = 0x10FFFF


# ---------------------------------------------------------------------------------------------
# Sources and chunks


def find_sources(source: str | os.PathLike[str] | list[str]) -> list[Path]:
    """The text files `source` names: a file, a folder (every non-hidden file below it) or a glob; sorted."""
    if isinstance(source, list):
        return [p for s in source for p in find_sources(s)]
    text = str(source)
    path = Path(text)
    if path.is_file():
        return [path]
    if path.is_dir():
        found = [
            Path(root) / name
            for root, dirs, names in os.walk(path)
            for name in names
            if not name.startswith(".") and not any(part.startswith(".") for part in Path(root).relative_to(path).parts)
        ]
        files = sorted(p for p in found if p.is_file())
        if not files:
            raise UserError(f"{path} holds no files; point --data at a text file, a folder of them or a glob")
        return files
    if glob.has_magic(text):
        files = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
        if not files:
            raise UserError(f"the pattern {text!r} matches no files")
        return files
    raise UserError(f"{text} not found; point --data at a text file, a folder of text files or a glob")


@dataclass(frozen=True)
class Chunk:
    """A byte range of one file, tokenized as one unit. `eot_first`: start with the end-of-text token."""

    path: str
    start: int
    end: int
    eot_first: bool = False


def _is_space(char: str) -> bool:
    return ord(char) in _WHITE_SPACE


def _char_at(buf: bytes, i: int, forward: bool) -> str | None:
    """The character starting at byte i (forward) or ending at byte i-1 (backward) of UTF-8 `buf`."""
    if forward:
        for n in range(1, 5):
            with contextlib.suppress(UnicodeDecodeError):
                return buf[i : i + n].decode("utf-8")
        return None
    for n in range(1, 5):
        if i - n >= 0:
            with contextlib.suppress(UnicodeDecodeError):
                return buf[i - n : i].decode("utf-8")
    return None


def find_cut(f: Any, pos: int, size: int, *, end_ok: bool = True, anywhere: bool = False) -> tuple[int, bool]:
    """The chunk boundary at or after byte `pos` of the open file `f`, at most `size`: (offset, exact).

    Exact: just after a newline between two non-whitespace characters (see the module docstring), or
    `size` itself (the end of the file or of a split). Otherwise just after any newline, or at the next
    character boundary, when no exact cut lies within SCAN_BYTES. `end_ok=False`: `size` only if
    nothing else is left (the train/val split wants a cut near `pos`, not the end of a short file).
    `anywhere`: every character boundary is exact (a character vocabulary has no pieces to cut).
    """
    if pos <= 0 or pos >= size:
        return min(max(pos, 0), size), True
    if anywhere:
        f.seek(pos)
        head = f.read(4)
        skip = next((i for i, b in enumerate(head) if not 0x80 <= b < 0xC0), len(head))
        return min(pos + skip, size), True
    base = max(pos - 4, 0)  # a few bytes back: the character before a newline at pos - 1
    limit = min(pos + SCAN_BYTES, size)  # cuts considered up to here
    f.seek(base)
    buf = f.read(limit - base + 4)  # + the character after a newline at the limit
    first = pos - base - 1  # a newline here gives the cut `pos`
    nl = buf.find(b"\n", first)
    while 0 <= nl and base + nl + 1 <= limit:
        before, after = _char_at(buf, nl, forward=False), _char_at(buf, nl + 1, forward=True)
        if before and after and not _is_space(before) and not _is_space(after):
            return base + nl + 1, True
        nl = buf.find(b"\n", nl + 1)
    if limit == size and end_ok:
        return size, True
    nl = buf.find(b"\n", first)
    if 0 <= nl and base + nl + 1 <= limit:
        return base + nl + 1, False
    cut = pos - base
    while cut < len(buf) and 0x80 <= buf[cut] < 0xC0:  # UTF-8 continuation bytes: not a boundary
        cut += 1
    return base + cut, False


def plan_chunks(
    files: list[Path], val_fraction: float, chunk_bytes: int, anywhere: bool = False
) -> tuple[dict[str, list[Chunk]], int]:
    """Split the corpus into train and val chunks; return them and the number of inexact cuts.

    `anywhere`: cut at any character boundary (for a character vocabulary), else see `find_cut`.
    """
    sizes = [p.stat().st_size for p in files]
    total = sum(sizes)
    if total == 0:
        raise UserError("the corpus is empty; supply text files with some text")
    # The split: the first (1 - val_fraction) of the bytes, moved to a cut. val starts at (file, offset).
    split_at, inexact = int(total * (1.0 - val_fraction)), 0
    val_file, val_offset, offset = len(files), 0, 0
    for index, size in enumerate(sizes):
        if offset <= split_at < offset + size:
            with open(files[index], "rb") as f:
                last_file = index + 1 == len(files)
                val_offset, exact = find_cut(f, split_at - offset, size, end_ok=not last_file, anywhere=anywhere)
            inexact += not exact
            val_file = index if val_offset < size else index + 1
            val_offset = val_offset if val_offset < size else 0
            break
        offset += size
    chunks: dict[str, list[Chunk]] = {split: [] for split in SPLITS}
    for index, (path, size) in enumerate(zip(files, sizes)):
        with open(path, "rb") as f:
            begin = len(_BOM) if f.read(len(_BOM)) == _BOM else 0
            if index < val_file:
                segments = [("train", begin, size)]
            elif index == val_file:
                segments = [("train", begin, max(val_offset, begin)), ("val", max(val_offset, begin), size)]
            else:
                segments = [("val", begin, size)]
            for split, start, stop in segments:
                eot = start == begin and bool(chunks[split])  # a new document after others in this split
                while start < stop:
                    end, exact = find_cut(f, start + chunk_bytes, stop, anywhere=anywhere)
                    inexact += not exact
                    chunks[split].append(Chunk(str(path), start, end, eot))
                    start, eot = end, False
    if not chunks["train"] or not chunks["val"]:
        raise UserError(
            f"the corpus ({total:,} bytes) is too small to split into training and validation text "
            f"(val_fraction {val_fraction}); supply more text"
        )
    return chunks, inexact


def read_chunk(chunk: Chunk) -> str:
    """The chunk's text, with a one-line error naming the file and offset if it is not UTF-8."""
    try:
        with open(chunk.path, "rb") as f:
            f.seek(chunk.start)
            raw = f.read(chunk.end - chunk.start)
    except OSError as e:
        raise UserError(f"cannot read {chunk.path}: {e.strerror or e}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        at = chunk.start + e.start
        raise UserError(
            f"{chunk.path} is not UTF-8 text: byte 0x{raw[e.start]:02x} at byte offset {at} is invalid; "
            "convert the file to UTF-8 or leave it out"
        ) from None


# ---------------------------------------------------------------------------------------------
# Work done in the worker processes (module-level functions, so a spawned process can import them)

_worker: dict[str, Any] = {}


def _init_worker(tokenizer: dict[str, Any] | None) -> None:
    _worker.clear()
    if tokenizer is None:
        return
    tok = tokenizer_from_dict(tokenizer)
    _worker["tokenizer"] = tok
    _worker["dtype"] = token_dtype(tok.vocab_size)
    if isinstance(tok, CharTokenizer):
        lut = np.full(_MAX_CODE_POINT + 1, -1, dtype=np.int32)
        lut[[ord(c) for c in tok.chars]] = np.arange(tok.vocab_size, dtype=np.int32)
        _worker["lut"] = lut


def _init_pool_worker(tokenizer: dict[str, Any] | None) -> None:
    # A forked worker inherits the command's SIGTERM handler (errors.sigterm_raises); it should just end.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _init_worker(tokenizer)


def _code_points(text: str) -> Iterator[np.ndarray]:
    """The text's code points as uint32 arrays, a slice at a time (a whole chunk would take 4 bytes a character)."""
    for i in range(0, len(text), CHAR_SLICE):
        yield np.frombuffer(text[i : i + CHAR_SLICE].encode("utf-32-le"), dtype=np.uint32)


def _alphabet(chunk: Chunk) -> tuple[np.ndarray, int]:
    """The distinct code points of a chunk (the character vocabulary's first pass), and its size."""
    seen = np.zeros(_MAX_CODE_POINT + 1, dtype=bool)
    for codes in _code_points(read_chunk(chunk)):
        seen[codes] = True
    return np.flatnonzero(seen).astype(np.uint32), chunk.end - chunk.start


def _encode(chunk: Chunk) -> tuple[np.ndarray, int, int]:
    """A chunk's token ids in the output dtype, its character count and its byte count."""
    text = read_chunk(chunk)
    tok: Tokenizer = _worker["tokenizer"]
    dtype = _worker["dtype"]
    if "lut" in _worker:
        parts = [np.zeros(0, dtype)]
        for codes in _code_points(text):
            ids = _worker["lut"][codes]
            if ids.size and ids.min() < 0:
                missing = sorted({c for c in text if c not in tok.stoi})[:10]
                raise UserError(f"{chunk.path}: character(s) {missing} are not in the vocabulary; prepare again")
            parts.append(ids.astype(dtype))
        ids = np.concatenate(parts)
    else:
        ids = tok._enc.encode_to_numpy(text, allowed_special=tok._allowed, disallowed_special=())
    if chunk.eot_first and tok.eot_token is not None:
        ids = np.concatenate([np.array([tok.eot_token], dtype=ids.dtype), ids])
    return ids.astype(dtype, copy=False), len(text), chunk.end - chunk.start


@contextlib.contextmanager
def _pool(workers: int, tokenizer: dict[str, Any] | None) -> Iterator[Callable[..., Iterator[Any]]]:
    """A function mapping a worker function over tasks in order, at most 2 per worker in flight."""
    if workers <= 1:
        _init_worker(tokenizer)
        yield lambda fn, tasks: map(fn, tasks)
        return
    # fork where there is one: no `if __name__ == "__main__"` needed in a caller's script, no re-imports.
    # The workers touch only tiktoken and NumPy calls that use no BLAS/OpenMP threads, so a forked
    # copy of the parent's idle thread pools does no harm. Elsewhere (macOS, Windows): spawn.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    executor = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_pool_worker, initargs=(tokenizer,))

    def ordered_map(fn: Callable[[Chunk], Any], tasks: list[Chunk]) -> Iterator[Any]:
        pending: list[Future[Any]] = []
        queue = iter(tasks)
        for task in queue:
            pending.append(executor.submit(fn, task))
            if len(pending) >= 2 * workers:
                break
        while pending:
            result = pending.pop(0).result()
            task = next(queue, None)
            if task is not None:
                pending.append(executor.submit(fn, task))
            yield result

    try:
        yield ordered_map
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def default_workers() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, MAX_DEFAULT_WORKERS))


# ---------------------------------------------------------------------------------------------
# The prepare step


def _bar(total: int, desc: str, quiet: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=quiet, file=sys.stderr)


def build_corpus_tokenizer(
    name: str, chunks: dict[str, list[Chunk]], vocab_size: int, workers: int, quiet: bool
) -> Tokenizer:
    """The tokenizer for `name`: GPT-2's; characters from a streaming pass; our BPE from the train start."""
    if name == "gpt2":
        return TiktokenTokenizer("gpt2")
    if name == "char":
        chars = np.zeros(0, dtype=np.uint32)
        every = chunks["train"] + chunks["val"]
        with _pool(workers, None) as pmap, _bar(sum(c.end - c.start for c in every), "alphabet", quiet) as bar:
            for alphabet, n_bytes in pmap(_alphabet, every):
                chars = np.union1d(chars, alphabet)
                bar.update(n_bytes)
        return CharTokenizer(chr(c) for c in chars.tolist())
    if name == "bpe":
        sample, budget = [], BPE_TRAIN_BYTES
        for chunk in chunks["train"]:
            if budget <= 0:
                break
            piece = Chunk(chunk.path, chunk.start, chunk.end if chunk.end - chunk.start <= budget else chunk.start)
            if piece.end == piece.start:  # a first chunk larger than the budget: cut it exactly
                with open(chunk.path, "rb") as f:
                    end, _ = find_cut(f, chunk.start + budget, chunk.end)
                piece = Chunk(chunk.path, chunk.start, end)
            sample.append(read_chunk(piece))
            budget -= piece.end - piece.start
        try:
            return BPETokenizer.train("".join(sample), vocab_size)  # contiguous pieces of the train split
        except UserError as e:
            raise UserError(f"--vocab-size {vocab_size}: {e}") from None
    raise UserError(f"unknown tokenizer {name!r}; choose one of {', '.join(TOKENIZER_CHOICES)}")


def _fingerprint(
    files: list[Path], tokenizer: str | dict[str, Any], vocab_size: int, val_fraction: float, chunk_bytes: int
) -> dict:
    """What the token files depend on: a rerun with a different fingerprint starts over. `tokenizer`: a
    name (built here) or a given tokenizer's to_dict() (recorded by its digest)."""
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    if isinstance(tokenizer, dict):
        tokenizer = "sha256:" + hashlib.sha256(json.dumps(tokenizer, sort_keys=True).encode()).hexdigest()
    return {
        "sources": [{"path": s, "bytes": b, "mtime_ns": m} for s, b, m in stats],
        "tokenizer": tokenizer,
        "vocab_size": vocab_size if tokenizer == "bpe" else None,
        "val_fraction": val_fraction,
        "chunk_bytes": chunk_bytes,
    }


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _write_json(path: Path, value: dict[str, Any]) -> None:
    with atomic_write(path) as f:
        f.write((json.dumps(value, indent=2) + "\n").encode("utf-8"))


def prepare_corpus(
    source: str | os.PathLike[str] | list[str],
    out_dir: str | os.PathLike[str],
    tokenizer: str | Tokenizer = "char",
    *,
    vocab_size: int = 512,
    val_fraction: float = 0.1,
    workers: int | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    overwrite: bool = False,
    quiet: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Tokenize the text files `source` names into out_dir/train.bin, val.bin and meta.json; return the meta.

    Reruns are cheap: finished output with the same fingerprint is reused, an interrupted one continues.
    Output from other sources or settings is replaced only with `overwrite`.
    """
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if chunk_bytes < 1:
        raise UserError(f"chunk_bytes must be positive, got {chunk_bytes}")
    given = tokenizer if isinstance(tokenizer, Tokenizer) else None  # e.g. a checkpoint's: used as it is
    name = tokenizer_name(given.to_dict()) if given is not None else tokenizer
    if given is None and name not in TOKENIZER_CHOICES:
        raise UserError(f"unknown tokenizer {name!r}; choose one of {', '.join(TOKENIZER_CHOICES)}")
    files = find_sources(source)
    if workers is None:
        workers = default_workers() if sum(p.stat().st_size for p in files) >= PARALLEL_MIN_BYTES else 1
    workers = max(1, workers)
    fingerprint = _fingerprint(files, given.to_dict() if given else name, vocab_size, val_fraction, chunk_bytes)
    out = Path(out_dir)
    existing = _read_json(out / META_FILE) if (out / META_FILE).exists() else None
    if existing is not None:
        if existing.get("fingerprint") == fingerprint:
            log(f"{out}: already prepared from these files with these settings; nothing to do")
            return load_meta(out)
        if not overwrite:
            raise UserError(
                f"{out} already holds token files prepared from other files or settings; "
                "pass --overwrite to replace them, or choose another output directory"
            )
        (out / META_FILE).unlink()  # from here on the directory no longer claims complete token files
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {out}: {e.strerror or e}") from None

    chunks, inexact = plan_chunks(files, val_fraction, chunk_bytes, anywhere=name == "char")
    workers = min(workers, len(chunks["train"]) + len(chunks["val"]))  # one chunk: no worker processes
    progress = _read_json(out / PROGRESS_FILE)
    if progress is None or progress.get("fingerprint") != fingerprint:
        tok = given or build_corpus_tokenizer(name, chunks, vocab_size, workers, quiet)
        progress = {"fingerprint": fingerprint, "tokenizer": tok.to_dict(), "done": {}}
        for split in SPLITS:
            with contextlib.suppress(FileNotFoundError):
                (out / f"{split}.bin.partial").unlink()
        _write_json(out / PROGRESS_FILE, progress)
    elif not quiet:
        done = sum(c.end - c.start for s in SPLITS for c in chunks[s][: progress["done"].get(s, {}).get("chunks", 0)])
        log(f"{out}: continuing an interrupted preparation ({done / 2**20:,.1f} MB of text already done)")
    tok = tokenizer_from_dict(progress["tokenizer"])
    dtype = token_dtype(tok.vocab_size)
    _tokenize_splits(chunks, out, progress, workers, quiet)

    meta: dict[str, Any] = {
        "vocab_size": int(tok.vocab_size),
        "dtype": dtype.name,
        "tokenizer": tok.to_dict(),
        "val_fraction": val_fraction,
    }
    for split in SPLITS:
        done = progress["done"][split]
        os.replace(out / f"{split}.bin.partial", out / f"{split}.bin")
        meta[f"{split}_tokens"] = done["tokens"]
        meta[f"{split}_chars"] = done["chars"]
    meta.update(
        source_bytes=sum(f["bytes"] for f in fingerprint["sources"]),
        inexact_cuts=inexact,
        fingerprint=fingerprint,
    )
    _write_json(out / META_FILE, meta)  # last: its presence means the token files are complete
    (out / PROGRESS_FILE).unlink()
    return meta


def _tokenize_splits(
    chunks: dict[str, list[Chunk]], out: Path, progress: dict[str, Any], workers: int, quiet: bool
) -> None:
    """Append each split's remaining chunks to <split>.bin.partial, committing progress after each one."""
    todo = {s: chunks[s][progress["done"].get(s, {}).get("chunks", 0) :] for s in SPLITS}
    total = sum(c.end - c.start for s in SPLITS for c in chunks[s])
    remaining = sum(c.end - c.start for s in SPLITS for c in todo[s])
    with _pool(workers, progress["tokenizer"]) as pmap, _bar(total, "tokenize", quiet) as bar:
        bar.update(total - remaining)
        for split in SPLITS:
            done = progress["done"].setdefault(split, {"chunks": 0, "bytes": 0, "tokens": 0, "chars": 0})
            path = out / f"{split}.bin.partial"
            with open(path, "ab") as f:
                f.truncate(done["bytes"])  # drop anything appended after the last commit
                for ids, n_chars, n_bytes in pmap(_encode, todo[split]):
                    try:
                        ids.tofile(f)
                        f.flush()
                        os.fsync(f.fileno())
                    except OSError as e:
                        raise UserError(f"cannot write {path}: {e.strerror or e}; free space and rerun") from None
                    done["chunks"] += 1
                    done["bytes"] += ids.nbytes
                    done["tokens"] += int(ids.size)
                    done["chars"] += n_chars
                    _write_json(out / PROGRESS_FILE, progress)
                    bar.update(n_bytes)


def tokenizer_name(tokenizer: dict[str, Any]) -> str:
    """The --tokenizer choice that makes a tokenizer (its `to_dict()` form): char, bpe or gpt2."""
    if tokenizer.get("kind") == "tiktoken":
        return str(tokenizer.get("name"))
    return str(tokenizer.get("kind"))


def check_token_dir(data_dir: str | os.PathLike[str], expected: str) -> dict[str, Any]:
    """meta.json of a prepared directory, after checking its tokens come from the `expected` tokenizer."""
    meta = load_meta(data_dir)
    found = tokenizer_name(meta.get("tokenizer", {}))
    if found != expected:
        raise UserError(
            f"{data_dir} holds tokens from the {found} tokenizer, not {expected}: drop --tokenizer to train on them "
            f"as they are, or prepare the text again with --tokenizer {expected} (scripts/prepare.py)"
        )
    return meta


__all__ = ["Chunk", "check_token_dir", "find_cut", "find_sources", "plan_chunks", "prepare_corpus"]
