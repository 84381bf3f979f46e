"""CUDA kernels (through CuPy) for the hot paths of fused.py and optim.py.

Each public function here is a drop-in for a stretch of NumPy/CuPy array code in fused.py or
optim.py: same inputs, same outputs. The ops' CUDA forms at the end (subclasses registered with
dispatch.py) call them, so the array code stays the reference twin and the tests compare the two
on the same inputs.

- Elementwise work (GELU, the cross-entropy gradient, embedding scatter-add, the AdamW update) is
  a `cupy.ElementwiseKernel` over a type placeholder `T` (float32 or float64).
- Row-wise work (layer norm, the cross-entropy log-sum-exp, the masked softmax inside attention)
  is a `cupy.RawKernel` with one thread block per row, compiled once per dtype.

CuPy is reached only through `backend.cupy_module()` inside functions, so importing this module on
a machine without CuPy or a GPU is harmless; calling a kernel there raises backend's clear error.
Kernels are built on first use and cached in the module dicts below (CuPy caches the binaries).

Set `MINIGPT_NO_CUDA_KERNELS=1` to switch them off: the plain CuPy array code then runs instead,
so both paths can be timed and compared on a GPU.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from minigpt.autograd import backend, dispatch, fused

DISABLE_ENV = dispatch.SWITCHES["cuda"]
# The drop-ins that fused.py and optim.py dispatch to (the tests spy on exactly these).
KERNEL_FUNCTIONS = (
    "gelu_forward",
    "gelu_backward",
    "layer_norm_forward",
    "layer_norm_backward",
    "cross_entropy_forward",
    "cross_entropy_backward",
    "masked_softmax_",
    "softmax_backward_",
    "embedding_backward",
    "adamw_step",
)
_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_MAX_BLOCK = 256  # threads per row block; the shared buffers below are this long

_GELU_K = math.sqrt(2.0 / math.pi)  # the constants of fused.Gelu
_GELU_C = 0.044715
_GELU_CLIP = 10.0

_elementwise_cache: dict[str, Any] = {}
_row_cache: dict[tuple[str, str], Any] = {}


def enabled(dtype: Any) -> bool:
    """Whether the kernels serve arrays of `dtype` (float32/float64, and not switched off by the env var)."""
    return dtype in _FLOAT_DTYPES and os.environ.get(DISABLE_ENV, "") in ("", "0")


def _cp() -> Any:
    return backend.cupy_module()  # raises 'device "cuda" needs CuPy and an NVIDIA GPU' without one


# ----------------------------------------------------------------------------- elementwise kernels

# name -> (in_params, out_params, loop body); `i` is the flat (C-order) index of the output element
_ELEMENTWISE: dict[str, tuple[str, str, str]] = {
    # fused.Gelu.forward: t = tanh(K (x + C x^3)), out = 0.5 x (1 + t)
    "gelu_fwd": (
        "T x",
        "T out, T t",
        f"""
        const T xc = min(max(x, (T)-{_GELU_CLIP!r}), (T){_GELU_CLIP!r});  // x^3 cannot overflow; t is ±1 beyond
        T u = ((xc * xc * (T){_GELU_C!r} + (T)1) * xc) * (T){_GELU_K!r};
        t = tanh(u);
        out = (t * (T)0.5 + (T)0.5) * x;
        """,
    ),
    # fused.Gelu.backward: g * (0.5 (1 + t) + 0.5 x (1 - t^2) K (1 + 3 C x^2))
    "gelu_bwd": (
        "T x, T t, T g",
        "T gx",
        f"""
        const T xc = min(max(x, (T)-{_GELU_CLIP!r}), (T){_GELU_CLIP!r});  // no inf * 0 where 1 - t^2 is 0
        T inner = ((xc * xc * (T){3 * _GELU_C!r} + (T)1) * xc) * (T){0.5 * _GELU_K!r};
        inner = inner * ((T)1 - t * t) + (T)0.5 * (t + (T)1);
        gx = inner * g;
        """,
    ),
    # fused.CrossEntropy.backward on (N, V) logits: (softmax - onehot) * scale, zero on ignored rows
    "cross_entropy_bwd": (
        "T x, T scale, raw T lse, raw int64 tgt, int64 ncol, int64 ignore",
        "T gx",
        """
        const long long row = (long long)i / ncol;
        const long long col = (long long)i - row * ncol;
        const long long target = tgt[row];
        if (target == ignore) {
            gx = (T)0;
        } else {
            gx = (exp(x - lse[row]) - (col == target ? (T)1 : (T)0)) * scale;
        }
        """,
    ),
    # fused.Embedding.backward: out[ids[r], c] += g[r, c]; ids outside [0, nrows) add nothing
    "embedding_bwd": (
        "T g, raw int64 ids, int64 ncol, int64 nrows",
        "raw T out",
        """
        const long long row = (long long)i / ncol;
        const long long id = ids[row];
        if (id >= 0 && id < nrows) {
            atomicAdd(&out[id * ncol + ((long long)i - row * ncol)], g);
        }
        """,
    ),
    # optim.AdamW._update, in place on p, m, v (decoupled decay; bias corrections folded into scalars)
    "adamw": (
        "T g, T decay, T beta1, T omb1, T beta2, T omb2, T inv_sqrt_bc2, T eps, T step_size",
        "T p, T m, T v",
        """
        p = p * decay;
        m = m * beta1 + g * omb1;
        v = v * beta2 + g * g * omb2;
        p = p - (m / (sqrt(v) * inv_sqrt_bc2 + eps)) * step_size;
        """,
    ),
}


def _elementwise(name: str) -> Any:
    kernel = _elementwise_cache.get(name)
    if kernel is None:
        in_params, out_params, body = _ELEMENTWISE[name]
        kernel = _cp().ElementwiseKernel(in_params, out_params, body, f"minigpt_{name}")
        _elementwise_cache[name] = kernel
    return kernel


# ----------------------------------------------------------------------------- row kernels (one block per row)

_C_MATH = {  # per dtype: the C type, its math functions and special values
    "f": dict(
        ctype="float",
        exp="expf",
        log="logf",
        sqrt="sqrtf",
        fmax="fmaxf",
        neg_inf="__int_as_float(0xff800000)",
        nan="__int_as_float(0x7fffffff)",
    ),
    "d": dict(
        ctype="double",
        exp="exp",
        log="log",
        sqrt="sqrt",
        fmax="fmax",
        neg_inf="__longlong_as_double((long long)0xfff0000000000000ULL)",
        nan="__longlong_as_double((long long)0x7ff8000000000000ULL)",
    ),
}

# Block reductions: every thread of the block must call them (they synchronise); blockDim.x is a
# power of two <= 256. The result is read by all threads before the buffer may be reused.
_BLOCK_REDUCE = r"""
__device__ __forceinline__ real block_sum(real v, real* sh) {
    sh[threadIdx.x] = v;
    __syncthreads();
    for (unsigned int s = blockDim.x >> 1; s > 0; s >>= 1) {
        if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
        __syncthreads();
    }
    const real r = sh[0];
    __syncthreads();
    return r;
}

__device__ __forceinline__ real block_max(real v, real* sh) {
    sh[threadIdx.x] = v;
    __syncthreads();
    for (unsigned int s = blockDim.x >> 1; s > 0; s >>= 1) {
        if (threadIdx.x < s) sh[threadIdx.x] = R_MAX(sh[threadIdx.x], sh[threadIdx.x + s]);
        __syncthreads();
    }
    const real r = sh[0];
    __syncthreads();
    return r;
}
"""

_ROW_SOURCES: dict[str, str] = {
    # fused.LayerNorm.forward over rows of length ncol: two-pass mean/variance, then x̂ and out
    "layer_norm_fwd": r"""
extern "C" __global__ void minigpt_layer_norm_fwd(
        const real* __restrict__ x, const real* __restrict__ w, const real* __restrict__ b,
        real* __restrict__ out, real* __restrict__ xhat, real* __restrict__ rstd,
        const int ncol, const real eps, const int has_bias) {
    __shared__ real sh[256];
    const long long base = (long long)blockIdx.x * ncol;
    const real* xr = x + base;
    // centred on the row's first value, so an all-equal row has mean exactly x0 and variance 0
    const real x0 = xr[0];
    real s = 0;
    for (int j = threadIdx.x; j < ncol; j += blockDim.x) s += xr[j] - x0;
    const real mean = x0 + block_sum(s, sh) / (real)ncol;
    real s2 = 0;
    for (int j = threadIdx.x; j < ncol; j += blockDim.x) {
        const real d = xr[j] - mean;
        s2 += d * d;
    }
    const real r = (real)1 / R_SQRT(block_sum(s2, sh) / (real)ncol + eps);
    for (int j = threadIdx.x; j < ncol; j += blockDim.x) {
        const real h = (xr[j] - mean) * r;
        xhat[base + j] = h;
        real o = h * w[j];
        if (has_bias) o += b[j];
        out[base + j] = o;
    }
    if (threadIdx.x == 0) rstd[blockIdx.x] = r;
}
""",
    # fused.LayerNorm.backward, input gradient: (g w - (x̂ mean(g w x̂) + mean(g w))) / σ
    "layer_norm_bwd": r"""
extern "C" __global__ void minigpt_layer_norm_bwd(
        const real* __restrict__ g, const real* __restrict__ xhat, const real* __restrict__ rstd,
        const real* __restrict__ w, real* __restrict__ gx, const int ncol) {
    __shared__ real sh[256];
    const long long base = (long long)blockIdx.x * ncol;
    real s1 = 0, s2 = 0;
    for (int j = threadIdx.x; j < ncol; j += blockDim.x) {
        const real gh = g[base + j] * w[j];
        s1 += gh;
        s2 += gh * xhat[base + j];
    }
    const real m1 = block_sum(s1, sh) / (real)ncol;
    const real m2 = block_sum(s2, sh) / (real)ncol;
    const real r = rstd[blockIdx.x];
    for (int j = threadIdx.x; j < ncol; j += blockDim.x) {
        const real gh = g[base + j] * w[j];
        gx[base + j] = (gh - (xhat[base + j] * m2 + m1)) * r;
    }
}
""",
    # fused.CrossEntropy.forward per row: log-sum-exp, and lse - x[target] (0 when ignored,
    # NaN when the target is outside [0, ncol): CuPy would wrap such an index silently)
    "cross_entropy_fwd": r"""
extern "C" __global__ void minigpt_cross_entropy_fwd(
        const real* __restrict__ x, const long long* __restrict__ tgt, real* __restrict__ lse,
        real* __restrict__ loss, const int ncol, const long long ignore) {
    __shared__ real sh[256];
    const long long row = blockIdx.x;
    const real* xr = x + row * ncol;
    real m = R_NEG_INF;
    for (int j = threadIdx.x; j < ncol; j += blockDim.x) m = R_MAX(m, xr[j]);
    m = block_max(m, sh);
    real s = 0;
    for (int j = threadIdx.x; j < ncol; j += blockDim.x) s += R_EXP(xr[j] - m);
    s = block_sum(s, sh);
    if (threadIdx.x == 0) {
        const real l = R_LOG(s) + m;
        const long long t = tgt[row];
        lse[row] = l;
        loss[row] = t == ignore ? (real)0 : (t < 0 || t >= ncol) ? R_NAN : l - xr[t];
    }
}
""",
    # fused.ScaledDotProductAttention's softmax, in place on (rows, tk) scores. Row r is query
    # q = r % tq; with causal it sees keys j <= q + tk - tq (bottom-right aligned), others get 0.
    # A row that sees no key is NaN, as the -inf mask makes it in the array code.
    "masked_softmax": r"""
extern "C" __global__ void minigpt_masked_softmax(
        real* __restrict__ att, const int tq, const int tk, const int causal) {
    __shared__ real sh[256];
    const long long row = blockIdx.x;
    real* a = att + row * tk;
    int nvis = causal ? (int)(row % tq) + tk - tq + 1 : tk;
    if (nvis > tk) nvis = tk;
    if (nvis <= 0) {
        for (int j = threadIdx.x; j < tk; j += blockDim.x) a[j] = R_NAN;
        return;
    }
    real m = R_NEG_INF;
    for (int j = threadIdx.x; j < nvis; j += blockDim.x) m = R_MAX(m, a[j]);
    m = block_max(m, sh);
    real s = 0;
    for (int j = threadIdx.x; j < nvis; j += blockDim.x) s += R_EXP(a[j] - m);
    s = block_sum(s, sh);
    for (int j = threadIdx.x; j < tk; j += blockDim.x) a[j] = j < nvis ? R_EXP(a[j] - m) / s : (real)0;
}
""",
    # softmax's backward per row, in place on g: g := y (g - Σ g y), y the softmax output
    "softmax_bwd": r"""
extern "C" __global__ void minigpt_softmax_bwd(real* __restrict__ g, const real* __restrict__ y, const int ncol) {
    __shared__ real sh[256];
    const long long base = (long long)blockIdx.x * ncol;
    real s = 0;
    for (int j = threadIdx.x; j < ncol; j += blockDim.x) s += g[base + j] * y[base + j];
    s = block_sum(s, sh);
    for (int j = threadIdx.x; j < ncol; j += blockDim.x) g[base + j] = y[base + j] * (g[base + j] - s);
}
""",
}


def _row_kernel(name: str, dtype: Any) -> Any:
    key = (name, np.dtype(dtype).char)
    kernel = _row_cache.get(key)
    if kernel is None:
        c = _C_MATH[key[1]]
        header = (
            f"typedef {c['ctype']} real;\n#define R_EXP {c['exp']}\n#define R_LOG {c['log']}\n"
            f"#define R_SQRT {c['sqrt']}\n#define R_MAX {c['fmax']}\n#define R_NEG_INF {c['neg_inf']}\n"
            f"#define R_NAN {c['nan']}\n"
        )
        kernel = _cp().RawKernel(header + _BLOCK_REDUCE + _ROW_SOURCES[name], f"minigpt_{name}")
        _row_cache[key] = kernel
    return kernel


def _block_size(ncol: int) -> int:
    """Threads per row: a power of two from 32 (one warp) to 256, about the row length."""
    return min(_MAX_BLOCK, max(32, 1 << max(0, ncol - 1).bit_length()))


def _launch_rows(name: str, dtype: Any, n_rows: int, ncol: int, args: tuple[Any, ...]) -> None:
    if n_rows > 0:
        _row_kernel(name, dtype)((n_rows,), (_block_size(ncol),), args)


def _vector(cp: Any, a: Any, n: int, dtype: Any) -> Any:
    """`a` as a contiguous length-n vector of `dtype` (a (C,) weight, or anything broadcastable to it)."""
    return cp.ascontiguousarray(cp.broadcast_to(a.astype(dtype, copy=False).reshape(-1), (n,)))


# ----------------------------------------------------------------------------- the ops


def gelu_forward(x: Any) -> tuple[Any, Any]:
    """GELU (tanh form): (out, t) with t = tanh(√(2/π)(x + 0.044715 x³)) saved for the backward."""
    _cp()
    return _elementwise("gelu_fwd")(x)


def gelu_backward(g: Any, x: Any, t: Any) -> Any:
    _cp()
    return _elementwise("gelu_bwd")(x, t, g.astype(x.dtype, copy=False))


def layer_norm_forward(x: Any, w: Any, b: Any, eps: float) -> tuple[Any, Any, Any]:
    """Layer norm over the last dim: (out, x̂, 1/σ with shape (..., 1)), as fused.LayerNorm saves them."""
    cp = _cp()
    c = x.shape[-1]
    x2 = cp.ascontiguousarray(x).reshape(-1, c)
    n = x2.shape[0]
    w1 = _vector(cp, w, c, x.dtype)
    b1 = _vector(cp, b, c, x.dtype) if b is not None else w1
    out, xhat = cp.empty_like(x2), cp.empty_like(x2)
    rstd = cp.empty(n, dtype=x.dtype)
    args = (x2, w1, b1, out, xhat, rstd, np.int32(c), x.dtype.type(eps), np.int32(b is not None))
    _launch_rows("layer_norm_fwd", x.dtype, n, c, args)
    return out.reshape(x.shape), xhat.reshape(x.shape), rstd.reshape(*x.shape[:-1], 1)


def layer_norm_backward(g: Any, xhat: Any, rstd: Any, w: Any, needs: list[bool]) -> tuple[Any, ...]:
    """(gx, gw) or (gx, gw, gb) as fused.LayerNorm.backward returns them (None where not needed)."""
    cp = _cp()
    c = xhat.shape[-1]
    g2 = cp.ascontiguousarray(g.astype(xhat.dtype, copy=False)).reshape(-1, c)
    h2 = xhat.reshape(-1, c)
    gx = gw = gb = None
    if needs[0]:
        gx = cp.empty_like(g2)
        w1 = _vector(cp, w, c, xhat.dtype)
        args = (g2, cp.ascontiguousarray(h2), cp.ascontiguousarray(rstd), w1, gx, np.int32(c))
        _launch_rows("layer_norm_bwd", xhat.dtype, g2.shape[0], c, args)
        gx = gx.reshape(xhat.shape)
    if needs[1]:
        gw = _dot_rows_kernel(cp)(g2, h2, axis=0)
    if len(needs) == 3 and needs[2]:
        gb = g2.sum(axis=0)
    return (gx, gw) if len(needs) == 2 else (gx, gw, gb)


def _dot_rows_kernel(cp: Any) -> Any:
    """Σ over axis 0 of g * x̂ without the (N, C) product temporary (the layer norm weight gradient)."""
    kernel = _elementwise_cache.get("layer_norm_dw")
    if kernel is None:
        kernel = cp.ReductionKernel("T g, T h", "T y", "g * h", "a + b", "y = a", "0", "minigpt_layer_norm_dw")
        _elementwise_cache["layer_norm_dw"] = kernel
    return kernel


def cross_entropy_forward(x: Any, targets: Any, ignore_index: int) -> tuple[Any, Any, Any, Any]:
    """Mean cross-entropy of (N, V) logits over targets != ignore_index.

    Returns (loss, lse, targets as contiguous int64, count of counted rows); the last three are what
    `cross_entropy_backward` needs. Nothing is read back to the host.
    """
    cp = _cp()
    n, vocab = x.shape
    x = cp.ascontiguousarray(x)
    t = cp.ascontiguousarray(targets.reshape(-1).astype(cp.int64, copy=False))
    lse = cp.empty(n, dtype=x.dtype)
    losses = cp.empty(n, dtype=x.dtype)
    _launch_rows("cross_entropy_fwd", x.dtype, n, vocab, (x, t, lse, losses, np.int32(vocab), np.int64(ignore_index)))
    count = (t != ignore_index).sum()
    return (losses.sum() / count).astype(x.dtype), lse, t, count


def cross_entropy_backward(g: Any, x: Any, lse: Any, t: Any, ignore_index: int, count: Any) -> Any:
    """(N, V) gradient of the mean cross-entropy: (softmax − one-hot) · g / count, zero on ignored rows."""
    _cp()
    scale = (g / count).astype(x.dtype)  # 0-d, stays on the device
    return _elementwise("cross_entropy_bwd")(x, scale, lse, t, np.int64(x.shape[1]), np.int64(ignore_index))


def masked_softmax_(att: Any, is_causal: bool) -> Any:
    """Softmax over the last dim of C-contiguous (..., Tq, Tk) scores, in place; with is_causal, query i
    sees keys j <= i + Tk - Tq (the array code's `causal_bias`) and the rest become 0."""
    _cp()
    if not att.flags.c_contiguous:
        raise ValueError("masked_softmax_: scores must be C-contiguous (it works in place)")
    if att.size:
        tq, tk = att.shape[-2], att.shape[-1]
        args = (att, np.int32(tq), np.int32(tk), np.int32(bool(is_causal)))
        _launch_rows("masked_softmax", att.dtype, att.size // tk, tk, args)
    return att


def softmax_backward_(g: Any, out: Any) -> Any:
    """g := out * (g - Σ g·out) over the last dim, in g's C-contiguous buffer: softmax's backward."""
    _cp()
    if not (g.flags.c_contiguous and out.flags.c_contiguous) or g.shape != out.shape:
        raise ValueError("softmax_backward_: g and out must be C-contiguous and of one shape (it works in place)")
    if g.size:
        n = g.shape[-1]
        _launch_rows("softmax_bwd", g.dtype, g.size // n, n, (g, out.astype(g.dtype, copy=False), np.int32(n)))
    return g


def embedding_backward(g: Any, ids: Any, n_rows: int) -> Any:
    """Gradient of weight[ids]: rows of g scatter-added (atomically) at their ids; (n_rows, *g.shape[ids.ndim:])."""
    cp = _cp()
    tail = g.shape[ids.ndim :]
    ncol = math.prod(tail)
    out = cp.zeros(n_rows * ncol, dtype=g.dtype)
    if ids.size and ncol:
        ids64 = cp.ascontiguousarray(ids.reshape(-1).astype(cp.int64, copy=False))
        _elementwise("embedding_bwd")(g.reshape(ids.size, ncol), ids64, np.int64(ncol), np.int64(n_rows), out)
    return out.reshape(n_rows, *tail)


def adamw_step(
    p: Any, grad: Any, m: Any, v: Any, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int
) -> None:
    """One AdamW update of p, m (exp_avg) and v (exp_avg_sq) in place; `step` counts from 1."""
    _cp()
    ty = p.dtype.type
    decay = 1.0 - lr * weight_decay if weight_decay else 1.0
    _elementwise("adamw")(
        grad.astype(p.dtype, copy=False),
        ty(decay),
        ty(beta1),
        ty(1.0 - beta1),
        ty(beta2),
        ty(1.0 - beta2),
        ty(1.0 / math.sqrt(1.0 - beta2**step)),
        ty(eps),
        ty(lr / (1.0 - beta1**step)),
        p,
        m,
        v,
    )


# ----------------------------------------------------------------------------- the ops' CUDA forms


@dispatch.register(fused.Gelu, "cuda")
class Gelu(fused.Gelu):
    def forward(self, x, approximate="tanh"):
        if approximate != "tanh":  # the exact form stays array code: CuPy's erfc is a kernel already
            return super().forward(x, approximate)
        self.approximate = approximate
        out, self.t = gelu_forward(x)
        self.x = x
        return out

    def backward(self, g):
        if self.approximate != "tanh":
            return super().backward(g)
        return gelu_backward(g, self.x, self.t)


@dispatch.register(fused.LayerNorm, "cuda")
class LayerNorm(fused.LayerNorm):
    def forward(self, x, w, b=None, eps=1e-5):
        out, self.xhat, self.rstd = layer_norm_forward(x, w, b, eps)
        self.w = w
        return out

    def backward(self, g):
        return layer_norm_backward(g, self.xhat, self.rstd, self.w, self.needs_input_grad)


@dispatch.register(fused.CrossEntropy, "cuda")
class CrossEntropy(fused.CrossEntropy):
    def forward(self, logits, targets, ignore_index):
        x, t = fused.logit_rows(logits, targets)
        loss, self.lse, self.t, self.count = cross_entropy_forward(x, t, ignore_index)
        self.x, self.shape, self.ignore_index = x, logits.shape, ignore_index
        return loss

    def backward(self, g):
        return cross_entropy_backward(g, self.x, self.lse, self.t, self.ignore_index, self.count).reshape(self.shape)


@dispatch.register(fused.ScaledDotProductAttention, "cuda")
class ScaledDotProductAttention(fused.ScaledDotProductAttention):
    # Each chunk costs launches that small sizes feel: measured on an H100, chunking made attention
    # at T=256 slower (0.6 -> 1.6 ms per layer) and at T=1024 faster (6.0 -> 4.5 ms).
    chunk_rows = 256

    def causal_softmax_(self, att, is_causal):
        return masked_softmax_(_cp().ascontiguousarray(att), is_causal)

    def softmax_backward_(self, g, out):
        return softmax_backward_(g, out)


@dispatch.register(fused.Embedding, "cuda")
class Embedding(fused.Embedding):
    def backward(self, g):
        return embedding_backward(g, self.ids, self.n_rows)


dispatch.register("adamw_update", "cuda")(lambda *args: adamw_step(*args))  # optim.adamw_update's twin
