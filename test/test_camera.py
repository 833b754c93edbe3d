"""Intrinsics: validation, K/P, and the pixel-centre resize convention against cv2.resize."""

import dataclasses
import math

import cv2
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from metricgold_ros.camera import Intrinsics
from metricgold_ros.errors import InputError

K = [525.0, 0.0, 319.5, 0.0, 520.0, 239.5, 0.0, 0.0, 1.0]


def test_from_k_reads_the_row_major_matrix():
    intr = Intrinsics.from_k(K, width=640, height=480)
    assert (intr.fx_px, intr.fy_px, intr.cx_px, intr.cy_px) == (525.0, 520.0, 319.5, 239.5)
    assert (intr.width, intr.height) == (640, 480)
    np.testing.assert_array_equal(intr.k, np.array(K).reshape(3, 3))
    assert intr.p.shape == (3, 4)
    np.testing.assert_array_equal(intr.p[:, :3], intr.k)
    np.testing.assert_array_equal(intr.p[:, 3], 0.0)
    assert Intrinsics.from_k(np.array(K).reshape(3, 3), 640, 480) == intr


def test_frozen_and_hashable():
    intr = Intrinsics.from_k(K, 640, 480)
    with pytest.raises(dataclasses.FrozenInstanceError):
        intr.fx_px = 1.0
    assert len({intr, Intrinsics.from_k(K, 640, 480)}) == 1


@pytest.mark.parametrize('k, match', [
    (K[:8], r'K: 8 values; a row-major 3x3 K has 9'),
    ([0.0] * 9, r'K: fx=0.0, fy=0.0; both must be > 0.*uncalibrated'),
    (K[:4] + [-1.0] + K[5:], r'K: fx=525.0, fy=-1.0'),
    ([math.nan] + K[1:], r'K: .*NaN/inf'),
    ([math.inf] + K[1:], r'K: .*NaN/inf'),
    ('abc', r'K: .*not 9 numbers'),
])
def test_from_k_rejects_bad_matrices(k, match):
    with pytest.raises(InputError, match=match):
        Intrinsics.from_k(k, 640, 480)


@pytest.mark.parametrize('width, height, match', [
    (0, 480, r'width: 0 must be a positive'), (640, -1, r'height: -1 must be a positive'),
    (640.5, 480, r'width: 640.5'), (True, 480, r'width: True')])
def test_from_k_rejects_bad_sizes(width, height, match):
    with pytest.raises(InputError, match=match):
        Intrinsics.from_k(K, width, height)


def test_direct_construction_is_validated_too():
    with pytest.raises(InputError, match=r'fx_px: 0.0 must be > 0'):
        Intrinsics(0.0, 1.0, 1.0, 1.0, 4, 4)
    with pytest.raises(InputError, match=r'cy_px: nan is not a finite number'):
        Intrinsics(1.0, 1.0, 1.0, math.nan, 4, 4)
    intr = Intrinsics(np.float32(2), 3, 1, 1, np.int64(4), 4)
    assert type(intr.fx_px) is float and type(intr.width) is int


def test_scaled_to_follows_the_pixel_centre_convention():
    intr = Intrinsics(100.0, 80.0, 30.0, 20.0, 64, 48)
    half = intr.scaled_to(32, 24)
    assert (half.fx_px, half.fy_px) == (50.0, 40.0)
    assert half.cx_px == pytest.approx((30.0 + 0.5) * 0.5 - 0.5)
    assert half.cy_px == pytest.approx((20.0 + 0.5) * 0.5 - 0.5)
    assert (half.width, half.height) == (32, 24)
    # the image centre stays the centre
    centred = Intrinsics(100.0, 100.0, 31.5, 23.5, 64, 48).scaled_to(16, 12)
    assert (centred.cx_px, centred.cy_px) == (7.5, 5.5)
    with pytest.raises(InputError, match=r'width: 0'):
        intr.scaled_to(0, 24)


def test_scaled_to_matches_where_cv2_resize_puts_a_point():
    # A 2x2 bright block centred on pixel coordinate (10.5, 6.5) of a 40x30 image
    image = np.zeros((30, 40), np.float32)
    image[6:8, 10:12] = 1.0
    intr = Intrinsics(50.0, 50.0, 10.5, 6.5, 40, 30)  # the block lies on the optical axis
    small = cv2.resize(image, (20, 15), interpolation=cv2.INTER_AREA)
    row, col = np.unravel_index(np.argmax(small), small.shape)
    scaled = intr.scaled_to(20, 15)
    assert (scaled.cx_px, scaled.cy_px) == (col, row)  # the axis still hits the block


@settings(max_examples=50, deadline=None)
@given(st.floats(1, 2000), st.floats(-100, 800), st.integers(1, 4000), st.integers(1, 4000))
def test_scaling_there_and_back_is_identity(f_px, c_px, width, height):
    intr = Intrinsics(f_px, f_px * 1.1, c_px, c_px * 0.7, 640, 480)
    back = intr.scaled_to(width, height).scaled_to(640, 480)
    for name in ('fx_px', 'fy_px', 'cx_px', 'cy_px'):
        assert getattr(back, name) == pytest.approx(getattr(intr, name), rel=1e-9, abs=1e-9)
