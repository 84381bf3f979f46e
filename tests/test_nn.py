"""minigpt.nn: registration, names, modes, state dicts, devices, and the layers (gradchecked)."""

from __future__ import annotations

import numpy as np
import pytest

import minigpt
from minigpt import nn
from minigpt.autograd import gradcheck
from minigpt.errors import UserError


class Block(nn.Module):
    def __init__(self, d: int, rng: np.random.Generator) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d, rng=rng)

    def forward(self, x: minigpt.Tensor) -> minigpt.Tensor:
        return x + self.fc(self.ln(x))


class TinyLM(nn.Module):
    """GPT-shaped: a ModuleDict holding an embedding and a ModuleList of blocks, a tied head."""

    def __init__(self, vocab: int = 7, d: int = 4, n_layer: int = 2, seed: int = 0) -> None:
        super().__init__()
        rng = np.random.default_rng(seed)
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(vocab, d, rng=rng),
                h=nn.ModuleList(Block(d, rng) for _ in range(n_layer)),
                ln_f=nn.LayerNorm(d, bias=False),
            )
        )
        self.lm_head = nn.Linear(d, vocab, bias=False, rng=rng)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying

    def forward(self, ids: np.ndarray) -> minigpt.Tensor:
        x = self.transformer.wte(ids)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


EXPECTED_NAMES = [
    "transformer.wte.weight",
    "transformer.h.0.ln.weight",
    "transformer.h.0.ln.bias",
    "transformer.h.0.fc.weight",
    "transformer.h.0.fc.bias",
    "transformer.h.1.ln.weight",
    "transformer.h.1.ln.bias",
    "transformer.h.1.fc.weight",
    "transformer.h.1.fc.bias",
    "transformer.ln_f.weight",
]


# ----------------------------------------------------------------------------- traversal


def test_named_parameters_dotted_in_definition_order_tied_once() -> None:
    model = TinyLM()
    names = [n for n, _ in model.named_parameters()]
    assert names == EXPECTED_NAMES
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())
    assert [p.name for p in model.parameters()] == EXPECTED_NAMES  # names set for optimizers
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.num_parameters() == 7 * 4 + 2 * (4 + 4 + 16 + 4) + 4


def test_state_dict_has_every_name_including_tied_duplicates() -> None:
    model = TinyLM()
    sd = model.state_dict()
    assert list(sd) == EXPECTED_NAMES + ["lm_head.weight"]
    assert all(type(v) is np.ndarray for v in sd.values())
    np.testing.assert_array_equal(sd["lm_head.weight"], sd["transformer.wte.weight"])
    sd["transformer.wte.weight"][...] = 123.0  # a copy: the model is untouched
    assert not np.any(model.transformer.wte.weight.data == 123.0)


def test_plain_lists_dicts_and_nested_containers_register() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            self.layers = [nn.Linear(2, 2), nn.Linear(2, 1)]  # no super().__init__(): still works
            self.heads = {"a": nn.Linear(1, 1, bias=False)}
            self.scale = nn.Parameter(np.ones(1))
            self.config = {"n": 3, "names": ["x"]}  # not members
            self.cache = minigpt.zeros(2)  # a plain Tensor is not a parameter

    m = M()
    assert [n for n, _ in m.named_parameters()] == [
        "layers.0.weight",
        "layers.0.bias",
        "layers.1.weight",
        "layers.1.bias",
        "heads.a.weight",
        "scale",
    ]
    assert [n for n, _ in m.named_modules()] == ["", "layers.0", "layers.1", "heads.a"]
    assert len(list(m.children())) == 3
    assert m.training


def test_shared_module_and_back_reference() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(2, 2)
            self.b = self.a  # the same module twice
            self.a.owner = self  # a cycle must not recurse forever

    m = M()
    assert [n for n, _ in m.named_parameters()] == ["a.weight", "a.bias"]
    assert list(m.state_dict()) == ["a.weight", "a.bias", "b.weight", "b.bias"]
    assert len(list(m.modules())) == 2


def test_train_eval_recursive_and_zero_grad() -> None:
    model = TinyLM()
    assert model.eval() is model
    assert not any(m.training for m in model.modules())
    model.train()
    assert all(m.training for m in model.modules())
    model(np.array([[1, 2, 3]])).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_apply_visits_every_module() -> None:
    model = TinyLM()
    seen: list[str] = []
    assert model.apply(lambda m: seen.append(type(m).__name__)) is model
    assert seen.count("Linear") == 3 and seen.count("LayerNorm") == 3 and seen[0] == "TinyLM"


def test_module_containers() -> None:
    seq = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x = minigpt.randn(5, 3, generator=np.random.default_rng(0))
    assert seq(x).shape == (5, 2)
    assert len(seq) == 3 and isinstance(seq[1], nn.Tanh)
    assert isinstance(seq[:2], nn.Sequential) and seq[:2](x).shape == (5, 4)
    assert [n for n, _ in seq.named_parameters()] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    md = nn.ModuleDict({"enc": nn.Linear(2, 2)})
    md["dec"] = nn.Linear(2, 3)
    assert md.keys() == ["enc", "dec"] and "dec" in md and md["enc"] is md.enc
    with pytest.raises(KeyError):
        md["train"] = nn.Linear(1, 1)  # would shadow a method


def test_buffers_moved_and_saved_only_when_persistent() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self.register_buffer("table", np.arange(6.0).reshape(3, 2))
            self.register_buffer("stats", np.zeros(2), persistent=True)

    m = M()
    assert isinstance(m.table, minigpt.Tensor) and not m.table.requires_grad
    assert list(m.state_dict()) == ["fc.weight", "fc.bias", "stats"]
    assert [n for n, _ in m.named_buffers()] == ["table", "stats"]
    sd = m.state_dict()
    sd["stats"] = np.array([5.0, 6.0])
    m.load_state_dict(sd)
    np.testing.assert_array_equal(m.stats.numpy(), [5.0, 6.0])
    assert m.to("cpu") is m
    m.table = np.ones((3, 2))  # reassigning keeps it a buffer
    assert [n for n, _ in m.named_buffers()] == ["table", "stats"] and "table" not in vars(m)


# ----------------------------------------------------------------------------- state dict loading


def test_state_dict_round_trip_in_place() -> None:
    a, b = TinyLM(seed=0), TinyLM(seed=1)
    params_before = list(b.parameters())
    arrays_before = [p.data for p in params_before]
    b.load_state_dict(a.state_dict())
    ids = np.array([[0, 3, 6, 2]])
    np.testing.assert_array_equal(a(ids).numpy(), b(ids).numpy())
    assert all(p is q for p, q in zip(b.parameters(), params_before))  # same objects, same arrays
    assert all(p.data is d for p, d in zip(b.parameters(), arrays_before))
    assert b.lm_head.weight is b.transformer.wte.weight  # still tied


def test_load_casts_to_the_models_dtype() -> None:
    m = nn.Linear(2, 2)
    m.load_state_dict({"weight": np.ones((2, 2), dtype=np.float64), "bias": [1, 2]})
    assert m.weight.dtype == np.float32 and m.bias.data.tolist() == [1.0, 2.0]


def test_strict_load_names_missing_unexpected_and_mismatched() -> None:
    model = TinyLM()
    sd = model.state_dict()
    del sd["transformer.h.1.fc.bias"]
    sd["transformer.h.9.fc.bias"] = np.zeros(4, np.float32)
    sd["transformer.ln_f.weight"] = np.ones(5, np.float32)
    before = model.transformer.wte.weight.numpy().copy()
    sd["transformer.wte.weight"] = np.zeros((7, 4), np.float32)
    with pytest.raises(nn.StateDictError) as err:
        model.load_state_dict(sd)
    msg = str(err.value)
    assert "missing: transformer.h.1.fc.bias" in msg
    assert "unexpected: transformer.h.9.fc.bias" in msg
    assert "transformer.ln_f.weight (given (5,), model (4,))" in msg
    assert isinstance(err.value, UserError) and isinstance(err.value, ValueError)
    np.testing.assert_array_equal(model.transformer.wte.weight.numpy(), before)  # nothing written


def test_non_strict_load_reports_keys_but_shape_mismatch_still_raises() -> None:
    model = TinyLM()
    sd = {"transformer.wte.weight": np.zeros((7, 4)), "extra": np.zeros(1)}
    result = model.load_state_dict(sd, strict=False)
    assert result.unexpected_keys == ["extra"]
    assert "transformer.h.0.ln.weight" in result.missing_keys
    assert "lm_head.weight" not in result.missing_keys  # tied: loaded through its other name
    assert np.all(model.lm_head.weight.data == 0)
    with pytest.raises(ValueError, match="shape mismatch"):
        model.load_state_dict({"transformer.wte.weight": np.zeros((3, 4))}, strict=False)


# ----------------------------------------------------------------------------- layers


def test_parameter_is_a_float_named_tensor() -> None:
    p = nn.Parameter(np.arange(3))
    assert p.requires_grad and p.dtype == np.float32 and p.name is None
    assert isinstance(p, minigpt.Tensor)
    assert nn.Parameter(np.zeros(2, np.float64)).dtype == np.float64


def test_linear_init_and_shapes() -> None:
    lin = nn.Linear(100, 30, rng=np.random.default_rng(0))
    assert lin.weight.shape == (30, 100) and lin.bias.shape == (30,)
    assert lin.weight.dtype == np.float32
    bound = 1 / np.sqrt(100)
    for p in (lin.weight, lin.bias):
        assert np.abs(p.numpy()).max() <= bound
        assert np.abs(p.numpy()).max() > 0.8 * bound
    x = minigpt.randn(2, 5, 100, generator=np.random.default_rng(1))
    np.testing.assert_allclose(lin(x).numpy(), x.numpy() @ lin.weight.numpy().T + lin.bias.numpy(), rtol=1e-5)
    assert nn.Linear(3, 2, bias=False).bias is None
    # the same seed gives the same weights, whatever the dtype
    w64 = nn.Linear(4, 3, rng=np.random.default_rng(5), dtype=np.float64).weight.numpy()
    w32 = nn.Linear(4, 3, rng=np.random.default_rng(5)).weight.numpy()
    np.testing.assert_array_equal(w32, w64.astype(np.float32))


def test_embedding_and_layernorm_defaults() -> None:
    emb = nn.Embedding(1000, 64, rng=np.random.default_rng(0))
    w = emb.weight.numpy()
    assert w.shape == (1000, 64) and abs(w.mean()) < 0.02 and abs(w.std() - 1) < 0.02
    ids = np.array([[3, 1], [999, 3]])
    np.testing.assert_array_equal(emb(ids).numpy(), w[ids])
    ln = nn.LayerNorm(8)
    assert ln.weight.numpy().tolist() == [1.0] * 8 and ln.bias.numpy().tolist() == [0.0] * 8
    assert nn.LayerNorm((8,), bias=False).bias is None
    y = ln(minigpt.randn(3, 8, generator=np.random.default_rng(0))).numpy()
    np.testing.assert_allclose(y.mean(-1), 0, atol=1e-6)
    np.testing.assert_allclose(y.std(-1), 1, atol=1e-3)


def test_dropout_train_and_eval() -> None:
    drop = nn.Dropout(0.5, rng=np.random.default_rng(0))
    x = minigpt.ones(1000)
    y = drop(x).numpy()
    assert set(np.unique(y)) == {0.0, 2.0} and 400 < (y == 0).sum() < 600
    drop.eval()
    assert drop(x) is x
    drop.train()
    nn.manual_seed(3)
    a = nn.Dropout(0.5)(x).numpy()
    nn.manual_seed(3)
    np.testing.assert_array_equal(a, nn.Dropout(0.5)(x).numpy())  # the default generator is seeded


def test_mlp_structure_and_activations() -> None:
    mlp = nn.MLP(2, [16, 16, 1], rng=np.random.default_rng(0))
    assert [n for n, _ in mlp.named_parameters()] == [f"layers.{i}.{k}" for i in range(3) for k in ("weight", "bias")]
    assert mlp.num_parameters() == 2 * 16 + 16 + 16 * 16 + 16 + 16 + 1
    x = minigpt.randn(5, 2, generator=np.random.default_rng(0))
    assert mlp(x).shape == (5, 1)
    for act in nn.ACTIVATIONS:
        assert nn.MLP(2, [3, 1], activation=act)(x).shape == (5, 1)
    with pytest.raises(ValueError, match="unknown activation"):
        nn.MLP(2, [1], activation="swish")
    assert "Linear(in_features=2, out_features=16, bias=True)" in repr(mlp)


def _gradcheck_module(module: nn.Module, make_input: object) -> None:
    """Gradcheck every parameter (and a float input) of a float64 module through its forward."""
    params = list(module.parameters())
    x = make_input

    def fn(*tensors: minigpt.Tensor) -> minigpt.Tensor:
        return module(tensors[-1] if isinstance(x, minigpt.Tensor) else x)

    inputs = [*params, x] if isinstance(x, minigpt.Tensor) else params
    assert gradcheck(fn, inputs)


def test_gradcheck_linear() -> None:
    rng = np.random.default_rng(0)
    lin = nn.Linear(4, 3, rng=rng, dtype=np.float64)
    _gradcheck_module(lin, minigpt.tensor(rng.standard_normal((2, 5, 4)), requires_grad=True))
    _gradcheck_module(
        nn.Linear(4, 3, bias=False, rng=rng, dtype=np.float64), minigpt.tensor(rng.standard_normal((3, 4)))
    )


def test_gradcheck_layernorm() -> None:
    rng = np.random.default_rng(0)
    ln = nn.LayerNorm(5, dtype=np.float64)
    ln.weight.data[...] = rng.standard_normal(5)  # away from the ones/zeros init
    ln.bias.data[...] = rng.standard_normal(5)
    _gradcheck_module(ln, minigpt.tensor(rng.standard_normal((3, 5)), requires_grad=True))
    _gradcheck_module(nn.LayerNorm(5, bias=False, dtype=np.float64), minigpt.tensor(rng.standard_normal((2, 2, 5))))


def test_gradcheck_embedding() -> None:
    emb = nn.Embedding(6, 3, rng=np.random.default_rng(0), dtype=np.float64)
    _gradcheck_module(emb, np.array([[0, 5, 5], [2, 0, 1]]))  # repeated ids sum


@pytest.mark.gpu
def test_to_cuda_in_place_keeps_ties_and_loads_back() -> None:
    model = TinyLM()
    sd = model.state_dict()
    params = list(model.parameters())
    model.register_buffer("table", np.ones(3))
    assert model.to("cuda") is model
    assert all(p is q and p.device == "cuda" for p, q in zip(model.parameters(), params))
    assert model.table.device == "cuda" and model.lm_head.weight is model.transformer.wte.weight
    out = model(np.array([[1, 2]]))
    assert out.device == "cuda"
    gpu_sd = model.state_dict()
    assert all(type(v) is np.ndarray for v in gpu_sd.values())
    model.load_state_dict(sd)
    assert model.transformer.wte.weight.device == "cuda"
    model.to("cpu")
    np.testing.assert_array_equal(model.transformer.wte.weight.numpy(), sd["transformer.wte.weight"])
