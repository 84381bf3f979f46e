"""MLP sanity runs: the engine, modules, optimizers and loop learn XOR, the moons and a regression."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

import minigpt
from minigpt import nn, optim
from minigpt.train import train

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "scripts" / "train_mlp.py"


@pytest.fixture(scope="module")
def demo() -> ModuleType:
    """scripts/train_mlp.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("train_mlp", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_moons_shape_and_labels(demo: ModuleType) -> None:
    x, y = demo.make_moons(100, 0.1, seed=0)
    assert x.shape == (100, 2) and x.dtype == np.float32
    assert sorted(set(y.tolist())) == [-1.0, 1.0] and (y == 1).sum() == 50
    np.testing.assert_array_equal(x, demo.make_moons(100, 0.1, seed=0)[0])  # fixed seed, same data


def test_xor_learned_to_100_percent(demo: ModuleType) -> None:
    out = demo.run("xor", steps=100, seed=0)
    assert out["accuracy"] == 1.0


@pytest.mark.parametrize("seed", [1337, 0, 1])
def test_moons_at_least_97_percent_in_100_steps(demo: ModuleType, seed: int) -> None:
    out = demo.run("moons", steps=100, seed=seed)
    assert out["accuracy"] >= 0.97, out["accuracy"]


def test_regression_memorised() -> None:
    rng = np.random.default_rng(0)
    x = np.linspace(-2, 2, 16, dtype=np.float32).reshape(-1, 1)
    y = np.sin(2 * x) + 0.1 * rng.standard_normal(x.shape).astype(np.float32)  # noise too: memorised
    model = nn.MLP(1, [32, 32, 1], activation="tanh", rng=rng)
    opt = optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)

    def mse(m: nn.Module, batch: tuple[np.ndarray, np.ndarray]) -> minigpt.Tensor:
        diff = m(minigpt.tensor(batch[0])) - minigpt.tensor(batch[1])
        return (diff * diff).mean()

    result = train(model, opt, lambda: (x, y), mse, max_steps=600, log_interval=600, quiet=True)
    with minigpt.no_grad():
        final = mse(model, (x, y)).item()
    assert final < 1e-3, final
    assert result.loss is not None and result.loss < 0.05  # mean over the whole run, from about 0.5


def test_script_prints_accuracy_line() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quiet"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("moons: final loss ") and "accuracy " in line
    assert float(line.split("accuracy ")[1].rstrip("%")) >= 97.0


def test_script_plot_without_matplotlib_is_a_clear_error(
    demo: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a)
    )
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--plot", "out.png"])
    assert exit_info.value.code == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err
