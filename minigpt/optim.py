"""Optimizers (SGD, AdamW), gradient clipping and learning-rate schedules.

Optimizers update parameters in place. Their state lives in buffers allocated once, on the
parameter's device, and each step reuses one scratch buffer per device and dtype, so a step makes
no full-size temporaries. State is keyed by parameter name, and `state_dict()` is a flat
{str: ndarray} that drops straight into an .npz checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from minigpt.autograd import backend
from minigpt.autograd.dispatch import implementation
from minigpt.autograd.tensor import Tensor
from minigpt.nn import raise_state_problems

LRSchedule = Callable[[int], float]


def _name_params(items: Iterable[Any], taken: set[str]) -> tuple[list[str], list[Tensor]]:
    """Split parameters or (name, parameter) pairs into names and tensors; unnamed ones get `param.<i>`."""
    names, params = [], []
    for item in items:
        name, p = item if isinstance(item, tuple) else (getattr(item, "name", None), item)
        if not isinstance(p, Tensor):
            raise TypeError(f"optimizer: expected Tensors or (name, Tensor) pairs, got {type(p).__name__}")
        if name is None or name in taken:
            name = f"param.{len(taken)}"
        taken.add(name)
        names.append(name)
        params.append(p)
    return names, params


class Optimizer:
    """Base class: param groups (dicts with "params", "names", "lr", ...), state by name, step()."""

    state_kinds: tuple[str, ...] = ()  # the per-parameter state entries a subclass keeps

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        items = list(params)
        if not items:
            raise ValueError(f"{type(self).__name__}: got an empty parameter list")
        groups = [dict(g) for g in items] if isinstance(items[0], dict) else self._default_groups(items)
        self.defaults = defaults
        self.param_groups: list[dict[str, Any]] = []
        self.state: dict[str, dict[str, Any]] = {}
        self._scratch: dict[tuple[str, str], Any] = {}
        self._flat: dict[int, dict[str, Any]] = {}  # AdamW: flat buffers per param group
        taken: set[str] = set()
        seen: set[int] = set()
        for group in groups:
            if "params" not in group:
                raise ValueError(f"{type(self).__name__}: a param group needs a 'params' entry")
            group["names"], group["params"] = _name_params(group["params"], taken)
            for p in group["params"]:
                if id(p) in seen:
                    raise ValueError(f"{type(self).__name__}: a parameter appears twice (tied weights belong once)")
                seen.add(id(p))
            for k, v in defaults.items():
                group.setdefault(k, v)
            self.param_groups.append(group)

    def _default_groups(self, items: list[Any]) -> list[dict[str, Any]]:
        return [{"params": items}]

    def _named_params(self) -> Iterable[tuple[str, Tensor, dict[str, Any]]]:
        for group in self.param_groups:
            for name, p in zip(group["names"], group["params"]):
                yield name, p, group

    def zero_grad(self) -> None:
        """Drop every gradient (set to None), so the next backward writes fresh ones."""
        for _, p, _ in self._named_params():
            p.grad = None

    def step(self) -> None:
        """Update every parameter that has a gradient, in place."""
        for name, p, group in self._named_params():
            if p.grad is not None:
                self._update(p, p.grad, self._state_for(name, p), self._scratch_for(p), group)

    def _update(self, p: Tensor, grad: Any, state: dict[str, Any], scratch: Any, group: dict[str, Any]) -> None:
        raise NotImplementedError

    def _init_state(self, p: Tensor) -> dict[str, Any]:
        return {}

    def _state_for(self, name: str, p: Tensor) -> dict[str, Any]:
        state = self.state.get(name)
        if state is None:
            state = self.state[name] = self._init_state(p)
        for k, v in state.items():  # after model.to(device), follow the parameter
            if backend.is_array(v) and type(v) is not type(p.data):
                state[k] = backend.to_device(v, p.device)
        return state

    def _scratch_for(self, p: Tensor) -> Any:
        """A view of p's shape into the one scratch buffer for p's device and dtype."""
        key = (p.device, p.dtype.str)
        buf = self._scratch.get(key)
        if buf is None or buf.size < p.data.size:
            size = max(q.data.size for _, q, _ in self._named_params() if (q.device, q.dtype.str) == key)
            xp = backend.get_array_module(p.data)
            buf = self._scratch[key] = xp.empty(max(size, p.data.size), dtype=p.dtype)
        return buf[: p.data.size].reshape(p.shape)

    # ------------------------------------------------------------------ state dict

    def state_dict(self) -> dict[str, np.ndarray]:
        """{"<kind>/<param name>": NumPy copy}, e.g. "exp_avg/transformer.wte.weight" and "step/...".

        Hyperparameters are not saved: they come from the constructor (and the LR schedule), so a
        resumed run may change them on purpose.
        """
        out: dict[str, np.ndarray] = {}
        for name, state in self.state.items():
            for kind, v in state.items():
                if v is None:
                    continue
                arr = backend.to_numpy(v) if backend.is_array(v) else np.asarray(v, dtype=np.int64)
                out[f"{kind}/{name}"] = arr.copy() if arr is v else arr
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore state saved by state_dict(); errors name unknown, incomplete and mis-shaped entries."""
        params = {name: p for name, p, _ in self._named_params()}
        unexpected, mismatched = [], []
        loaded: dict[str, dict[str, Any]] = {}
        for key, value in state.items():
            kind, _, name = key.partition("/")
            if kind not in self.state_kinds or name not in params:
                unexpected.append(key)
                continue
            value = value.data if isinstance(value, Tensor) else value
            value = value if backend.is_array(value) else np.asarray(value)
            p = params[name]
            if kind != "step" and tuple(value.shape) != p.shape:
                mismatched.append(f"{key} (given {tuple(value.shape)}, parameter {p.shape})")
                continue
            loaded.setdefault(name, {})[kind] = value
        incomplete = sorted(n for n, s in loaded.items() if set(s) != set(self._required_kinds()))
        problems = {"shape mismatch": mismatched, "unexpected": sorted(unexpected)}
        problems[f"incomplete state (needs {', '.join(self._required_kinds())})"] = incomplete
        hint = "was it saved for the same model and optimizer?"
        raise_state_problems(f"{type(self).__name__}.load_state_dict", problems, hint)
        new_state = {}  # built whole before it replaces the old: a failure part-way changes nothing
        for name, entries in loaded.items():
            p = params[name]
            new_state[name] = {
                kind: int(v) if kind == "step" else backend.to_device(v, p.device).astype(p.dtype, copy=True)
                for kind, v in entries.items()
            }
        self.state = new_state

    def _required_kinds(self) -> tuple[str, ...]:
        return self.state_kinds


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum and (coupled, L2) weight decay, as in PyTorch.

    g = grad + weight_decay * p;  buf = momentum * buf + g (buf = g on the first step);  p -= lr * buf
    """

    state_kinds = ("momentum_buffer",)

    def __init__(self, params: Iterable[Any], lr: float, momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"SGD: lr, momentum and weight_decay must be >= 0 (got {lr}, {momentum}, {weight_decay})")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    def _update(self, p: Tensor, grad: Any, state: dict[str, Any], scratch: Any, group: dict[str, Any]) -> None:
        xp = backend.get_array_module(p.data)
        lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
        g = grad
        if wd:
            xp.multiply(p.data, wd, out=scratch)
            scratch += grad
            g = scratch
        if momentum:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = g.copy()  # allocated once, on the first step
            else:
                buf *= momentum
                buf += g
            g = buf
        xp.multiply(g, lr, out=scratch)
        p.data -= scratch


class AdamW(Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter), step for step PyTorch's AdamW.

    Given a plain list of parameters, only those with ndim >= 2 (matmul weights, embeddings) decay;
    biases and LayerNorm weights do not (nanoGPT's configure_optimizers). Explicit param groups
    (dicts with "params" and options) are used exactly as given.
    """

    state_kinds = ("step", "exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(
                f"AdamW: need lr, eps, weight_decay >= 0 and betas in [0, 1) (got lr={lr}, betas={betas}, "
                f"eps={eps}, weight_decay={weight_decay})"
            )
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    def _default_groups(self, items: list[Any]) -> list[dict[str, Any]]:
        def ndim(item: Any) -> int:
            return (item[1] if isinstance(item, tuple) else item).ndim

        decay = [it for it in items if ndim(it) >= 2]
        no_decay = [it for it in items if ndim(it) < 2]
        groups: list[dict[str, Any]] = []
        if decay:
            groups.append({"params": decay})
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return groups

    def _init_state(self, p: Tensor) -> dict[str, Any]:
        xp = backend.get_array_module(p.data)
        return {"step": 0, "exp_avg": xp.zeros_like(p.data), "exp_avg_sq": xp.zeros_like(p.data)}

    def step(self) -> None:
        """Update every parameter that has a gradient, in place: one update over each group's flat buffers."""
        for group in self.param_groups:
            if not self._step_flat(group):
                for name, p in zip(group["names"], group["params"]):
                    if p.grad is not None:
                        self._update(p, p.grad, self._state_for(name, p), self._scratch_for(p), group)

    def _step_flat(self, group: dict[str, Any]) -> bool:
        """On the GPU, one AdamW update over the whole group as one flat parameter buffer (each launch
        costs ~10 µs there; on the CPU the update runs per parameter, in place, with no gathering).

        The group's parameters and their exp_avg / exp_avg_sq become views into three flat buffers,
        built on first use and rebuilt whenever something replaced one of those arrays (model.to(),
        load_state_dict()). The gradients are gathered into one flat array per step. Returns False
        where the per-parameter path runs instead: on the CPU, with mixed devices or dtypes, a missing
        gradient, or step counts that differ within the group.
        """
        params = group["params"]
        first = params[0].data
        if isinstance(first, np.ndarray):
            return False
        if any(p.grad is None or type(p.data) is not type(first) or p.dtype != first.dtype for p in params):
            return False
        states = [self._state_for(name, p) for name, p in zip(group["names"], params)]
        if len({s["step"] for s in states}) != 1:
            return False
        xp = backend.get_array_module(first)
        key = id(group)
        flat = self._flat.get(key)
        if flat is None or not _views_intact(flat, params, states):
            flat = self._flat[key] = _flatten_group(xp, params, states)
        grads = xp.concatenate([p.grad.astype(first.dtype, copy=False).ravel() for p in params])
        step = states[0]["step"] + 1
        for s in states:
            s["step"] = step
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        update = implementation("adamw_update", flat["param"], adamw_update)
        update(flat["param"], grads, flat["exp_avg"], flat["exp_avg_sq"], lr, beta1, beta2, eps, wd, step)
        return True

    def _update(self, p: Tensor, grad: Any, state: dict[str, Any], scratch: Any, group: dict[str, Any]) -> None:
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        state["step"] += 1
        update = implementation("adamw_update", p.data, adamw_update)
        update(
            p.data,
            grad.astype(p.dtype, copy=False),
            state["exp_avg"],
            state["exp_avg_sq"],
            lr,
            beta1,
            beta2,
            eps,
            wd,
            state["step"],
        )


def adamw_update(p: Any, grad: Any, m: Any, v: Any, lr: float, beta1: float, beta2: float, eps: float,
                 weight_decay: float, step: int) -> None:  # fmt: skip
    """One AdamW update of p, m (exp_avg) and v (exp_avg_sq) in place; `step` counts from 1.

    The array code, and the reference of the compiled twins (kernels_cpu, kernels_cuda):
    p -= lr/(1-β1^t) * m / (sqrt(v)/sqrt(1-β2^t) + eps), after the decoupled weight decay.
    """
    xp = backend.get_array_module(p)
    if weight_decay:
        p *= 1.0 - lr * weight_decay  # decoupled: shrink the weight, not the gradient
    m *= beta1  # m = β1 m + (1-β1) g
    m += (1.0 - beta1) * grad
    v *= beta2  # v = β2 v + (1-β2) g²
    v += (1.0 - beta2) * grad * grad
    denom = xp.sqrt(v)
    denom *= 1.0 / math.sqrt(1.0 - beta2**step)
    denom += eps
    p -= (lr / (1.0 - beta1**step)) * m / denom


_FLAT_KINDS = ("param", "exp_avg", "exp_avg_sq")


def _flatten_group(xp: Any, params: list[Tensor], states: list[dict[str, Any]]) -> dict[str, Any]:
    """Copy the group's parameters and moments into flat buffers and make the originals views of them."""
    flat: dict[str, Any] = {}
    for kind in _FLAT_KINDS:
        arrays = [p.data if kind == "param" else s[kind] for p, s in zip(params, states)]
        flat[kind] = buf = xp.concatenate([a.ravel() for a in arrays])
        flat[kind + "_views"] = backend.flat_views(buf, [a.shape for a in arrays])
    for p, s, pv, mv, vv in zip(params, states, flat["param_views"], flat["exp_avg_views"], flat["exp_avg_sq_views"]):
        p.data, s["exp_avg"], s["exp_avg_sq"] = pv, mv, vv
    return flat


def _views_intact(flat: dict[str, Any], params: list[Tensor], states: list[dict[str, Any]]) -> bool:
    """Whether every parameter and moment is still the view into the flat buffers it was made."""
    return (
        len(params) == len(flat["param_views"])
        and all(p.data is v for p, v in zip(params, flat["param_views"]))
        and all(s["exp_avg"] is m and s["exp_avg_sq"] is v
                for s, m, v in zip(states, flat["exp_avg_views"], flat["exp_avg_sq_views"]))
    )  # fmt: skip


def clip_grad_norm_(params: Iterable[Tensor], max_norm: float) -> Any:
    """Scale all gradients in place so their global L2 norm is at most max_norm; returns the norm before.

    The norm is a 0-d float64 array on the gradients' device, on every device (PyTorch returns a
    tensor too): on the GPU, turning it into a float would make the host wait at every step.
    A non-finite norm is returned as is and the gradients are left alone (the caller decides).
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return np.zeros((), dtype=np.float64)
    xp = backend.get_array_module(grads[0])
    if xp is np:
        total = math.sqrt(sum(implementation("squared_norm", g, squared_norm)(g) for g in grads))
        if math.isfinite(total) and total > max_norm:
            scale = max_norm / (total + 1e-6)
            for g in grads:
                g *= scale
        return np.asarray(total, dtype=np.float64)
    flat = xp.concatenate([g.ravel() for g in grads]) if len(grads) > 1 else grads[0].ravel()
    norm = xp.sqrt(xp.vdot(flat, flat).astype(np.float64))
    scale = xp.where(xp.isfinite(norm), xp.minimum(max_norm / (norm + 1e-6), 1.0), 1.0)
    scales = {dtype: scale.astype(dtype) for dtype in {g.dtype for g in grads}}
    for g in grads:
        g *= scales[g.dtype]
    return norm


def squared_norm(g: np.ndarray) -> float:
    """Σ g² of a NumPy array (a dot with itself: no squared temporary); kernels_cpu has the compiled twin."""
    return float(np.vdot(g.ravel(), g.ravel()))


# ----------------------------------------------------------------------------- LR schedules


def cosine_lr(step: int, *, lr: float, min_lr: float, warmup_iters: int, decay_iters: int) -> float:
    """nanoGPT's get_lr: linear warmup, cosine decay to min_lr at decay_iters, then min_lr."""
    if step < warmup_iters:
        return lr * (step + 1) / (warmup_iters + 1)
    if step >= decay_iters:  # nanoGPT has `>`; at step == decay_iters its cosine gives min_lr too
        return min_lr
    ratio = (step - warmup_iters) / (decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return min_lr + coeff * (lr - min_lr)


@dataclass(frozen=True)
class CosineSchedule:
    """`CosineSchedule(lr, min_lr, warmup_iters, decay_iters)(step) -> lr`, see cosine_lr."""

    lr: float
    min_lr: float
    warmup_iters: int
    decay_iters: int

    def __call__(self, step: int) -> float:
        return cosine_lr(
            step, lr=self.lr, min_lr=self.min_lr, warmup_iters=self.warmup_iters, decay_iters=self.decay_iters
        )


@dataclass(frozen=True)
class ConstantSchedule:
    lr: float

    def __call__(self, step: int) -> float:
        return self.lr


def constant_lr(lr: float) -> LRSchedule:
    """A schedule that always gives lr."""
    return ConstantSchedule(lr)


def linear_lr(start: float, end: float, steps: int) -> LRSchedule:
    """lr from `start` at step 0 down (or up) linearly, reaching `end` at step `steps` (micrograd's demo)."""
    return lambda step: start + (end - start) * min(step, steps) / steps


__all__ = [
    "SGD",
    "AdamW",
    "ConstantSchedule",
    "CosineSchedule",
    "LRSchedule",
    "Optimizer",
    "clip_grad_norm_",
    "constant_lr",
    "cosine_lr",
    "linear_lr",
]
