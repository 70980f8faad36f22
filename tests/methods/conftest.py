"""Fixtures of the method tests: a method built as the run layer builds it, and a fixed batch of its streams."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ssl_kvasir.methods import METHODS, BaseMethod
from ssl_kvasir.models import build_network

C = 5
"""Classes of the toy problems."""


def build_method(name: str, counts=(1,) * C, num_unlabeled: int = 8, **settings) -> BaseMethod:
    """``METHODS[name]`` from its YAML's settings, ``settings`` replacing some, and the facts a DataModule gives
    (labeled class counts, the unlabeled pool's size), on a small random network; EMA made, in training mode."""
    datamodule = SimpleNamespace(
        streams={
            "lb": SimpleNamespace(labels=np.repeat(np.arange(C), counts)),
            "ulb": SimpleNamespace(rows=np.arange(num_unlabeled)),
        },
        num_classes=C,
        training_prior=np.array(counts) / sum(counts),  # a uniform sampler: the labeled set's shares
    )
    cls = METHODS[name]
    torch.manual_seed(0)
    module = cls.from_config(
        build_network("test_resnet", C),
        class_names=list("abcde"),
        max_steps=10,
        **{**cls.data_kwargs(datamodule), **settings},
    )
    module.configure_model()
    return module.train()


def fixed_batch(seed: int = 0, n_lb: int = 4, n_ulb: int = 8) -> dict:
    """Labeled images (weak view) and unlabeled ones (weak and strong views, positions, unknown labels)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "lb": {"weak": torch.randn(n_lb, 3, 32, 32, generator=g), "label": torch.arange(n_lb) % C},
        "ulb": {
            "weak": torch.randn(n_ulb, 3, 32, 32, generator=g),
            "strong": torch.randn(n_ulb, 3, 32, 32, generator=g),
            "pos": torch.arange(n_ulb),
            "label": torch.full((n_ulb,), -1),
        },
    }


@pytest.fixture
def make_method() -> Callable[..., BaseMethod]:
    return build_method


@pytest.fixture
def make_batch() -> Callable[..., dict]:
    return fixed_batch
