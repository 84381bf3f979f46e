"""What every test file shares: the test corpus, the shared data (CI only), the GPU rule, CPU/GPU twins.

- `corpus` / `text_file`: a built-in, seeded text, the same on every machine, so no test depends on
  what happens to lie beside the clone.
- `shared_data`, `shakespeare`, `tiktoken_cache`: `<clone>/../shared/data` (Tiny Shakespeare and
  tiktoken's GPT-2 files), which CI has and users do not. Tests that take one of them skip cleanly
  when it is absent, and carry the `shared` marker (`pytest -m shared` runs just them).
  MINIGPT_HIDE_SHARED=1 hides the folder, so the suite runs as on a user's fresh clone.
- The GPU rule: a test marked `gpu` runs only when CuPy sees a GPU, and otherwise skips with the cause.
- `device` / `xp`: run a test once on the CPU (NumPy) and once on the GPU (CuPy, marked `gpu`).
- Ctrl-C: a suite started with SIGINT ignored (`cmd &` in a script, nohup) gets the default back, so the
  training processes the tests start and signal behave as in a terminal.
- `run_main`: a command line's main(argv) run in this process, as its script would run it (exit code,
  stdout, stderr), so tests of what a command does pay no interpreter, Numba or torch start-up. Tests of
  the process itself (signals, kill -9, `python -m minigpt`, MPI) still start one.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from minigpt.autograd import backend

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
HIDE_SHARED_ENV = "MINIGPT_HIDE_SHARED"
SHARED_FIXTURES = {"shared_data", "shakespeare", "tiktoken_cache"}


# ----------------------------------------------------------------------------- markers and signals


def pytest_configure(config: pytest.Config) -> None:
    # An ignored signal stays ignored across exec, and training then (rightly) leaves Ctrl-C alone.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if SHARED_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.shared)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") is not None and not backend.cuda_available():
        pytest.skip(f"needs CuPy and an NVIDIA GPU ({backend.cuda_unavailable_reason()})")


# ----------------------------------------------------------------------------- the test corpus

_SPEAKERS = ["ROMEO", "JULIET", "First Citizen", "Second Citizen", "MENENIUS", "All", "KING HENRY", "Nurse"]
_WORDS = (
    "the of and to a in that is was he for it with as his on be at by I had not are but from or have an they "
    "which one you were her all she there would their we him been has when who will more no if out so said what "
    "up its about into than them can only other new some could time these two may then do first any my now such "
    "like our over man me even most made after also did many before must through back years where much your way "
    "well down should because each just those people how too little state good very make world still own see "
    "men work long get here between both life being under never day same another know while last might us great "
    "old year off come since against go came right used take three thou thee thy hath doth lord king queen love "
    "sweet night death blood heaven speak noble gentle fair brother sir madam"
).split()
_OPENERS = ["The", "This", "Thou", "That", "There", "These", "Then", "They", "What", "Why", "O", "Good", "My"]
_EXTRAS = ["don't", "we'll", "it's", "I'm", "you've", "1,234", "56", "1600", "A.D.", "'tis", "o'er"]


def make_corpus(n_chars: int = 120_000, seed: int = 0) -> str:
    """A play-shaped text (speaker lines, capitals, punctuation, digits, contractions) of `n_chars`."""
    rng = random.Random(seed)
    parts: list[str] = []
    size = 0
    while size < n_chars:
        lines = [f"{rng.choice(_SPEAKERS)}:"]
        for _ in range(rng.randint(1, 4)):
            words = [rng.choice(_OPENERS)]
            words += [rng.choice(_EXTRAS if rng.random() < 0.04 else _WORDS) for _ in range(rng.randint(3, 10))]
            lines.append(" ".join(words) + rng.choice(".,;:?!."))
        speech = "\n".join(lines) + "\n\n"
        parts.append(speech)
        size += len(speech)
    return "".join(parts)[:n_chars]


@pytest.fixture(scope="session")
def corpus() -> str:
    """~120 KB of built-in text, identical on every machine (it contains every character tests prompt with)."""
    return make_corpus()


@pytest.fixture
def text_file(tmp_path: Path, corpus: str) -> Path:
    """The first 40 KB of the corpus as a UTF-8 file (enough for small char and BPE runs)."""
    path = tmp_path / "input.txt"
    path.write_text(corpus[:40_000], encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- shared data (CI only)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`<clone>/../shared/data`; skips the test when it is absent or hidden (MINIGPT_HIDE_SHARED=1)."""
    if os.environ.get(HIDE_SHARED_ENV, "") not in ("", "0"):
        pytest.skip(f"shared data hidden ({HIDE_SHARED_ENV} is set)")
    if not SHARED_DATA.is_dir():
        pytest.skip(f"no shared data at {SHARED_DATA} (CI has it; a fresh clone does not)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def shakespeare(shared_data: Path) -> str:
    """Tiny Shakespeare (1.1 MB), from the shared data."""
    path = shared_data / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.skip(f"{path} absent")
    return path.read_text(encoding="utf-8")


@pytest.fixture
def tiktoken_cache(shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tiktoken's GPT-2 files from the shared data, as TIKTOKEN_CACHE_DIR for this test."""
    path = shared_data / "tiktoken_cache"
    if not path.is_dir():
        pytest.skip(f"{path} absent")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(path))
    return path


# ----------------------------------------------------------------------------- CPU/GPU twins


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request: pytest.FixtureRequest) -> str:
    """ "cpu", then "cuda" (skipped without a GPU): the same test on both devices."""
    return request.param


@pytest.fixture
def xp(device: str) -> Any:
    """The array module of `device`: numpy, or cupy."""
    return np if device == "cpu" else backend.cupy_module()


# ----------------------------------------------------------------------------- command lines in-process


@pytest.fixture
def run_main(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., subprocess.CompletedProcess]:
    """`run_main(main, *argv, cwd=None)`: call a script's main(argv) as `python script argv` would run it,
    offline, in `cwd`; returns a CompletedProcess (returncode 0, or the SystemExit code; stdout; stderr)."""

    def run(main: Callable[[list[str]], Any], *argv: Any, cwd: Path | None = None) -> subprocess.CompletedProcess:
        args = [str(a) for a in argv]
        capsys.readouterr()
        with monkeypatch.context() as m:
            m.setenv("MINIGPT_OFFLINE", "1")
            if cwd is not None:
                m.chdir(cwd)
            try:
                main(args)
                code = 0
            except SystemExit as e:  # what the interpreter would turn into the exit status
                code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    return run
