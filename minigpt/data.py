"""Data pipeline: find a text corpus, tokenize it to train.bin/val.bin + meta.json, sample batches.

Token files are raw arrays of ids (uint16 when the vocabulary fits, else uint32), read back
through a memmap so a corpus never has to fit in memory twice. meta.json says how to read them;
nothing here is ever pickled.
"""

from __future__ import annotations

import contextlib
import copy
import http.client
import json
import os
import sys
import sysconfig
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from minigpt.errors import UserError
from minigpt.tokenizers import Tokenizer

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
# The repository root (this file lives in <root>/minigpt/); used for the default corpus location.
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = REPO_ROOT / "data" / "shakespeare_char"
DOWNLOAD_TIMEOUT_S = 5.0
# The offline fallback stops adding standard-library files once it holds this many characters.
STDLIB_CORPUS_CHARS = 3_000_000
# Directories skipped by the fallback: tests are huge and full of odd encodings; site-packages
# differs between machines, and the corpus should depend only on the Python install.
_STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
SPLITS = ("train", "val")
META_FILE = "meta.json"


# ---------------------------------------------------------------------------------------------
# Files


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces `path` only once the `with` block succeeds.

    The data goes to a temporary file in the same directory (so `os.replace` is an atomic rename
    on the same file system), is fsynced, then renamed over `path`. An exception or crash
    mid-write leaves any old `path` untouched, and the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; these files are ordinary shareable outputs
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno is not None and e.filename is None:
            e.filename = str(path)  # a failed write (e.g. a full disk) names the file it was for
        raise


def read_text_file(path: str | os.PathLike[str]) -> str:
    """Read a UTF-8 text file, turning every way it can be unusable into a one-line UserError."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{p} is a directory; --data needs a UTF-8 text file")
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise UserError(f"data file {p} not found; check the --data path") from None
    except OSError as e:
        raise UserError(f"cannot read data file {p}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8-sig")  # -sig: drop a leading byte-order mark some editors add
    except UnicodeDecodeError as e:
        raise UserError(
            f"data file {p} is not UTF-8 text: byte 0x{raw[e.start]:02x} at byte offset {e.start} "
            "is invalid; convert the file to UTF-8"
        ) from None
    if not text:
        raise UserError(f"data file {p} is empty; --data needs a file with some text")
    return text


# ---------------------------------------------------------------------------------------------
# Corpus resolution


def resolve_corpus(
    data: str | os.PathLike[str] | None = None, *, download_dir: str | os.PathLike[str] | None = None
) -> tuple[str, str]:
    """Find the training text; return (text, one-line description of where it came from).

    Order: the `data` file if given; else `<download_dir>/input.txt` (default
    data/shakespeare_char/ in the repository) if present; else download Tiny Shakespeare there;
    else (offline, or MINIGPT_OFFLINE=1) Python standard-library source, with a notice on stderr.
    """
    if data is not None:
        text = read_text_file(data)
        return text, f"{data} ({len(text):,} characters)"

    directory = Path(download_dir) if download_dir is not None else DEFAULT_DATA_DIR
    local = directory / "input.txt"
    if local.exists():
        text = read_text_file(local)
        return text, f"{local} ({len(text):,} characters)"

    if os.environ.get("MINIGPT_OFFLINE", "") not in ("", "0"):
        reason = "MINIGPT_OFFLINE is set"
    else:
        text, reason = _download_shakespeare(local)
        if text is not None:
            return text, f"Tiny Shakespeare downloaded to {local} ({len(text):,} characters)"

    text, description = stdlib_corpus()
    print(
        f"notice: no Tiny Shakespeare ({reason}); training on {description} instead. "
        f"Pass --data FILE to use your own UTF-8 text, or place it at {local}",
        file=sys.stderr,
    )
    return text, description


def _download_shakespeare(dest: Path) -> tuple[str | None, str]:
    """Download Tiny Shakespeare and save it to `dest`; return (text or None, reason it failed)."""
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=DOWNLOAD_TIMEOUT_S) as response:
            text = response.read().decode("utf-8")
    except (OSError, http.client.HTTPException, ValueError) as e:  # URLError and timeouts are OSErrors
        return None, "download failed: " + " ".join(str(e).split())  # keep the notice one line
    if not text:
        return None, "download returned no text"
    try:
        with atomic_write(dest) as f:
            f.write(text.encode("utf-8"))
    except OSError as e:
        # The text is still good; only the cache failed, so say so and carry on.
        print(f"notice: could not save the download to {dest}: {e}", file=sys.stderr)
    return text, ""


def stdlib_corpus(max_chars: int | None = None) -> tuple[str, str]:
    """Concatenate the standard library's .py files (sorted paths) until `max_chars` is reached.

    A corpus that exists on every machine with Python, so training works offline. Same Python
    install, same text: paths are sorted and site-packages/test directories are skipped.
    """
    limit = STDLIB_CORPUS_CHARS if max_chars is None else max_chars
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise UserError(
            f"no corpus available: cannot download Tiny Shakespeare and the Python standard library "
            f"({root}) is missing; pass --data FILE"
        )
    parts: list[str] = []
    total = n_files = 0
    for path in _stdlib_py_files(root):
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # a rare legacy-encoded or unreadable file; the corpus does without it
        parts.append(source)
        total += len(source) + 1
        n_files += 1
        if total >= limit:
            break
    if not parts:
        raise UserError(f"no corpus available: no readable .py files under {root}; pass --data FILE")
    text = "\n".join(parts)
    return text, f"Python standard-library source ({n_files} files under {root}, {len(text):,} characters)"


def _stdlib_py_files(root: Path) -> list[Path]:
    """All .py files under `root` outside skipped directories, sorted by their relative path."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith(".")]
        rel = Path(dirpath).relative_to(root)
        found.extend((rel / name).as_posix() for name in filenames if name.endswith(".py"))
    return [root / rel for rel in sorted(found)]


# ---------------------------------------------------------------------------------------------
# Token files


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype the ids 0..vocab_size-1 fit in (uint16, as nanoGPT, or uint32)."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def prepare(
    text: str, tokenizer: Tokenizer, out_dir: str | os.PathLike[str], val_fraction: float = 0.1
) -> dict[str, Any]:
    """Tokenize `text` into out_dir/train.bin, val.bin and meta.json; return the metadata dict.

    As nanoGPT, the first (1 - val_fraction) of the text is train and the rest val. The split is
    made on characters before encoding, so no multi-character token straddles the boundary and
    `train_chars`/`val_chars` (for bits per character) are exact.
    """
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if not text:
        raise UserError("cannot prepare an empty text; supply a corpus with some text")
    dtype = token_dtype(tokenizer.vocab_size)
    cut = int(len(text) * (1.0 - val_fraction))
    pieces = {"train": text[:cut], "val": text[cut:]}

    out = Path(out_dir)
    meta: dict[str, Any] = {
        "vocab_size": int(tokenizer.vocab_size),
        "dtype": dtype.name,
        "tokenizer": tokenizer.to_dict(),
        "val_fraction": val_fraction,
    }
    for split, piece in pieces.items():
        ids = np.asarray(tokenizer.encode(piece), dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
            raise ValueError(f"tokenizer produced ids outside 0..{tokenizer.vocab_size - 1}")
        with atomic_write(out / f"{split}.bin") as f:
            ids.astype(dtype).tofile(f)
        meta[f"{split}_tokens"] = int(ids.size)
        meta[f"{split}_chars"] = len(piece)
    # meta.json last: its presence means the .bin files beside it are complete and match it.
    with atomic_write(out / META_FILE) as f:
        f.write((json.dumps(meta, indent=2) + "\n").encode("utf-8"))
    return meta


def load_meta(data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read data_dir/meta.json written by `prepare`."""
    path = Path(data_dir) / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(
            f"{path} not found; prepare the data first (e.g. python data/shakespeare_char/prepare.py)"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path} ({e}); re-run the prepare script") from None
    if not isinstance(meta, dict) or "dtype" not in meta or "vocab_size" not in meta:
        raise UserError(f"{path} lacks vocab_size/dtype; re-run the prepare script")
    return meta


def load_tokens(data_dir: str | os.PathLike[str], split: str) -> np.ndarray:
    """Memory-map data_dir/<split>.bin with the dtype recorded in meta.json (read-only)."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    meta = load_meta(data_dir)
    try:
        dtype = np.dtype(meta["dtype"])
    except TypeError:
        dtype = np.dtype(np.object_)  # reported just below
    if dtype.kind not in "iu":  # a float or text "token" file would be its bytes reinterpreted
        raise UserError(
            f"{Path(data_dir) / META_FILE} gives dtype {meta['dtype']!r}; token files hold integer ids "
            "(uint16 or uint32): re-run the prepare script"
        )
    path = Path(data_dir) / f"{split}.bin"
    if not path.is_file():
        raise UserError(f"{path} not found; re-run the prepare script")
    size = path.stat().st_size
    expected = meta.get(f"{split}_tokens")
    if size % dtype.itemsize or (expected is not None and size // dtype.itemsize != expected):
        raise UserError(
            f"{path} holds {size} bytes, which does not match meta.json "
            f"({expected} {dtype.name} tokens); re-run the prepare script"
        )
    if size == 0:
        return np.zeros(0, dtype=dtype)  # np.memmap cannot map an empty file
    return np.memmap(path, dtype=dtype, mode="r")


# ---------------------------------------------------------------------------------------------
# Batches


class BatchSampler:
    """Random (x, y) windows of `block_size` tokens from a 1-D token array, as nanoGPT's get_batch.

    Reproducible: a seeded PCG64 generator picks the offsets, and `state()`/`set_state()` carry
    it through a checkpoint so a resumed run draws exactly the batches it would have drawn.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, block_size: int, seed: int = 0, *, name: str = "data"):
        if batch_size < 1 or block_size < 1:
            raise UserError(f"batch size and block size must be >= 1, got {batch_size} and {block_size}")
        n = len(tokens)
        if n < block_size + 1:
            raise UserError(
                f"the {name} split has {n} tokens but block size {block_size} needs at least "
                f"{block_size + 1}; use a smaller --block-size or more data"
            )
        self.tokens, self.name = tokens, name
        self.batch_size = batch_size
        self.block_size = block_size
        self.rng = np.random.Generator(np.random.PCG64(seed))
        # Offsets 0..block_size: row i of tokens[offsets] is x's window plus the one-later target.
        self._window = np.arange(block_size + 1, dtype=np.int64)

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        """Draw one batch: x and y, int64 arrays of shape (B, T), y[:, t] == x[:, t + 1] shifted."""
        starts = self.rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size)
        index = starts[:, None] + self._window[None, :]  # (B, T+1)
        windows = np.asarray(self.tokens[index], dtype=np.int64)  # one gather; copies off the memmap
        return np.ascontiguousarray(windows[:, :-1]), np.ascontiguousarray(windows[:, 1:])

    __call__ = next

    def state(self) -> dict[str, Any]:
        """The generator's state as a JSON-serialisable dict (plain ints and strings)."""
        return copy.deepcopy(self.rng.bit_generator.state)

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore a state from `state()`, e.g. one read back from a checkpoint."""
        if not isinstance(state, dict) or state.get("bit_generator") != "PCG64":
            raise UserError("sampler state in the checkpoint is not a PCG64 state; cannot resume batches")
        try:
            self.rng.bit_generator.state = copy.deepcopy(state)
        except (TypeError, ValueError, KeyError) as e:
            raise UserError(f"invalid sampler state in the checkpoint: {e}") from None
