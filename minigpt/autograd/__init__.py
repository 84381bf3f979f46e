"""The minigpt autograd engine: tensors on NumPy or CuPy, ops with hand-written backward."""

from minigpt.autograd.backend import cuda_available
from minigpt.autograd.function import Function, enable_grad, is_grad_enabled, no_grad
from minigpt.autograd.gradcheck import GradcheckError, gradcheck
from minigpt.autograd.ops import cat, masked_fill, split, stack, where
from minigpt.autograd.parallel import get_num_threads, set_num_threads
from minigpt.autograd.tensor import Tensor, arange, ones, randn, tensor, zeros

__all__ = [
    "Function",
    "GradcheckError",
    "Tensor",
    "arange",
    "cat",
    "cuda_available",
    "enable_grad",
    "get_num_threads",
    "gradcheck",
    "is_grad_enabled",
    "masked_fill",
    "no_grad",
    "ones",
    "randn",
    "set_num_threads",
    "split",
    "stack",
    "tensor",
    "where",
    "zeros",
]
