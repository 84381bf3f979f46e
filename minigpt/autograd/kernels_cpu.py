"""CPU kernels (Numba) for the hot paths of a GPT step: the CPU twin of kernels_cuda.py.

Each kernel is a plain loop in llm.c's style: one pass over memory where it can. Kernels release
the GIL, and minigpt's own threads (parallel.py) share their rows out in blocks, as they do the
GEMMs' slices: one pool of threads, none of them spinning while another works. The ops' CPU forms
at the end subclass the ops of fused.py and register with dispatch.py, which picks them for
float32/float64 NumPy arrays; the ops' array code stays the reference, and the tests compare the
two on the same inputs.

The llvmlite wheels carry no vector math library, so `math.exp` in a loop is a scalar libm call
(~12 ns). `exp_` below is a branch-free exp for float32 that LLVM vectorizes (~1 ns); float64
keeps libm's exp, exact to the array code. Kernels compile on first use and are cached on disk
next to this file (`cache=True`); the first run on a machine says so in one line.

MINIGPT_NO_CPU_KERNELS=1 switches them off (see dispatch.py).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from minigpt.autograd import dispatch, fused, parallel
from minigpt.autograd.parallel import map_row_blocks, run_parallel

# error_model="numpy": no zero-division branch in each loop (it would stop vectorization);
# reassoc lets LLVM vectorize sums; no nnan/ninf, so NaN and inf behave as in NumPy.
# nogil: minigpt's threads run kernels on row blocks side by side (parallel.map_row_blocks).
_FLAGS = dict(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc", "contract", "arcp"})


# ----------------------------------------------------------------------------- scalar helpers


def like(x: Any, value: float) -> Any:
    """`value` in x's float type (in a float32 kernel a bare constant would promote to float64)."""
    return type(x)(value)


@overload(like, inline="always")
def _like(x, value):
    ty = x
    return lambda x, value: ty(value)


@intrinsic
def _times_pow2(typingctx, p, biased):
    """p 2^(biased - 150) for float32 p and int32 biased in [0, 278]: the power of two is built from
    exponent bits in two halves, each a normal float, multiplied in one at a time (so p 2^128 with
    p < 1 stays finite). Written in LLVM IR to stay in int32: Numba widens int32 arithmetic to
    int64, which does not vectorize."""

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        k = builder.sub(args[1], ir.Constant(i32, 150))
        half = builder.ashr(k, ir.Constant(i32, 1))
        y = args[0]
        for e in (half, builder.sub(k, half)):
            bits = builder.shl(builder.add(e, ir.Constant(i32, 127)), ir.Constant(i32, 23))
            y = builder.fmul(y, builder.bitcast(bits, ir.FloatType()))
        return y

    return types.float32(types.float32, types.int32), codegen


_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)  # ln 2 in two parts: k * _LN2_HI is exact for |k| < 2^9
_LN2_LO = np.float32(-2.12194440e-4)


def _exp32(x):
    """e^x in float32 without branches: x = k ln2 + r, |r| <= ln2/2; e^r by its Taylor polynomial
    to r^7 (truncation < 1 ulp); 2^k from exponent bits (_times_pow2), so that k from -150 to 128 stays in
    range (e^x underflows to 0 below -103.9 and overflows to inf above 88.72)."""
    xc = min(max(x, np.float32(-104.0)), np.float32(89.0))
    biased = np.int32(xc * _LOG2E + np.float32(150.5))  # k + 150 = round(x log2 e) + 150: truncating a positive
    kf = np.float32(biased) - np.float32(150.0)
    r = xc - kf * _LN2_HI - kf * _LN2_LO
    p = np.float32(1.0 / 5040.0)
    p = p * r + np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    y = _times_pow2(p, biased)
    return y if x == x else x  # NaN stays NaN


def exp_(x: Any) -> Any:
    """e^x in kernels: the vectorizable _exp32 for float32, libm's exp for float64."""
    return math.exp(x)


@overload(exp_, inline="always")
def _exp_overload(x):
    if x == types.float32:
        return _exp32
    return lambda x: math.exp(x)


@njit(**_FLAGS)
def exp_array(x, out):
    """out = exp_(x) elementwise over flat arrays (the helper's test and benchmark entry)."""
    for i in range(x.size):
        out[i] = exp_(x[i])


# ----------------------------------------------------------------------------- GELU

_K = math.sqrt(2.0 / math.pi)


@njit(**_FLAGS)
def gelu_tanh_forward(x, out, s):
    """out = x s with s = (1 + tanh u)/2 = 1/(1 + e^(-2u)), u = √(2/π)(x + 0.044715 x³); s is saved.
    (x is clipped to ±10 inside u, where s is 0 or 1 already, so x³ never overflows.)"""
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            xi = x[i, j]
            xc = min(max(xi, like(xi, -10.0)), like(xi, 10.0))
            u = like(xi, _K) * (xc + like(xi, 0.044715) * xc * xc * xc)
            si = like(xi, 1.0) / (like(xi, 1.0) + exp_(like(xi, -2.0) * u))
            si = like(xi, 0.0) if xi < like(xi, -10.0) else si  # as tanh's -1: x s stays 0 for huge -x
            s[i, j] = si
            out[i, j] = xi * si


@njit(**_FLAGS)
def gelu_tanh_backward(x, s, g, gx):
    """gx = g (s + 2 √(2/π) x s (1 - s)(1 + 3·0.044715 x²)): d/dx of x s(x), as 1 - tanh² = 4 s (1 - s)."""
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            xi, si = x[i, j], s[i, j]
            xc = min(max(xi, like(xi, -10.0)), like(xi, 10.0))
            du = like(xi, 2.0 * _K) * (like(xi, 1.0) + like(xi, 3 * 0.044715) * xc * xc)
            gx[i, j] = g[i, j] * (si + xc * si * (like(xi, 1.0) - si) * du)


@njit(**_FLAGS)
def gelu_exact_forward(x, out, cdf):
    """out = x Φ(x), Φ(x) = erfc(-x/√2)/2 (libm's erfc, in float64); Φ is saved."""
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            xi = x[i, j]
            c = like(xi, 0.5 * math.erfc(-math.sqrt(0.5) * np.float64(xi)))
            cdf[i, j] = c
            out[i, j] = xi * c


@njit(**_FLAGS)
def gelu_exact_backward(x, cdf, g, gx):
    """gx = g (Φ(x) + x φ(x)), φ(x) = e^(-x²/2)/√(2π) (x clipped to ±40, where φ is 0: no overflow)."""
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            xc = min(max(x[i, j], like(x[i, j], -40.0)), like(x[i, j], 40.0))
            pdf = exp_(like(xc, -0.5) * xc * xc) * like(xc, 1.0 / math.sqrt(2.0 * math.pi))
            gx[i, j] = g[i, j] * (cdf[i, j] + xc * pdf)


# ----------------------------------------------------------------------------- layer norm


@njit(**_FLAGS)
def layer_norm_forward(x, out, mean, rstd, w, b, eps):
    """Per row: mean and variance (two passes, centred on the row's first value, so an all-equal row
    has variance exactly 0), then out = (x - mean) rstd w + b. mean and rstd are saved."""
    n, c = x.shape
    for i in range(n):
        x0 = x[i, 0]
        inv_c = like(x0, 1.0 / c)
        acc = like(x0, 0.0)
        for j in range(c):
            acc += x[i, j] - x0
        m = x0 + acc * inv_c
        var = like(x0, 0.0)
        for j in range(c):
            d = x[i, j] - m
            var += d * d
        r = like(x0, 1.0) / math.sqrt(var * inv_c + like(x0, eps))
        for j in range(c):
            out[i, j] = (x[i, j] - m) * r * w[j] + b[j]
        mean[i] = m
        rstd[i] = r


@njit(**_FLAGS)
def layer_norm_backward(g, x, mean, rstd, gx, w):
    """gx = rstd (g w - mean(g w) - x̂ mean(g w x̂)) per row; returns this block's Σ g x̂ and Σ g over
    rows (the weight and bias gradients, summed over blocks by the caller)."""
    n, c = g.shape
    gw_sum, gb_sum = np.zeros(c, g.dtype), np.zeros(c, g.dtype)
    for i in range(n):
        m, r = mean[i], rstd[i]
        inv_c = like(r, 1.0 / c)
        s1 = like(r, 0.0)
        s2 = like(r, 0.0)
        for j in range(c):
            xh = (x[i, j] - m) * r
            gw = g[i, j] * w[j]
            s1 += gw
            s2 += gw * xh
            gw_sum[j] += g[i, j] * xh
            gb_sum[j] += g[i, j]
        s1 *= inv_c
        s2 *= inv_c
        for j in range(c):
            xh = (x[i, j] - m) * r
            gx[i, j] = (g[i, j] * w[j] - s1 - xh * s2) * r
    return gw_sum, gb_sum


# ----------------------------------------------------------------------------- softmax rows


@njit(**_FLAGS, inline="always")
def _row_max(row, n):
    """max(row[:n]) in 8 running maxima side by side, which LLVM packs into one vector. A single running
    max is a chain of dependent compares, and without no-NaN fast-math LLVM may not reorder it: 4x
    slower over a GPT-2 vocabulary's logits. (A NaN makes the softmax's row NaN whatever max it gives.)"""
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = row[0]
    j = 0
    while j + 8 <= n:
        m0, m1, m2, m3 = max(m0, row[j]), max(m1, row[j + 1]), max(m2, row[j + 2]), max(m3, row[j + 3])
        m4, m5, m6, m7 = max(m4, row[j + 4]), max(m5, row[j + 5]), max(m6, row[j + 6]), max(m7, row[j + 7])
        j += 8
    m = max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))
    for rest in range(j, n):
        m = max(m, row[rest])
    return m


@njit(**_FLAGS)
def cross_entropy_forward(x, t, lse, losses, ignore_index):
    """Per row of (N, V) logits: lse = log Σ e^x (shifted by the row max); loss = lse - x[target], 0 if ignored."""
    for i in range(x.shape[0]):
        row = x[i]
        m = _row_max(row, row.shape[0])
        s = like(m, 0.0)
        for j in range(row.shape[0]):
            s += exp_(row[j] - m)
        total = math.log(s) + m
        lse[i] = total
        losses[i] = like(m, 0.0) if t[i] == ignore_index else total - row[t[i]]


@njit(**_FLAGS)
def cross_entropy_backward(x, lse, t, gx, ignore_index, scale):
    """gx = (softmax(x) - one-hot(target)) scale per row, 0 on ignored rows."""
    for i in range(x.shape[0]):
        if t[i] == ignore_index:
            gx[i, :] = 0
            continue
        shift = lse[i]
        for j in range(x.shape[1]):
            gx[i, j] = exp_(x[i, j] - shift) * scale
        gx[i, t[i]] -= scale


@njit(**_FLAGS)
def causal_softmax_rows(att, is_causal):
    """Softmax in place over the last dim of (R, rows, keys) scores. The rows are the last of the keys'
    positions: with is_causal, row r sees keys j <= r + keys - rows and the rest become 0."""
    n, rows, keys = att.shape
    for idx in range(n * rows):
        row = att[idx // rows, idx % rows]
        seen = min(keys, idx % rows + keys - rows + 1) if is_causal else keys
        m = _row_max(row, seen)
        s = like(m, 0.0)
        for j in range(seen):
            e = exp_(row[j] - m)
            row[j] = e
            s += e
        inv = like(m, 1.0) / s
        for j in range(seen):
            row[j] *= inv
        for j in range(seen, keys):
            row[j] = 0


@njit(**_FLAGS)
def softmax_backward_rows(g, y):
    """g := y (g - Σ g y) per row of (N, C), in place: softmax's backward."""
    for i in range(g.shape[0]):
        s = like(g[i, 0], 0.0)
        for j in range(g.shape[1]):
            s += g[i, j] * y[i, j]
        for j in range(g.shape[1]):
            g[i, j] = y[i, j] * (g[i, j] - s)


def _attention_blocks(q: np.ndarray, k: np.ndarray) -> list[tuple[slice, ...]] | None:
    """Index tuples that share (B, nh, T, hs) attention out among the threads, by sequence or by head;
    None where one thread does it all (one thread, or too little work for a hand-off)."""
    threads = parallel.get_num_threads()
    if threads == 1 or q.ndim != 4 or 4 * q.size * k.shape[-2] < parallel.MIN_SPLIT_FLOPS:  # 2 GEMMs' FLOPs
        return None
    dim = 0 if q.shape[0] >= threads else 1
    if q.shape[dim] < 2:
        return None
    lead = (slice(None),) * dim
    return [(*lead, slice(s, e)) for s, e in parallel.splits(q.shape[dim], min(threads, q.shape[dim]))]


# ----------------------------------------------------------------------------- embedding, optimizer


@njit(**_FLAGS)
def embedding_backward(ids, g, out):
    """out[ids[i]] += g[i] over a zeroed (V, C) out (repeated ids sum)."""
    for i in range(ids.shape[0]):
        row = ids[i]
        for j in range(g.shape[1]):
            out[row, j] += g[i, j]


@njit(**_FLAGS)
def adamw_update(p, g, m, v, decay, beta1, beta2, eps, v_scale, step_size):
    """AdamW on flat buffers, in place: p = p decay - step_size m / (sqrt(v) v_scale + eps)."""
    for i in range(p.shape[0]):
        gi = g[i]
        mi = beta1 * m[i] + (like(gi, 1.0) - beta1) * gi
        vi = beta2 * v[i] + (like(gi, 1.0) - beta2) * gi * gi
        m[i] = mi
        v[i] = vi
        p[i] = p[i] * decay - step_size * mi / (math.sqrt(vi) * v_scale + eps)


@njit(**_FLAGS)
def squared_norm(x):
    """Σ x² of a flat array, accumulated in float64."""
    total = 0.0
    for i in range(x.shape[0]):
        total += np.float64(x[i]) * np.float64(x[i])
    return total


# ----------------------------------------------------------------------------- the ops' CPU forms


def _rows(a: np.ndarray, dtype: Any = None) -> np.ndarray:
    """`a` as C-contiguous (N, C) rows over its last dim (a view where it already is)."""
    a = np.ascontiguousarray(a, dtype=dtype)
    c = a.shape[-1] if a.ndim else 1
    return a.reshape(a.size // c if c else math.prod(a.shape[:-1]), c)


def _vector(a: np.ndarray, n: int, dtype: Any) -> np.ndarray:
    """`a` broadcast to a contiguous (n,) vector of dtype (itself when it is one: broadcast_to costs µs a call)."""
    a = np.ascontiguousarray(a, dtype=dtype)
    return a if a.shape == (n,) else np.ascontiguousarray(np.broadcast_to(a, (n,)))


@dispatch.register(fused.Gelu, "cpu")
class Gelu(fused.Gelu):
    def forward(self, x, approximate="tanh"):
        x2 = _rows(x)
        out, saved = np.empty_like(x2), np.empty_like(x2)  # saved: s (tanh form) or Φ(x) (exact)
        map_row_blocks(gelu_tanh_forward if approximate == "tanh" else gelu_exact_forward, x2, out, saved)
        self.x, self.saved, self.approximate = x2, saved, approximate
        return out.reshape(x.shape)

    def backward(self, g):
        gx = np.empty_like(self.x)
        kernel = gelu_tanh_backward if self.approximate == "tanh" else gelu_exact_backward
        map_row_blocks(kernel, self.x, self.saved, _rows(g, self.x.dtype), gx)
        return gx.reshape(g.shape)


@dispatch.register(fused.LayerNorm, "cpu")
class LayerNorm(fused.LayerNorm):
    """Saves x (alive anyway as the residual stream), the row means and 1/σ instead of an x̂ buffer."""

    def forward(self, x, w, b=None, eps=1e-5):
        x2 = _rows(x)
        dtype, (n, c) = x2.dtype, x2.shape
        w1 = _vector(w, c, dtype)
        b1 = np.zeros(c, dtype) if b is None else _vector(b, c, dtype)
        out, mean, rstd = np.empty_like(x2), np.empty(n, dtype), np.empty(n, dtype)
        map_row_blocks(layer_norm_forward, x2, out, mean, rstd, w=w1, b=b1, eps=dtype.type(eps))
        self.x2, self.w1, self.mean, self.rstd = x2, w1, mean, rstd
        return out.reshape(x.shape)

    def backward(self, g):
        need = self.needs_input_grad
        g2 = _rows(g, self.x2.dtype)
        gx = np.empty_like(g2)
        sums = map_row_blocks(layer_norm_backward, g2, self.x2, self.mean, self.rstd, gx, w=self.w1)
        gw, gb = (sum(block[k] for block in sums) for k in (0, 1))  # per-block sums over rows
        grads = (gx.reshape(g.shape) if need[0] else None, gw if need[1] else None)
        return grads if len(need) == 2 else (*grads, gb if need[2] else None)


@dispatch.register(fused.CrossEntropy, "cpu")
class CrossEntropy(fused.CrossEntropy):
    def forward(self, logits, targets, ignore_index):
        x, t = fused.logit_rows(logits, targets)
        x, t = np.ascontiguousarray(x), np.ascontiguousarray(t, dtype=np.int64)
        valid = t != ignore_index
        fused.check_targets(t[valid], x.shape[1])
        lse, losses = np.empty(x.shape[0], x.dtype), np.empty(x.shape[0], x.dtype)
        map_row_blocks(cross_entropy_forward, x, t, lse, losses, ignore_index=ignore_index)
        self.x, self.t, self.lse, self.ignore_index, self.shape = x, t, lse, ignore_index, logits.shape
        self.count = valid.sum()
        return (losses.sum() / self.count).astype(x.dtype)

    def backward(self, g):
        gx = np.empty_like(self.x)
        scale = (g / self.count).astype(self.x.dtype)[()]  # 0 valid rows: NaN, as the array code
        args = (self.x, self.lse, self.t, gx)
        map_row_blocks(cross_entropy_backward, *args, ignore_index=self.ignore_index, scale=scale)
        return gx.reshape(self.shape)


@dispatch.register(fused.ScaledDotProductAttention, "cpu")
class ScaledDotProductAttention(fused.ScaledDotProductAttention):
    """The batch (or, for fewer sequences than threads, the heads) is shared out among the threads,
    each block's attention run whole on one thread: one hand-off per pass instead of one per GEMM
    and per softmax, and a block's scores stay in its core's cache. Dropout runs as one block, in the
    array code's chunks (its random draws keep the array code's order)."""

    chunk_rows = 64  # 4 chunks at T=256 (M): 8% less time than 2 there, and 13% at T=128; T=512 the same
    parts = None  # [(index of a block, the op that attends over it)]

    def forward(self, q, k, v, is_causal, dropout_p, rng):
        blocks = _attention_blocks(q, k) if dropout_p == 0 else None
        if dropout_p > 0:
            self.chunk_rows = fused.ScaledDotProductAttention.chunk_rows
        if blocks is None:
            return super().forward(q, k, v, is_causal, dropout_p, rng)
        out = self.output_buffer(q, v)
        self.parts = [(b, ScaledDotProductAttention()) for b in blocks]
        with parallel.blas_at_one():
            run_parallel(
                [lambda b=b, a=a: a.attend_(q[b], k[b], v[b], out[b], is_causal, 0.0, None) for b, a in self.parts]
            )
        self.like = q, k, v
        return out

    def backward(self, g):
        if self.parts is None:
            return super().backward(g)
        grads = [np.empty_like(a) if n else None for a, n in zip(self.like, self.needs_input_grad)]
        with parallel.blas_at_one():
            run_parallel(
                [
                    lambda b=b, a=a: a.attend_backward_(g[b], *(x if x is None else x[b] for x in grads))
                    for b, a in self.parts
                ]
            )
        return tuple(grads)

    def causal_softmax_(self, att, is_causal):
        att = np.ascontiguousarray(att)  # a no-op for a GEMM's output
        map_row_blocks(causal_softmax_rows, att.reshape(-1, *att.shape[-2:]), is_causal=is_causal)
        return att

    def softmax_backward_(self, g, out):
        g = np.ascontiguousarray(g)
        rows = (g.reshape(-1, g.shape[-1]), np.ascontiguousarray(out, g.dtype).reshape(-1, g.shape[-1]))
        map_row_blocks(softmax_backward_rows, *rows)
        return g


@dispatch.register(fused.Embedding, "cpu")
class Embedding(fused.Embedding):
    def backward(self, g):
        ids = np.ascontiguousarray(self.ids.reshape(-1), dtype=np.int64)
        g2 = np.ascontiguousarray(g).reshape(ids.shape[0], -1)
        out = np.zeros((self.n_rows, g2.shape[1]), g2.dtype)
        embedding_backward(ids, g2, out)
        return out.reshape(self.n_rows, *g.shape[self.ids.ndim :])


@dispatch.register("adamw_update", "cpu")
def adamw(p, grad, m, v, lr, beta1, beta2, eps, weight_decay, step):
    """optim.adamw_update on flat views (copied in and out if an array is not contiguous)."""
    arrays = [np.ascontiguousarray(a, dtype=p.dtype) for a in (p, grad, m, v)]
    ty = p.dtype.type
    v_scale, step_size = 1.0 / math.sqrt(1.0 - beta2**step), lr / (1.0 - beta1**step)
    coefficients = (1.0 - lr * weight_decay, beta1, beta2, eps, v_scale, step_size)
    coefficients = dict(zip(("decay", "beta1", "beta2", "eps", "v_scale", "step_size"), map(ty, coefficients)))
    map_row_blocks(adamw_update, *(a.reshape(-1) for a in arrays), **coefficients)
    for original, updated in zip((p, m, v), (arrays[0], arrays[2], arrays[3])):
        if original is not updated and not np.shares_memory(original, updated):
            original[...] = updated


@dispatch.register("squared_norm", "cpu")
def squared_norm_of(g):
    """optim.squared_norm: Σ g² (in float64)."""
    return sum(map_row_blocks(squared_norm, np.ascontiguousarray(g).reshape(-1)))


def _first_compile_notice() -> None:
    """One line on stderr when no compiled kernel is cached yet for this file: the first run compiles."""
    cache = Path(__file__).parent / "__pycache__"
    if not any(cache.glob(Path(__file__).stem + ".*.nbi")):
        print("minigpt: compiling the CPU kernels (first run only; cached after)...", file=sys.stderr)


_first_compile_notice()
