"""gradcheck: compare autograd gradients with float64 central differences."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from minigpt.autograd.backend import get_array_module, to_numpy
from minigpt.autograd.function import no_grad
from minigpt.autograd.tensor import Tensor


class GradcheckError(AssertionError):
    pass


def gradcheck(
    fn: Callable[..., Tensor],
    inputs: Sequence[Tensor],
    eps: float = 1e-6,
    atol: float = 1e-5,
    rtol: float = 1e-3,
    seed: int = 0,
) -> bool:
    """Check d fn(*inputs) / d input for every input with requires_grad, in float64.

    A non-scalar output is reduced with fixed random weights (sum(out * w)), so every output
    element's gradient is exercised. Returns True or raises GradcheckError naming the input, the
    worst element and both values.
    """
    inputs = list(inputs)
    for i, t in enumerate(inputs):
        if t.requires_grad and t.dtype != np.float64:
            raise TypeError(f"gradcheck: input {i} is {t.dtype}; gradcheck needs float64 inputs")
    out = fn(*inputs)
    xp = get_array_module(out.data)
    weights = xp.asarray(np.random.default_rng(seed).standard_normal(out.shape))

    def objective() -> float:
        with no_grad():
            return float((fn(*inputs).data * weights).sum())

    for t in inputs:
        t.grad = None
    (out * Tensor(weights)).sum().backward()

    for i, t in enumerate(inputs):
        if not t.requires_grad:
            continue
        analytic = to_numpy(t.grad) if t.grad is not None else np.zeros(t.shape)
        numeric = np.zeros(t.shape)
        flat = t.data.reshape(-1)  # a view: perturb in place
        for j in range(flat.size):
            orig = float(flat[j])
            flat[j] = orig + eps
            plus = objective()
            flat[j] = orig - eps
            minus = objective()
            flat[j] = orig
            numeric.reshape(-1)[j] = (plus - minus) / (2 * eps)
        err = np.abs(analytic - numeric)
        bad = err > atol + rtol * np.abs(numeric)
        if bad.any():
            j = int(np.argmax(np.where(bad, err, -1)))
            raise GradcheckError(
                f"gradcheck: input {i} (shape {t.shape}) element {np.unravel_index(j, t.shape)}: "
                f"autograd {analytic.reshape(-1)[j]:.6g} vs numeric {numeric.reshape(-1)[j]:.6g} "
                f"({int(bad.sum())} of {t.data.size} elements off)"
            )
    return True
