"""Function: the base of every op. forward and backward side by side, on raw backend arrays.

An op subclasses Function, computes its result in `forward(*arrays, **options)` (saving what its
backward needs as attributes), and returns one gradient per input from `backward(grad)`.
`apply` records the op in the graph only when grad mode is on and some input requires grad.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import numpy as np

from minigpt.autograd.dispatch import implementation

if TYPE_CHECKING:
    from minigpt.autograd.tensor import Tensor
else:
    Tensor = None  # bound by tensor.py once the class exists (the two modules need each other)
_new_tensor = object.__new__

_grad_enabled = True


def is_grad_enabled() -> bool:
    return _grad_enabled


class no_grad(contextlib.ContextDecorator):
    """Context manager (and decorator) under which ops record no graph, like torch.no_grad()."""

    def __enter__(self) -> no_grad:
        global _grad_enabled
        self._prev, _grad_enabled = _grad_enabled, False
        return self

    def __exit__(self, *exc: object) -> None:
        global _grad_enabled
        _grad_enabled = self._prev


class enable_grad(no_grad):
    def __enter__(self) -> enable_grad:
        global _grad_enabled
        self._prev, _grad_enabled = _grad_enabled, True
        return self


def unbroadcast(grad: Any, shape: tuple[int, ...]) -> Any:
    """Sum `grad` down to `shape`, undoing NumPy broadcasting (leading dims and size-1 dims)."""
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)
    if extra:
        grad = grad.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if axes:
        grad = grad.sum(axis=axes, keepdims=True)
    return grad


class Function:
    """An op and a node of the graph. Subclasses define forward() and backward()."""

    inputs: tuple[Tensor, ...]
    needs_input_grad: list[bool]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def backward(self, grad: Any) -> Any:
        """One gradient per input (a tuple), a bare array for one-input ops; None where not needed."""
        raise NotImplementedError

    @classmethod
    def apply(cls, *inputs: Tensor, **kwargs: Any) -> Tensor:
        datas = [t.data for t in inputs]
        needs = [t.requires_grad for t in inputs]
        if len(datas) > 1:
            on_cpu = isinstance(datas[0], np.ndarray)
            for d in datas:
                if isinstance(d, np.ndarray) is not on_cpu:
                    devices = ", ".join(t.device for t in inputs)
                    raise RuntimeError(
                        f"{cls.__name__.lower()}: tensors are on different devices ({devices}); "
                        "move them with .to(device) first"
                    )
        fn = implementation(cls, datas[0])()  # a device kernel of the op where one serves, else the op
        requires_grad = _grad_enabled and True in needs
        if requires_grad:
            fn.needs_input_grad = needs
        out = fn.forward(*datas, **kwargs)
        if isinstance(out, np.generic):  # NumPy returns scalars from 0-d ops; keep arrays
            out = np.asarray(out)
        result = _new_tensor(Tensor)
        result.data = out
        result.grad = None
        result.requires_grad = requires_grad
        result._ctx = fn if requires_grad else None
        if requires_grad:
            fn.inputs = inputs
        return result

    def release(self) -> None:
        """Drop saved arrays and graph edges after backward (unless retain_graph)."""
        self.__dict__.clear()
        self.released = True

    released = False
