"""Depth to organized cloud against a per-pixel loop; rgb packing; atomic PLY."""

import math
import os

import numpy as np
import pytest

from metricgold_ros.camera import Intrinsics
from metricgold_ros.errors import InputError
from metricgold_ros.pointcloud import depth_to_points, write_ply

HEIGHT, WIDTH = 7, 10
INTR = Intrinsics(fx_px=8.0, fy_px=6.5, cx_px=4.3, cy_px=2.9, width=WIDTH, height=HEIGHT)


@pytest.fixture
def depth_m() -> np.ndarray:
    depth = np.random.default_rng(3).uniform(0.5, 9.0, (HEIGHT, WIDTH)).astype(np.float32)
    depth[0, 0] = np.nan
    depth[1, 2] = np.inf
    depth[2, 4] = 0.0
    depth[3, 6] = -1.0
    depth[4, 8] = 50.0  # beyond max_depth_m in some tests
    return depth


def _expected(depth, intr, stride, max_depth_m):
    """xyz per sampled pixel with a plain loop, as depth_image_proc writes it."""
    rows = []
    for v in range(0, depth.shape[0], stride):
        row = []
        for u in range(0, depth.shape[1], stride):
            z = float(depth[v, u])
            if not (math.isfinite(z) and 0 < z <= max_depth_m):
                row.append((math.nan, math.nan, math.nan))
                continue
            row.append(((u - intr.cx_px) * z / intr.fx_px, (v - intr.cy_px) * z / intr.fy_px, z))
        rows.append(row)
    return np.array(rows)


@pytest.mark.parametrize('stride', [1, 2, 3, 4])
@pytest.mark.parametrize('max_depth_m', [math.inf, 8.0])
def test_xyz_match_an_independent_projection(depth_m, stride, max_depth_m):
    cloud = depth_to_points(depth_m, INTR, stride=stride, max_depth_m=max_depth_m)
    expected = _expected(depth_m, INTR, stride, max_depth_m)
    assert (cloud.height, cloud.width) == (math.ceil(HEIGHT / stride), math.ceil(WIDTH / stride))
    assert cloud.points.shape == expected.shape[:2]
    got = np.stack([cloud.points[n] for n in ('x', 'y', 'z')], axis=-1)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6, equal_nan=True)


def test_invalid_depth_becomes_nan_everywhere(depth_m):
    cloud = depth_to_points(depth_m, INTR, max_depth_m=10.0)
    for v, u in [(0, 0), (1, 2), (2, 4), (3, 6), (4, 8)]:
        assert all(math.isnan(cloud.points[n][v, u]) for n in ('x', 'y', 'z')), (v, u)
    assert np.isfinite(cloud.points['z']).sum() == HEIGHT * WIDTH - 5


def test_layout_is_little_endian_float32_fields(depth_m):
    cloud = depth_to_points(depth_m, INTR)
    assert cloud.fields == (('x', 0, 7, 1), ('y', 4, 7, 1), ('z', 8, 7, 1))
    assert (cloud.point_step, cloud.row_step) == (12, 12 * WIDTH)
    assert not cloud.has_rgb
    raw = np.frombuffer(cloud.points.tobytes(), '<f4').reshape(HEIGHT, WIDTH, 3)
    np.testing.assert_array_equal(raw[..., 2], cloud.points['z'])
    with_rgb = depth_to_points(depth_m, INTR, rgb=np.zeros((HEIGHT, WIDTH, 3), np.uint8))
    assert with_rgb.fields[-1] == ('rgb', 12, 7, 1)
    assert (with_rgb.point_step, with_rgb.row_step) == (16, 16 * WIDTH)


@pytest.mark.parametrize('stride', [1, 3])
def test_rgb_packs_as_pcl_and_decodes_back(depth_m, stride):
    rgb = np.random.default_rng(5).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    rgb[0, 0] = (1, 2, 3)  # small values: a denormal float32, must survive bit-exact
    rgb[0, 3] = (255, 0, 128)
    cloud = depth_to_points(depth_m, INTR, stride=stride, rgb=rgb)
    raw = np.frombuffer(cloud.points.tobytes(), '<u4').reshape(cloud.height, cloud.width, 4)
    packed = raw[..., 3]
    expected = rgb[::stride, ::stride]
    assert np.all(packed >> 24 == 0)
    np.testing.assert_array_equal((packed >> 16) & 0xFF, expected[..., 0])
    np.testing.assert_array_equal((packed >> 8) & 0xFF, expected[..., 1])
    np.testing.assert_array_equal(packed & 0xFF, expected[..., 2])
    assert packed[0, 0] == 0x010203
    xyz = depth_to_points(depth_m, INTR, stride=stride)
    np.testing.assert_array_equal(cloud.points['z'], xyz.points['z'])


def test_ray_cache_is_keyed_on_the_intrinsics(depth_m):
    first = depth_to_points(depth_m, INTR).points['x'].copy()
    moved = Intrinsics(8.0, 6.5, 1.0, 2.9, WIDTH, HEIGHT)  # same size, other cx
    assert not np.allclose(depth_to_points(depth_m, moved).points['x'], first, equal_nan=True)
    np.testing.assert_array_equal(depth_to_points(depth_m, INTR).points['x'], first)


def test_float64_depth_is_accepted(depth_m):
    cloud = depth_to_points(depth_m.astype(np.float64), INTR)
    np.testing.assert_array_equal(cloud.points['z'], depth_to_points(depth_m, INTR).points['z'])


@pytest.mark.parametrize('kwargs, match', [
    ({'intr': Intrinsics(8.0, 6.5, 4.0, 3.0, 20, 14)},
     r'intr: intrinsics are for 20x14 but the depth is 10x7.*scaled_to\(10, 7\)'),
    ({'stride': 0}, r'stride: 0 must be an integer >= 1'),
    ({'stride': 1.5}, r'stride: 1.5'),
    ({'max_depth_m': 0.0}, r'max_depth_m: 0.0 must be > 0'),
    ({'rgb': np.zeros((HEIGHT, WIDTH, 4), np.uint8)}, r'rgb: uint8 array of shape'),
    ({'depth_m': np.zeros((HEIGHT, WIDTH), np.uint16)}, r'depth_m: uint16 array'),
])
def test_bad_arguments_raise(depth_m, kwargs, match):
    args = {'depth_m': depth_m, 'intr': INTR, **kwargs}
    with pytest.raises(InputError, match=match):
        depth_to_points(**args)


def _read_ply(path):
    with open(path, 'rb') as handle:
        blob = handle.read()
    header, body = blob.split(b'end_header\n', 1)
    lines = header.decode('ascii').splitlines()
    assert lines[:2] == ['ply', 'format binary_little_endian 1.0']
    count = int(lines[2].split()[-1])
    props = [line.split() for line in lines[3:]]
    dtype = np.dtype([(p[2], '<f4' if p[1] == 'float' else 'u1') for p in props])
    assert len(body) == count * dtype.itemsize
    return np.frombuffer(body, dtype)


@pytest.mark.parametrize('with_rgb', [False, True])
def test_write_ply_holds_the_finite_points(tmp_path, depth_m, with_rgb):
    rgb = np.random.default_rng(9).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    cloud = depth_to_points(depth_m, INTR, rgb=rgb if with_rgb else None)
    path = tmp_path / 'cloud.ply'
    path.write_bytes(b'old content')  # replaced, never appended to
    count = write_ply(path, cloud)
    vertices = _read_ply(path)
    finite = np.isfinite(cloud.points['z'])
    assert count == vertices.size == finite.sum() == HEIGHT * WIDTH - 4
    for name in ('x', 'y', 'z'):
        np.testing.assert_array_equal(vertices[name], cloud.points[name][finite])
    if with_rgb:
        assert vertices.dtype.names[3:] == ('red', 'green', 'blue')
        np.testing.assert_array_equal(vertices['red'], rgb[..., 0][finite])
        np.testing.assert_array_equal(vertices['blue'], rgb[..., 2][finite])
    assert os.listdir(tmp_path) == ['cloud.ply']  # no temporary file left behind


def test_write_ply_failure_leaves_nothing(tmp_path, depth_m):
    cloud = depth_to_points(depth_m, INTR)
    target = tmp_path / 'cloud.ply'
    target.mkdir()  # os.replace onto a directory fails after the temp file is written
    with pytest.raises(OSError):
        write_ply(target, cloud)
    assert sorted(os.listdir(tmp_path)) == ['cloud.ply']
    assert os.listdir(target) == []
