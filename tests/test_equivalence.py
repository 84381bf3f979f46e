"""Guard for the fast paths: a GPT trained with the fused ops matches one built from primitive ops."""

import numpy as np
import pytest

from minigpt import functional
from minigpt.autograd import composed
from minigpt.gpt import GPT, GPTConfig
from minigpt.optim import AdamW, clip_grad_norm_

FUSED_NAMES = ["linear", "cross_entropy", "layer_norm", "gelu", "embedding", "scaled_dot_product_attention"]


def train_losses(steps: int = 5) -> tuple[list[float], dict[str, np.ndarray]]:
    config = GPTConfig(vocab_size=23, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=True)
    model = GPT(config, rng=np.random.default_rng(0))
    opt = AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.99), weight_decay=0.1)
    x = np.random.default_rng(1).integers(0, 23, (4, 17))
    x, y = x[:, :-1], x[:, 1:]  # one batch, repeated: the loss must fall
    losses = []
    for _ in range(steps):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    return losses, model.state_dict()


def test_fused_training_matches_composed_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    fused_losses, fused_state = train_losses()
    for name in FUSED_NAMES:
        monkeypatch.setattr(functional, name, getattr(composed, name))
    composed_losses, composed_state = train_losses()
    np.testing.assert_allclose(fused_losses, composed_losses, rtol=2e-5)
    assert fused_losses[-1] < fused_losses[0]
    for name, value in fused_state.items():
        np.testing.assert_allclose(value, composed_state[name], rtol=1e-3, atol=2e-5, err_msg=name)
