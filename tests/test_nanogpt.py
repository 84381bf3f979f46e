"""nanoGPT checkpoints in and out: a nanoGPT model (its model.py, cut to what matters) is the reference."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

from minigpt.errors import UserError
from minigpt.nanogpt import read_meta_pkl

ROOT = Path(__file__).resolve().parents[1]

sys.path.insert(0, str(ROOT / "scripts"))
import convert_nanogpt as convert_script  # noqa: E402
import sample as sample_script  # noqa: E402


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_meta_pkl_is_read_without_running_code(tmp_path):
    good = {"vocab_size": 3, "itos": {0: "\n", 1: "a", 2: "b"}, "stoi": {"\n": 0, "a": 1, "b": 2}}
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps(good))
    assert read_meta_pkl(tmp_path / "meta.pkl") == good
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"itos": {0: "a"}, "x": Evil()}))
    with pytest.raises(UserError, match=r"refers to posix\.system"):
        read_meta_pkl(tmp_path / "evil.pkl")
    (tmp_path / "bpe.pkl").write_bytes(pickle.dumps({"vocab_size": 3}))
    with pytest.raises(UserError, match="'itos'"):
        read_meta_pkl(tmp_path / "bpe.pkl")


def test_without_torch_one_line_says_so(tmp_path, run_main, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch fails as if not installed
    r = run_main(convert_script.main, "ckpt.pt", "x.npz", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "pip install torch" in r.stderr, r.stderr


# ---------------------------------------------------------------- against nanoGPT itself

torch = pytest.importorskip("torch", reason="nanoGPT's .pt files need PyTorch")
nn, tF = torch.nn, torch.nn.functional


class NanoLayerNorm(nn.Module):
    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return tF.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class NanoAttention(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.c_attn = nn.Linear(a["n_embd"], 3 * a["n_embd"], bias=a["bias"])
        self.c_proj = nn.Linear(a["n_embd"], a["n_embd"], bias=a["bias"])
        self.n_head = a["n_head"]

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        y = tF.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class NanoBlock(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.ln_1, self.attn = NanoLayerNorm(a["n_embd"], a["bias"]), NanoAttention(a)
        self.ln_2 = NanoLayerNorm(a["n_embd"], a["bias"])
        self.mlp = nn.ModuleDict(
            dict(c_fc=nn.Linear(a["n_embd"], 4 * a["n_embd"], bias=a["bias"]), gelu=nn.GELU(),
                 c_proj=nn.Linear(4 * a["n_embd"], a["n_embd"], bias=a["bias"]))
        )  # fmt: skip

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        m = self.mlp
        return x + m.c_proj(m.gelu(m.c_fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    """nanoGPT's model.py GPT: same names, tying, inference path and generate()."""

    def __init__(self, a):
        super().__init__()
        self.block_size = a["block_size"]
        self.transformer = nn.ModuleDict(
            dict(wte=nn.Embedding(a["vocab_size"], a["n_embd"]), wpe=nn.Embedding(a["block_size"], a["n_embd"]),
                 drop=nn.Dropout(a["dropout"]), h=nn.ModuleList([NanoBlock(a) for _ in range(a["n_layer"])]),
                 ln_f=NanoLayerNorm(a["n_embd"], a["bias"]))
        )  # fmt: skip
        self.lm_head = nn.Linear(a["n_embd"], a["vocab_size"], bias=False)
        self.transformer.wte.weight = self.lm_head.weight

    def forward(self, idx):
        t = self.transformer
        x = t.drop(t.wte(idx) + t.wpe(torch.arange(idx.size(1))))
        for block in t.h:
            x = block(x)
        return self.lm_head(t.ln_f(x)[:, [-1], :])

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        for _ in range(max_new_tokens):
            idx_cond = idx if idx.size(1) <= self.block_size else idx[:, -self.block_size :]
            logits = self(idx_cond)[:, -1, :] / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("Inf")
            idx_next = torch.multinomial(tF.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx


CHARS = "\n !',.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def nanogpt_run(tmp_path, bias=True, compiled=False):
    """A trained-looking nanoGPT char run on disk: out/ckpt.pt and data/shakespeare_char/meta.pkl."""
    torch.manual_seed(0)
    a = dict(n_layer=2, n_head=4, n_embd=32, block_size=16, bias=bias, vocab_size=len(CHARS), dropout=0.0)
    model = NanoGPT(a).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    state = model.state_dict()
    if compiled:  # torch.compile's wrapper prefixes every name
        state = {"_orig_mod." + k: v for k, v in state.items()}
    config = dict(dataset="shakespeare_char", batch_size=64, learning_rate=1e-3, compile=compiled, out_dir="out")
    ckpt = dict(model=state, optimizer=optimizer.state_dict(), model_args=a, iter_num=250,
                best_val_loss=torch.tensor(1.4697), config=config)  # fmt: skip
    (tmp_path / "out").mkdir()
    torch.save(ckpt, tmp_path / "out" / "ckpt.pt")
    itos = dict(enumerate(CHARS[::-1]))  # not minigpt's sorted order: ids must be remapped
    meta = dict(vocab_size=len(CHARS), itos=itos, stoi={c: i for i, c in itos.items()})
    (tmp_path / "data" / "shakespeare_char").mkdir(parents=True)
    (tmp_path / "data" / "shakespeare_char" / "meta.pkl").write_bytes(pickle.dumps(meta))
    return model, meta


@pytest.fixture
def run_convert(run_main):
    """scripts/convert_nanogpt.py, run in this process (torch is imported once, not per conversion)."""
    return lambda *args, cwd: run_main(convert_script.main, *args, cwd=cwd)


@pytest.mark.parametrize("compiled", [False, True])
def test_converted_model_generates_nanogpts_greedy_tokens(tmp_path, compiled, run_main, run_convert):
    from minigpt.lm import load_model, sample_text

    nano, meta = nanogpt_run(tmp_path, compiled=compiled)
    r = run_convert("out/ckpt.pt", "mini/ckpt.npz", cwd=tmp_path)  # meta.pkl found in data/<dataset>/
    assert r.returncode == 0, r.stderr
    model, tokenizer, saved = load_model(tmp_path / "mini" / "ckpt.npz")
    assert saved["step"] == 250 and saved["best_val_loss"] == pytest.approx(1.4697)
    assert model.config.gelu == "none"
    prompt = "ROMEO:\nWhat say"
    ids = torch.tensor([[meta["stoi"][c] for c in prompt]])
    expected = "".join(meta["itos"][int(i)] for i in nano.generate(ids, 40, top_k=1)[0, len(prompt) :])
    assert sample_text(model, tokenizer, prompt, 40, temperature=0) == expected
    # sample.py reads the .pt itself too (meta.pkl beside it or in data/<dataset>/, as nanoGPT's sample.py)
    r = run_main(sample_script.main, "--init-from", "out/ckpt.pt", "--start", prompt, "--max-new-tokens", "40",
                 "--temperature", "0", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0 and r.stdout.startswith(prompt + expected), r.stderr


@pytest.mark.parametrize("bias", [True, False])
def test_round_trip_to_nanogpt_is_bit_identical(tmp_path, bias, run_convert):
    nano, meta = nanogpt_run(tmp_path, bias=bias)
    assert run_convert("out/ckpt.pt", "mini.npz", cwd=tmp_path).returncode == 0
    r = run_convert("mini.npz", "back", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    back = torch.load(tmp_path / "back" / "ckpt.pt", weights_only=True)
    original = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert back["model_args"] == original["model_args"] and back["iter_num"] == 250
    # minigpt's sorted characters are now the ids: nanoGPT reloads them with the written meta.pkl.
    new_meta = pickle.loads((tmp_path / "back" / "meta.pkl").read_bytes())
    order = [meta["stoi"][new_meta["itos"][i]] for i in range(len(CHARS))]
    assert back["model"].keys() == original["model"].keys()
    for name, tensor in original["model"].items():
        expected = tensor[order] if name in ("transformer.wte.weight", "lm_head.weight") else tensor
        assert torch.equal(back["model"][name], expected), name
    assert back["model"]["lm_head.weight"].data_ptr() == back["model"]["transformer.wte.weight"].data_ptr()
    reloaded = NanoGPT(back["model_args"])
    reloaded.load_state_dict(back["model"])  # strict, as nanoGPT's sample.py


def test_bad_nanogpt_inputs_are_one_line_errors(tmp_path, run_convert):
    nanogpt_run(tmp_path)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    torch.save({"model": {}}, tmp_path / "other.pt")
    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    cases = [
        (("junk.pt", "x.npz"), "not a readable nanoGPT checkpoint"),
        (("other.pt", "x.npz"), "not a nanoGPT checkpoint"),
        (("evil.pt", "x.npz"), "not a readable nanoGPT checkpoint"),  # weights_only refuses the global
        (("out/ckpt.pt", "x.npz", "--meta", "nowhere.pkl"), "no such file"),
        (("x.txt", "y"), "expected nanoGPT's .pt"),
    ]
    for args, message in cases:
        r = run_convert(*args, cwd=tmp_path)
        assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, (args, r.stderr)


def test_a_minigpt_run_exports_to_nanogpt_with_its_adamw_state(tmp_path, run_convert):
    from minigpt import GPTConfig
    from minigpt.checkpoint import load_checkpoint
    from minigpt.lm import RunConfig, train_lm

    (tmp_path / "input.txt").write_text("".join(f"{i}: To be, or not to be.\n" for i in range(300)))
    cfg = RunConfig(
        data=str(tmp_path / "input.txt"), out_dir=str(tmp_path / "out"), max_iters=4, eval_interval=4, eval_iters=1,
        batch_size=4, quiet=True, plot=False, sample_tokens=0, model=GPTConfig(n_layer=1, n_head=2, n_embd=16,
        block_size=16, gelu="none", bias=True, pos_encoding="sinusoidal"),
    )  # fmt: skip
    train_lm(cfg, log=lambda s: None)
    r = run_convert("out/last.npz", "nano", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ckpt = torch.load(tmp_path / "nano" / "ckpt.pt", weights_only=True)
    _, optim, _ = load_checkpoint(tmp_path / "out" / "last.npz")
    # nanoGPT's init_from='resume': strict weights, then configure_optimizers' two groups and their state.
    model = NanoGPT(ckpt["model_args"])
    model.load_state_dict(ckpt["model"])
    params = dict(model.named_parameters())
    groups = [{"params": [p for p in params.values() if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params.values() if p.dim() < 2], "weight_decay": 0.0}]  # fmt: skip
    adamw = torch.optim.AdamW(groups, lr=1e-3)
    adamw.load_state_dict(ckpt["optimizer"])
    for name in ("transformer.wte.weight", "transformer.h.0.attn.c_proj.bias"):
        state = adamw.state[params[name]]
        assert state["step"].item() == 4
        np.testing.assert_array_equal(state["exp_avg"].numpy(), optim[f"exp_avg/{name}"])
    assert params["transformer.wpe.weight"] not in adamw.state  # the fixed table had no moments
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    adamw.step()  # and nanoGPT trains on
