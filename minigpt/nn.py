"""Neural-network modules: Module, Parameter and the layers a GPT is built from (like torch.nn).

A Module finds its Parameters and submodules by walking its own attributes in definition order
(micrograd's `parameters()` idea, with PyTorch's dotted names): an attribute that is a Parameter,
a Module, or a list/tuple/dict of them is part of the model. Nothing has to be registered by hand.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import numpy as np

from minigpt import functional as F
from minigpt.autograd import backend
from minigpt.autograd.tensor import Tensor
from minigpt.errors import UserError

# The default generator for initialisation and dropout when no `rng` is passed. Seeded, so a run
# that never mentions randomness is still reproducible; `manual_seed` resets it.
_default_rng = np.random.default_rng(0)
_init_weights = True  # see no_init
_device_rngs: dict[str, Any] = {}


def manual_seed(seed: int) -> None:
    """Reseed the default generator used by layers built or run without an explicit `rng`."""
    global _default_rng
    _default_rng = np.random.default_rng(seed)
    _device_rngs.clear()


def _dropout_rng(x: Tensor) -> Any:
    """A generator on x's device: CuPy needs its own, seeded from the NumPy default so runs repeat."""
    if x.device == "cpu":
        return _default_rng
    rng = _device_rngs.get(x.device)
    if rng is None:
        xp = backend.get_array_module(x.data)
        rng = _device_rngs[x.device] = xp.random.default_rng(int(_default_rng.integers(2**63)))
    return rng


class StateDictError(UserError, ValueError):
    """A state dict that does not fit the model or optimizer (names, shapes). Names every bad key."""


def raise_state_problems(owner: str, problems: dict[str, list[str]], hint: str) -> None:
    """Raise one StateDictError listing every non-empty kind of problem ("missing: a, b; unexpected: c")."""
    text = "; ".join(f"{kind}: {', '.join(keys)}" for kind, keys in problems.items() if keys)
    if text:
        raise StateDictError(f"{owner}: {text} ({hint})")


class IncompatibleKeys(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]


class Parameter(Tensor):
    """A Tensor that is a model weight: always requires grad, always floating point.

    `name` is the dotted name under which the owning model last listed it (set by
    `named_parameters()`), so an optimizer built from `model.parameters()` can key its state by name.
    """

    __slots__ = ("name",)

    def __init__(self, data: Any, dtype: Any = None):
        if isinstance(data, Tensor):
            data = data.data
        if dtype is None and backend.is_array(data) and data.dtype.kind != "f":
            dtype = np.float32  # integer data would make an integer weight, which cannot learn
        super().__init__(data, requires_grad=True, dtype=dtype)
        self.name: str | None = None

    def __repr__(self) -> str:
        return "Parameter(" + super().__repr__() + ")"


# Instance attributes that are the Module's own bookkeeping, never members of the model.
_BOOKKEEPING = frozenset({"training", "_buffers", "_persistent"})


def _flatten(prefix: str, value: Any) -> Iterator[tuple[str, Any]]:
    """(name, member) for a Parameter/Module, or for each one inside (nested) lists, tuples and dicts."""
    if isinstance(value, (Parameter, Module)):
        yield prefix, value
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _flatten(f"{prefix}.{i}", v)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _flatten(f"{prefix}.{k}", v)


def _as_array(v: Any) -> Any:
    if isinstance(v, Tensor):
        return v.data
    return v if backend.is_array(v) else np.asarray(v)


def _host_copy(a: Any) -> np.ndarray:
    out = backend.to_numpy(a)
    return out.copy() if out is a else out  # from the GPU the transfer already made a copy


class Module:
    """Base class of every layer and model. Subclasses set attributes in __init__ and define forward()."""

    training: bool = True  # a class default, so subclasses need not call super().__init__()

    def __init__(self) -> None:
        self.training = True

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} has no forward()")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    # ------------------------------------------------------------------ buffers

    def register_buffer(self, name: str, value: Any, persistent: bool = False) -> None:
        """Keep a non-learned array (e.g. a sinusoidal table) as a Tensor that `to()` moves.

        It is read as `self.<name>`, and appears in `state_dict()` only when `persistent`.
        """
        if not name.isidentifier() or name in vars(self):
            raise KeyError(f"register_buffer: {name!r} is not an identifier or is already an attribute")
        self.__dict__.setdefault("_buffers", {})[name] = value if isinstance(value, Tensor) else Tensor(value)
        persistent_names = self.__dict__.setdefault("_persistent", set())
        (persistent_names.add if persistent else persistent_names.discard)(name)

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: buffers live in _buffers, not the instance dict.
        buffers = self.__dict__.get("_buffers")
        if buffers is not None and name in buffers:
            return buffers[name]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def __setattr__(self, name: str, value: Any) -> None:
        buffers = self.__dict__.get("_buffers")
        if buffers is not None and name in buffers:  # reassigning a buffer keeps it a buffer
            buffers[name] = value if isinstance(value, Tensor) else Tensor(value)
        else:
            object.__setattr__(self, name, value)

    def named_buffers(self, prefix: str = "") -> Iterator[tuple[str, Tensor]]:
        for mod_name, mod in self.named_modules(prefix):
            for name, buf in mod.__dict__.get("_buffers", {}).items():
                yield (f"{mod_name}.{name}" if mod_name else name), buf

    # ------------------------------------------------------------------ traversal

    def _members(self) -> Iterator[tuple[str, Any]]:
        """This module's own Parameters and submodules, in definition order, names relative to it."""
        for key, value in vars(self).items():
            if key not in _BOOKKEEPING:
                yield from _flatten(key, value)

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        """(name, module) for self (name "") and every submodule, depth first; a shared module once."""
        seen: set[int] = set()
        stack: list[tuple[str, Module]] = [(prefix, self)]
        while stack:
            name, mod = stack.pop()
            if id(mod) in seen:
                continue
            seen.add(id(mod))
            yield name, mod
            subs = [(f"{name}.{n}" if name else n, m) for n, m in mod._members() if isinstance(m, Module)]
            stack.extend(reversed(subs))  # reversed so they pop in definition order

    def modules(self) -> Iterator[Module]:
        return (m for _, m in self.named_modules())

    def named_children(self) -> Iterator[tuple[str, Module]]:
        seen: set[int] = set()
        for name, m in self._members():
            if isinstance(m, Module) and id(m) not in seen:
                seen.add(id(m))
                yield name, m

    def children(self) -> Iterator[Module]:
        return (m for _, m in self.named_children())

    def _all_named_parameters(self, prefix: str = "", active: frozenset[int] = frozenset()) -> Iterator[Any]:
        """Every (name, Parameter), tied or shared ones under each of their names, in definition order."""
        active = active | {id(self)}  # the modules on the current path: a back-reference is not a child
        for name, member in self._members():
            full = prefix + name
            if isinstance(member, Parameter):
                yield full, member
            elif id(member) not in active:
                yield from member._all_named_parameters(full + ".", active)

    def named_parameters(self) -> Iterator[tuple[str, Parameter]]:
        """(dotted name, Parameter) in definition order; a tied Parameter once, under its first name.

        Sets each Parameter's `name`, so optimizers built from the result can name their state.
        """
        seen: set[int] = set()
        for name, p in self._all_named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                p.name = name
                yield name, p

    def parameters(self) -> Iterator[Parameter]:
        return (p for _, p in self.named_parameters())

    def num_parameters(self) -> int:
        """Number of learned scalars (a tied weight counted once)."""
        return sum(p.data.size for p in self.parameters())

    # ------------------------------------------------------------------ modes and grads

    def train(self, mode: bool = True) -> Module:
        for m in self.modules():
            m.training = mode
        return self

    def eval(self) -> Module:
        return self.train(False)

    def apply(self, fn: Callable[[Module], Any]) -> Module:
        """Call fn on every submodule and self (nanoGPT's `self.apply(self._init_weights)`)."""
        for m in self.modules():
            fn(m)
        return self

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def to(self, device: str) -> Module:
        """Move every parameter, gradient and buffer to `device` in place; returns self.

        The Parameter objects stay the same (only their arrays change), so optimizers and tied
        weights keep working.
        """
        for p in self.parameters():
            p.data = backend.to_device(p.data, device)
            if p.grad is not None:
                p.grad = backend.to_device(p.grad, device)
        for _, buf in self.named_buffers():
            buf.data = backend.to_device(buf.data, device)
        return self

    # ------------------------------------------------------------------ state dict

    def _state_tensors(self) -> dict[str, Tensor]:
        """Every saved name -> its Tensor: all parameter names (tied duplicates too), persistent buffers."""
        out: dict[str, Tensor] = dict(self._all_named_parameters())
        for mod_name, mod in self.named_modules():
            persistent = mod.__dict__.get("_persistent", ())
            for name, buf in mod.__dict__.get("_buffers", {}).items():
                if name in persistent:
                    out[f"{mod_name}.{name}" if mod_name else name] = buf
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        """{name: NumPy copy} of every parameter (each name of a tied one) and persistent buffer.

        Copies to the host; the live model stays where it is. A tied parameter is copied once and
        its names share that one array (as PyTorch's share storage), so savers can store it once.
        """
        copies: dict[int, np.ndarray] = {}
        out = {}
        for name, t in self._state_tensors().items():
            if id(t) not in copies:
                copies[id(t)] = _host_copy(t.data)
            out[name] = copies[id(t)]
        return out

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> IncompatibleKeys:
        """Copy `state` into the existing arrays (keeping their device and dtype).

        Shape mismatches always raise; with `strict`, so do missing and unexpected names. A tied
        weight counts as present when any of its names is given. Nothing is written unless all fits.
        """
        targets = self._state_tensors()
        unexpected = sorted(k for k in state if k not in targets)
        covered = {id(targets[k]) for k in state if k in targets}
        missing = [k for k, t in targets.items() if id(t) not in covered]
        arrays = {k: _as_array(v) for k, v in state.items() if k in targets}
        mismatched = [
            f"{k} (given {tuple(a.shape)}, model {targets[k].shape})"
            for k, a in arrays.items()
            if tuple(a.shape) != targets[k].shape
        ]
        not_numeric = [f"{k} (dtype {a.dtype})" for k, a in arrays.items() if a.dtype.kind not in "biuf"]
        problems = {"shape mismatch": mismatched, "not numbers": not_numeric}
        if strict:
            problems.update(missing=missing, unexpected=unexpected)
        raise_state_problems(
            f"load_state_dict into {type(self).__name__}", problems, "was it saved from a model with the same config?"
        )
        # Convert (and move) everything before writing anything: a failure here leaves the model as it was.
        converted = {
            k: backend.to_device(a, targets[k].device).astype(targets[k].dtype, copy=False) for k, a in arrays.items()
        }
        for k, a in converted.items():
            targets[k].data[...] = a
        return IncompatibleKeys(missing, unexpected)

    # ------------------------------------------------------------------ printing

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        lines = [f"({name}): " + repr(m).replace("\n", "\n  ") for name, m in self.named_children()]
        head = f"{type(self).__name__}({self.extra_repr()}"
        if not lines:
            return head + ")"
        return head + "\n  " + "\n  ".join(lines) + "\n)"


# ----------------------------------------------------------------------------- containers


class ModuleList(Module):
    """A list of modules, named 0, 1, 2, ... (like torch.nn.ModuleList)."""

    def __init__(self, modules: Iterable[Module] = ()) -> None:
        super().__init__()
        self._items: list[Module] = list(modules)

    def _members(self) -> Iterator[tuple[str, Any]]:
        for i, m in enumerate(self._items):
            yield from _flatten(str(i), m)

    def append(self, module: Module) -> ModuleList:
        self._items.append(module)
        return self

    def extend(self, modules: Iterable[Module]) -> ModuleList:
        self._items.extend(modules)
        return self

    def __getitem__(self, i: Any) -> Any:
        if not isinstance(i, slice):
            return self._items[i]
        part = type(self).__new__(type(self))  # same container type (a Sequential slice runs)
        Module.__init__(part)
        part._items = self._items[i]
        return part

    def __setitem__(self, i: int, module: Module) -> None:
        self._items[i] = module

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._items)


class ModuleDict(Module):
    """Named submodules reachable as attributes: `ModuleDict(dict(wte=..., h=...)).wte` (nanoGPT's style).

    The modules are ordinary attributes, so their names are the keys and order is insertion order.
    """

    def __init__(self, modules: dict[str, Module] | None = None) -> None:
        super().__init__()
        for key, module in (modules or {}).items():
            self[key] = module

    def __setitem__(self, key: str, module: Module) -> None:
        if not key.isidentifier() or key.startswith("_") or hasattr(type(self), key):
            raise KeyError(f"ModuleDict: {key!r} cannot be a key (it must be an identifier and not a method name)")
        setattr(self, key, module)

    def __getitem__(self, key: str) -> Module:
        if key not in self:
            raise KeyError(key)
        return vars(self)[key]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key not in _BOOKKEEPING and key in vars(self)

    def keys(self) -> list[str]:
        return [k for k in vars(self) if k not in _BOOKKEEPING]

    def items(self) -> list[tuple[str, Module]]:
        return [(k, vars(self)[k]) for k in self.keys()]

    def __len__(self) -> int:
        return len(self.keys())

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())


class Sequential(ModuleList):
    """Modules applied one after another."""

    def __init__(self, *modules: Module) -> None:
        super().__init__(modules)

    def forward(self, x: Any) -> Any:
        for m in self._items:
            x = m(x)
        return x


# ----------------------------------------------------------------------------- layers


@contextlib.contextmanager
def no_init() -> Iterator[None]:
    """Within: Linear and Embedding leave their weights uninitialised (np.empty), for a model whose every
    weight a state dict replaces next (as Hugging Face's no_init_weights): loading GPT-2 124M is then
    not paced by 124M random draws. See GPT.from_state_dict."""
    global _init_weights
    before, _init_weights = _init_weights, False
    try:
        yield
    finally:
        _init_weights = before


def init_enabled() -> bool:
    """False within no_init(): a model's own initialisation is skipped too."""
    return _init_weights


def _uniform(rng: np.random.Generator, bound: float, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    if not _init_weights:
        return np.empty(shape, dtype)
    # Drawn in float64 and then cast, so the same seed gives the same weights in any dtype.
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


class Linear(Module):
    """y = x @ weight.T + bias with weight (out_features, in_features), initialised like PyTorch.

    PyTorch's default init is uniform in ±1/√in_features for both weight and bias.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        rng: np.random.Generator | None = None,
        dtype: Any = np.float32,
    ) -> None:
        super().__init__()
        rng = rng if rng is not None else _default_rng
        self.in_features, self.out_features = in_features, out_features
        bound = 1.0 / np.sqrt(in_features)
        self.weight = Parameter(_uniform(rng, bound, (out_features, in_features), dtype))
        self.bias = Parameter(_uniform(rng, bound, (out_features,), dtype)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Embedding(Module):
    """A lookup table of num_embeddings vectors, initialised normal(0, 1) like PyTorch."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        rng: np.random.Generator | None = None,
        dtype: Any = np.float32,
    ) -> None:
        super().__init__()
        rng = rng if rng is not None else _default_rng
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        shape = (num_embeddings, embedding_dim)
        self.weight = Parameter(rng.standard_normal(shape).astype(dtype) if _init_weights else np.empty(shape, dtype))

    def forward(self, ids: Any) -> Tensor:
        return F.embedding(ids, self.weight)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class LayerNorm(Module):
    """Normalise over the last dimension, then scale by weight (ones) and shift by bias (zeros, optional)."""

    def __init__(
        self, normalized_shape: int | tuple[int], eps: float = 1e-5, bias: bool = True, *, dtype: Any = np.float32
    ) -> None:
        super().__init__()
        if isinstance(normalized_shape, (tuple, list)):
            if len(normalized_shape) != 1:
                raise ValueError(f"LayerNorm normalises over the last dimension only; got {normalized_shape}")
            normalized_shape = normalized_shape[0]
        self.normalized_shape, self.eps = int(normalized_shape), eps
        self.weight = Parameter(np.ones(self.normalized_shape, dtype=dtype))
        self.bias = Parameter(np.zeros(self.normalized_shape, dtype=dtype)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, bias={self.bias is not None}"


class Dropout(Module):
    """Zero activations with probability p while training (scaling the rest by 1/(1-p)); identity in eval."""

    def __init__(self, p: float = 0.5, rng: Any = None) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1], got {p}")
        self.p, self.rng = p, rng

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        rng = self.rng if self.rng is not None else _dropout_rng(x)
        return F.dropout(x, self.p, training=True, rng=rng)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Tanh(Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.tanh(x)


class ReLU(Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x)


class GELU(Module):
    """GELU as torch.nn.GELU: exact (approximate="none") or GPT-2's tanh form (approximate="tanh")."""

    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(x, approximate=self.approximate)


class Sigmoid(Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.sigmoid(x)


ACTIVATIONS: dict[str, type[Module]] = {"tanh": Tanh, "relu": ReLU, "gelu": GELU, "sigmoid": Sigmoid}


class MLP(Module):
    """micrograd's MLP in tensor form: Linear layers nin -> sizes[0] -> ... -> sizes[-1].

    Every layer but the last is followed by the activation; the last is linear (it gives scores).
    """

    def __init__(
        self,
        nin: int,
        sizes: list[int],
        activation: str = "tanh",
        rng: np.random.Generator | None = None,
        *,
        dtype: Any = np.float32,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"MLP: unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
        if not sizes:
            raise ValueError("MLP: sizes must list at least one layer width")
        dims = [nin, *sizes]
        self.layers = ModuleList(Linear(a, b, rng=rng, dtype=dtype) for a, b in zip(dims[:-1], dims[1:]))
        self.act = ACTIVATIONS[activation]()

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = self.act(x)
        return x
