"""Tensor: an array on a backend (NumPy or CuPy), its gradient, and its place in the graph."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from minigpt.autograd import backend, function
from minigpt.autograd.function import Function, unbroadcast

_memory_kept = False  # backend.keep_freed_memory() applied (on the first backward pass, not on import)


def _default_dtype(data: Any, dtype: Any) -> Any:
    if dtype is not None:
        return np.dtype(dtype)
    if backend.is_array(data) or isinstance(data, np.generic):
        return data.dtype  # arrays keep their dtype: float64 stays float64, token ids stay integer
    return np.dtype(np.float32)  # Python numbers and lists become float32, as torch.tensor does


class Tensor:
    """A backend array with autograd. `data` is a NumPy or CuPy array; `grad` one of the same shape or None."""

    __slots__ = ("data", "grad", "requires_grad", "_ctx", "__weakref__")
    __array_ufunc__ = None  # make `ndarray <op> Tensor` call the Tensor's reflected operator

    def __init__(self, data: Any, requires_grad: bool = False, dtype: Any = None, device: str | None = None):
        if isinstance(data, Tensor):
            data = data.data
        dtype = _default_dtype(data, dtype)
        if backend.is_array(data):
            data = data if data.dtype == dtype else data.astype(dtype)
        else:
            data = np.asarray(data, dtype=dtype)
        if device is not None:
            data = backend.to_device(data, device)
        self.data = data
        self.grad: Any = None
        self._ctx: Function | None = None
        self.requires_grad = False
        if requires_grad:
            self.requires_grad_(True)

    # ------------------------------------------------------------------ properties

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape  # a tuple, from NumPy and CuPy alike

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def dtype(self) -> Any:
        return self.data.dtype

    @property
    def device(self) -> str:
        return backend.device_of(self.data)

    @property
    def is_leaf(self) -> bool:
        return self._ctx is None

    @property
    def T(self) -> Tensor:
        return self.permute(tuple(reversed(range(self.ndim))))

    def size(self, dim: int | None = None) -> Any:
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return int(self.data.size)

    def __len__(self) -> int:
        if self.ndim == 0:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    def requires_grad_(self, requires_grad: bool = True) -> Tensor:
        if requires_grad and self.dtype.kind != "f":
            raise TypeError(
                f"only floating-point tensors can require grad; this one is {self.dtype} "
                "(integer tensors hold ids, not values to differentiate)"
            )
        self.requires_grad = requires_grad
        return self

    def item(self) -> float | int | bool:
        if self.data.size != 1:
            raise ValueError(f"item(): the tensor has {self.data.size} elements, not 1")
        return self.data.reshape(()).item()

    def numpy(self) -> np.ndarray:
        """The data as a NumPy array (a host copy when the tensor lives on the GPU)."""
        return backend.to_numpy(self.data)

    def tolist(self) -> Any:
        return self.numpy().tolist()

    def detach(self) -> Tensor:
        """The same data, cut from the graph."""
        return Tensor(self.data)

    def to(self, device: str) -> Tensor:
        """This tensor on `device` ("cpu" or "cuda"): itself if already there, else a leaf copy."""
        data = backend.to_device(self.data, device)
        if data is self.data:
            return self
        return Tensor(data, requires_grad=self.requires_grad)

    def float(self) -> Tensor:
        return ops.cast(self, np.float32)

    def double(self) -> Tensor:
        return ops.cast(self, np.float64)

    def astype(self, dtype: Any) -> Tensor:
        return ops.cast(self, dtype)

    def __repr__(self) -> str:
        extra = ", requires_grad=True" if self.requires_grad else ""
        device = ", device='cuda'" if self.device == "cuda" else ""
        return f"tensor({backend.to_numpy(self.data)!r}{device}{extra})"

    # ------------------------------------------------------------------ autograd

    def backward(self, grad: Any = None, retain_graph: bool = False) -> None:
        """Accumulate d(self)/d(leaf) into every leaf's .grad that requires it.

        The graph is walked in reverse topological order, found iteratively (deep graphs cannot hit
        the recursion limit). Intermediate gradients live only for the walk; leaves accumulate.
        """
        if not self.requires_grad:
            raise RuntimeError("backward: this tensor does not require grad (no input had requires_grad=True)")
        global _memory_kept
        if not _memory_kept:  # training: keep freed activation buffers for the next step (see backend)
            _memory_kept = True
            backend.keep_freed_memory()
        xp = backend.get_array_module(self.data)
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(
                    f"backward: the output has shape {self.shape}, not a scalar; "
                    "pass grad= of that shape, or reduce it first (e.g. .sum())"
                )
            grad = xp.ones_like(self.data)
        else:
            grad = grad.data if isinstance(grad, Tensor) else xp.asarray(grad, dtype=self.dtype)
            if grad.shape != self.data.shape:
                raise ValueError(f"backward: grad has shape {tuple(grad.shape)}, expected {self.shape}")
        order: list[Any] = _topological_order(self)
        grads: dict[int, Any] = {id(self): grad}
        gathering = _multi_output_ops(order)  # ops of several outputs: their gradients, gathered
        for i in range(len(order) - 1, -1, -1):
            t, order[i] = order[i], None  # drop our reference so activations free as we go
            g = grads.pop(id(t), None)
            ctx = t._ctx
            if ctx is not None and ctx.output_ids is not None:
                g = _gather(gathering, ctx, t, g)  # all of its outputs' gradients once the last is reached
            if g is None:
                continue
            if ctx is None:  # a leaf: accumulate into a buffer it owns
                if g.dtype != t.data.dtype:
                    g = g.astype(t.data.dtype)
                if t.grad is None:
                    # Keep g itself only when nothing else can see it: it owns its memory and our
                    # local name is its sole reference (refcount 2 = `g` + getrefcount's argument).
                    # Otherwise (shared with another leaf, a view, user-held) store a copy.
                    sole_owner = g.flags.owndata and sys.getrefcount(g) == 2
                    t.grad = g if sole_owner else g.copy()
                else:
                    t.grad += g
                continue
            input_grads = ctx.backward(g)
            inputs = ctx.inputs
            if len(inputs) == 1:
                input_grads = (input_grads,)
            for parent, pg in zip(inputs, input_grads):
                if pg is None or not parent.requires_grad:
                    continue
                if isinstance(pg, np.generic):  # NumPy turns 0-d results into scalars
                    pg = np.asarray(pg)
                if pg.shape != parent.data.shape:
                    pg = unbroadcast(pg, parent.data.shape)
                key = id(parent)
                prev = grads.get(key)
                grads[key] = pg if prev is None else prev + pg
            input_grads = g = pg = prev = None  # no stray references (see the ownership test above)
            if not retain_graph:
                ctx.release()

    # ------------------------------------------------------------------ operators

    def __add__(self, other: Any) -> Tensor:
        return ops.add(self, other)

    def __radd__(self, other: Any) -> Tensor:
        return ops.add(self, other)

    def __sub__(self, other: Any) -> Tensor:
        return ops.sub(self, other)

    def __rsub__(self, other: Any) -> Tensor:
        return ops.add(ops.neg(self), other)

    def __mul__(self, other: Any) -> Tensor:
        return ops.mul(self, other)

    def __rmul__(self, other: Any) -> Tensor:
        return ops.mul(self, other)

    def __truediv__(self, other: Any) -> Tensor:
        return ops.div(self, other)

    def __rtruediv__(self, other: Any) -> Tensor:
        return ops.mul(ops.pow(self, -1), other)

    def __pow__(self, other: Any) -> Tensor:
        return ops.pow(self, other)

    def __rpow__(self, other: Any) -> Tensor:
        return ops.pow(as_tensor_like(other, self), self)

    def __neg__(self) -> Tensor:
        return ops.neg(self)

    def __matmul__(self, other: Any) -> Tensor:
        return ops.matmul(self, other)

    def __rmatmul__(self, other: Any) -> Tensor:
        return ops.matmul(as_tensor_like(other, self), self)

    def __getitem__(self, index: Any) -> Tensor:
        return ops.getitem(self, index)

    # Comparisons give boolean tensors outside the graph (masks), as in PyTorch.
    def __lt__(self, other: Any) -> Tensor:
        return Tensor(self.data < _raw(other))

    def __le__(self, other: Any) -> Tensor:
        return Tensor(self.data <= _raw(other))

    def __gt__(self, other: Any) -> Tensor:
        return Tensor(self.data > _raw(other))

    def __ge__(self, other: Any) -> Tensor:
        return Tensor(self.data >= _raw(other))

    __hash__ = object.__hash__

    # ------------------------------------------------------------------ methods (PyTorch names)

    def exp(self) -> Tensor:
        return ops.exp(self)

    def log(self) -> Tensor:
        return ops.log(self)

    def sqrt(self) -> Tensor:
        return ops.sqrt(self)

    def tanh(self) -> Tensor:
        return ops.tanh(self)

    def sigmoid(self) -> Tensor:
        return ops.sigmoid(self)

    def relu(self) -> Tensor:
        return ops.relu(self)

    def sum(self, dim: int | Sequence[int] | None = None, keepdim: bool = False) -> Tensor:
        return ops.sum(self, dim, keepdim)

    def mean(self, dim: int | Sequence[int] | None = None, keepdim: bool = False) -> Tensor:
        return ops.mean(self, dim, keepdim)

    def max(self, dim: int | Sequence[int] | None = None, keepdim: bool = False) -> Tensor:
        return ops.max(self, dim, keepdim)

    def var(self, dim: int | Sequence[int] | None = None, keepdim: bool = False, **kwargs: Any) -> Tensor:
        return ops.var(self, dim, keepdim, **kwargs)

    def reshape(self, *shape: Any) -> Tensor:
        return ops.reshape(self, *shape)

    view = reshape

    def flatten(self) -> Tensor:
        return ops.reshape(self, (-1,))

    def unsqueeze(self, dim: int) -> Tensor:
        dim = dim % (self.ndim + 1)
        return ops.reshape(self, self.shape[:dim] + (1,) + self.shape[dim:])

    def squeeze(self, dim: int) -> Tensor:
        if self.shape[dim] != 1:
            return self
        dim = dim % self.ndim
        return ops.reshape(self, self.shape[:dim] + self.shape[dim + 1 :])

    def permute(self, *dims: Any) -> Tensor:
        return ops.permute(self, *dims)

    def transpose(self, dim0: int, dim1: int) -> Tensor:
        return ops.transpose(self, dim0, dim1)

    def split(self, split_size_or_sections: int | Sequence[int], dim: int = 0) -> tuple[Tensor, ...]:
        return ops.split(self, split_size_or_sections, dim)

    def masked_fill(self, mask: Any, value: float) -> Tensor:
        return ops.masked_fill(self, mask, value)


def _raw(x: Any) -> Any:
    return x.data if isinstance(x, Tensor) else x


def as_tensor_like(x: Any, like: Tensor) -> Tensor:
    """A constant operand as a Tensor on `like`'s device; numbers take `like`'s dtype (no float64 upcasts)."""
    if isinstance(x, Tensor):
        return x
    xp = backend.get_array_module(like.data)
    if isinstance(x, (int, float, bool)) or backend.is_array(x) or isinstance(x, np.generic):
        dtype = like.dtype if like.dtype.kind == "f" else None
        if backend.is_array(x) and x.dtype.kind != "f":
            dtype = None
        t = Tensor.__new__(Tensor)
        t.data = xp.asarray(x, dtype=dtype)
        t.grad, t._ctx, t.requires_grad = None, None, False
        return t
    return Tensor(xp.asarray(np.asarray(x, dtype=like.dtype)))


def _topological_order(root: Tensor) -> list[Tensor]:
    """Tensors reachable from root through requires-grad edges, each after all of its inputs."""
    order: list[Tensor] = []
    expanded: set[int] = set()
    stack: list[tuple[Tensor, bool]] = [(root, False)]
    while stack:
        t, inputs_done = stack.pop()
        if inputs_done:
            order.append(t)
            continue
        if id(t) in expanded:  # reached again through another path
            continue
        expanded.add(id(t))
        stack.append((t, True))
        ctx = t._ctx
        if ctx is None:
            continue
        if ctx.released:
            raise RuntimeError(
                "backward: the graph was already freed by an earlier backward(); "
                "pass retain_graph=True to the first call to backprop twice"
            )
        for parent in ctx.inputs:
            if parent.requires_grad and id(parent) not in expanded:
                stack.append((parent, False))
    return order


def _multi_output_ops(order: list[Tensor]) -> dict[int, list[Any]]:
    """For each op of several outputs in the graph: [its outputs' gradients so far, how many of its
    outputs the walk has yet to reach]."""
    gathering: dict[int, list[Any]] = {}
    for t in order:
        ctx = t._ctx
        if ctx is not None and ctx.output_ids is not None:
            entry = gathering.setdefault(id(ctx), [[None] * len(ctx.output_ids), 0])
            entry[1] += 1
    return gathering


def _gather(gathering: dict[int, list[Any]], ctx: Function, t: Tensor, g: Any) -> tuple[Any, ...] | None:
    """Record output t's gradient g; once the op's last output in the graph is reached, all of them
    (None for an output no gradient reached, or when none did), else None."""
    entry = gathering[id(ctx)]
    entry[0][ctx.output_ids.index(id(t))] = g
    entry[1] -= 1
    if entry[1]:
        return None
    del gathering[id(ctx)]
    output_grads = tuple(entry[0])
    return None if all(og is None for og in output_grads) else output_grads


# ----------------------------------------------------------------------------- factories


def tensor(data: Any, requires_grad: bool = False, dtype: Any = None, device: str = "cpu") -> Tensor:
    """A new leaf tensor holding a copy of `data` (like torch.tensor)."""
    if isinstance(data, Tensor):
        data = data.data
    dtype = _default_dtype(data, dtype)
    xp = backend.get_array_module(data) if backend.is_array(data) else np
    return Tensor(xp.array(data, dtype=dtype), requires_grad=requires_grad, device=device)


def _shape(shape: tuple[Any, ...]) -> tuple[int, ...]:
    return tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape


def zeros(*shape: Any, dtype: Any = np.float32, device: str = "cpu", requires_grad: bool = False) -> Tensor:
    return Tensor(np.zeros(_shape(shape), dtype=dtype), requires_grad=requires_grad, device=device)


def ones(*shape: Any, dtype: Any = np.float32, device: str = "cpu", requires_grad: bool = False) -> Tensor:
    return Tensor(np.ones(_shape(shape), dtype=dtype), requires_grad=requires_grad, device=device)


def randn(
    *shape: Any,
    generator: np.random.Generator | None = None,
    dtype: Any = np.float32,
    device: str = "cpu",
    requires_grad: bool = False,
) -> Tensor:
    """Standard normal samples drawn on the CPU from `generator` (seeded runs match across devices)."""
    rng = generator if generator is not None else np.random.default_rng()
    data = rng.standard_normal(_shape(shape), dtype=np.float64).astype(dtype)
    return Tensor(data, requires_grad=requires_grad, device=device)


def arange(start: int, end: int | None = None, step: int = 1, dtype: Any = np.int64, device: str = "cpu") -> Tensor:
    if end is None:
        start, end = 0, start
    return Tensor(np.arange(start, end, step, dtype=dtype), device=device)


function.Tensor = Tensor  # Function.apply builds its results directly
from minigpt.autograd import ops  # noqa: E402  (ops builds on Tensor)
