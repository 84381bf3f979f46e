"""The minigpt autograd engine: tensors on NumPy or CuPy, ops with hand-written backward."""

from minigpt.autograd.backend import cuda_available
from minigpt.autograd.function import Function, enable_grad, is_grad_enabled, no_grad
from minigpt.autograd.gradcheck import GradcheckError, gradcheck
from minigpt.autograd.ops import cat, masked_fill, split, stack, where
from minigpt.autograd.tensor import Tensor, arange, ones, randn, tensor, zeros

__all__ = [
    "Function",
    "GradcheckError",
    "Tensor",
    "arange",
    "cat",
    "cuda_available",
    "enable_grad",
    "gradcheck",
    "is_grad_enabled",
    "masked_fill",
    "no_grad",
    "ones",
    "randn",
    "split",
    "stack",
    "tensor",
    "where",
    "zeros",
]
