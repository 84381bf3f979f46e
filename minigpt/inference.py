"""Text in, text out: load a model (a minigpt checkpoint, nanoGPT's ckpt.pt, Hugging Face GPT-2) and
generate from a string.

import minigpt
model, tokenizer = minigpt.load("out")
print(minigpt.generate_text(model, tokenizer, "ROMEO:", max_new_tokens=200))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TextIO

import numpy as np

from minigpt import nanogpt, weights
from minigpt.checkpoint import check_meta, load_checkpoint, meta_error
from minigpt.config import InvalidSetting
from minigpt.errors import UserError
from minigpt.gpt import GPT, GPTConfig
from minigpt.tokenizers import StreamDecoder, Tokenizer, tokenizer_from_dict

BEST, LATEST = "ckpt.npz", "last.npz"


def load_model(path: str | Path, device: str = "cpu") -> tuple[GPT, Tokenizer, dict[str, Any]]:
    """A GPT, its tokenizer and metadata from a minigpt checkpoint (a run's or weights-only .npz),
    nanoGPT's ckpt.pt (needs PyTorch), or a Hugging Face GPT-2 folder or cached name (`gpt2`)."""
    if str(path).endswith(".pt"):
        model, tokenizer_dict, meta = nanogpt.read_nanogpt(path)
        meta = {**meta, "tokenizer": tokenizer_dict}
    elif str(path).endswith(".npz") or (Path(path).is_file() and not str(path).endswith(".safetensors")):
        state, _, meta = load_checkpoint(path)
        config, tokenizer = read_model_meta(path, meta)
        model = GPT.from_state_dict(config, state)
        return model.to(device).eval(), tokenizer, meta
    else:
        model, tokenizer_dict = weights.load_hf(path)
        if tokenizer_dict is None:
            raise UserError(
                f"{path}: no tokenizer is known for its {model.config.vocab_size}-id vocabulary "
                "(GPT-2's has 50,257; a minigpt export records its own in config.json)"
            )
        meta = {"tokenizer": tokenizer_dict, "source": str(path)}
    meta["model_config"] = model.config.to_dict()
    return model.to(device).eval(), tokenizer_from_dict(meta["tokenizer"]), meta


def read_model_meta(path: str | Path, meta: dict[str, Any]) -> tuple[GPTConfig, Tokenizer]:
    """The model config and tokenizer a checkpoint's metadata describes, each checked."""
    check_meta(path, meta)
    try:
        config = GPTConfig(**meta["model_config"])
    except TypeError as e:  # an unknown key
        raise meta_error(path, "model_config", f"has an unknown field ({e})") from None
    except InvalidSetting as e:
        raise meta_error(path, f"model_config.{e.name}", e.problem) from None
    try:
        tokenizer = tokenizer_from_dict(meta["tokenizer"])
    except UserError as e:
        raise meta_error(path, "tokenizer", f"is unusable ({e})") from None
    return config, tokenizer


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


def sample_text(
    model: GPT, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, stream: Any = None, **kwargs: Any
) -> str:
    """Generate from `prompt` and return the new text; with `stream` (a file), write it as it comes.

    Ids are decoded as they come (`StreamDecoder`, constant cost per token), and a multi-byte character
    split across BPE tokens is written once its last byte arrives. Only ids below the tokenizer's
    vocab_size are sampled, never the model's padding rows.
    """
    if not prompt:
        raise UserError("the prompt is empty; pass --start with at least one character")
    prompt_ids = tokenizer.encode(prompt)
    if not prompt_ids:
        raise UserError(f"the prompt {prompt!r} encodes to no tokens; use a different --start")
    decoder = StreamDecoder(tokenizer)
    pieces: list[str] = []
    for ids in model.generate_tokens(
        np.array([prompt_ids]), max_new_tokens, vocab_limit=tokenizer.vocab_size, **kwargs
    ):
        pieces.append(decoder.step([int(ids[0])]))
        if stream is not None and pieces[-1]:
            stream.write(pieces[-1])
            stream.flush()
    pieces.append(decoder.finish())  # a character cut short by the end shows as U+FFFD
    if stream is not None and pieces[-1]:
        stream.write(pieces[-1])
        stream.flush()
    return "".join(pieces)
