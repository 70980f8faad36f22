"""Fixtures of the method tests: a method built as the run layer builds it, and a fixed batch of its streams."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from helpers import build_method, fixed_batch

from ssl_kvasir.methods import BaseMethod


@pytest.fixture
def make_method() -> Callable[..., BaseMethod]:
    return build_method


@pytest.fixture
def make_batch() -> Callable[..., dict]:
    return fixed_batch
