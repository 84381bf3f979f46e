"""Checkpoints: one .npz holding model weights, optimizer state and a JSON metadata string.

Layout (all plain arrays, so `np.load(..., allow_pickle=False)` reads it and nothing executes code):
    model/<name>   each model parameter/buffer, e.g. model/transformer.wte.weight
    optim/<name>   each optimizer state array, e.g. optim/exp_avg.transformer.wte.weight
                   (a tied weight is stored once; meta's `tied` maps its other names to the stored one)
    meta.json      uint8 array of UTF-8 JSON: config, tokenizer, step, best val loss, RNG state,
                   and `format_version`
"""

from __future__ import annotations

import json
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from minigpt.data import atomic_write
from minigpt.errors import UserError

FORMAT_VERSION = 1
MODEL_PREFIX = "model/"
OPTIM_PREFIX = "optim/"
META_KEY = "meta.json"
TIED_KEY = "tied"  # in meta: {name: the name it shares its array with}, for weights stored once
# What reading a damaged zip/npy can raise (zipfile raises NotImplementedError for mangled headers).
_READ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, NotImplementedError, zlib.error)


def _json_default(obj: Any) -> Any:
    """Let NumPy scalars/arrays in meta (e.g. a float32 loss) serialise as plain JSON numbers/lists."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"checkpoint meta value of type {type(obj).__name__} is not JSON-serialisable")


def _plain_arrays(prefix: str, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Prefix the names and check every value is a NumPy array savez can store without pickling."""
    out: dict[str, np.ndarray] = {}
    for name, value in state.items():
        arr = np.asarray(value)  # a CuPy array raises here: callers hand over CPU copies
        if arr.dtype.hasobject:
            raise TypeError(f"{prefix}{name} has dtype object; checkpoints hold numeric arrays only")
        out[prefix + name] = arr
    return out


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: dict[str, np.ndarray],
    optimizer: dict[str, np.ndarray] | None,
    meta: dict[str, Any],
) -> None:
    """Write model/optimizer state and JSON-able `meta` to one .npz at `path`, atomically.

    The file goes to a temporary name in the same directory and is renamed over `path` only when
    complete, so a crash mid-save leaves the previous checkpoint intact. `path` is used exactly as
    given (np.savez adds `.npz` only to file names, and here it writes to an open file).
    """
    # A tied weight under several names (one array object, as state_dict() gives it) is stored once.
    first_name: dict[int, str] = {}
    tied = {name: first_name.setdefault(id(v), name) for name, v in model.items()}
    tied = {name: target for name, target in tied.items() if name != target}
    arrays = _plain_arrays(MODEL_PREFIX, {k: v for k, v in model.items() if k not in tied})
    arrays.update(_plain_arrays(OPTIM_PREFIX, optimizer or {}))
    meta = {**meta, TIED_KEY: tied} if tied else meta
    meta_text = json.dumps({**meta, "format_version": FORMAT_VERSION}, default=_json_default)
    arrays[META_KEY] = np.frombuffer(meta_text.encode("utf-8"), dtype=np.uint8)
    with atomic_write(path) as f:
        np.savez(f, **arrays)


def load_checkpoint(
    path: str | os.PathLike[str],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None, dict[str, Any]]:
    """Read a checkpoint: (model state, optimizer state or None if none was saved, meta).

    `meta` is what was saved plus `format_version`. Any unreadable file raises a one-line UserError.
    """
    p = Path(path)
    if p.is_dir():
        raise UserError(f"checkpoint {p} is a directory; pass the .npz file")
    if not p.exists():
        raise UserError(f"checkpoint {p} not found")
    try:
        with open(p, "rb") as f:
            head = f.read(6)
    except OSError as e:
        raise UserError(f"cannot read checkpoint {p}: {e.strerror or e}") from None
    if head.startswith(b"\x93NUMPY"):
        raise UserError(f"checkpoint {p} is a single .npy array, not a minigpt .npz checkpoint")
    if not head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        # Checked here because np.load would guess "pickle" and suggest allow_pickle, a bad hint.
        raise UserError(f"checkpoint {p} is not a readable .npz file (no zip header; empty or corrupt)")
    try:
        npz = np.load(p, allow_pickle=False)
    except _READ_ERRORS as e:
        raise UserError(f"checkpoint {p} is not a readable .npz file ({_first_line(e)})") from None
    with npz:
        try:
            # Read everything now: a truncated or bit-flipped member fails here (zip CRC), not later.
            arrays = {name: npz[name] for name in npz.files}
        except _READ_ERRORS as e:
            raise UserError(f"checkpoint {p} is corrupt ({_first_line(e)}); use another checkpoint") from None

    meta = _read_meta(p, arrays.pop(META_KEY, None))
    model = {k[len(MODEL_PREFIX) :]: v for k, v in arrays.items() if k.startswith(MODEL_PREFIX)}
    tied = meta.pop(TIED_KEY, None) or {}
    for name, target in tied.items() if isinstance(tied, dict) else [(TIED_KEY, None)]:
        if not isinstance(target, str) or target not in model:
            raise UserError(
                f"checkpoint {p}: {name} is tied to {target}, which it does not hold; use another checkpoint"
            )
        model[name] = model[target]
    optim = {k[len(OPTIM_PREFIX) :]: v for k, v in arrays.items() if k.startswith(OPTIM_PREFIX)}
    return model, (optim or None), meta


def _read_meta(path: Path, raw: np.ndarray | None) -> dict[str, Any]:
    """Decode and check the meta.json entry of a checkpoint."""
    if raw is None:
        raise UserError(f"checkpoint {path} has no meta.json entry; it was not written by minigpt")
    try:
        meta = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"checkpoint {path} has unreadable metadata ({_first_line(e)})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("format_version"), int):
        raise UserError(f"checkpoint {path} metadata has no format_version; it was not written by minigpt")
    version = meta["format_version"]
    if version > FORMAT_VERSION:
        raise UserError(
            f"checkpoint {path} has format version {version}, newer than this minigpt reads "
            f"({FORMAT_VERSION}); upgrade minigpt"
        )
    return meta


def _first_line(e: BaseException) -> str:
    """An exception's message cut to one line, so the user-facing error stays one line."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


# ----------------------------------------------------------------------------- metadata schema

# The metadata of a training run's checkpoint (minigpt.lm): key -> (JSON types, required).
RUN_META_SCHEMA: dict[str, tuple[tuple[type, ...], bool]] = {
    "model_config": ((dict,), True),
    "tokenizer": ((dict,), True),
    "run_config": ((dict,), False),  # absent from weights-only checkpoints; --resume needs it
    "step": ((int,), False),
    "best_val_loss": ((float, int, type(None)), False),
    "elapsed": ((float, int), False),
    "rng": ((dict,), False),
    "data": ((str,), False),
}
_JSON_NAMES = {dict: "an object", int: "an integer", float: "a number", str: "a string", type(None): "null"}


def check_meta(path: str | os.PathLike[str], meta: dict[str, Any], required: tuple[str, ...] = ()) -> None:
    """Check a run checkpoint's metadata against RUN_META_SCHEMA; one UserError names the first bad key.

    `required` adds keys the caller needs (e.g. --resume needs step, rng and run_config).
    """
    for key, (types, needed) in RUN_META_SCHEMA.items():
        if key not in meta:
            if needed or key in required:
                raise meta_error(path, key, "is missing")
            continue
        value = meta[key]
        if isinstance(value, bool) or not isinstance(value, types):  # JSON true is not an integer
            expected = " or ".join(_JSON_NAMES[t] for t in types if not (t is int and float in types))
            raise meta_error(path, key, f"must be {expected}, got {json.dumps(value)[:60]}")
        if isinstance(value, (int, float)) and (not np.isfinite(value) or value < 0):
            raise meta_error(path, key, f"must be a finite non-negative number, got {value}")
    rng = meta.get("rng")
    if rng is not None:
        for part in ("train_batches", "dropout"):
            if not isinstance(rng.get(part), dict):
                raise meta_error(path, f"rng.{part}", "must be an object (a NumPy bit generator state)")


def meta_error(path: str | os.PathLike[str], key: str, problem: str) -> UserError:
    return UserError(
        f"checkpoint {path} has malformed metadata: {key} {problem}; the file is damaged or was not "
        "written by minigpt's train_gpt.py, so use another checkpoint"
    )
