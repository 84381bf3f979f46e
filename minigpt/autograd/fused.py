"""Fused ops: one forward and one hand-written backward for the hot paths of a GPT.

Each saves only what its backward needs and works in place on its own buffers where it can, so
a fused op is both faster and lighter than the same computation composed from primitive ops.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from minigpt.autograd.backend import get_array_module, index_add_rows, random_uniform
from minigpt.autograd.function import Function
from minigpt.autograd.parallel import map_row_blocks, matmul, matmuls
from minigpt.autograd.tensor import Tensor, _raw


class Linear(Function):
    """y = x @ W.T + b with W (out, in); leading dims of x are folded so dW is one 2-D GEMM."""

    def forward(self, x, w, b=None):
        if x.shape[-1] != w.shape[1]:
            raise ValueError(
                f"linear: input has {x.shape[-1]} features (shape {tuple(x.shape)}) but the weight "
                f"{tuple(w.shape)} expects {w.shape[1]}"
            )
        x2 = x.reshape(-1, x.shape[-1])
        out = matmul(x2, w.T)
        if b is not None:
            out += b
        self.x2, self.w, self.x_shape = x2, w, x.shape
        return out.reshape(*x.shape[:-1], w.shape[0])

    def backward(self, g):
        g2 = g.reshape(-1, g.shape[-1])
        need = self.needs_input_grad
        gx, gw = matmuls((g2, self.w) if need[0] else None, (g2.T, self.x2) if need[1] else None)
        gx = None if gx is None else gx.reshape(self.x_shape)
        if len(need) == 2:
            return gx, gw
        return gx, gw, (g2.sum(axis=0) if need[2] else None)


class Softmax(Function):
    def forward(self, x, dim):
        xp = get_array_module(x)
        out = x - x.max(axis=dim, keepdims=True)
        xp.exp(out, out=out)
        out /= out.sum(axis=dim, keepdims=True)
        self.out, self.dim = out, dim
        return out

    def backward(self, g):
        out = self.out
        gx = g - (g * out).sum(axis=self.dim, keepdims=True)
        gx *= out
        return gx


class LogSoftmax(Function):
    def forward(self, x, dim):
        xp = get_array_module(x)
        shifted = x - x.max(axis=dim, keepdims=True)
        shifted -= xp.log(xp.exp(shifted).sum(axis=dim, keepdims=True))
        self.out, self.dim = shifted, dim
        return shifted

    def backward(self, g):
        xp = get_array_module(g)
        gx = xp.exp(self.out)
        gx *= -g.sum(axis=self.dim, keepdims=True)
        gx += g
        return gx


class CrossEntropy(Function):
    """Mean of -log softmax(logits)[target] over targets != ignore_index.

    Saves the logits and one log-sum-exp per row; backward rebuilds softmax in its own output
    buffer and subtracts 1 at the targets (no one-hot is ever built).
    """

    def forward(self, logits, targets, ignore_index):
        xp = get_array_module(logits)
        x, t = logit_rows(logits, targets)
        valid = t != ignore_index
        if xp is np:
            check_targets(t[valid], x.shape[1])
        safe_t = xp.where(valid, t, 0)
        lse = xp.empty(x.shape[0], dtype=x.dtype)
        map_row_blocks(_logsumexp_rows, x, lse)
        rows = xp.arange(x.shape[0])
        losses = lse - x[rows, safe_t]
        count = valid.sum()
        all_valid = bool(count == x.shape[0]) if xp is np else False
        self.x, self.lse, self.safe_t, self.rows, self.shape = x, lse, safe_t, rows, logits.shape
        self.weight = None if all_valid else valid.astype(x.dtype)
        self.count = count
        if not all_valid:
            losses *= self.weight
        return (losses.sum() / count).astype(x.dtype)

    def backward(self, g):
        xp = get_array_module(g)
        grad = xp.empty_like(self.x)
        scale = (g / self.count).astype(grad.dtype)
        row_scale = xp.full(self.lse.shape, scale) if self.weight is None else self.weight * scale
        # (softmax - one-hot) * scale per row, with ignored rows' scale 0
        map_row_blocks(_scaled_softmax_rows, self.x, self.lse[:, None], row_scale[:, None], grad)
        grad[self.rows, self.safe_t] -= row_scale
        return grad.reshape(self.shape)


def logit_rows(logits, targets):
    """Logits as (N, V) rows and targets as (N,), or a clear error when their counts differ."""
    x, t = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    if t.shape[0] != x.shape[0]:
        raise ValueError(
            f"cross_entropy: {x.shape[0]} rows of logits {tuple(logits.shape)} but {t.shape[0]} "
            f"targets {tuple(targets.shape)}"
        )
    return x, t


def check_targets(t, vocab):
    """Raise for target ids (already without ignore_index) outside [0, vocab)."""
    if t.size and (t.min() < 0 or t.max() >= vocab):
        raise IndexError(f"cross_entropy: a target id is outside [0, {vocab}) and is not ignore_index")


def _logsumexp_rows(x, lse):
    """One block of rows: lse = log Σ exp(x), shifted by the row max for stability."""
    xp = get_array_module(x)
    row_max = x.max(axis=1)
    buf = x - row_max[:, None]
    xp.exp(buf, out=buf)
    xp.log(buf.sum(axis=1), out=lse)
    lse += row_max


def _scaled_softmax_rows(x, lse, scale, out):
    """One block of rows: out = exp(x - lse) * scale, the softmax from each row's log-sum-exp."""
    xp = get_array_module(x)
    xp.subtract(x, lse, out=out)
    xp.exp(out, out=out)
    out *= scale


class LayerNorm(Function):
    """Normalise over the last dim, then scale (and shift). Saves x̂ and 1/σ per row."""

    def forward(self, x, w, b=None, eps=1e-5):
        xp = get_array_module(x)
        x2 = x.reshape(-1, x.shape[-1])
        out, xhat = xp.empty_like(x2), xp.empty_like(x2)
        rstd = xp.empty((x2.shape[0], 1), dtype=x.dtype)
        map_row_blocks(_layer_norm_rows, x2, out, xhat, rstd, w=w, b=b, eps=eps)
        self.xhat, self.rstd, self.w = xhat, rstd, w  # as rows: the backward works on rows too
        return out.reshape(x.shape)

    def backward(self, g):
        xhat, rstd, w = self.xhat, self.rstd, self.w
        need = self.needs_input_grad
        g2 = g.reshape(-1, g.shape[-1])
        gx = get_array_module(g).empty_like(g2)
        partials = map_row_blocks(_layer_norm_backward_rows, g2, xhat, rstd, gx, w=w, need=need)
        gw = sum(p[0] for p in partials) if need[1] else None  # per-block partial sums over rows
        gx = gx.reshape(g.shape) if need[0] else None
        if len(need) == 2:
            return gx, gw
        return gx, gw, (sum(p[1] for p in partials) if need[2] else None)


def _layer_norm_rows(x, out, xhat, rstd, w, b, eps):
    """One block of rows: x̂ = (x - mean) / sqrt(var + eps); out = x̂ w + b."""
    xp = get_array_module(x)
    # Centre on each row's first value before taking the mean: an all-equal row is then exactly 0
    # (a mean of equal float32 values by a GEMV is off by an ulp, which 1/sqrt(eps) would magnify).
    xp.subtract(x, x[:, :1], out=xhat)
    xhat -= _row_mean(xhat)
    var = xp.einsum("ij,ij->i", xhat, xhat)[:, None] if xp is np else (xhat * xhat).sum(axis=-1, keepdims=True)
    xp.divide(1.0, xp.sqrt(var * (1.0 / x.shape[-1]) + eps), out=rstd)
    xhat *= rstd
    xp.multiply(xhat, w, out=out)
    if b is not None:
        out += b


_mean_vectors: dict[tuple[Any, ...], Any] = {}


def _row_mean(x):
    """Mean of each row of a 2-D block as a (rows, 1) column, by a GEMV with a 1/C vector: in NumPy
    ~4x faster than x.mean(axis=-1), which reduces along the rows in a slower loop."""
    xp = get_array_module(x)
    key = (xp.__name__, x.shape[-1], x.dtype.str)
    weights = _mean_vectors.get(key)
    if weights is None:
        weights = _mean_vectors[key] = xp.full((x.shape[-1], 1), 1.0 / x.shape[-1], dtype=x.dtype)
    return x @ weights


def _layer_norm_backward_rows(g, xhat, rstd, gx, w, need):
    """One block: gx = rstd (g w - mean(g w) - x̂ mean(g w x̂)); returns its (Σ g x̂, Σ g) for dw, db."""
    xp = get_array_module(g)
    c = g.shape[-1]
    xp.multiply(g, w, out=gx)  # g x̂-side: d loss / d x̂
    mean_g = _row_mean(gx)
    mean_gx = (xp.einsum("ij,ij->i", gx, xhat) if xp is np else (gx * xhat).sum(axis=-1))[:, None] * (1.0 / c)
    gx -= mean_g
    gx -= xhat * mean_gx
    gx *= rstd
    gw = xp.einsum("ij,ij->j", g, xhat) if need[1] else None
    gb = g.sum(axis=0) if len(need) == 3 and need[2] else None
    return gw, gb


_GELU_K = math.sqrt(2.0 / math.pi)
_GELU_C = 0.044715
_GELU_CLIP = 10.0  # beyond ±10, tanh(√(2/π)(x + 0.044715 x³)) is ±1 even in float64: clip x³ before it overflows
GELU_APPROXIMATIONS = ("tanh", "none")


class Gelu(Function):
    """GELU. approximate="tanh" (GPT-2): 0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)));
    approximate="none" (exact, nanoGPT and torch.nn.GELU's default): x Φ(x), Φ the normal CDF.

    Saves x and t (the tanh, or Φ(x) for the exact form): the backward needs no transcendental but
    exp(-x²/2).
    """

    def forward(self, x, approximate="tanh"):
        xp = get_array_module(x)
        self.approximate = approximate
        if approximate == "none":
            self.x, self.t = x, normal_cdf(x)
            return x * self.t
        x2 = x.reshape(-1, x.shape[-1])
        out, t = xp.empty_like(x2), xp.empty_like(x2)
        map_row_blocks(_gelu_rows, x2, out, t)
        self.x, self.t = x, t.reshape(x.shape)
        return out.reshape(x.shape)

    def backward(self, g):
        x, t = self.x, self.t
        xp = get_array_module(g)
        if self.approximate == "none":  # d/dx x Φ(x) = Φ(x) + x φ(x)
            xc = xp.clip(x, -40.0, 40.0)  # φ is 0 beyond (in float64 too); x² cannot overflow
            gx = xp.exp(xc * xc * -0.5) * xc
            gx *= 1.0 / math.sqrt(2.0 * math.pi)
            gx += t
            gx *= g
            return gx
        gx = xp.empty_like(g)
        map_row_blocks(_gelu_backward_rows, *(a.reshape(-1, a.shape[-1]) for a in (x, t, g, gx)))
        return gx


def _gelu_rows(x, out, t):
    """One block: t = tanh(√(2/π) (x + 0.044715 x³)), out = x (0.5 + 0.5 t)."""
    xp = get_array_module(x)
    xp.clip(x, -_GELU_CLIP, _GELU_CLIP, out=t)
    cube = t * t
    cube *= _GELU_C
    cube += 1
    t *= cube
    t *= _GELU_K
    xp.tanh(t, out=t)
    xp.multiply(t, 0.5, out=out)  # x (0.5 + 0.5 t): no 2x on the way to overflow at x ~ 3e38
    out += 0.5
    out *= x


def _gelu_backward_rows(x, t, g, gx):
    """One block: gx = g (0.5 (1 + t) + 0.5 x (1 - t²) √(2/π) (1 + 3·0.044715 x²)).

    x is clipped where 1 - t² is 0 anyway, so the polynomial never overflows into inf·0 = NaN."""
    xp = get_array_module(x)
    xp.clip(x, -_GELU_CLIP, _GELU_CLIP, out=gx)
    tmp = gx * gx  # block-sized temporaries stay in cache
    tmp *= 3 * _GELU_C
    tmp += 1
    gx *= tmp
    gx *= 0.5 * _GELU_K
    xp.multiply(t, t, out=tmp)
    xp.subtract(1, tmp, out=tmp)
    gx *= tmp
    xp.add(t, 1, out=tmp)
    tmp *= 0.5
    gx += tmp
    gx *= g


def normal_cdf(x: Any) -> Any:
    """Φ(x) = erfc(-x/√2) / 2 elementwise, in x's dtype, to float64 accuracy (relative, also in the tails)."""
    xp = get_array_module(x)
    z = x.astype(np.float64) * -math.sqrt(0.5)
    if xp is not np:  # CuPy ships erfc as a kernel
        import cupyx.scipy.special

        return (cupyx.scipy.special.erfc(z) * 0.5).astype(x.dtype)
    return (erfc(z) * 0.5).astype(x.dtype)


_ERF_SERIES_TERMS = 40  # |z| < 2: the last term is below 1e-19
_ERFC_FRACTION_DEPTH = 40  # |z| >= 2: converged to float64 (measured against math.erfc)


def erfc(z: np.ndarray) -> np.ndarray:
    """erfc of a float64 array, to ~3e-13 relative error everywhere (math.erfc as a ufunc).

    NumPy has no erf, and SciPy would be a large dependency for one function. Two textbook
    expansions cover the line: the Maclaurin series of erf for |z| < 2 (little cancellation there:
    erfc >= 0.0047), and the continued fraction erfc(z) = exp(-z²)/√π / (z + ½/(z + 1/(z + 3/2/(z + …))))
    for |z| >= 2, which keeps its relative accuracy deep into the tail; erfc(-z) = 2 - erfc(z).
    """
    a = np.minimum(np.abs(z), 30.0)  # erfc(30) underflows to 0: no larger z is needed
    small = np.minimum(a, 2.0)
    s2, term = small * small, small.copy()
    series = small.copy()  # erf(small) = 2/√π Σ (-1)^n small^(2n+1) / (n! (2n+1))
    for n in range(1, _ERF_SERIES_TERMS):
        term *= s2 * (-1.0 / n)
        series += term * (1.0 / (2 * n + 1))
    series *= 2.0 / math.sqrt(math.pi)
    large = np.maximum(a, 2.0)
    fraction = large.copy()
    for k in range(_ERFC_FRACTION_DEPTH, 0, -1):
        fraction = large + (0.5 * k) / fraction
    tail = np.exp(-large * large) * (1.0 / math.sqrt(math.pi)) / fraction
    result = np.where(a < 2.0, 1.0 - series, tail)
    return np.where(z < 0, 2.0 - result, result)


class Embedding(Function):
    """weight[ids]; backward scatter-adds rows (repeated ids sum)."""

    def forward(self, weight, ids):
        xp = get_array_module(weight)
        if xp is np:
            check_ids(ids, weight.shape[0])
        self.ids, self.n_rows = ids, weight.shape[0]
        return weight[ids]

    def backward(self, g):
        grad = index_add_rows(self.n_rows, self.ids, g)
        return grad.reshape(self.n_rows, *g.shape[self.ids.ndim :])


def check_ids(ids, n_rows):
    """Raise for embedding ids outside [0, n_rows)."""
    if ids.size and (ids.min() < 0 or ids.max() >= n_rows):
        bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
        raise IndexError(f"embedding: id {bad} is out of range for {n_rows} rows")


class Dropout(Function):
    def forward(self, x, p, rng):
        mask = random_uniform(rng, x.shape, x) >= p
        self.mask = mask.astype(x.dtype)
        self.mask *= 1.0 / (1.0 - p)
        return x * self.mask

    def backward(self, g):
        return g * self.mask


_causal_bias_cache: dict[tuple[Any, ...], Any] = {}


def causal_bias(xp: Any, tq: int, tk: int, dtype: Any) -> Any:
    """(tq, tk) additive mask, 0 where query i may see key j and -inf after it.

    Queries are the last tq of tk positions (bottom-right aligned), so a KV-cached step with one
    query sees every cached key; for tq == tk it is the usual lower-triangular mask.
    """
    key = (xp.__name__, tq, tk, np.dtype(dtype).str)
    bias = _causal_bias_cache.get(key)
    if bias is None:
        bias = xp.triu(xp.full((tq, tk), -np.inf, dtype=dtype), k=tk - tq + 1)
        _causal_bias_cache[key] = bias
    return bias


CAUSAL_CHUNK = 128  # query rows per chunk of causal attention (measured: 2 chunks at T=256 beat 4)


class ScaledDotProductAttention(Function):
    """softmax(q kᵀ/√hs + causal mask) v on (B, nh, T, hs): batched GEMMs, softmax in place.

    Causal attention runs over chunks of queries, each against only the keys it can see, so the
    masked upper triangle is (mostly) never computed: n chunks do (n + 1) / 2n of the full work.
    Device kernels override the two softmax steps (and the chunk size) only.
    """

    chunk_rows = CAUSAL_CHUNK

    def forward(self, q, k, v, is_causal, dropout_p, rng):
        out = self.output_buffer(q, v)
        self.attend_(q, k, v, out, is_causal, dropout_p, rng)
        return out

    @staticmethod
    def output_buffer(q, v):
        """An empty (..., Tq, hs) result; (B, nh, Tq, hs) as a view of a (B, Tq, nh, hs) buffer, so the
        caller's transpose(1, 2) back to (B, T, C) costs no copy."""
        xp = get_array_module(q)
        if q.ndim == 4:
            return xp.empty((q.shape[0], q.shape[2], q.shape[1], v.shape[-1]), dtype=q.dtype).transpose(0, 2, 1, 3)
        return xp.empty(q.shape[:-1] + v.shape[-1:], dtype=q.dtype)

    def attend_(self, q, k, v, out, is_causal, dropout_p, rng):
        """Write the attention of q over k, v into out; save what attend_backward_ needs."""
        self.k, self.v = k, v
        tq, tk = q.shape[-2], k.shape[-2]
        self.scale = scale = 1.0 / math.sqrt(q.shape[-1])
        self.q = q = q * scale  # saved scaled, as the backward's d/dk needs it
        self.chunks = []
        for start, end, keys in _query_chunks(tq, tk, is_causal, self.chunk_rows):
            att = matmul(q[..., start:end, :], k[..., :keys, :].swapaxes(-1, -2))  # (B, nh, rows, keys)
            att = self.causal_softmax_(att, is_causal)  # the chunk's queries are the last rows of its keys
            mask = None
            if dropout_p > 0:
                mask = (random_uniform(rng, att.shape, att) >= dropout_p).astype(att.dtype)
                mask *= 1.0 / (1.0 - dropout_p)
            matmul(att if mask is None else att * mask, v[..., :keys, :], out=out[..., start:end, :])
            self.chunks.append((start, end, keys, att, mask))

    def backward(self, g):
        xp = get_array_module(g)
        need = self.needs_input_grad
        grads = [xp.empty_like(a) if n else None for a, n in zip((self.q, self.k, self.v), need)]
        self.attend_backward_(g, *grads)
        return tuple(grads)

    def attend_backward_(self, g, gq, gk, gv):
        """Write the gradients of q, k and v (those not None) for the output's gradient g."""
        q, k, v, scale = self.q, self.k, self.v, self.scale
        # The last chunk sees every key: it writes gk and gv whole, and earlier chunks add to their prefixes.
        for i, (start, end, keys, att, mask) in enumerate(reversed(self.chunks)):
            g_rows = g[..., start:end, :]
            if gv is not None:
                att_used = att if mask is None else att * mask
                if i == 0:
                    matmul(att_used.swapaxes(-1, -2), g_rows, out=gv)
                else:
                    gv[..., :keys, :] += matmul(att_used.swapaxes(-1, -2), g_rows)
            gatt = matmul(g_rows, v[..., :keys, :].swapaxes(-1, -2))  # (B, nh, rows, keys)
            if mask is not None:
                gatt *= mask
            gatt = self.softmax_backward_(gatt, att)
            if gq is not None:
                matmul(gatt, k[..., :keys, :], out=gq[..., start:end, :])
            if gk is not None and i == 0:
                matmul(gatt.swapaxes(-1, -2), q[..., start:end, :], out=gk)  # q is scaled already
            elif gk is not None:
                gk[..., :keys, :] += matmul(gatt.swapaxes(-1, -2), q[..., start:end, :])
        if gq is not None:
            gq *= scale

    def causal_softmax_(self, att, is_causal):
        """Softmax over the last dim of (..., rows, keys) scores in place, the rows being the last of the
        keys' positions; returns the scores. Only the last min(rows, keys) columns hold masked entries,
        so the mask is added there alone (a single query row sees every key: nothing to mask)."""
        rows, keys = att.shape[-2:]
        masked = is_causal and rows > 1
        bias = causal_bias(get_array_module(att), rows, min(rows, keys), att.dtype) if masked else None
        map_row_blocks(_softmax_in_place, att.reshape(-1, rows, keys), bias=bias)
        return att

    def softmax_backward_(self, g, out):
        """g := out * (g - Σ g·out) over the last dim, in g's buffer (softmax's backward); returns g."""
        map_row_blocks(_softmax_backward_in_place, g.reshape(-1, *g.shape[-2:]), out.reshape(-1, *out.shape[-2:]))
        return g


def _query_chunks(tq: int, tk: int, is_causal: bool, min_rows: int | None = None) -> list[tuple[int, int, int]]:
    """(first query, end query, keys seen) per chunk of at least min_rows (default CAUSAL_CHUNK) queries;
    the last chunk sees every key. Queries are the last tq of tk positions."""
    min_rows = min_rows or CAUSAL_CHUNK
    if not is_causal or tq <= min_rows:
        return [(0, tq, tk)]
    n = min(4, tq // min_rows)  # more chunks save less and cost more GEMM calls
    bounds = [tq * i // n for i in range(n + 1)]
    return [(bounds[i], bounds[i + 1], bounds[i + 1] + tk - tq) for i in range(n)]


def _softmax_in_place(att, bias):
    """Softmax over the last dim of a block, in place, after adding a mask to its last columns."""
    xp = get_array_module(att)
    if bias is not None:
        att[..., att.shape[-1] - bias.shape[-1] :] += bias
    att -= att.max(axis=-1, keepdims=True)
    xp.exp(att, out=att)
    att *= 1.0 / att.sum(axis=-1, keepdims=True)  # one reciprocal per row, then multiplies


def _softmax_backward_in_place(g, out):
    """g := out * (g - Σ g·out) over the last dim: softmax's backward, in g's buffer."""
    g -= (g * out).sum(axis=-1, keepdims=True)
    g *= out


# ----------------------------------------------------------------------------- public wrappers


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ weight.T + bias, weight (out_features, in_features) as in PyTorch."""
    return Linear.apply(x, weight) if bias is None else Linear.apply(x, weight, bias)


def softmax(x: Tensor, dim: int = -1) -> Tensor:
    return Softmax.apply(x, dim=dim)


def log_softmax(x: Tensor, dim: int = -1) -> Tensor:
    return LogSoftmax.apply(x, dim=dim)


def cross_entropy(logits: Tensor, targets: Any, ignore_index: int = -1) -> Tensor:
    """Mean cross-entropy of logits (..., V) against integer targets (...), skipping ignore_index."""
    targets = _raw(targets)
    xp = get_array_module(logits.data)
    if get_array_module(targets) is not xp:
        targets = xp.asarray(targets)
    return CrossEntropy.apply(logits, targets=targets, ignore_index=ignore_index)


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    args = (x, weight) if bias is None else (x, weight, bias)
    return LayerNorm.apply(*args, eps=eps)


def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    """GELU as torch.nn.functional.gelu: the exact x Φ(x) by default, or approximate="tanh" (GPT-2's form)."""
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f'gelu: approximate must be "none" or "tanh", got {approximate!r}')
    return Gelu.apply(x, approximate=approximate)


def embedding(ids: Any, weight: Tensor) -> Tensor:
    """Rows of `weight` (num_embeddings, dim) for integer `ids` of any shape."""
    ids = _raw(ids)
    xp = get_array_module(weight.data)
    if get_array_module(ids) is not xp:
        ids = xp.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"embedding: ids must be integers, got {ids.dtype}")
    return Embedding.apply(weight, ids=ids)


def dropout(x: Tensor, p: float = 0.5, training: bool = True, rng: Any = None) -> Tensor:
    """Zero each element with probability p and scale the rest by 1/(1-p); identity when not training."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout: p must be in [0, 1], got {p}")
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return x * 0.0
    return Dropout.apply(x, p=p, rng=rng)


def scaled_dot_product_attention(
    q: Tensor, k: Tensor, v: Tensor, is_causal: bool = True, dropout_p: float = 0.0, rng: Any = None
) -> Tensor:
    """Attention on (B, nh, T, hs) tensors. With is_causal, query i sees keys up to its own position,
    counting queries as the last Tq of the Tk key positions (what a KV cache needs)."""
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"scaled_dot_product_attention: q {q.shape}, k {k.shape}, v {v.shape} do not fit "
            "(q and k need the same head size, k and v the same length)"
        )
    return ScaledDotProductAttention.apply(q, k, v, is_causal=is_causal, dropout_p=dropout_p, rng=rng)
