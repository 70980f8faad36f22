"""The network around a timm backbone: dropout before the classifier, applied once."""

from __future__ import annotations

import torch


def test_dropout_is_applied_once():
    from ssl_kvasir.models import build_network

    torch.manual_seed(0)
    net = build_network("test_resnet", 5, drop_rate=0.5).train()
    x = torch.randn(8, 3, 32, 32)
    # The backbone itself has no dropout: in training mode it gives the same features twice.
    assert torch.equal(net.backbone(x), net.backbone(x))
    seen = []
    linear = net.head[-1]
    linear.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    with torch.no_grad():
        clean = net.backbone(x)  # (8, D)
        net(x)
    dropped = seen[0]  # (8, D) what the classifier received
    alive = clean > 0
    share = float((dropped[alive] == 0).float().mean())
    assert 0.4 < share < 0.6  # dropout 0.5 once, not 0.75
    kept = dropped[alive] != 0
    assert torch.allclose(dropped[alive][kept], 2 * clean[alive][kept], atol=1e-5)  # scaled by 1 / (1 - 0.5)
