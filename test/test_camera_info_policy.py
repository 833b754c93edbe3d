"""One CameraInfo policy in every path: the same bad calibrations through the frame
processor, ``metricgold bag``, ``metricgold infer`` and the live node behave alike: depth
always, points and depth/camera_info only from a usable calibration, a warning that names the
problem, and D written as the camera gave it (an empty D as the model's zeros)."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from bag_helpers import read_bag, run_bag, write_camera_bag
from metricgold_ros.camera import Calibration
from metricgold_ros.depth_frame import DepthFrameProcessor, FrameOptions
from metricgold_ros.tools.cli import main

W, H = 160, 120
# (case, K override or None, (width, height) of the info, D, points expected, warning words)
CASES = [
    ('good', None, (W, H), [0.0] * 5, True, []),
    ('empty D', None, (W, H), [], True, []),
    ('zero K', [0.0] * 9, (W, H), [0.0] * 5, False, ['fx', 'calibrat']),
    ('NaN D', None, (W, H), [math.nan, 0.0, 0.0, 0.0, 0.0], False, ['D:', 'NaN']),
    ('another aspect', None, (W, 2 * H), [0.0] * 5, False, ['aspect', f'{W}x{2 * H}']),
]
IDS = [case[0] for case in CASES]
FAST = ['--processing-resolution', '64']


def _k9(camera, k):
    return [float(v) for v in camera.k.reshape(-1)] if k is None else k


@pytest.fixture(scope='module')
def bag_camera(tmp_path_factory):
    """The intrinsics the bag helper records (a rendered scene's)."""
    return write_camera_bag(tmp_path_factory.mktemp('probe') / 'b', count=1).camera


@pytest.mark.parametrize('case, k, size, d, points, words', CASES, ids=IDS)
def test_frame_processor(tiny_pipeline, bag_camera, case, k, size, d, points, words):
    calibration = Calibration.from_fields(_k9(bag_camera, k), d, 'plumb_bob', *size)
    rgb = np.full((H, W, 3), 128, np.uint8)
    result = DepthFrameProcessor(tiny_pipeline).process(
        rgb, calibration, FrameOptions(processing_resolution=32))
    assert result.depth.shape == (H, W) and np.isfinite(result.depth).all()
    assert (result.cloud is not None) == points == (result.intrinsics is not None)
    assert all(word in (result.camera_problem or '') for word in words), result.camera_problem
    if points:
        assert result.distortion == (0.0,) * 5  # an empty D is plumb_bob's five zeros


@pytest.mark.parametrize('case, k, size, d, points, words', CASES, ids=IDS)
def test_bag(tmp_path, capsys, fast_model, case, k, size, d, points, words):
    bag = write_camera_bag(tmp_path / 'in', count=2, info_k=k, info_size=size, info_d=d)
    code, summary, _ = run_bag(capsys, bag.path, tmp_path / 'out', *FAST)
    assert code == 0 and summary['messages']['/camera/depth/image'] == 2, case
    assert ('/camera/points' in summary['messages']) == points
    assert ('/camera/depth/camera_info' in summary['messages']) == points
    problems = [w for w in summary['warnings'] if 'camera_info' in w]
    assert bool(problems) != points and all(word in problems[0] for word in words) \
        if words else not problems, summary['warnings']
    if points:
        infos = read_bag(tmp_path / 'out')['/camera/depth/camera_info']
        assert [list(item[2].d) for item in infos] == [[0.0] * 5] * 2


@pytest.mark.parametrize('case, k, size, d, points, words', CASES, ids=IDS)
def test_infer(tmp_path, capsys, fast_model, bag_camera, case, k, size, d, points, words):
    image = tmp_path / 'a.png'
    Image.fromarray(np.full((H, W, 3), 128, np.uint8)).save(image)
    calib = tmp_path / 'cam.yaml'
    calib.write_text(f'image_width: {size[0]}\nimage_height: {size[1]}\n'
                     f'camera_matrix: {{rows: 3, cols: 3, data: {_k9(bag_camera, k)}}}\n'
                     f'distortion_model: plumb_bob\n'
                     f'distortion_coefficients: {{rows: 1, cols: {len(d)}, data: '
                     f'{[".nan" if math.isnan(v) else v for v in d]}}}\n'.replace("'", ''))
    code = main(['infer', str(image), '--out', str(tmp_path / 'out'), '--camera-info',
                 str(calib), '--quiet', *FAST])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and (tmp_path / 'out' / 'a_depth.npy').exists(), case
    assert (tmp_path / 'out' / 'a.ply').exists() == points
    problems = [w for w in summary['warnings'] if 'point cloud' in w]
    assert bool(problems) != points
    assert all(word in problems[0] for word in words) if words else True, problems


@pytest.mark.parametrize('case, k, size, d, points, words', CASES, ids=IDS)
def test_node(node_rig, case, k, size, d, points, words):
    from ros_helpers import stamp_of, wait_until

    rig = _node_rig(node_rig)
    k4 = None if k is None else (k[0], k[4], k[2], k[5])
    stamp = rig.send(info_k=k4, info_size=size, info_d=d)
    depth = rig.collectors['depth/image'].wait_for(lambda m: stamp_of(m) == stamp, 20.0)
    assert depth is not None, f'{case}: no depth'
    if points:
        for topic in ('points', 'depth/camera_info'):
            assert rig.collectors[topic].wait_for(lambda m: stamp_of(m) == stamp, 20.0), topic
        info = rig.collectors['depth/camera_info'].wait_for(lambda m: stamp_of(m) == stamp, 1)
        assert list(info.d) == [0.0] * 5
    else:
        assert wait_until(lambda: rig.errors_naming('/policy/camera_info', *words), 10.0), case
        assert not any(stamp_of(m) == stamp for m in rig.collectors['points'].messages())


_RIGS = {}


def _node_rig(factory):
    """One node for the whole table (the factory's harness lives for the module)."""
    if factory not in _RIGS:
        rig = factory('/policy', processing_resolution=32, publish_colored=False,
                      stats_period=0.0)
        rig.collectors = rig.outputs('depth/image', 'depth/camera_info', 'points')
        _RIGS.clear()
        _RIGS[factory] = rig
    return _RIGS[factory]
