"""Checkpoints: bit-exact round trip, atomic save, clear errors for bad files."""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from minigpt import checkpoint
from minigpt.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint
from minigpt.errors import UserError


def make_state(seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]]:
    rng = np.random.default_rng(seed)
    model = {
        "transformer.wte.weight": rng.standard_normal((65, 32)).astype(np.float32),
        "transformer.h.0.attn.c_attn.weight": rng.standard_normal((96, 32)).astype(np.float32),
        "transformer.ln_f.bias": np.zeros(32, dtype=np.float32),
        "lm_head.weight": rng.standard_normal((65, 32)),  # float64 must stay float64
    }
    optim = {
        "step": np.array(7, dtype=np.int64),
        "exp_avg.transformer.wte.weight": rng.standard_normal((65, 32)).astype(np.float32),
    }
    meta = {
        "config": {"n_layer": 1, "n_head": 4, "n_embd": 32, "block_size": 64, "bias": True},
        "tokenizer": {"kind": "char", "chars": "\n !abcé"},
        "step": 7,
        "best_val_loss": 2.5,
        "rng": np.random.default_rng(1).bit_generator.state,  # 128-bit ints must survive
    }
    return model, optim, meta


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k  # bit-identical


def test_round_trip(tmp_path: Path) -> None:
    model, optim, meta = make_state()
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, model=model, optimizer=optim, meta=meta)
    model2, optim2, meta2 = load_checkpoint(path)
    assert_same(model, model2)
    assert optim2 is not None
    assert_same(optim, optim2)
    assert meta2 == {**meta, "format_version": FORMAT_VERSION}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.npz"]  # no temp files left
    # Readable by plain NumPy without pickle, laid out as documented.
    with np.load(path, allow_pickle=False) as z:
        assert "model/lm_head.weight" in z.files and "optim/step" in z.files and "meta.json" in z.files


def test_no_optimizer_numpy_meta_and_exact_name(tmp_path: Path) -> None:
    model, _, _ = make_state()
    path = tmp_path / "latest.ckpt"  # no .npz suffix: the file is still written exactly here
    save_checkpoint(path, model=model, optimizer=None, meta={"best_val_loss": np.float32(1.5), "x": math.inf})
    assert [p.name for p in tmp_path.iterdir()] == ["latest.ckpt"]
    model2, optim2, meta2 = load_checkpoint(path)
    assert_same(model, model2)
    assert optim2 is None
    assert meta2["best_val_loss"] == 1.5 and meta2["x"] == math.inf


def test_overwrite_replaces(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.npz"
    for seed in (0, 1):
        model, optim, meta = make_state(seed)
        save_checkpoint(path, model=model, optimizer=optim, meta=meta)
    assert_same(load_checkpoint(path)[0], make_state(1)[0])


def test_failed_save_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, optim, meta = make_state()
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, model=model, optimizer=optim, meta=meta)
    before = path.read_bytes()

    def crash(file: Any, *args: Any, **kwargs: Any) -> None:
        file.write(b"PK partial data")  # die mid-write, after some bytes went out
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model=make_state(5)[0], optimizer=None, meta={"step": 99})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.npz"]


def test_object_arrays_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="object"):
        bad = {"w": np.array([{}], dtype=object)}
        save_checkpoint(tmp_path / "c.npz", model=bad, optimizer=None, meta={})
    assert not list(tmp_path.iterdir())


def one_line_error(path: Path, fragment: str) -> None:
    with pytest.raises(UserError, match=fragment) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message


def test_missing_and_directory(tmp_path: Path) -> None:
    one_line_error(tmp_path / "nope.npz", "not found")
    one_line_error(tmp_path, "directory")


def test_truncated(tmp_path: Path) -> None:
    model, optim, meta = make_state()
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, model=model, optimizer=optim, meta=meta)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    one_line_error(path, "not a readable .npz")


def test_garbage_and_empty(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.npz"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    one_line_error(path, "not a readable .npz")
    path.write_bytes(b"")
    one_line_error(path, "not a readable .npz")


def test_flipped_byte_in_array_data(tmp_path: Path) -> None:
    model, optim, meta = make_state()
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, model=model, optimizer=optim, meta=meta)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 3] ^= 0xFF  # inside the first arrays' data, so only the zip CRC notices
    path.write_bytes(bytes(raw))
    one_line_error(path, "corrupt|not a readable")


def test_plain_npy_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.npy"
    np.save(path, np.zeros(3))
    one_line_error(path, "single .npy array")


def test_missing_meta(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.npz"
    np.savez(path, **{"model/w": np.zeros(3)})
    one_line_error(path, "no meta.json")


def write_meta(path: Path, meta_text: str) -> None:
    np.savez(path, **{"model/w": np.zeros(3), "meta.json": np.frombuffer(meta_text.encode(), np.uint8)})


def test_bad_meta(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.npz"
    write_meta(path, "{truncated")
    one_line_error(path, "unreadable metadata")
    write_meta(path, json.dumps({"step": 1}))
    one_line_error(path, "no format_version")


def test_newer_format_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ckpt.npz"
    monkeypatch.setattr(checkpoint, "FORMAT_VERSION", FORMAT_VERSION + 1)
    save_checkpoint(path, model={"w": np.zeros(2)}, optimizer=None, meta={})
    monkeypatch.setattr(checkpoint, "FORMAT_VERSION", FORMAT_VERSION)
    one_line_error(path, f"format version {FORMAT_VERSION + 1}.*upgrade")


def test_pickled_npz_member_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.npz"
    np.savez(path, **{"model/w": np.array([{"a": 1}], dtype=object)})  # contains a pickle
    assert zipfile.is_zipfile(path)
    one_line_error(path, "corrupt")


def test_a_tied_weight_from_state_dict_is_stored_once(tmp_path):
    from minigpt import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=300, n_embd=64, n_layer=1, n_head=2))
    state = model.state_dict()
    assert state["lm_head.weight"] is state["transformer.wte.weight"]  # one copy, both names
    save_checkpoint(tmp_path / "ck.npz", model=state, optimizer=None, meta={"x": 1})
    with np.load(tmp_path / "ck.npz") as npz:
        assert "model/transformer.wte.weight" in npz.files and "model/lm_head.weight" not in npz.files
    loaded, _, meta = load_checkpoint(tmp_path / "ck.npz")
    assert loaded.keys() == state.keys() and "tied" not in meta
    np.testing.assert_array_equal(loaded["lm_head.weight"], state["transformer.wte.weight"])
    GPT(model.config).load_state_dict(loaded)
