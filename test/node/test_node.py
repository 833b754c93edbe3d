"""depth_node in-process over real DDS (loopback) with the tiny real model: outputs, geometry,
live parameters, bad input, laziness, diagnostics."""

import math

import numpy as np
import pytest

pytest.importorskip('rclpy')
pytest.importorskip('sensor_msgs.msg')

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rcl_interfaces.msg import Log  # noqa: E402
from rclpy.logging import LoggingSeverity  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import Image, PointCloud2  # noqa: E402

from metricgold_ros.ground import FIT_STATES  # noqa: E402
from metricgold_ros.node.depth_node import DepthNode  # noqa: E402
from metricgold_ros.node.parameters import SPECS  # noqa: E402
from ros_helpers import (RosHarness, cloud_array, image_array, image_msg,  # noqa: E402
                         raw_image_msg, reliable_qos, stamp_of, synthetic_frame,
                         wait_for_publishers, wait_for_subscribers, wait_until)

pytestmark = pytest.mark.timeout(120)

W, H = 160, 120
NS = '/cam'
OUT_TIMEOUT_S = 20.0
BASE_PARAMS = {'processing_resolution': 64, 'denoising_steps': 1, 'ensemble_size': 1,
               'points_stride': 1, 'output_scale': 1.0, 'max_depth': 0.0,
               'publish_points': True, 'points_rgb': False}


@pytest.fixture(scope='module')
def rig(node_rig):
    return node_rig(NS, stats_period=1.0, **BASE_PARAMS)


@pytest.fixture
def fresh(rig):
    """The rig with base parameters, output collectors removed afterwards."""
    assert all(r.successful for r in rig.set_params(**BASE_PARAMS))
    yield rig
    rig.drop_collectors()


def _wait_stamp(collector, stamp, timeout_s=OUT_TIMEOUT_S):
    return collector.wait_for(lambda m: stamp_of(m) == stamp, timeout_s)


def _expected_xyz(depth, k, stride, max_depth=math.inf):
    """Independent pinhole projection (depth_image_proc): x=(u-cx)z/fx, y=(v-cy)z/fy."""
    fx, fy, cx, cy = k
    z = depth[::stride, ::stride].astype(np.float64)
    v, u = np.mgrid[0:depth.shape[0]:stride, 0:depth.shape[1]:stride]
    z = np.where((z > 0) & (z <= max_depth), z, np.nan)
    return (u - cx) * z / fx, (v - cy) * z / fy, z


def test_declares_exactly_the_parameter_table(rig):
    names = set(rig.node._parameters)
    assert set(SPECS) <= names
    assert names - set(SPECS) <= {'use_sim_time', 'start_type_description_service'}
    model_path = rig.node.describe_parameter('model_path')
    assert model_path.read_only and 'checkpoint' in model_path.description
    assert not rig.node.describe_parameter('denoising_steps').read_only


@pytest.mark.parametrize('stride', [1, 3])
def test_outputs_headers_sizes_and_cloud_geometry(fresh, stride):
    rig = fresh
    out = rig.outputs('depth/image', 'depth/camera_info', 'depth/colored', 'points')
    assert all(r.successful for r in rig.set_params(points_stride=stride, max_depth=5.0))
    stamp = rig.send(padding=7)  # bgr8 with padded rows
    depth_msg = _wait_stamp(out['depth/image'], stamp)
    assert depth_msg is not None, 'no depth/image for the frame'
    info = _wait_stamp(out['depth/camera_info'], stamp, 5.0)
    colored = _wait_stamp(out['depth/colored'], stamp, 5.0)
    cloud = _wait_stamp(out['points'], stamp, 5.0)
    for msg in (depth_msg, info, colored, cloud):
        assert msg is not None
        assert msg.header.frame_id == 'camera_optical_frame' and stamp_of(msg) == stamp
    assert (depth_msg.encoding, depth_msg.width, depth_msg.height) == ('32FC1', W, H)
    assert (colored.encoding, colored.width, colored.height) == ('bgr8', W, H)
    assert (info.width, info.height) == (W, H)
    np.testing.assert_allclose(np.reshape(info.k, (3, 3))[[0, 1, 0, 1], [0, 1, 2, 2]],
                               rig.k, rtol=1e-9)
    depth = image_array(depth_msg)
    assert np.all(np.isfinite(depth) & (depth > 0))  # the model's range: nothing invalid here
    assert (cloud.height, cloud.width) == (math.ceil(H / stride), math.ceil(W / stride))
    assert not cloud.is_dense and not cloud.is_bigendian
    assert [f.name for f in cloud.fields] == ['x', 'y', 'z']
    got = cloud_array(cloud)
    expected = _expected_xyz(depth, rig.k, stride, max_depth=5.0)
    for name, want in zip('xyz', expected):
        assert np.array_equal(np.isnan(got[name]), np.isnan(want)), f'NaN placement of {name}'
        np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-6, equal_nan=True)
    far = depth[::stride, ::stride] > 5.0
    assert far.any() and (~far).any(), 'test frame should straddle max_depth'


def test_resized_camera_info_and_output_scale(fresh):
    """CameraInfo for 2x the image size (e.g. 1280x720 info, 640x360 image), depth at 1/2."""
    rig = fresh
    out = rig.outputs('depth/image', 'depth/camera_info', 'points')
    assert all(r.successful for r in rig.set_params(output_scale=0.5, points_rgb=True))
    fx, fy, cx, cy = rig.k
    big_k = (2 * fx, 2 * fy, 2 * cx + 0.5, 2 * cy + 0.5)  # the same camera at 2W x 2H
    stamp = rig.send(info_k=big_k, info_size=(2 * W, 2 * H), encoding='rgba8')
    depth_msg = _wait_stamp(out['depth/image'], stamp)
    info = _wait_stamp(out['depth/camera_info'], stamp, 5.0)
    cloud = _wait_stamp(out['points'], stamp, 5.0)
    assert depth_msg is not None and info is not None and cloud is not None
    assert (depth_msg.width, depth_msg.height) == (W // 2, H // 2) == (info.width, info.height)
    s = 0.25  # from 2W to W/2; pixel centres stay aligned: c' = (c + 0.5) s - 0.5
    want_k = (big_k[0] * s, big_k[1] * s, (big_k[2] + 0.5) * s - 0.5, (big_k[3] + 0.5) * s - 0.5)
    k = np.reshape(info.k, (3, 3))
    np.testing.assert_allclose([k[0, 0], k[1, 1], k[0, 2], k[1, 2]], want_k, rtol=1e-9)
    got = cloud_array(cloud)
    assert [f.name for f in cloud.fields] == ['x', 'y', 'z', 'rgb']
    for name, want in zip('xyz', _expected_xyz(image_array(depth_msg), want_k, 1)):
        np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_uncertainty_only_when_ensembling(fresh):
    rig = fresh
    out = rig.outputs('depth/image', 'depth/uncertainty')
    first = rig.send()
    assert _wait_stamp(out['depth/image'], first) is not None
    assert all(r.successful for r in rig.set_params(ensemble_size=2))
    second = rig.send()
    unc = _wait_stamp(out['depth/uncertainty'], second)
    assert unc is not None and (unc.encoding, unc.width, unc.height) == ('32FC1', W, H)
    spread = image_array(unc)
    assert np.all(np.isfinite(spread) & (spread >= 0))
    assert not any(stamp_of(m) == first for m in out['depth/uncertainty'].messages())


def test_live_parameter_change_takes_effect_on_next_frame(fresh):
    rig = fresh
    out = rig.outputs('depth/image', 'points')
    one_step = _wait_stamp(out['depth/image'], rig.send())
    assert all(r.successful for r in rig.set_params(denoising_steps=3, points_stride=4))
    stamp = rig.send()
    three_steps = _wait_stamp(out['depth/image'], stamp)
    cloud = _wait_stamp(out['points'], stamp, 5.0)
    assert (cloud.height, cloud.width) == (H // 4, W // 4)
    assert not np.allclose(image_array(one_step), image_array(three_steps))
    assert all(r.successful for r in rig.set_params(denoising_steps=1))
    again = _wait_stamp(out['depth/image'], rig.send())  # same seed, same steps: same depth
    np.testing.assert_allclose(image_array(again), image_array(one_step), rtol=1e-5)


@pytest.mark.parametrize('values, reason', [
    ({'model_path': '/elsewhere'}, 'read-only'),
    ({'ensemble_size': 0}, ''),
    ({'colormap': 'rainbowish'}, 'colormap'),
    ({'color_min_depth': 5.0, 'color_max_depth': 2.0}, 'color_min_depth'),
    ({'points_stride': 2.5}, ''),
])
def test_bad_parameter_values_are_refused(fresh, values, reason):
    results = fresh.set_params(**values)
    assert not all(r.successful for r in results)
    assert reason.lower() in ' '.join(r.reason.lower() for r in results)


def _bad_images(rig):
    good = image_msg(rig.rgb, 0, 'rgb8')
    data = bytes(good.data)
    return {
        'encoding 32FC1': (lambda s: raw_image_msg(s, '32FC1', H, W, 4 * W, bytes(4 * W * H)),
                           ["'32FC1'", 'encoding', 'rgb8']),
        'encoding bayer_rggb16': (lambda s: raw_image_msg(s, 'bayer_rggb16', H, W, 2 * W,
                                                          bytes(2 * W * H)),
                                  ["'bayer_rggb16'", 'encoding']),
        'encoding nv12': (lambda s: raw_image_msg(s, 'nv12', H, W, W, bytes(W * H * 3 // 2)),
                          ["'nv12'", 'encoding']),
        'truncated data': (lambda s: raw_image_msg(s, 'rgb8', H, W, 3 * W, data[:len(data) // 2]),
                           ['data', 'truncated']),
        'step too small': (lambda s: raw_image_msg(s, 'rgb8', H, W, 3 * W - 3, data),
                           ['step', 'publisher']),
        'empty image': (lambda s: raw_image_msg(s, 'rgb8', 0, 0, 0, b''), ['height', 'pixel']),
        'odd-width yuv422': (lambda s: raw_image_msg(s, 'yuv422', H, W - 1, 2 * (W - 1),
                                                     bytes(2 * (W - 1) * H)), ['width', 'even']),
    }


def test_bad_images_are_logged_and_the_next_good_frame_served(fresh):
    rig = fresh
    out = rig.outputs('depth/image', 'points')
    image_topic = f'{NS}/image_raw'
    for case, (make, words) in _bad_images(rig).items():
        before = rig.node.stats().errors
        rig.send(image=make)
        assert wait_until(lambda: rig.errors_naming(image_topic, *words), 10.0), \
            f'{case}: no error naming {image_topic} and {words} on /rosout'
        assert rig.node.stats().errors == before + 1
        stamp = rig.send()
        assert _wait_stamp(out['depth/image'], stamp) is not None, f'{case}: node stopped'


def test_work_budget_refuses_settings_that_would_exhaust_memory(fresh):
    """pixels x ensemble members over max_work_megapixels is refused when set, naming both and
    the way out; the node goes on serving at the old settings."""
    rig = fresh
    out = rig.outputs('depth/image')
    try:
        assert all(r.successful for r in rig.set_params(processing_resolution=4096))
        result, = rig.set_params(ensemble_size=2)
        assert not result.successful
        assert 'processing_resolution 4096 x ensemble_size 2 is 33.6 megapixels' in result.reason
        assert 'max_work_megapixels 32' in result.reason
        assert all(r.successful for r in rig.set_params(processing_resolution=64))
        assert all(r.successful for r in rig.set_params(ensemble_size=32))  # 64 px x 32: fine
        result, = rig.set_params(processing_resolution=1024)
        assert not result.successful and 'ensemble_size 32' in result.reason
        assert _wait_stamp(out['depth/image'], rig.send()) is not None
    finally:
        assert all(r.successful for r in rig.set_params(processing_resolution=64,
                                                        ensemble_size=1))


def test_pixel_budget_refuses_large_images_and_is_read_only(node_rig, rig):
    small = node_rig('/budget', max_pixels=W * H - 1, **BASE_PARAMS)
    try:
        out = small.outputs('depth/image')
        small.send()
        assert wait_until(lambda: small.errors_naming('/budget/image_raw', 'pixel budget'), 10.0)
        assert out['depth/image'].messages() == []
        # Read-only: `ros2 param set` cannot raise the budget under a running node.
        result, = small.set_params(max_pixels=W * H)
        assert not result.successful and 'read-only' in result.reason
    finally:
        small.close()


@pytest.mark.parametrize('case, info_k, info_size, words', [
    ('zero fx', (0.0, 0.0, 80.0, 60.0), (W, H), ['fx', 'calibrat']),
    ('another aspect', None, (W, 2 * H), [f'{W}x{2 * H}', 'aspect', 'camera_info']),
])
def test_bad_camera_info_still_gives_depth_without_points(fresh, case, info_k, info_size, words):
    rig = fresh
    out = rig.outputs('depth/image', 'points')
    stamp = rig.send(info_k=info_k, info_size=info_size)
    assert _wait_stamp(out['depth/image'], stamp) is not None, f'{case}: no depth'
    assert wait_until(lambda: rig.errors_naming(f'{NS}/camera_info', *words), 10.0), case
    assert not any(stamp_of(m) == stamp for m in out['points'].messages())
    good = rig.send()
    assert _wait_stamp(out['points'], good) is not None, f'{case}: no cloud after good info'


def test_no_camera_info_gives_depth_and_a_warning(tiny_model_dir):
    """A node that never got CameraInfo publishes depth and warns that no cloud can be made."""
    with RosHarness('no_info_test') as ros:
        ros.add_node(DepthNode(
            context=ros.context, namespace='/noinfo',
            parameter_overrides=[Parameter('model_path', value=str(tiny_model_dir)),
                                 Parameter('device', value='cpu'),
                                 Parameter('processing_resolution', value=64)]))
        rosout = ros.collector(Log, '/rosout', reliable_qos(200))
        depth = ros.collector(Image, '/noinfo/depth/image')
        points = ros.collector(PointCloud2, '/noinfo/points')
        pub = ros.publisher(Image, '/noinfo/image')
        assert wait_for_subscribers(pub) and wait_for_publishers(depth.subscription)
        rgb, _ = synthetic_frame(1, W, H)
        pub.publish(image_msg(rgb, 5_000_000_000, 'mono8'))
        assert depth.wait_for(lambda m: stamp_of(m) == 5_000_000_000, OUT_TIMEOUT_S)
        assert wait_until(lambda: [m for m in rosout.messages() if m.level == 30 and
                                   'no CameraInfo on /noinfo/camera_info' in m.msg], 5.0)
        assert not points.messages()


def test_lazy_without_subscribers(fresh):
    rig = fresh
    rig.drop_collectors()
    assert wait_until(lambda: not rig.node.streams[0].has_subscribers(), 10.0)
    before = rig.node.stats()
    for _ in range(5):
        rig.send()
    assert wait_until(lambda: rig.node.stats().received >= before.received + 5, 5.0)
    after = rig.node.stats()
    assert after.published == before.published
    assert after.idle >= before.idle + 5


def test_diagnostics_and_stats(fresh):
    rig = fresh
    diag = rig.ros.collector(DiagnosticArray, '/diagnostics', reliable_qos())
    out = rig.outputs('depth/image')
    rig.node.get_logger().set_level(LoggingSeverity.DEBUG)
    try:
        assert _wait_stamp(out['depth/image'], rig.send()) is not None
        assert wait_until(lambda: [m for m in rig.rosout.messages() if m.level == 10 and
                                   'unet' in m.msg and 'stamp->publish' in m.msg], 5.0)
    finally:
        rig.node.get_logger().set_level(LoggingSeverity.INFO)
    msg = diag.wait_for(lambda m: any('depth_node' in s.name for s in m.status), 5.0)
    assert msg is not None
    keys = {kv.key for kv in msg.status[0].values}
    assert {'frames received', 'frames dropped', 'latency p50 (ms)'} <= keys
    rig.ros.node.destroy_subscription(diag.subscription)
    infos = [m.msg for m in rig.rosout.messages() if m.level == 20 and 'dropped' in m.msg]
    assert any('stamp->publish p50' in text for text in infos), infos


def test_mounting_publishes_the_metric_scale(fresh):
    """camera_height_m (live) turns the ground fit on: depth/scale per frame, /diagnostics."""
    rig = fresh
    scale = rig.collect(DiagnosticArray, 'depth/scale')
    diag = rig.ros.collector(DiagnosticArray, '/diagnostics', reliable_qos())
    assert wait_for_publishers(scale.subscription)
    try:
        assert all(r.successful for r in rig.set_params(
            camera_height_m=1.2, camera_pitch_deg=15.0, camera_roll_deg=-2.0))
        stamp = rig.send()
        msg = _wait_stamp(scale, stamp)
        assert msg is not None, 'no depth/scale for the frame'
        status = msg.status[0]
        values = {kv.key: kv.value for kv in status.values}
        assert status.name == 'metric_scale' and status.message.startswith('ground fit')
        assert values['state'] in FIT_STATES and values['state'] != 'off'
        assert float(values['scale']) > 0 and 0.0 <= float(values['inlier_share']) <= 1.0
        assert diag.wait_for(lambda m: any('metric scale' in s.name for s in m.status), 5.0)
        refused = rig.set_params(camera_pitch_deg=120.0)
        assert not refused[0].successful and 'camera_pitch_deg' in refused[0].reason
        # Looking up (no floor: a warning), then no mounting (off: info): each change of
        # state is logged at its own severity and the frames are still served.
        depth = rig.collect(Image, 'depth/image')
        assert wait_for_publishers(depth.subscription)
        for params, state in (({'camera_pitch_deg': -60.0}, 'no_floor'),
                              ({'camera_height_m': 0.0}, None)):
            assert all(r.successful for r in rig.set_params(**params))
            stamp = rig.send()
            assert _wait_stamp(depth, stamp) is not None
            if state is not None:
                msg = _wait_stamp(scale, stamp)
                assert {kv.key: kv.value for kv in msg.status[0].values}['state'] == state
        assert wait_until(lambda: [m for m in rig.rosout.messages()
                                   if 'metric scale: ground fit off' in m.msg], 5.0)
        assert not rig.errors_naming('unexpected')
    finally:
        rig.set_params(camera_height_m=0.0, camera_pitch_deg=0.0, camera_roll_deg=0.0)
        rig.ros.node.destroy_subscription(diag.subscription)


def test_single_step_models_refuse_more_steps(node_rig, tiny_model_dir, tmp_path_factory):
    """An E2E-FT checkpoint runs one step: more is refused at start and live, with the reason."""
    import json
    import shutil

    from rclpy.lifecycle import TransitionCallbackReturn

    e2e = tmp_path_factory.mktemp('e2e') / 'model'
    shutil.copytree(tiny_model_dir, e2e)
    meta = json.loads((e2e / 'metricgold.json').read_text())
    (e2e / 'metricgold.json').write_text(json.dumps({**meta, 'e2e_ft': True}))
    with RosHarness('e2e_start') as ros:
        rosout = ros.collector(Log, '/rosout', reliable_qos(200))
        node = ros.add_node(DepthNode(context=ros.context, namespace='/e2e_start',
                                      parameter_overrides=[
                                          Parameter('model_path', value=str(e2e)),
                                          Parameter('device', value='cpu'),
                                          Parameter('denoising_steps', value=4)]),
                            activate=False)
        assert wait_for_publishers(rosout.subscription, count=2)  # this harness and the node
        assert node.trigger_configure() == TransitionCallbackReturn.FAILURE
        assert node.pipeline is None and node.streams == ()
        assert wait_until(lambda: [m for m in rosout.messages() if m.level >= 40 and
                                   'denoising_steps: 4: this model is single-step' in m.msg],
                          5.0)
    rig = node_rig('/e2e_live', model_path=str(e2e), processing_resolution=32)
    result = rig.set_params(denoising_steps=2)[0]
    assert not result.successful and 'single-step (E2E-FT' in result.reason
    assert all(r.successful for r in rig.set_params(denoising_steps=1))
    out = rig.outputs('depth/image')
    assert _wait_stamp(out['depth/image'], rig.send()) is not None
    rig.close()
