"""Function: the base of every op. forward and backward side by side, on raw backend arrays.

An op subclasses Function, computes its result in `forward(*arrays, **options)` (saving what its
backward needs as attributes), and returns one gradient per input from `backward(grad)`.
`apply` records the op in the graph only when grad mode is on and some input requires grad.
"""

from __future__ import annotations

import contextlib
from operator import attrgetter
from typing import TYPE_CHECKING, Any

import numpy as np

from minigpt.autograd.dispatch import implementation

if TYPE_CHECKING:
    from minigpt.autograd.tensor import Tensor
else:
    Tensor = None  # bound by tensor.py once the class exists (the two modules need each other)
_new_tensor = object.__new__
_data, _requires_grad = attrgetter("data"), attrgetter("requires_grad")

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
    output_ids: list[int] | None = None  # a multi-output op's results, in order (see Tensor.backward)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def backward(self, grad: Any) -> Any:
        """One gradient per input (a tuple), a bare array for one-input ops; None where not needed."""
        raise NotImplementedError

    @classmethod
    def apply(cls, *inputs: Tensor, **kwargs: Any) -> Any:
        """Run the op on the inputs' arrays: a Tensor, or a tuple of Tensors when forward returns a tuple.

        The graph is recorded only when grad mode is on and an input requires grad. Without it this
        is little more than the op's forward: generation runs here, op by op, so it is kept lean.
        """
        try:
            datas = list(map(_data, inputs))
        except AttributeError:  # a list, a number...
            raise _not_tensors(cls.__name__, inputs) from None
        if len(datas) > 1 and len(set(map(type, datas))) > 1:  # another device (or an ndarray subclass)
            _check_devices(cls.__name__, inputs, datas)
        elif type(datas[0]) is memoryview:  # an ndarray's .data
            raise _not_tensors(cls.__name__, inputs)
        fn = implementation(cls, datas[0])()  # a device kernel of the op where one serves, else the op
        ctx = None
        if _grad_enabled:
            needs = list(map(_requires_grad, inputs))
            if True in needs:
                ctx, fn.needs_input_grad, fn.inputs = fn, needs, inputs
        out = fn.forward(*datas, **kwargs)
        if type(out) is tuple:
            return fn._outputs(out, ctx)
        return _tensor(out, ctx)

    def _outputs(self, outs: tuple[Any, ...], ctx: Function | None) -> tuple[Tensor, ...]:
        """A multi-output op's results. Its backward takes one gradient per output (None for one unused)."""
        results = tuple([_tensor(out, ctx) for out in outs])
        if ctx is not None:
            self.output_ids = [id(r) for r in results]
        return results

    def release(self) -> None:
        """Drop saved arrays and graph edges after backward (unless retain_graph)."""
        self.__dict__.clear()
        self.released = True

    released = False


def _tensor(data: Any, ctx: Function | None = None) -> Tensor:
    """A Tensor holding an op's result (the fast constructor); `ctx` the op, when the graph is recorded."""
    if isinstance(data, np.generic):  # NumPy returns scalars from 0-d ops; keep arrays
        data = np.asarray(data)
    result = _new_tensor(Tensor)
    result.data = data
    result.grad = None
    result.requires_grad = ctx is not None
    result._ctx = ctx
    return result


def _not_tensors(name: str, inputs: tuple[Any, ...]) -> TypeError:
    kinds = ", ".join(type(t).__name__ for t in inputs)
    return TypeError(f"{name.lower()}: expects Tensors, got ({kinds}); wrap arrays with minigpt.tensor(...)")


def _check_devices(name: str, inputs: tuple[Tensor, ...], datas: list[Any]) -> None:
    if not all(isinstance(t, Tensor) for t in inputs):  # an ndarray's .data is a memoryview
        raise _not_tensors(name, inputs)
    on_cpu = isinstance(datas[0], np.ndarray)
    for d in datas:
        if isinstance(d, np.ndarray) is not on_cpu:
            devices = ", ".join(t.device for t in inputs)
            raise RuntimeError(
                f"{name.lower()}: tensors are on different devices ({devices}); move them with .to(device) first"
            )
