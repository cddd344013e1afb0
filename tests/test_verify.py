"""Fidelity numbers against direct numpy definitions."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fcpts_onnx.verify import fidelity, wilson_interval


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 6), width=st.integers(2, 7), noise=st.floats(0.0, 2.0), seed=st.integers(0, 10_000))
def test_nmse_and_per_sample_cosine(n, width, noise, seed):
    rng = np.random.default_rng(seed)
    d = rng.standard_normal((n, width, 3)).astype(np.float32)
    s = (d + noise * rng.standard_normal(d.shape)).astype(np.float32)
    (result,) = fidelity({"y": d}, {"y": s})
    d64, s64 = d.astype(np.float64), s.astype(np.float64)
    assert np.isclose(result.nmse, np.sum((s64 - d64) ** 2) / np.sum(d64 ** 2))
    expected = np.mean([_cos(d64[i].ravel(), s64[i].ravel()) for i in range(n)])
    assert np.isclose(result.cosine, expected)
    assert np.isclose(result.max_abs_diff, np.max(np.abs(s64 - d64)))


def test_one_value_per_sample_takes_the_cosine_over_the_samples():
    """A [N, 1] score or an [N] probability: per sample, the cosine is only the sign (1.0 for any
    two positive numbers), so it is taken over the samples, where it says something."""
    d = np.array([[0.9], [0.1], [0.8], [0.2]], dtype=np.float32)
    s = np.array([[0.1], [0.9], [0.2], [0.8]], dtype=np.float32)  # every answer flipped
    for shape in ((4, 1), (4,)):
        (result,) = fidelity({"p": d.reshape(shape)}, {"p": s.reshape(shape)})
        assert np.isclose(result.cosine, _cos(d.ravel().astype(np.float64), s.ravel().astype(np.float64)))
        assert result.cosine < 0.5


def test_logits_get_top1_and_kl():
    d = np.array([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0]], dtype=np.float32)
    s = np.array([[0.0, 2.0, -1.0], [0.0, 3.0, 0.5]], dtype=np.float32)
    (result,) = fidelity({"logits": d}, {"logits": s})
    p = np.exp(d) / np.exp(d).sum(1, keepdims=True)
    q = np.exp(s) / np.exp(s).sum(1, keepdims=True)
    assert result.top1_agreement == 0.5
    assert np.isclose(result.kl, np.mean(np.sum(p * np.log(p / q), axis=1)))


def test_agreement_comes_with_its_interval_over_the_samples():
    """51 held-out samples that all agree: the interval says at least 93% (n / (n + z^2) for a
    Wilson interval with no disagreement), not 100%."""
    rng = np.random.default_rng(0)
    d = rng.standard_normal((51, 10)).astype(np.float32)
    (result,) = fidelity({"logits": d}, {"logits": d * 1.01})
    assert result.top1_agreement == 1.0 and result.samples == 51
    low, high = result.top1_interval
    assert high == 1.0 and np.isclose(low, 51 / (51 + 1.96 ** 2), atol=1e-6)


def test_the_interval_of_per_position_agreement_counts_samples_not_positions():
    """An OCR-style [N, T, C] softmax output is scored per time step; its steps move together,
    so the interval is as wide as N samples allow, not N * T positions."""
    rng = np.random.default_rng(1)
    z = rng.standard_normal((8, 40, 5))
    d = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    s = d.copy()
    s[0] = s[0][:, ::-1]  # one sample reads differently at most steps
    (result,) = fidelity({"probs": d.astype(np.float32)}, {"probs": s.astype(np.float32)})
    assert result.samples == 8
    assert result.top1_interval == wilson_interval(result.top1_agreement, 8)
    assert result.top1_interval[1] - result.top1_interval[0] > 0.3


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 5000), share=st.floats(0.0, 1.0))
def test_wilson_interval_holds_the_share_and_narrows_with_more_samples(n, share):
    low, high = wilson_interval(share, n)
    assert 0.0 <= low <= share + 1e-6 and share - 1e-6 <= high <= 1.0
    low4, high4 = wilson_interval(share, 4 * n)
    assert high4 - low4 <= high - low + 1e-6
    if n >= 30 and 0.2 <= share <= 0.8:  # the normal approximation's half-width there
        assert np.isclose((high - low) / 2, 1.96 * np.sqrt(share * (1 - share) / n), rtol=0.1)
