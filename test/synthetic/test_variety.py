"""The widened training distribution (issue 24): what it adds and what it leaves alone."""

import math

import numpy as np
import pytest

from metricgold_ros.errors import InputError
from metricgold_ros.synthetic.scenes import NEAR_M, Material, Scene, render_sample
from metricgold_ros.synthetic.variety import CLEARANCE_M, _clear, render_varied
from metricgold_ros.synthetic.vkitti import write_vkitti2

W, H = 80, 60
ROOMS = 120


@pytest.fixture(scope='module')
def rooms():
    return [render_varied(seed, 'indoor', W, H) for seed in range(ROOMS)]


def test_each_frame_follows_its_seed_and_differs_from_the_evaluation_distribution():
    for kind in ('indoor', 'outdoor'):
        frame = render_varied(5, kind, W, H)
        assert np.array_equal(render_varied(5, kind, W, H).rgb, frame.rgb)
        assert not np.array_equal(render_sample(5, kind, W, H).rgb, frame.rgb)
        assert frame.valid.any() and (frame.depth_m[frame.valid] >= NEAR_M).all()
        hfov = math.degrees(2 * math.atan(W / 2 / frame.fx_px))
        assert 50.0 <= hfov <= 100.0


def test_rooms_reach_poses_colours_and_walls_that_render_sample_never_draws(rooms):
    usual = [render_sample(seed, 'indoor', W, H) for seed in range(ROOMS)]
    pitch = [s.camera_pitch_deg for s in rooms if s.camera_height_m > 0]
    usual_pitch = [s.camera_pitch_deg for s in usual]
    assert min(pitch) < min(usual_pitch) - 5 and max(pitch) > max(usual_pitch) + 5
    heights = [s.camera_height_m for s in rooms if s.camera_height_m > 0]
    assert min(heights) < 0.45 and max(heights) > 2.0  # render_sample: 0.6-1.9 m
    # Flat walls (the camera at the wall scene's origin): about 15 % of the indoor frames.
    walls = [s for s in rooms if s.camera_height_m == 0.0]
    assert 0.05 * ROOMS <= len(walls) <= 0.3 * ROOMS
    # Sky-like rooms: frames whose mean colour is clearly blue, which render_sample's rooms
    # (walls and ceiling drawn bright and mostly warm) rarely are.
    def blue(frames):
        return sum(float(np.mean(s.rgb[..., 2])) > float(np.mean(s.rgb[..., 0])) + 25
                   for s in frames)
    assert blue(rooms) > blue(usual)


def test_wall_share_sets_how_many_indoor_frames_are_walls():
    def walls(share):
        return sum(render_varied(seed, 'indoor', 32, 24, wall_share=share).camera_height_m == 0
                   for seed in range(40))
    assert (walls(0.0), walls(1.0)) == (0, 40) and 10 <= walls(0.5) <= 30
    with pytest.raises(InputError, match='wall_share'):
        render_varied(0, 'indoor', 32, 24, wall_share=1.5)


def test_a_camera_position_must_keep_clear_of_every_box():
    # The slab method does not draw a box around the camera (its entry point is behind), so a
    # camera placed inside furniture would see through it: poses are checked before rendering.
    scene = Scene('indoor', np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 1.0]]),
                  np.array([[4.0, 3.0, 5.0], [2.0, 1.0, 2.0]]), np.zeros((2, 3, 2), int),
                  [Material((0.5, 0.5, 0.5))], np.array([True, False]))
    assert not _clear(scene, np.array([1.5, 0.5, 1.5]))  # inside the box
    assert not _clear(scene, np.array([2.0 + CLEARANCE_M / 2, 0.5, 1.5]))  # touching it
    assert _clear(scene, np.array([2.0 + CLEARANCE_M * 1.1, 0.5, 1.5]))
    assert _clear(scene, np.array([1.5, 1.0 + CLEARANCE_M * 1.1, 1.5]))  # above it
    assert _clear(scene, np.array([3.9, 2.9, 4.9]))  # the room itself is no obstacle


def test_the_vkitti2_writer_writes_the_varied_frames(tmp_path):
    from training.datasets import VirtualKitti2Dataset

    assert write_vkitti2(tmp_path, 2, seed=3, width=W, height=H, variety=True,
                         kinds=['outdoor']) == 2
    item = VirtualKitti2Dataset(tmp_path)[1]
    truth = render_varied(4, 'outdoor', W, H)
    assert item['intrinsics'] == (truth.fx_px, truth.fy_px, truth.cx_px, truth.cy_px)
    assert np.abs(item['depth_m'] - truth.depth_m)[truth.valid].max() <= 0.005 + 1e-6
