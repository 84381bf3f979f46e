"""Primitive ops: elementwise, reductions, matmul, shape ops, indexing. Forward and backward side by side.

Every forward/backward works on raw backend arrays (NumPy or CuPy) and uses only their common API,
so the same code runs on both. Gradients are un-broadcast centrally by Tensor.backward.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from typing import Any

import numpy as np

from minigpt.autograd.backend import get_array_module, scatter_add, to_device
from minigpt.autograd.function import Function
from minigpt.autograd.tensor import Tensor, as_tensor_like


def _broadcast_error(name: str, a: Any, b: Any) -> ValueError:
    return ValueError(f"{name}: shapes {tuple(a.shape)} and {tuple(b.shape)} cannot be broadcast together")


# ----------------------------------------------------------------------------- elementwise binary


class Add(Function):
    def forward(self, a, b):
        try:
            return a + b
        except ValueError:
            raise _broadcast_error("add", a, b) from None

    def backward(self, g):
        return g, g


class Mul(Function):
    def forward(self, a, b):
        try:
            out = a * b
        except ValueError:
            raise _broadcast_error("mul", a, b) from None
        self.a, self.b = a, b
        return out

    def backward(self, g):
        ga, gb = self.needs_input_grad
        return (g * self.b if ga else None), (g * self.a if gb else None)


class Pow(Function):
    """a ** b with a tensor exponent."""

    def forward(self, a, b):
        try:
            out = a**b
        except ValueError:
            raise _broadcast_error("pow", a, b) from None
        self.a, self.b, self.out = a, b, out
        return out

    def backward(self, g):
        xp = get_array_module(g)
        ga, gb = self.needs_input_grad
        a, b, out = self.a, self.b, self.out
        grad_a = g * b * a ** (b - 1) if ga else None
        grad_b = g * out * xp.log(xp.where(a > 0, a, 1)) if gb else None  # d/db a^b = a^b ln a (a > 0)
        return grad_a, grad_b


class PowScalar(Function):
    """a ** p for a Python number p (squares and cubes by multiplication: float32 pow is slow)."""

    def forward(self, a, p):
        self.a, self.p = a, p
        if p == 2:
            return a * a
        if p == 3:
            return a * a * a
        if p == -1:
            return 1 / a
        if p == 0.5:
            return get_array_module(a).sqrt(a)
        return a**p

    def backward(self, g):
        a, p = self.a, self.p
        if p == 2:
            return g * (2 * a)
        if p == 3:
            return g * (3 * a * a)
        return g * (p * a ** (p - 1))


class Neg(Function):
    def forward(self, a):
        return -a

    def backward(self, g):
        return -g


class MatMul(Function):
    """a @ b with NumPy semantics: batched, batch dims broadcast, 1-D operands promoted."""

    def forward(self, a, b):
        if a.ndim == 0 or b.ndim == 0 or a.shape[-1] != b.shape[-2 if b.ndim > 1 else 0]:
            raise ValueError(f"matmul: shapes {tuple(a.shape)} and {tuple(b.shape)} are not aligned")
        try:
            out = a @ b
        except ValueError:
            raise ValueError(
                f"matmul: batch dims of {tuple(a.shape)} and {tuple(b.shape)} cannot be broadcast"
            ) from None
        self.a, self.b = a, b
        return out

    def backward(self, g):
        a, b = self.a, self.b
        # Promote 1-D operands as NumPy does, so the two formulas below hold for every case.
        a2 = a[None, :] if a.ndim == 1 else a
        b2 = b[:, None] if b.ndim == 1 else b
        if b.ndim == 1:
            g = g[..., None]
        if a.ndim == 1:
            g = g[..., None, :]
        ga, gb = self.needs_input_grad
        grad_a = grad_b = None
        if ga:
            grad_a = g @ b2.swapaxes(-1, -2)
            grad_a = grad_a[..., 0, :] if a.ndim == 1 else grad_a
        if gb:
            if b2.ndim == 2 and a2.ndim > 2:  # x @ W: fold all leading dims into one 2-D GEMM
                grad_b = a2.reshape(-1, a2.shape[-1]).T @ g.reshape(-1, g.shape[-1])
            else:
                grad_b = a2.swapaxes(-1, -2) @ g
            grad_b = grad_b[..., 0] if b.ndim == 1 else grad_b
        return grad_a, grad_b


class Where(Function):
    """cond ? a : b; cond is a boolean array (no gradient)."""

    def forward(self, a, b, cond):
        self.cond = cond
        try:
            return get_array_module(a).where(cond, a, b)
        except ValueError:
            raise _broadcast_error("where", a, b) from None

    def backward(self, g):
        xp = get_array_module(g)
        ga, gb = self.needs_input_grad
        zero = xp.zeros((), dtype=g.dtype)
        return (xp.where(self.cond, g, zero) if ga else None), (xp.where(self.cond, zero, g) if gb else None)


# ----------------------------------------------------------------------------- elementwise unary


class Exp(Function):
    def forward(self, a):
        self.out = get_array_module(a).exp(a)
        return self.out

    def backward(self, g):
        return g * self.out


class Log(Function):
    def forward(self, a):
        self.a = a
        return get_array_module(a).log(a)

    def backward(self, g):
        return g / self.a


class Sqrt(Function):
    def forward(self, a):
        self.out = get_array_module(a).sqrt(a)
        return self.out

    def backward(self, g):
        return g / (2 * self.out)


class Tanh(Function):
    def forward(self, a):
        self.out = get_array_module(a).tanh(a)
        return self.out

    def backward(self, g):
        out = self.out
        return g * (1 - out * out)


class Sigmoid(Function):
    def forward(self, a):
        xp = get_array_module(a)
        # 0.5 * (1 + tanh(x/2)) is sigmoid without overflow in exp for large |x|
        self.out = 0.5 * (1 + xp.tanh(0.5 * a))
        return self.out

    def backward(self, g):
        out = self.out
        return g * out * (1 - out)


class Relu(Function):
    def forward(self, a):
        self.out = get_array_module(a).maximum(a, 0)
        return self.out

    def backward(self, g):
        return g * (self.out > 0)


class Cast(Function):
    def forward(self, a, dtype):
        self.dtype = a.dtype
        return a.astype(dtype)

    def backward(self, g):
        return g.astype(self.dtype)


# ----------------------------------------------------------------------------- reductions


def _axes(dim: int | Sequence[int] | None, ndim: int) -> tuple[int, ...]:
    if dim is None:
        return tuple(range(ndim))
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    for d in dims:
        if not -ndim <= d < builtins.max(ndim, 1):
            raise IndexError(f"dim {d} is out of range for a tensor with {ndim} dims")
    return tuple(sorted(d % builtins.max(ndim, 1) for d in dims))


def _kept_shape(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, ...]:
    """The shape a reduction over `axes` has with keepdim=True."""
    return tuple(1 if i in axes else n for i, n in enumerate(shape))


class Sum(Function):
    def forward(self, a, axes, keepdim):
        self.shape, self.kept = a.shape, _kept_shape(a.shape, axes)
        return a.sum(axis=axes, keepdims=keepdim)

    def backward(self, g):
        return get_array_module(g).broadcast_to(g.reshape(self.kept), self.shape)


class Max(Function):
    """Maximum over dims (values only, like torch.amax); tied maxima share the gradient evenly."""

    def forward(self, a, axes, keepdim):
        if a.size == 0:
            raise ValueError("max: cannot reduce an empty tensor")
        out = a.max(axis=axes, keepdims=True)
        self.mask, self.axes = a == out, axes
        return out if keepdim else out.reshape([n for i, n in enumerate(a.shape) if i not in axes])

    def backward(self, g):
        mask = self.mask
        count = mask.sum(axis=self.axes, keepdims=True)
        return mask * (g.reshape(count.shape) / count)


# ----------------------------------------------------------------------------- shape ops


class Reshape(Function):
    def forward(self, a, shape):
        self.shape = a.shape
        try:
            return a.reshape(shape)
        except ValueError:
            raise ValueError(f"reshape: cannot reshape {tuple(a.shape)} ({a.size} elements) to {shape}") from None

    def backward(self, g):
        return g.reshape(self.shape)


class Permute(Function):
    def forward(self, a, dims):
        self.dims = dims
        try:
            return a.transpose(dims)  # raises for a repeated or out-of-range dim
        except ValueError:
            raise ValueError(f"permute: {dims} is not a permutation of the {a.ndim} dims of {tuple(a.shape)}") from None

    def backward(self, g):
        inverse = [0] * len(self.dims)
        for i, d in enumerate(self.dims):
            inverse[d % len(self.dims)] = i
        return g.transpose(inverse)


def _is_basic_index(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in items)


class GetItem(Function):
    """a[index]. Integer-array indices may repeat: backward scatter-adds."""

    def forward(self, a, index):
        self.shape, self.index = a.shape, index
        return a[index]

    def backward(self, g):
        grad = get_array_module(g).zeros(self.shape, dtype=g.dtype)
        if _is_basic_index(self.index):
            grad[self.index] = g  # basic indexing never repeats an element
        else:
            scatter_add(grad, self.index, g)
        return grad


class Split(Function):
    """Consecutive pieces of `sizes` along dim, as views (torch.split). One op for all the pieces:
    backward writes their gradients into one buffer (q, k and v of attention cost one, not three)."""

    def forward(self, a, sizes, dim):
        self.like, self.dim, self.sizes = a, dim, sizes  # a view: the pieces keep its memory alive anyway
        pieces, start = [], 0
        for size in sizes:
            pieces.append(a[(slice(None),) * dim + (slice(start, start + size),)])
            start += size
        return tuple(pieces)

    def backward(self, grads):
        some = next(g for g in grads if g is not None)
        # laid out in memory as the input is (attention's q, k, v: a transposed view of one GEMM's
        # output), so the transposes and reshapes back to that GEMM's gradient are views, not copies
        grad = get_array_module(some).empty_like(self.like, dtype=some.dtype)
        start = 0
        for size, g in zip(self.sizes, grads):
            grad[(slice(None),) * self.dim + (slice(start, start + size),)] = 0 if g is None else g
            start += size
        return grad


class Cat(Function):
    def forward(self, *arrays, dim):
        xp = get_array_module(arrays[0])
        self.dim = dim
        self.sizes = [a.shape[dim] for a in arrays]
        try:
            return xp.concatenate(arrays, axis=dim)
        except ValueError:
            shapes = ", ".join(str(tuple(a.shape)) for a in arrays)
            raise ValueError(f"cat: shapes {shapes} differ outside dim {dim}") from None

    def backward(self, g):
        xp = get_array_module(g)
        bounds = np.cumsum(self.sizes)[:-1].tolist()
        return tuple(xp.split(g, bounds, axis=self.dim))


class Stack(Function):
    def forward(self, *arrays, dim):
        xp = get_array_module(arrays[0])
        self.dim = dim
        try:
            return xp.stack(arrays, axis=dim)
        except ValueError:
            shapes = ", ".join(str(tuple(a.shape)) for a in arrays)
            raise ValueError(f"stack: all tensors must have the same shape, got {shapes}") from None

    def backward(self, g):
        xp = get_array_module(g)
        return tuple(xp.moveaxis(g, self.dim, 0))


# ----------------------------------------------------------------------------- public wrappers


def add(a: Tensor, b: Any) -> Tensor:
    return Add.apply(a, as_tensor_like(b, a))


def sub(a: Tensor, b: Any) -> Tensor:
    if isinstance(b, (int, float)):
        return Add.apply(a, as_tensor_like(-b, a))
    return Add.apply(a, Neg.apply(as_tensor_like(b, a)))


def mul(a: Tensor, b: Any) -> Tensor:
    return Mul.apply(a, as_tensor_like(b, a))


def div(a: Tensor, b: Any) -> Tensor:
    if isinstance(b, (int, float)):
        return Mul.apply(a, as_tensor_like(1.0 / b, a))
    return Mul.apply(a, PowScalar.apply(as_tensor_like(b, a), p=-1))


def pow(a: Tensor, b: Any) -> Tensor:
    if isinstance(b, (int, float)):
        return PowScalar.apply(a, p=b)
    return Pow.apply(a, as_tensor_like(b, a))


def neg(a: Tensor) -> Tensor:
    return Neg.apply(a)


def matmul(a: Tensor, b: Any) -> Tensor:
    return MatMul.apply(a, as_tensor_like(b, a))


def exp(a: Tensor) -> Tensor:
    return Exp.apply(a)


def log(a: Tensor) -> Tensor:
    return Log.apply(a)


def sqrt(a: Tensor) -> Tensor:
    return Sqrt.apply(a)


def tanh(a: Tensor) -> Tensor:
    return Tanh.apply(a)


def sigmoid(a: Tensor) -> Tensor:
    return Sigmoid.apply(a)


def relu(a: Tensor) -> Tensor:
    return Relu.apply(a)


def sum(a: Tensor, dim: int | Sequence[int] | None = None, keepdim: bool = False) -> Tensor:  # noqa: A001
    return Sum.apply(a, axes=_axes(dim, a.ndim), keepdim=keepdim)


def _count(a: Tensor, axes: tuple[int, ...]) -> int:
    """How many elements a reduction over `axes` combines."""
    return int(np.prod([a.shape[d] for d in axes])) if axes else 1


def mean(a: Tensor, dim: int | Sequence[int] | None = None, keepdim: bool = False) -> Tensor:
    axes = _axes(dim, a.ndim)
    count = _count(a, axes)
    return Sum.apply(a, axes=axes, keepdim=keepdim) * (1.0 / count if count else float("nan"))  # empty: nan, as torch


def max(a: Tensor, dim: int | Sequence[int] | None = None, keepdim: bool = False) -> Tensor:  # noqa: A001
    return Max.apply(a, axes=_axes(dim, a.ndim), keepdim=keepdim)


def var(
    a: Tensor,
    dim: int | Sequence[int] | None = None,
    keepdim: bool = False,
    *,
    correction: int = 1,
    unbiased: bool | None = None,
) -> Tensor:
    """Variance as torch.var: Bessel's correction (divide by n - 1) unless correction=0/unbiased=False.

    As torch, the divisor is max(0, n - correction): with none left (one element, unbiased) the result is nan
    (inf where the squares do not sum to 0), not 0.
    """
    if unbiased is not None:
        correction = 1 if unbiased else 0
    axes = _axes(dim, a.ndim)
    centered = a - mean(a, dim=axes, keepdim=True)
    dof = _count(a, axes) - correction
    return sum(centered * centered, dim=axes, keepdim=keepdim) * (1.0 / dof if dof > 0 else float("inf"))


def reshape(a: Tensor, *shape: Any) -> Tensor:
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    return Reshape.apply(a, shape=shape)


def permute(a: Tensor, *dims: Any) -> Tensor:
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    return Permute.apply(a, dims=dims)


def transpose(a: Tensor, dim0: int, dim1: int) -> Tensor:
    dims = list(range(a.ndim))
    dims[dim0], dims[dim1] = dims[dim1], dims[dim0]
    return Permute.apply(a, dims=tuple(dims))


def getitem(a: Tensor, index: Any) -> Tensor:
    index = _unwrap_index(index)
    return GetItem.apply(a, index=index)


def _unwrap_index(index: Any) -> Any:
    """Tensors and lists inside an index become backend arrays."""
    if isinstance(index, tuple):
        return tuple(_unwrap_index(i) for i in index)
    if isinstance(index, Tensor):
        return index.data
    if isinstance(index, list):
        return np.asarray(index)
    return index


def cat(tensors: Sequence[Tensor], dim: int = 0) -> Tensor:
    if not tensors:
        raise ValueError("cat: expected a non-empty list of tensors")
    return Cat.apply(*tensors, dim=dim)


def stack(tensors: Sequence[Tensor], dim: int = 0) -> Tensor:
    if not tensors:
        raise ValueError("stack: expected a non-empty list of tensors")
    return Stack.apply(*tensors, dim=dim)


def split(a: Tensor, split_size_or_sections: int | Sequence[int], dim: int = 0) -> tuple[Tensor, ...]:
    """As torch.split: chunks of a given size (the last may be smaller) or a list of sizes."""
    n = a.shape[dim]
    if isinstance(split_size_or_sections, int):
        if split_size_or_sections <= 0:
            raise ValueError("split: split size must be positive")
        sizes = [split_size_or_sections] * (n // split_size_or_sections)
        if n % split_size_or_sections:
            sizes.append(n % split_size_or_sections)
    else:
        sizes = list(split_size_or_sections)
        if builtins.sum(sizes) != n:
            raise ValueError(f"split: sizes {sizes} do not add up to {n} (dim {dim} of {tuple(a.shape)})")
    return Split.apply(a, sizes=tuple(sizes), dim=dim % a.ndim)


def where(cond: Any, a: Any, b: Any) -> Tensor:
    """Elementwise cond ? a : b (a or b may be Python numbers); no gradient flows to cond."""
    like = a if isinstance(a, Tensor) else b
    if not isinstance(like, Tensor):
        raise TypeError("where: a or b must be a Tensor")
    return Where.apply(as_tensor_like(a, like), as_tensor_like(b, like), cond=_condition_like(cond, like))


def masked_fill(a: Tensor, mask: Any, value: float) -> Tensor:
    """a with `value` where mask is True (mask broadcasts against a)."""
    return Where.apply(as_tensor_like(value, a), a, cond=_condition_like(mask, a))


def _condition_like(cond: Any, like: Tensor) -> Any:
    """A boolean condition (Tensor, array or nested list) as an array on `like`'s device."""
    cond = cond.data if isinstance(cond, Tensor) else cond
    return to_device(cond, like.device)  # lists too: np.asarray or cupy.asarray


def cast(a: Tensor, dtype: Any) -> Tensor:
    if a.dtype == dtype:
        return a
    return Cast.apply(a, dtype=np.dtype(dtype))
