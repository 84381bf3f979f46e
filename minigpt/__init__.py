"""minigpt: a tiny GPT on its own autograd engine (NumPy on CPU, CuPy on GPU)."""

from minigpt import functional, nn, optim
from minigpt.autograd import (
    Tensor,
    arange,
    cat,
    cuda_available,
    enable_grad,
    get_num_threads,
    is_grad_enabled,
    masked_fill,
    no_grad,
    ones,
    randn,
    set_num_threads,
    split,
    stack,
    tensor,
    where,
    zeros,
)
from minigpt.gpt import GPT, GPTConfig
from minigpt.inference import generate_text, load

__version__ = "0.1.0"

__all__ = [
    "GPT",
    "GPTConfig",
    "Tensor",
    "arange",
    "cat",
    "cuda_available",
    "enable_grad",
    "get_num_threads",
    "functional",
    "generate_text",
    "is_grad_enabled",
    "load",
    "masked_fill",
    "nn",
    "no_grad",
    "ones",
    "optim",
    "randn",
    "set_num_threads",
    "split",
    "stack",
    "tensor",
    "where",
    "zeros",
]
