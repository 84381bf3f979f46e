"""Text in, text out: load a trained model from its out-dir and generate from a string.

import minigpt
model, tokenizer = minigpt.load("out")
print(minigpt.generate_text(model, tokenizer, "ROMEO:", max_new_tokens=200))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TextIO

from minigpt.errors import UserError
from minigpt.gpt import GPT
from minigpt.lm import load_model, sample_text
from minigpt.tokenizers import Tokenizer

BEST, LATEST = "ckpt.npz", "last.npz"


def find_checkpoint(path: str | Path = "out") -> tuple[Path, str]:
    """The checkpoint `path` means: in a run's out-dir ckpt.npz (the best validation loss), else last.npz
    (the latest weights); anything else as given (a .npz, nanoGPT's ckpt.pt, a Hugging Face GPT-2 folder
    or name). Returns (path, note), the note saying so when last.npz was taken ("" otherwise)."""
    path = Path(path)
    if path.is_dir():
        if (path / BEST).is_file():
            return path / BEST, ""
        if (path / LATEST).is_file():
            return path / LATEST, f"no {BEST} in {path} (no evaluation finished yet): using {path / LATEST}"
        if not (path / "config.json").is_file():  # not a Hugging Face folder either
            raise UserError(f"no checkpoint in {path} ({BEST} or {LATEST}); train first (minigpt train)")
    elif path.suffix in (".npz", ".pt") and not path.exists():
        raise UserError(f"no checkpoint at {path}; train first (minigpt train) or pass an out-dir or file")
    return path, ""


def load(path: str | Path = "out", device: str = "cpu") -> tuple[GPT, Tokenizer]:
    """The model (in eval mode, on `device`) and its tokenizer: from a run's out-dir, a checkpoint file,
    nanoGPT's ckpt.pt or a Hugging Face GPT-2 folder or name (see `find_checkpoint`)."""
    model, tokenizer, _ = load_model(find_checkpoint(path)[0], device=device)
    return model, tokenizer


def generate_text(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int = 200,
    *,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stream: TextIO | None = None,
    **kwargs: Any,
) -> str:
    """`prompt` followed by up to `max_new_tokens` generated tokens, as text (temperature 0: greedy).

    With `stream` (e.g. sys.stdout) the new text is also written as it comes. Other keyword arguments
    go to `GPT.generate_tokens` (stop_token, use_cache, ...).
    """
    new = sample_text(
        model, tokenizer, prompt, max_new_tokens, stream=stream, temperature=temperature, top_k=top_k,
        top_p=top_p, seed=seed, **kwargs,
    )  # fmt: skip
    return prompt + new
