"""GPT-2 weights in Hugging Face's layout: a folder with config.json + model.safetensors, in and out.

HF's GPT-2 stores its linear layers as Conv1D with weights (in, out); minigpt's Linear is (out, in) like
PyTorch's, so the four matrices of each block are transposed both ways. Names otherwise match one to
one (HF's `h.0.attn.c_attn.weight` is minigpt's `transformer.h.0.attn.c_attn.weight`). Tensors are read
with safetensors' NumPy API; pickled weights (`pytorch_model.bin`) are refused, never unpickled.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import numpy as np

from minigpt.checkpoint import save_checkpoint
from minigpt.data import atomic_write
from minigpt.errors import UserError
from minigpt.gpt import GPT, GPTConfig, sinusoidal_table

CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# HF's GELU names -> GPTConfig.gelu. "gelu_new" (GPT-2's) and its aliases are the tanh approximation.
HF_ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "none"}
GPT2_VOCAB = 50257  # tiktoken's `gpt2` encoding
HF_REPOS = {n: f"openai-community/{n}" for n in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
HF_FILES = ("config.json", "model.safetensors")
MINIGPT_KEY = "minigpt"  # our own entry in config.json: the exact config and tokenizer of an export


# ---------------------------------------------------------------- finding the files


def hf_cache_dir() -> Path:
    """Hugging Face's hub cache: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser() / "hub"


def _cached_snapshot(repo: str) -> Path | None:
    """The newest cached snapshot of `repo` that holds model.safetensors (refs/main first)."""
    root = hf_cache_dir() / ("models--" + repo.replace("/", "--"))
    ref = root / "refs" / "main"
    candidates = [root / "snapshots" / ref.read_text().strip()] if ref.is_file() else []
    if (root / "snapshots").is_dir():
        candidates += sorted((root / "snapshots").iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    return next((c for c in candidates if (c / "model.safetensors").is_file()), None)


def _network_answers(host: str = "huggingface.co") -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        return False
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return True
    except OSError:
        return False


def resolve_pretrained(name_or_path: str | os.PathLike[str]) -> Path:
    """A local folder holding config.json + model.safetensors, for a path or a model name like `gpt2`.

    A name is looked up in the Hugging Face cache; it is downloaded only when `huggingface_hub` is
    installed and huggingface.co answers. Otherwise one line says which files to fetch and where.
    """
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.name.endswith(".safetensors"):
        return path.parent
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.is_absolute() or name.startswith(".") or name.count("/") > 1 or path.suffix:
        raise UserError(f"{name}: no such folder; pass a folder holding {' + '.join(HF_FILES)} or a name like gpt2")
    repos = [HF_REPOS[name], name] if name in HF_REPOS else [name]
    for repo in repos:
        snapshot = _cached_snapshot(repo)
        if snapshot is not None:
            return snapshot
    try:
        import huggingface_hub
    except ImportError:
        huggingface_hub = None
    if huggingface_hub is not None and _network_answers():
        try:
            return Path(huggingface_hub.snapshot_download(repos[0], allow_patterns=list(HF_FILES)))
        except Exception as e:  # noqa: BLE001 - any hub failure becomes the one-line hint below
            reason = f"download failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    else:
        reason = "huggingface_hub is not installed" if huggingface_hub is None else "huggingface.co does not answer"
    raise UserError(
        f"{name} is not a folder and not in the Hugging Face cache ({hf_cache_dir()}); {reason}. "
        f"Fetch {' and '.join(HF_FILES)} from https://huggingface.co/{repos[0]}/tree/main into a folder "
        "and pass that folder"
    )


# ---------------------------------------------------------------- config.json <-> GPTConfig


def config_from_hf(hf: dict[str, Any], where: str = "config.json") -> GPTConfig:
    """The GPTConfig of an HF GPT-2 config.json; anything minigpt's model cannot express is an error."""
    if hf.get("model_type") != "gpt2":
        raise UserError(f"{where}: model_type is {hf.get('model_type')!r}; minigpt loads GPT-2 models only (gpt2)")
    activation = hf.get("activation_function", "gelu_new")
    n_embd = hf.get("n_embd", 768)
    unsupported = {
        "activation_function": activation not in HF_ACTIVATIONS,
        "n_inner": hf.get("n_inner") not in (None, 4 * n_embd),
        "scale_attn_weights": hf.get("scale_attn_weights", True) is not True,
        "scale_attn_by_inverse_layer_idx": hf.get("scale_attn_by_inverse_layer_idx", False) is not False,
        "tie_word_embeddings": hf.get("tie_word_embeddings", True) is not True,
        "add_cross_attention": hf.get("add_cross_attention", False) is not False,
    }
    bad = [f"{k}={hf.get(k)!r}" for k, v in unsupported.items() if v]
    if bad:
        raise UserError(f"{where}: minigpt's GPT cannot express {', '.join(bad)}")
    try:
        config = GPTConfig(
            vocab_size=hf.get("vocab_size", GPT2_VOCAB),
            block_size=hf.get("n_positions", 1024),
            n_layer=hf.get("n_layer", 12),
            n_head=hf.get("n_head", 12),
            n_embd=n_embd,
            bias=True,  # GPT-2 has every bias; a bias-free export stores zeros
            gelu=HF_ACTIVATIONS[activation],
        )
    except (ValueError, TypeError) as e:
        raise UserError(f"{where}: {e}") from None
    return config


def config_to_hf(config: GPTConfig, vocab_size: int, tokenizer: dict[str, Any] | None) -> dict[str, Any]:
    """HF GPT-2's config.json for a minigpt model (HF defaults for what minigpt has no setting for)."""
    hf: dict[str, Any] = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new" if config.gelu == "tanh" else "gelu",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }
    eot = None
    if tokenizer is not None and tokenizer.get("kind") == "tiktoken" and tokenizer.get("name") == "gpt2":
        eot = GPT2_VOCAB - 1
    hf["bos_token_id"] = hf["eos_token_id"] = eot
    hf[MINIGPT_KEY] = {"model_config": config.to_dict(), "tokenizer": tokenizer}
    return hf


# ---------------------------------------------------------------- tensors


def expected_hf_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """HF GPT-2 tensor names (without the `transformer.` prefix) and their shapes; Conv1D weights are (in, out)."""
    C = config.n_embd
    shapes: dict[str, tuple[int, ...]] = {
        "wte.weight": (config.vocab_size, C),
        "wpe.weight": (config.block_size, C),
        "ln_f.weight": (C,),
        "ln_f.bias": (C,),
    }
    block = {
        "ln_1.weight": (C,),
        "ln_1.bias": (C,),
        "attn.c_attn.weight": (C, 3 * C),
        "attn.c_attn.bias": (3 * C,),
        "attn.c_proj.weight": (C, C),
        "attn.c_proj.bias": (C,),
        "ln_2.weight": (C,),
        "ln_2.bias": (C,),
        "mlp.c_fc.weight": (C, 4 * C),
        "mlp.c_fc.bias": (4 * C,),
        "mlp.c_proj.weight": (4 * C, C),
        "mlp.c_proj.bias": (C,),
    }
    for i in range(config.n_layer):
        shapes.update({f"h.{i}.{k}": v for k, v in block.items()})
    return shapes


def _hf_key(name: str) -> str | None:
    """An HF tensor name without its `transformer.` prefix; None for HF's non-weight buffers and the tied head."""
    name = name.removeprefix("transformer.")
    if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
        return None  # causal-mask buffers of old exports; the head is tied to wte (checked separately)
    return name


def _read_safetensors(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of model.safetensors (or of the shards named by model.safetensors.index.json), as float32."""
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{index} is unreadable ({e}); fetch it again") from None
        files = [folder / f for f in dict.fromkeys(weight_map.values())]
    else:
        pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt*")]
        if pickled:
            raise UserError(
                f"{folder} holds {pickled[0]} (a pickle, which can run code when loaded; minigpt never unpickles "
                "weights); get model.safetensors instead (the Hugging Face repo has one, or run "
                "`transformers.GPT2LMHeadModel.from_pretrained(dir).save_pretrained(dir)` once)"
            )
        raise UserError(f"{folder} has no model.safetensors; fetch it beside config.json")
    from safetensors import SafetensorError, safe_open

    tensors: dict[str, np.ndarray] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="np") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    tensors[name] = f.get_tensor(name)
        except (SafetensorError, OSError, TypeError, ValueError) as e:
            what = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"{path} is not a readable safetensors file ({what}); fetch it again") from None
    return tensors


def state_from_hf(tensors: dict[str, np.ndarray], config: GPTConfig, where: str) -> dict[str, np.ndarray]:
    """minigpt's state dict from HF GPT-2 tensors: names, Conv1D transposes, float32; every shape checked."""
    expected = expected_hf_shapes(config)
    given: dict[str, np.ndarray] = {}
    for name, array in tensors.items():
        key = _hf_key(name)
        if key is not None:
            given[key] = array
    problems = []
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    if missing:
        problems.append(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}")
    for k, shape in expected.items():
        if k in given and tuple(given[k].shape) != shape:
            hint = " (Conv1D weights are stored (in, out))" if k.endswith(CONV1D_WEIGHTS) else ""
            problems.append(f"{k} is {tuple(given[k].shape)}, config.json needs {shape}{hint}")
    if problems:
        raise UserError(f"{where} does not match its config.json: {'; '.join(problems[:4])}")
    head = tensors.get("lm_head.weight")
    if head is not None and not np.array_equal(head, given["wte.weight"]):
        raise UserError(f"{where}: lm_head.weight differs from wte.weight; minigpt's GPT ties them")
    state = {}
    for k, array in given.items():
        array = np.asarray(array, dtype=np.float32)
        state["transformer." + k] = np.ascontiguousarray(array.T) if k.endswith(CONV1D_WEIGHTS) else array
    return state


def state_to_hf(model: GPT, vocab_size: int | None = None) -> dict[str, np.ndarray]:
    """HF GPT-2 tensors of a minigpt model (float32, `transformer.` names, head tied so not stored).

    A bias-free model exports zero biases and a sinusoidal one its table as wpe, both exact.
    """
    config = model.config
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    if config.pos_encoding != "learned":
        state["transformer.wpe.weight"] = sinusoidal_table(config.block_size, config.n_embd)
    out: dict[str, np.ndarray] = {}
    for hf_name, shape in expected_hf_shapes(config).items():
        array = state.get("transformer." + hf_name)
        if array is None:  # a bias the model does not have: it acts as zero
            array = np.zeros(shape, dtype=np.float32)
        elif hf_name.endswith(CONV1D_WEIGHTS):
            array = array.T
        out["transformer." + hf_name] = np.ascontiguousarray(array, dtype=np.float32)
    if vocab_size is not None:  # drop padding rows (never trained, never sampled)
        out["transformer.wte.weight"] = np.ascontiguousarray(out["transformer.wte.weight"][:vocab_size])
    return out


# ---------------------------------------------------------------- whole models


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{folder} has no config.json; fetch it beside model.safetensors") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not readable JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(hf, dict):
        raise UserError(f"{path} is not a JSON object")
    return hf


def _restore_minigpt_config(config: GPTConfig, hint: dict[str, Any], state: dict[str, np.ndarray]) -> GPTConfig:
    """The exact config of a minigpt export, if its zero biases and sinusoidal wpe are still as exported."""
    try:
        original = GPTConfig(**hint)
    except (ValueError, TypeError):
        return config
    if any(getattr(original, k) != getattr(config, k) for k in ("vocab_size", "block_size", "n_layer", "n_embd")):
        return config
    biases = [k for k in state if k.endswith(".bias")]
    if not original.bias and any(np.any(state[k]) for k in biases):
        original.bias = True  # trained elsewhere since: keep the biases
    if not original.bias:
        for k in biases:
            del state[k]
    if original.pos_encoding != "learned":
        table = sinusoidal_table(original.block_size, original.n_embd)
        if np.array_equal(state["transformer.wpe.weight"], table):
            del state["transformer.wpe.weight"]
        else:
            original.pos_encoding = "learned"
    original.dropout = config.dropout
    original.gelu = config.gelu  # config.json's activation_function decides
    return original


def load_hf(name_or_path: str | os.PathLike[str]) -> tuple[GPT, dict[str, Any]]:
    """A GPT from an HF GPT-2 folder or name, and its tokenizer as a dict (`tokenizer_from_dict` builds it).

    The tokenizer is the one a minigpt export recorded, else tiktoken's `gpt2` for a 50,257-id vocabulary.
    """
    folder = resolve_pretrained(name_or_path)
    hf = _read_config(folder)
    config = config_from_hf(hf, str(folder / "config.json"))
    state = state_from_hf(_read_safetensors(folder), config, str(folder))
    ours = hf.get(MINIGPT_KEY) if isinstance(hf.get(MINIGPT_KEY), dict) else {}
    if isinstance(ours.get("model_config"), dict):
        config = _restore_minigpt_config(config, ours["model_config"], state)
    tokenizer = ours.get("tokenizer")
    if tokenizer is None and config.vocab_size == GPT2_VOCAB:
        tokenizer = {"kind": "tiktoken", "name": "gpt2"}
    model = GPT.from_state_dict(config, state)
    return model.eval(), tokenizer


def save_hf(model: GPT, folder: str | os.PathLike[str], tokenizer: dict[str, Any] | None = None) -> Path:
    """Write config.json + model.safetensors in HF GPT-2's layout; returns the folder.

    With a tokenizer (its `to_dict()`), config.json records it and padding rows beyond its vocabulary
    are dropped, so a GPT-2-tokenizer model exports GPT-2's 50,257 rows.
    """
    from safetensors.numpy import save

    folder = Path(folder)
    vocab = tokenizer_vocab_size(tokenizer)
    vocab = vocab if vocab is not None and vocab < model.config.vocab_size else None
    tensors = state_to_hf(model, vocab)
    hf = config_to_hf(model.config, vocab or model.config.vocab_size, tokenizer)
    try:
        if folder.exists() and not folder.is_dir():
            raise UserError(f"{folder} is a file; save_pretrained needs a folder")
        with atomic_write(folder / "model.safetensors") as f:
            f.write(save(tensors, metadata={"format": "pt"}))  # "pt": what transformers expects
        with atomic_write(folder / "config.json") as f:
            f.write((json.dumps(hf, indent=2) + "\n").encode("utf-8"))
    except OSError as e:
        raise UserError(f"cannot write {folder}: {e.strerror or e}") from None
    return folder


def tokenizer_vocab_size(tokenizer: dict[str, Any] | None) -> int | None:
    """Ids of a tokenizer dict without building it (tiktoken's gpt2 needs no files for this)."""
    if tokenizer is None:
        return None
    if tokenizer.get("kind") == "tiktoken" and tokenizer.get("name") == "gpt2":
        return GPT2_VOCAB
    from minigpt.tokenizers import tokenizer_from_dict

    return tokenizer_from_dict(tokenizer).vocab_size


def save_weights(
    path: str | os.PathLike[str], model: GPT, tokenizer: dict[str, Any], meta: dict[str, Any] | None = None
) -> Path:
    """A weights-only minigpt checkpoint: config, tokenizer and weights (a tied one once), no optimizer state.

    `load_model`, sample.py and `--init-from` read it; `--resume` cannot (there is no run to resume).
    From `meta` the step, best val loss and data source are kept.
    """
    kept = {k: v for k, v in (meta or {}).items() if k in ("step", "best_val_loss", "data", "source")}
    meta = {"model_config": model.config.to_dict(), "tokenizer": tokenizer, **kept, "weights_only": True}
    save_checkpoint(path, model=model.state_dict(), optimizer=None, meta=meta)
    return Path(path)
