"""Fixtures shared by several test modules (opt-in: `pytestmark = pytest.mark.usefixtures(...)`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import ctrace.linear


@pytest.fixture(scope="module", params=["shipped", "all_onednn"])
def linear_route(request) -> Iterator[str]:
    """Every test of a module that uses this twice: `ctrace.linear` as shipped (oneDNN from MIN_ROWS rows),
    and with every float32 CPU inference linear on oneDNN, so that tests on tiny inputs check that path too."""
    if request.param == "shipped":
        yield request.param
        return
    if ctrace.linear._onednn_linear() is None:
        pytest.skip("this torch has no usable oneDNN linear (test_linear checks that x86-64 has one)")
    before = ctrace.linear.MIN_ROWS
    ctrace.linear.MIN_ROWS = 1
    try:
        yield request.param
    finally:
        ctrace.linear.MIN_ROWS = before
