"""The losses' gradients against closed forms."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from helpers import LONG_TAIL

from ssl_kvasir.losses import logit_adjusted_cross_entropy

C = len(LONG_TAIL)


def test_logit_adjusted_gradient_matches_autograd_free_formula():
    """d/dz of the adjusted CE is softmax(z + tau log pi) - onehot(y): the offset shifts the gradient."""
    z = torch.randn(3, C, requires_grad=True)
    y = torch.tensor([0, 2, 4])
    prior = torch.tensor(LONG_TAIL, dtype=torch.float)
    logit_adjusted_cross_entropy(z, y, prior, tau=1.0, reduction="sum").backward()
    expected = F.softmax(z.detach() + (prior / prior.sum()).log(), 1) - F.one_hot(y, C)
    assert torch.allclose(z.grad, expected, atol=1e-6)
