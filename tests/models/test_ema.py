"""The fused EMA update against a naive per-tensor loop, its counter across checkpoints and device moves."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ssl_kvasir.models.ema import EMA


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5)
    ).train()


def _train_a_little(model: nn.Module, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g, dtype=dtype))
        model(torch.randn(6, 3, 8, 8, generator=g, dtype=dtype))  # moves the BatchNorm statistics


@pytest.mark.parametrize("warmup", [True, False])
def test_fused_update_equals_a_naive_loop_over_the_state_dict(warmup: bool) -> None:
    model = _net()
    model(torch.zeros(2, 3, 8, 8))  # materialises the lazy layer
    ema = EMA(model, decay=0.9, warmup=warmup)
    naive = {k: v.clone() for k, v in model.state_dict().items()}
    for k in range(15):
        _train_a_little(model, 1, seed=k)
        d = min(0.9, (1 + k) / (10 + k)) if warmup else 0.9
        assert ema.current_decay() == pytest.approx(d)
        ema.update(model)
        for name, v in model.state_dict().items():
            naive[name] = d * naive[name] + (1 - d) * v if v.dtype.is_floating_point else v.clone()
    got = ema.module.state_dict()
    assert got.keys() == naive.keys()
    for name, v in naive.items():
        assert got[name].dtype == v.dtype
        torch.testing.assert_close(got[name], v, rtol=1e-6, atol=1e-6, msg=name)
    assert (
        int(got["1.num_batches_tracked"]) == 16
    )  # 1 + 15 forwards: integer buffers are copied, not averaged
    assert int(ema.num_updates) == 15


def test_counter_follows_a_loaded_checkpoint() -> None:
    model = _net()
    model(torch.zeros(2, 3, 8, 8))
    trained = EMA(model, decay=0.999)
    for k in range(7):
        _train_a_little(model, 1, seed=k)
        trained.update(model)
    fresh = EMA(model, decay=0.999)
    assert fresh.current_decay() == pytest.approx(1 / 10)
    fresh.load_state_dict(trained.state_dict())
    assert fresh.current_decay() == pytest.approx(8 / 17) == trained.current_decay()
    fresh.update(model)
    assert int(fresh.num_updates) == 8


def test_update_follows_buffers_replaced_by_a_move() -> None:
    # .to() replaces buffer tensors: an update after it must still write into the average's own buffers.
    model = _net()
    model(torch.zeros(2, 3, 8, 8))
    ema = EMA(model, decay=0.5, warmup=False)
    model.double()
    ema.double()
    _train_a_little(model, 1, seed=3)
    ema.update(model)
    live, avg = model.state_dict(), ema.module.state_dict()
    start = _net()
    start(torch.zeros(2, 3, 8, 8))
    for name, v in start.state_dict().items():
        if v.dtype.is_floating_point:
            torch.testing.assert_close(avg[name], 0.5 * v.double() + 0.5 * live[name], msg=name)
    assert avg["1.running_mean"].dtype == torch.float64


def test_update_with_another_model_is_refused() -> None:
    ema = EMA(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="update with the model the EMA was made from"):
        ema.update(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))
