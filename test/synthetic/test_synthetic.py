"""The procedural RGB-D renderer: exact planar depth, determinism, ranges, sequences, CLI."""

import math

import numpy as np
import pytest

from metricgold_ros.errors import InputError
from metricgold_ros.synthetic.scenes import (CHECKER, MAX_DEPTH_M, CameraPose, Material, Scene,
                                              camera_sequence, flat_wall, make_scene,
                                              render_sample, render_view)
from metricgold_ros.synthetic.vkitti import main

W, H = 64, 48
FX, CX, CY = 40.0, 31.5, 23.5


def _room(extra_lo=(), extra_hi=()) -> Scene:
    """A 4 x 3 x 5 m room [0,4]x[0,3]x[0,5] with optional boxes inside it."""
    lo = np.array([(0.0, 0.0, 0.0), *extra_lo])
    hi = np.array([(4.0, 3.0, 5.0), *extra_hi])
    return Scene('indoor', lo, hi, np.zeros((len(lo), 3, 2), int),
                 [Material((0.8, 0.6, 0.4), (0.2, 0.3, 0.4), CHECKER, 0.5)],
                 np.array([True] + [False] * len(extra_lo)),
                 lights_m=np.array([[2.0, 2.7, 2.5]]), light_power=np.array([0.8]))


def _pixel_rays() -> tuple[np.ndarray, np.ndarray]:
    """Camera-frame ray slopes a = (u - cx) / fx [1,W], b = (v - cy) / fy [H,1], float64."""
    return (np.arange(W) - CX)[None, :] / FX, (np.arange(H) - CY)[:, None] / FX


def test_room_depth_is_the_analytic_planar_depth_everywhere():
    # Camera at (2, 1.5, 1) looking down +z: world ray (a, -b, 1), so planar depth = ray t.
    sample = render_view(_room(), CameraPose((2.0, 1.5, 1.0)), (FX, FX, CX, CY), W, H)
    a, b = _pixel_rays()
    with np.errstate(divide='ignore'):
        to_walls = np.where(a != 0, 2.0 / np.abs(a), np.inf)  # x = 0 or x = 4
        to_floor_or_ceiling = np.where(b > 0, 1.5 / b, np.where(b < 0, 1.5 / -b, np.inf))
    expected = np.minimum(np.minimum(to_walls, to_floor_or_ceiling), 4.0)  # back wall z = 5
    assert sample.valid.all()
    np.testing.assert_allclose(sample.depth_m, expected, rtol=1e-6)
    back_wall = (np.abs(a) < 0.5) & (np.abs(b) < 0.375)  # rays reaching z = 5 inside the room
    assert back_wall.sum() > 100 and (sample.depth_m[back_wall] == 4.0).all()
    floor = (b > 0.375) & (np.abs(a) * 1.5 / b < 2.0)
    assert floor.sum() > 50
    v = np.broadcast_to(np.arange(H)[:, None], (H, W))[floor]
    np.testing.assert_allclose(sample.depth_m[floor], 1.5 * FX / (v - CY), rtol=1e-6)
    assert sample.rgb.dtype == np.uint8 and sample.rgb.shape == (H, W, 3)
    assert sample.rgb.std() > 5  # textured and shaded, not a flat colour


def test_box_in_front_of_the_camera_occludes_at_its_face_distance():
    # Box [1.5,2.5]x[0,1]x[3,3.5]: its front face z = 3 is 2 m ahead of the camera.
    scene = _room([(1.5, 0.0, 3.0)], [(2.5, 1.0, 3.5)])
    sample = render_view(scene, CameraPose((2.0, 1.5, 1.0)), (FX, FX, CX, CY), W, H)
    a, b = _pixel_rays()
    front = (np.abs(a) < 0.25) & (b > 0.25) & (b < 0.75)  # x = 2 + 2a, y = 1.5 - 2b on the face
    top = (np.abs(a) * 0.5 / b < 0.5) & (b > 0.2) & (b < 0.25)  # y = 1 reached at z in (3, 3.5)
    assert front.sum() > 50 and top.sum() > 0
    assert (sample.depth_m[front] == 2.0).all()
    v = np.broadcast_to(np.arange(H)[:, None], (H, W))[top]
    np.testing.assert_allclose(sample.depth_m[top], 0.5 * FX / (v - CY), rtol=1e-6)


def test_turned_camera_keeps_planar_not_euclidean_depth():
    # Turned 90 deg to +x, the camera faces the wall x = 4 at 2 m: planar depth 2 on it.
    sample = render_view(_room(), CameraPose((2.0, 1.5, 2.5), yaw_rad=math.pi / 2),
                         (FX, FX, CX, CY), W, H)
    a, b = _pixel_rays()
    wall = (np.abs(a) < 1.0) & (np.abs(b) < 0.75)
    np.testing.assert_allclose(sample.depth_m[wall], 2.0, rtol=1e-5)


@pytest.mark.parametrize('kind', ['indoor', 'outdoor'])
def test_same_seed_same_bytes_other_seed_differs(kind):
    first, again = render_sample(3, kind, W, H), render_sample(3, kind, W, H)
    other = render_sample(4, kind, W, H)
    assert first.rgb.tobytes() == again.rgb.tobytes()
    assert first.depth_m.tobytes() == again.depth_m.tobytes()
    assert (first.fx_px, first.cx_px) == (again.fx_px, again.cx_px)
    assert first.rgb.tobytes() != other.rgb.tobytes()
    assert first.depth_m.dtype == np.float32 and first.valid.dtype == bool


@pytest.mark.parametrize('kind, low_m, high_m', [('indoor', 0.5, 10.0), ('outdoor', 1.0, 80.0)])
def test_depth_ranges_and_intrinsics_are_plausible(kind, low_m, high_m):
    fov_deg = []
    for seed in range(6):
        sample = render_sample(seed, kind, W, H)
        depth = sample.depth_m[sample.valid]
        assert depth.size > 0.5 * W * H
        assert low_m <= depth.min() and depth.max() <= high_m
        assert (sample.depth_m[~sample.valid] == 0).all()
        assert sample.fx_px == sample.fy_px
        assert abs(sample.cx_px - (W - 1) / 2) <= 0.02 * W + 1e-9
        assert abs(sample.cy_px - (H - 1) / 2) <= 0.02 * H + 1e-9
        fov_deg.append(math.degrees(2 * math.atan(W / 2 / sample.fx_px)))
    assert all(45 - 1e-6 <= f <= 90 + 1e-6 for f in fov_deg) and len(set(fov_deg)) == 6
    big = render_sample(5, kind, 2 * W, 2 * H)  # same camera, twice the resolution
    assert big.fx_px == pytest.approx(2 * render_sample(5, kind, W, H).fx_px)


def test_outdoor_sky_is_invalid_and_blue():
    scene = make_scene(0, 'outdoor')
    up = render_view(scene, CameraPose((0.0, 1.5, 5.0), pitch_rad=0.9), (FX, FX, CX, CY), W, H)
    sky = ~up.valid
    assert sky[:5].all()  # the top rows look at the open sky
    assert (up.depth_m[sky] == 0).all() and (up.depth_m[up.valid] > 0).all()
    blue = up.rgb[sky].astype(int)
    assert (blue[:, 2] > blue[:, 0]).mean() > 0.9
    assert MAX_DEPTH_M == 80.0


@pytest.mark.parametrize('kind', ['indoor', 'outdoor'])
def test_sequence_moves_smoothly_in_one_fixed_scene(kind):
    frames = list(camera_sequence(7, kind, 5, W, H, fps=10))
    assert [f.frame_index for f in frames] == list(range(5))
    assert len({(f.fx_px, f.cx_px, f.cy_px) for f in frames}) == 1
    first_of_two = next(camera_sequence(7, kind, 2, W, H, fps=10))  # scene ignores n_frames
    assert first_of_two.rgb.tobytes() == frames[0].rgb.tobytes()
    for prev, cur in zip(frames, frames[1:]):
        both = prev.valid & cur.valid
        change = np.abs(prev.depth_m[both] - cur.depth_m[both]).mean()
        assert 0 < change < 0.1 * prev.depth_m[both].mean()
        assert prev.rgb.tobytes() != cur.rgb.tobytes()


def test_flat_wall_has_one_depth_everywhere_and_follows_its_seed():
    wall = flat_wall(3, 2.5, W, H)
    assert wall.valid.all() and (wall.depth_m == 2.5).all()
    hfov_deg = math.degrees(2 * math.atan(W / 2 / wall.fx_px))
    assert wall.cx_px == (W - 1) / 2 and 45 <= hfov_deg <= 90
    assert wall.rgb.std() > 1  # lit and textured, not a blank frame
    assert np.array_equal(flat_wall(3, 2.5, W, H).rgb, wall.rgb)
    assert not np.array_equal(flat_wall(4, 2.5, W, H).rgb, wall.rgb)
    with pytest.raises(InputError, match='distance_m'):
        flat_wall(3, 0.1, W, H)


def test_bad_arguments_raise_input_error():
    with pytest.raises(InputError, match='kind'):
        render_sample(0, 'underwater', W, H)
    with pytest.raises(InputError, match='image size'):
        render_sample(0, 'indoor', 4, 4)
    with pytest.raises(InputError, match='seed'):
        render_sample(-1, 'indoor', W, H)
    with pytest.raises(InputError, match='n_frames'):
        list(camera_sequence(0, 'indoor', -1, W, H))


def test_command_line_writes_vkitti2_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / 'synth'
    assert main(['--out', str(out), '--n', '2', '--seed', '5', '--size', '32x24']) == 0
    frames = out / 'Scene02' / 'clone' / 'frames'
    assert sorted(p.name for p in (frames / 'rgb' / 'Camera_0').iterdir()) == [
        'rgb_00000.jpg', 'rgb_00001.jpg']
    assert (frames / 'depth' / 'Camera_0' / 'depth_00001.png').is_file()
    assert (out / 'Scene01' / 'domain.txt').read_text().strip() == 'indoor'
    assert main(['--out', str(out), '--n', '1', '--size', '32x24']) == 1
    assert main(['--out', str(tmp_path / 'x'), '--size', 'big']) == 2
    assert main(['--out', str(tmp_path / 'y'), '--kinds', 'moon']) == 1
    assert capsys.readouterr().err.count('ERROR: ') == 3
    assert not (tmp_path / 'y').exists()
