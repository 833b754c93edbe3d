"""The valid-depth rule and the 16-bit depth encodings, shared by every reader and writer."""

import numpy as np
import pytest
import torch

from metricgold_ros.depth_traits import (MILLIMETRES, VKITTI2_CENTIMETRES, png_encoding,
                                         valid_depth)

RAW = np.array([[np.nan, 0.0, -1.0, np.inf], [0.0001, 1.2344, 65.535, 70.0]], np.float32)


def test_valid_depth_is_finite_and_positive_for_numpy_and_torch():
    expected = [[False, False, False, False], [True, True, True, True]]
    np.testing.assert_array_equal(valid_depth(RAW), expected)
    np.testing.assert_array_equal(valid_depth(torch.from_numpy(RAW)).numpy(), expected)
    np.testing.assert_array_equal(valid_depth(RAW, max_m=2.0)[1], [True, True, False, False])


def test_millimetres_saturate_and_mark_invalid_with_zero():
    np.testing.assert_array_equal(MILLIMETRES.encode(RAW), [[0, 0, 0, 0], [1, 1234, 65535, 65535]])
    back = MILLIMETRES.decode(MILLIMETRES.encode(RAW))
    assert np.isnan(back[0]).all()
    np.testing.assert_allclose(back[1], [0.001, 1.234, 65.535, 65.535])
    assert MILLIMETRES.max_m == pytest.approx(65.535)


def test_vkitti_centimetres_reserve_65535_for_sky():
    codes = VKITTI2_CENTIMETRES.encode(RAW)
    np.testing.assert_array_equal(codes, [[65535] * 4, [1, 123, 6554, 7000]])
    np.testing.assert_array_equal(VKITTI2_CENTIMETRES.valid(codes), valid_depth(RAW))
    assert VKITTI2_CENTIMETRES.encode(np.array([700.0]))[0] == 65534  # saturates below sky
    np.testing.assert_allclose(VKITTI2_CENTIMETRES.decode(codes)[1], [0.01, 1.23, 65.54, 70.0])


@pytest.mark.parametrize('units', [256.0, 1000.0, 5000.0])
def test_ground_truth_png_conventions_round_trip(units):
    encoding = png_encoding(units)
    depth = np.array([[0.5, 3.25], [np.nan, 10.0]])
    back = encoding.decode(encoding.encode(depth), np.float64)
    np.testing.assert_allclose(back[~np.isnan(depth)], depth[~np.isnan(depth)],
                               atol=0.5 / units)
    assert np.isnan(back[1, 0])
