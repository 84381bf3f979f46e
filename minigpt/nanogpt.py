"""nanoGPT checkpoints (`ckpt.pt` + a character vocabulary's `meta.pkl`) to minigpt's .npz and back.

nanoGPT's parameter names and (out, in) layouts are minigpt's, so conversion is renaming at most:
torch.compile's `_orig_mod.` prefix goes, the tied `lm_head.weight` is stored once, and nanoGPT's
exact GELU is recorded as `gelu="none"`. Reading `.pt` needs PyTorch (an optional extra) and uses
`torch.load(weights_only=True)`; `meta.pkl` is read by an unpickler that resolves no globals at all,
so it can build dicts, lists, strings and numbers but never call anything.
"""

from __future__ import annotations

import io
import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from minigpt.checkpoint import load_checkpoint, save_checkpoint
from minigpt.data import atomic_write
from minigpt.errors import UserError
from minigpt.gpt import GPT, GPTConfig, sinusoidal_table
from minigpt.tokenizers import CharTokenizer

MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")
GPT2_PADDED_VOCAB = 50304  # nanoGPT's GPT-2 vocabulary, 50,257 padded to a multiple of 64
GPT2_TOKENIZER = {"kind": "tiktoken", "name": "gpt2"}


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise UserError(
            "nanoGPT's .pt files need PyTorch to read and write: pip install torch (the minigpt[torch] extra)"
        ) from None
    return torch


class _NoGlobalsUnpickler(pickle.Unpickler):
    """Builds only pickle's native types (dict, list, tuple, str, bytes, int, float, bool, None)."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"it refers to {module}.{name}; a meta.pkl holds plain dicts, strings and ints")


def read_meta_pkl(path: str | Path) -> dict[str, Any]:
    """nanoGPT's meta.pkl ({'vocab_size', 'itos', 'stoi'}), read without running any code."""
    try:
        meta = _NoGlobalsUnpickler(io.BytesIO(Path(path).read_bytes())).load()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file (nanoGPT's meta.pkl of the character vocabulary)") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, OSError) as e:
        raise UserError(f"{path} is not a readable nanoGPT meta.pkl ({e})") from None
    itos = meta.get("itos") if isinstance(meta, dict) else None
    if not isinstance(itos, dict) or not all(
        isinstance(i, int) and isinstance(c, str) and len(c) == 1 for i, c in itos.items()
    ):
        raise UserError(f"{path}: expected nanoGPT's character meta.pkl with an 'itos' dict of id -> character")
    if sorted(itos) != list(range(len(itos))):
        raise UserError(f"{path}: 'itos' ids are not 0..{len(itos) - 1}")
    return meta


def _char_permutation(itos: dict[int, str]) -> tuple[CharTokenizer, np.ndarray]:
    """minigpt's CharTokenizer (sorted characters) and, for each of its ids, nanoGPT's id of that character."""
    tokenizer = CharTokenizer(itos.values())
    nano_id = {c: i for i, c in itos.items()}
    if len(nano_id) != len(itos):
        raise UserError("meta.pkl maps two ids to the same character")
    return tokenizer, np.array([nano_id[c] for c in tokenizer.chars])


def _to_numpy(t: Any) -> np.ndarray:
    return t.detach().to("cpu").float().numpy()


def read_nanogpt(ckpt: str | Path, meta_pkl: str | Path | None = None) -> tuple[GPT, dict[str, Any], dict[str, Any]]:
    """A GPT, its tokenizer dict and {step, best_val_loss, nanogpt_config} from nanoGPT's ckpt.pt.

    Without a meta.pkl the vocabulary is GPT-2's (as in nanoGPT's sample.py). With one, ids are
    re-ordered to minigpt's sorted characters (the embedding rows move with them).
    """
    torch = _torch()
    try:
        checkpoint = torch.load(str(ckpt), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{ckpt}: no such file") from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad or unsafe file
        raise UserError(f"{ckpt} is not a readable nanoGPT checkpoint ({str(e).splitlines()[0]})") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "model_args" not in checkpoint:
        raise UserError(f"{ckpt} is not a nanoGPT checkpoint (no 'model' and 'model_args' entries)")
    args = checkpoint["model_args"]
    try:
        config = GPTConfig(**{k: args[k] for k in MODEL_ARGS}, gelu="none")  # nanoGPT's nn.GELU() is exact
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{ckpt}: model_args are not nanoGPT's ({e})") from None
    state = {}
    for name, tensor in checkpoint["model"].items():
        name = name.removeprefix("_orig_mod.")  # torch.compile's wrapper
        if not name.endswith(".attn.bias"):  # the causal-mask buffer of nanoGPT without flash attention
            state[name] = _to_numpy(tensor)
    head = state.pop("lm_head.weight", None)
    if head is not None and not np.array_equal(head, state.get("transformer.wte.weight")):
        raise UserError(f"{ckpt}: lm_head.weight differs from transformer.wte.weight; minigpt's GPT ties them")
    if meta_pkl is None and config.vocab_size < 50257:  # nanoGPT keeps it in data/<dataset>/ (see its sample.py)
        dataset = (checkpoint.get("config") or {}).get("dataset")
        candidates = [Path(ckpt).parent / "meta.pkl"] + ([Path("data", dataset, "meta.pkl")] if dataset else [])
        meta_pkl = next((p for p in candidates if p.is_file()), None)
    if meta_pkl is not None:
        tokenizer, order = _char_permutation(read_meta_pkl(meta_pkl)["itos"])
        if config.vocab_size != tokenizer.vocab_size:
            raise UserError(
                f"{meta_pkl} has {tokenizer.vocab_size} characters but {ckpt} a vocabulary of {config.vocab_size}"
            )
        state["transformer.wte.weight"] = state["transformer.wte.weight"][order]
        tokenizer_dict = tokenizer.to_dict()
    elif config.vocab_size >= 50257:
        tokenizer_dict = GPT2_TOKENIZER
    else:
        raise UserError(
            f"{ckpt} has a {config.vocab_size}-id vocabulary: pass its meta.pkl (e.g. data/shakespeare_char/meta.pkl)"
        )
    try:
        model = GPT.from_state_dict(config, state)
    except (ValueError, KeyError) as e:
        raise UserError(f"{ckpt}: {str(e).splitlines()[0]}") from None
    best = checkpoint.get("best_val_loss")
    info = {
        "step": int(checkpoint.get("iter_num", 0)),
        "best_val_loss": None if best is None else float(best),
        "nanogpt_config": {k: v for k, v in (checkpoint.get("config") or {}).items() if _is_plain(v)},
    }
    return model.eval(), tokenizer_dict, info


def _is_plain(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def nanogpt_to_minigpt(ckpt: str | Path, out: str | Path, meta_pkl: str | Path | None = None) -> Path:
    """Convert nanoGPT's ckpt.pt (+ meta.pkl) into a minigpt checkpoint (weights only; no optimizer state)."""
    model, tokenizer, info = read_nanogpt(ckpt, meta_pkl)
    save_checkpoint(
        out,
        model={name: p.data for name, p in model.named_parameters()},  # tied weight once
        optimizer=None,
        meta={
            "model_config": model.config.to_dict(),
            "tokenizer": tokenizer,
            "step": info["step"],
            "best_val_loss": info["best_val_loss"],
            "source": f"nanoGPT {Path(ckpt).name}",
            "nanogpt_config": info["nanogpt_config"],
        },
    )
    return Path(out)


def minigpt_to_nanogpt(checkpoint: str | Path, out_dir: str | Path) -> list[Path]:
    """Write nanoGPT's ckpt.pt (and meta.pkl for a character vocabulary) from a minigpt checkpoint."""
    state, optim, meta = load_checkpoint(checkpoint)
    try:
        config = GPTConfig(**meta["model_config"])
        tokenizer = dict(meta["tokenizer"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{checkpoint}: not a minigpt GPT checkpoint ({e})") from None
    model = GPT.from_state_dict(config, state)
    return write_nanogpt(model, tokenizer, out_dir, meta, optimizer=optim, where=str(checkpoint))


def write_nanogpt(
    model: GPT,
    tokenizer: dict[str, Any],
    out_dir: str | Path,
    meta: dict[str, Any] | None = None,
    optimizer: dict[str, np.ndarray] | None = None,
    where: str = "model",
) -> list[Path]:
    """nanoGPT's ckpt.pt (+ meta.pkl for characters) of a model; meta gives step, best_val_loss, run_config.

    nanoGPT's model knows learned positions and exact GELU: a sinusoidal model exports its table as
    wpe (exact); a tanh-GELU model is refused, since nanoGPT would compute a different function.
    With minigpt's AdamW state (`optimizer`), ckpt.pt carries it in torch's AdamW layout, so nanoGPT
    can `init_from='resume'`; without it, nanoGPT can sample and fine-tune the weights only.
    """
    torch = _torch()
    config, meta = model.config, meta or {}
    if config.gelu != "none":
        raise UserError(
            f"{where} uses the tanh GELU; nanoGPT's model computes the exact GELU (nn.GELU()), so it would "
            "not reproduce this model. Export it to Hugging Face instead (activation gelu_new)"
        )
    if tokenizer.get("kind") not in ("char", "tiktoken") or (
        tokenizer.get("kind") == "tiktoken" and tokenizer.get("name") != "gpt2"
    ):
        raise UserError(f"{where}: nanoGPT knows character vocabularies (meta.pkl) and GPT-2's only")
    tensors = {}
    for name, array in model.state_dict().items():  # nanoGPT's parameter order: wte, wpe, h.0 ...
        tensors[name] = torch.from_numpy(np.ascontiguousarray(array))
        if name == "transformer.wte.weight" and config.pos_encoding != "learned":
            tensors["transformer.wpe.weight"] = torch.from_numpy(sinusoidal_table(config.block_size, config.n_embd))
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"]  # one storage, as nanoGPT's tied state
    best = meta.get("best_val_loss")
    run = meta.get("run_config") or {}
    out_dir = Path(out_dir)
    written = [out_dir / "ckpt.pt"]
    checkpoint_pt = {
        "model": tensors,
        "model_args": {k: getattr(config, k) for k in MODEL_ARGS},
        "iter_num": int(meta.get("step", 0)),
        "best_val_loss": math.inf if best is None else float(best),
        "config": {k: v for k, v in run.items() if _is_plain(v)},
    }
    if optimizer:
        checkpoint_pt["optimizer"] = _torch_adamw_state(torch, tensors, optimizer, run)
    try:
        with atomic_write(out_dir / "ckpt.pt") as f:
            torch.save(checkpoint_pt, f)
        if tokenizer["kind"] == "char":
            chars = tokenizer["chars"]
            meta_pkl = {
                "vocab_size": len(chars),
                "itos": dict(enumerate(chars)),
                "stoi": {c: i for i, c in enumerate(chars)},
            }
            with atomic_write(out_dir / "meta.pkl") as f:
                pickle.dump(meta_pkl, f)
            written.append(out_dir / "meta.pkl")
    except OSError as e:
        raise UserError(f"cannot write {out_dir}: {e.strerror or e}") from None
    return written


def _torch_adamw_state(
    torch: Any, tensors: dict[str, Any], optim: dict[str, np.ndarray], run: dict[str, Any]
) -> dict[str, Any]:
    """torch's AdamW state_dict as nanoGPT's configure_optimizers groups it (matrices decay, vectors
    do not, each in parameter order), filled with minigpt's moments and step counts."""
    names = [n for n in tensors if n != "lm_head.weight"]  # nanoGPT's named_parameters(): tied once
    params = {n: torch.zeros_like(tensors[n]) for n in names}
    decay = [params[n] for n in names if tensors[n].dim() >= 2]
    no_decay = [params[n] for n in names if tensors[n].dim() < 2]
    adamw = torch.optim.AdamW(
        [{"params": decay, "weight_decay": run.get("weight_decay", 0.1)}, {"params": no_decay, "weight_decay": 0.0}],
        lr=run.get("learning_rate", 1e-3),
        betas=(run.get("beta1", 0.9), run.get("beta2", 0.99)),
    )
    for n in names:
        if f"exp_avg/{n}" in optim:  # (a sinusoidal model's wpe has none: it starts fresh)
            adamw.state[params[n]] = {
                "step": torch.tensor(float(optim[f"step/{n}"])),
                "exp_avg": torch.from_numpy(np.array(optim[f"exp_avg/{n}"], dtype=np.float32)),
                "exp_avg_sq": torch.from_numpy(np.array(optim[f"exp_avg_sq/{n}"], dtype=np.float32)),
            }
    return adamw.state_dict()
