"""False-colour depth: log mapping, near = warm, invalid = black, auto range."""

import math

import cv2
import numpy as np
import pytest

from metricgold_ros.colorize import auto_range, colorize_depth, COLORMAPS
from metricgold_ros.errors import InputError


def _level_colour(level: int, colormap: int = cv2.COLORMAP_TURBO) -> np.ndarray:
    return cv2.applyColorMap(np.uint8([[level]]), colormap)[0, 0]


def test_shape_dtype_and_invalid_pixels_black():
    depth = np.full((4, 5), 2.0, np.float32)
    depth[0, :4] = [np.nan, np.inf, 0.0, -1.0]
    out = colorize_depth(depth, 1.0, 4.0)
    assert out.shape == (4, 5, 3) and out.dtype == np.uint8
    assert np.all(out[0, :4] == 0)
    assert np.all(out.reshape(-1, 3)[4:].sum(axis=1) > 0)


def test_log_mapping_ends_and_middle():
    # d_min -> top of the colormap (warm), d_max -> bottom; the geometric mean sits halfway
    depth = np.array([[1.0, 10.0, 100.0, 50.5, 0.5, 500.0]], np.float32)
    out = colorize_depth(depth, 1.0, 100.0)
    np.testing.assert_array_equal(out[0, 0], _level_colour(255))
    np.testing.assert_array_equal(out[0, 2], _level_colour(0))
    assert any(np.array_equal(out[0, 1], _level_colour(level)) for level in (127, 128, 129))
    # linear mid-range depth is far from halfway on a log scale
    assert not any(np.array_equal(out[0, 3], _level_colour(level)) for level in range(100, 156))
    np.testing.assert_array_equal(out[0, 4], out[0, 0])  # clamped below d_min
    np.testing.assert_array_equal(out[0, 5], out[0, 2])  # clamped above d_max


def test_near_is_warm_far_is_cold():
    depth = np.array([[0.5, 20.0]], np.float32)
    bgr = colorize_depth(depth, 0.5, 20.0).astype(int)
    assert bgr[0, 0, 2] > bgr[0, 0, 0]  # near: red over blue
    assert bgr[0, 1, 0] > bgr[0, 1, 2]  # far: blue over red


def test_auto_range_is_the_2nd_to_98th_percentile():
    rng = np.random.default_rng(1)
    depth = np.exp(rng.uniform(0.0, 3.0, (480, 640))).astype(np.float32)
    depth[rng.random(depth.shape) < 0.1] = np.nan
    depth[:5] = 1000.0  # outliers, about 1 %
    valid = depth[np.isfinite(depth)]
    low, high = np.percentile(valid, [2, 98])
    auto_low, auto_high = auto_range(depth)
    assert auto_low == pytest.approx(low, rel=0.05)
    assert auto_high == pytest.approx(high, rel=0.05)
    np.testing.assert_array_equal(colorize_depth(depth),
                                  colorize_depth(depth, auto_low, auto_high))
    # one bound given, the other automatic
    np.testing.assert_array_equal(colorize_depth(depth, d_min=2.0),
                                  colorize_depth(depth, 2.0, auto_high))


def test_degenerate_inputs():
    assert np.all(colorize_depth(np.full((3, 3), np.nan, np.float32)) == 0)
    constant = colorize_depth(np.full((3, 3), 2.5, np.float32))
    assert np.all(constant.reshape(-1, 3).sum(axis=1) > 0)
    sparse = np.full((64, 64), np.nan, np.float32)
    sparse[1, 1] = 3.0  # missed by the sampling grid: falls back to all pixels
    assert auto_range(sparse) == pytest.approx((2.97, 3.03))


@pytest.mark.parametrize('name', ['turbo', 'jet', 'viridis', 'inferno', 'magma', 'plasma'])
def test_colormaps_by_name(name):
    out = colorize_depth(np.array([[1.0]], np.float32), 1.0, 2.0, colormap=name)
    np.testing.assert_array_equal(out[0, 0], _level_colour(255, COLORMAPS[name]))


@pytest.mark.parametrize('kwargs, match', [
    ({'colormap': 'rainbowz'}, r"colormap: 'rainbowz' is unknown; use one of .*turbo"),
    ({'d_min': 5.0, 'd_max': 2.0}, r'd_min/d_max: 5.0 >= 2.0'),
    ({'d_min': -1.0}, r'd_min: -1.0 must be a finite depth > 0'),
    ({'d_max': math.inf}, r'd_max: inf must be a finite depth'),
])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(InputError, match=match):
        colorize_depth(np.ones((2, 2), np.float32), **kwargs)


def test_non_float_depth_raises():
    with pytest.raises(InputError, match=r'depth_m: uint16 array'):
        colorize_depth(np.ones((2, 2), np.uint16))
