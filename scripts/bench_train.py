"""Benchmark GPT training steps: the same command as `minigpt bench` (see --help, or minigpt/bench.py).

python scripts/bench_train.py --preset S --vs-torch
"""

import os
import sys
from pathlib import Path

if "--tf32" in sys.argv:  # CuPy reads CUPY_TF32 when it is imported: set it before minigpt imports CuPy
    os.environ["CUPY_TF32"] = "1"

try:
    import minigpt  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minigpt.bench import main  # noqa: E402

if __name__ == "__main__":
    main(prog="bench_train.py")
