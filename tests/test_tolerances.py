"""The tolerance table is an upper bound: a test may tighten it, never loosen it, and an unknown row is an error."""

import pytest
import torch

from tolerances import assert_close, tol


def test_tighter_is_accepted_and_looser_is_refused():
    assert tol(torch.float32, "cpu", "net") == dict(rtol=1e-4, atol=1e-5)
    assert tol(torch.float32, "cpu", "net", atol=0.0) == dict(rtol=1e-4, atol=0.0)
    with pytest.raises(ValueError, match="looser"):
        tol(torch.float32, "cpu", "op", rtol=1e-3)
    with pytest.raises(KeyError, match="add a row"):
        tol(torch.float16, "cpu", "net")


def test_assert_close_uses_the_row_of_the_result_dtype():
    expected = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    assert_close(expected.float() * (1 + 5e-6), expected)          # inside float32 "op": rtol 1e-5
    with pytest.raises(AssertionError):
        assert_close(expected * (1 + 5e-6), expected)              # outside float64 "op": rtol 1e-12
    with pytest.raises(AssertionError):
        assert_close(expected.float() * (1 + 5e-6), expected, rtol=1e-6)
    shifted = expected.float() + 2e-4
    assert_close(shifted, expected, path="kernel", scaled=True, rtol=0.0)  # atol 1e-4 times the largest |value| 3
    with pytest.raises(AssertionError):
        assert_close(shifted, expected, path="kernel", rtol=0.0)
