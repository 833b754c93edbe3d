"""The log-depth codec of DESIGN.md / paper eq. 3."""

import math

import numpy as np
import pytest
import torch

from metricgold_ros.errors import InputError
from metricgold_ros.model.codec import decode_depth, encode_depth

D_MIN, D_MAX = 0.5, 80.0


@pytest.mark.parametrize('kind', ['numpy', 'torch'])
def test_round_trip_is_exact_across_the_range(kind):
    rng = np.random.default_rng(0)
    depth = np.exp(rng.uniform(math.log(D_MIN), math.log(D_MAX), 10_000)).astype(np.float64)
    if kind == 'torch':
        x, valid = encode_depth(torch.from_numpy(depth), D_MIN, D_MAX)
        back = decode_depth(x, D_MIN, D_MAX).numpy()
        valid = valid.numpy()
    else:
        x, valid = encode_depth(depth, D_MIN, D_MAX)
        back = decode_depth(x, D_MIN, D_MAX)
    assert valid.all()
    np.testing.assert_allclose(back, depth, rtol=1e-5)


def test_anchor_values():
    anchors = np.array([D_MIN, D_MAX, math.sqrt(D_MIN * D_MAX)], np.float64)
    x, _ = encode_depth(anchors, D_MIN, D_MAX)
    np.testing.assert_allclose(x, [-1.0, 1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(decode_depth(np.array([-1.0, 1.0, 0.0]), D_MIN, D_MAX), anchors)


def test_formula_matches_the_paper_at_an_arbitrary_depth():
    depth = 3.7
    expected = 2 * math.log(depth / D_MIN) / math.log(D_MAX / D_MIN) - 1
    x, _ = encode_depth(np.array([depth]), D_MIN, D_MAX)
    assert x[0] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize('kind', ['numpy', 'torch'])
def test_invalid_depth_is_masked_not_encoded(kind):
    values = [0.0, -1.0, math.nan, math.inf, D_MIN / 2, D_MAX * 2, 2.0]
    depth = torch.tensor(values) if kind == 'torch' else np.array(values, np.float32)
    x, valid = encode_depth(depth, D_MIN, D_MAX)
    x, valid = np.asarray(x), np.asarray(valid)
    assert valid.tolist() == [False] * 6 + [True]
    assert np.all(x[:6] == 0.0) and np.all(np.isfinite(x))
    assert x[6] != 0.0


def test_decode_clips_out_of_range_values():
    np.testing.assert_allclose(decode_depth(np.array([-3.0, 3.0]), D_MIN, D_MAX), [D_MIN, D_MAX])


@pytest.mark.parametrize('d_min,d_max', [(0.0, 10.0), (5.0, 5.0), (10.0, 1.0), (-1.0, 2.0),
                                         (1.0, math.inf)])
def test_bad_range_is_refused(d_min, d_max):
    with pytest.raises(InputError, match='d_min'):
        encode_depth(np.ones(3), d_min, d_max)
