"""One node, several cameras, one injected model: streams, batching, isolation, lifecycle."""

import os
import time

import numpy as np
import pytest

pytest.importorskip('rclpy')

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus  # noqa: E402
from rcl_interfaces.msg import Log  # noqa: E402
from rclpy.lifecycle import TransitionCallbackReturn  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image, PointCloud2  # noqa: E402

from metricgold_ros.node.depth_node import DepthNode  # noqa: E402
from ros_helpers import (PairPublisher, RosHarness, camera_info_msg, image_msg,  # noqa: E402
                         raw_image_msg, reliable_qos, stamp_of, synthetic_frame,
                         wait_for_publishers, wait_for_subscribers, wait_until)

pytestmark = pytest.mark.timeout(180)

W, H = 160, 120
CAMERAS = ['front', 'rear', 'left']


def _node(ros, pipeline, ns, cameras=CAMERAS, **params):
    values = {'cameras': cameras, 'processing_resolution': 32, 'stats_period': 1.0, **params}
    return DepthNode(pipeline=pipeline, context=ros.context, namespace=ns,
                     parameter_overrides=[Parameter(k, value=v) for k, v in values.items()])


@pytest.fixture(scope='module')
def rgb_k():
    return synthetic_frame(2, W, H)


def _pair(rgb, k, stamp, encoding='rgb8'):
    return image_msg(rgb, stamp, encoding), camera_info_msg(stamp, W, H, k)


def test_streams_share_one_model_and_run_as_one_batch(tiny_pipeline, rgb_k):
    """Three cameras, one pipeline: each stream's own topics, its header kept, its own
    mounting override, and the frames waiting together go through the UNet as one batch."""
    rgb, k = rgb_k
    batches = []
    handle = tiny_pipeline.unet.register_forward_hook(
        lambda module, args, output: batches.append(args[0].shape[0]))
    with RosHarness('multi_test') as ros:
        node = ros.add_node(_node(ros, tiny_pipeline, '/robot', batch_wait_ms=500.0))
        try:
            assert node.pipeline is tiny_pipeline
            assert [s.name for s in node.streams] == CAMERAS
            depth = {c: ros.collector(Image, f'/robot/{c}/depth/image') for c in CAMERAS}
            points = {c: ros.collector(PointCloud2, f'/robot/{c}/points') for c in CAMERAS}
            pubs = {c: (ros.publisher(Image, f'/robot/{c}/image'),
                        ros.publisher(CameraInfo, f'/robot/{c}/camera_info'))
                    for c in CAMERAS}
            for c in CAMERAS:
                assert wait_for_subscribers(pubs[c][0]) and wait_for_subscribers(pubs[c][1])
                assert wait_for_publishers(depth[c].subscription)
                assert wait_for_publishers(points[c].subscription)
            batches.clear()
            stamps = {c: 1_000_000_000 + i for i, c in enumerate(CAMERAS)}
            for c in CAMERAS:
                image, info = _pair(rgb, k, stamps[c])
                image.header.frame_id = f'{c}_optical_frame'
                pubs[c][1].publish(info)
                pubs[c][0].publish(image)
            for c in CAMERAS:
                msg = depth[c].wait_for(lambda m, c=c: stamp_of(m) == stamps[c], 30.0)
                assert msg is not None, f'{c}: no depth'
                assert msg.header.frame_id == f'{c}_optical_frame'
                assert (msg.width, msg.height, msg.encoding) == (W, H, '32FC1')
                assert points[c].wait_for(lambda m, c=c: stamp_of(m) == stamps[c], 10.0)
            assert 3 in batches, f'UNet batch sizes {batches}: the three frames ran apart'
            for index in range(3):
                assert node.stats(index).published == 1
        finally:
            handle.remove()


def test_per_stream_mounting_overrides_the_node_value(tiny_pipeline, rgb_k):
    rgb, k = rgb_k
    with RosHarness('override_test') as ros:
        node = ros.add_node(_node(ros, tiny_pipeline, '/ovr', cameras=['front', 'rear'],
                                  **{'front.camera_height_m': 1.2,
                                     'front.camera_pitch_deg': 15.0}))
        scale = {c: ros.collector(DiagnosticArray, f'/ovr/{c}/depth/scale')
                 for c in ('front', 'rear')}
        depth = ros.collector(Image, '/ovr/rear/depth/image')
        pubs = {c: (ros.publisher(Image, f'/ovr/{c}/image'),
                    ros.publisher(CameraInfo, f'/ovr/{c}/camera_info')) for c in ('front', 'rear')}
        for c, (image_pub, _) in pubs.items():
            assert wait_for_subscribers(image_pub)
            assert wait_for_publishers(scale[c].subscription)
        assert wait_for_publishers(depth.subscription)
        described = node.describe_parameter('front.camera_height_m')
        assert 'front only' in described.description
        assert described.floating_point_range[0].to_value == 100.0
        for stamp in (10, 20):
            for c, (image_pub, info_pub) in pubs.items():
                image, info = _pair(rgb, k, stamp)
                info_pub.publish(info)
                image_pub.publish(image)
        assert scale['front'].wait_for(lambda m: True, 20.0) is not None  # ground fit on
        assert depth.wait_for(lambda m: stamp_of(m) == 20, 20.0) is not None
        assert scale['rear'].messages() == []  # the node's camera_height_m is 0: off
        # Live, checked like the node parameter it overrides.
        refused = node.set_parameters([Parameter('rear.camera_pitch_deg', value=120.0)])[0]
        assert not refused.successful and 'camera_pitch_deg' in refused.reason
        assert node.set_parameters([Parameter('rear.camera_height_m', value=1.0)])[0].successful
        assert node.streams[1].overrides == {'camera_height_m': 1.0}


@pytest.mark.parametrize('garbage', ['wrong encoding', 'NaN CameraInfo', '8K frame'])
def test_a_camera_sending_garbage_does_not_break_the_others(tiny_pipeline, rgb_k, garbage,
                                                            capfd):
    """One stream's bad input is its own error (named, counted); the good stream goes on at
    its rate and with its outputs intact."""
    rgb, k = rgb_k
    with RosHarness('garbage_test') as ros:
        node = ros.add_node(_node(ros, tiny_pipeline, '/mix', cameras=['good', 'bad'],
                                  max_pixels=W * H * 4))
        depth = {c: ros.collector(Image, f'/mix/{c}/depth/image') for c in ('good', 'bad')}
        points = ros.collector(PointCloud2, '/mix/good/points')
        pubs = {c: (ros.publisher(Image, f'/mix/{c}/image'),
                    ros.publisher(CameraInfo, f'/mix/{c}/camera_info')) for c in ('good', 'bad')}
        for c in pubs:
            assert wait_for_subscribers(pubs[c][0])
            assert wait_for_publishers(depth[c].subscription)
        assert wait_for_publishers(points.subscription)

        def bad(stamp):
            if garbage == 'wrong encoding':
                return (raw_image_msg(stamp, '64FC3', H, W, W * 24, b'\0' * (W * 24 * H)),
                        camera_info_msg(stamp, W, H, k))
            if garbage == 'NaN CameraInfo':
                return image_msg(rgb, stamp), camera_info_msg(stamp, W, H, (np.nan,) * 4)
            big = np.zeros((4320, 7680, 3), np.uint8)  # 8K: over max_pixels
            return image_msg(big, stamp), camera_info_msg(stamp, 7680, 4320, k)

        good = PairPublisher(*pubs['good'], lambda stamp: _pair(rgb, k, stamp), 5.0)
        # 8K raw frames are 100 MB messages: a few of them (deserialised by rclpy in this
        # process, refused by the node before any conversion) must leave the good stream its
        # rate.
        bad_camera = PairPublisher(*pubs['bad'], bad, 0.5 if garbage == '8K frame' else 5.0)
        try:
            time.sleep(4.0)
        finally:
            good.close()
            bad_camera.close()
        good_stats, bad_stats = node.stats(0), node.stats(1)
        assert good_stats.published >= 5 and good_stats.errors == 0, good_stats
        assert points.messages(), 'the good stream lost its points'
        if garbage == 'NaN CameraInfo':  # depth without points, the calibration named
            assert bad_stats.published >= 1
            words = ['/mix/bad/camera_info']
        else:
            assert bad_stats.published == 0 and bad_stats.errors >= 1
            words = ['/mix/bad/image']
        # The node's own log (stderr): its /rosout copy did not always arrive while 100 MB
        # frames were in flight in this process (seen here).
        logged = capfd.readouterr().err
        assert [line for line in logged.splitlines() if line.startswith('[ERROR]')
                and all(w in line for w in words)], (garbage, logged[-3000:])
        assert 'unexpected' not in logged


def test_a_quiet_camera_gets_a_diagnostic_not_an_error(tiny_pipeline, rgb_k):
    rgb, k = rgb_k
    with RosHarness('quiet_test') as ros:
        ros.add_node(_node(ros, tiny_pipeline, '/quiet', cameras=['live', 'dead']))
        diag = ros.collector(DiagnosticArray, '/diagnostics', reliable_qos())
        rosout = ros.collector(Log, '/rosout', reliable_qos(500))
        assert wait_for_publishers(rosout.subscription, count=2)  # this harness and the node
        depth = ros.collector(Image, '/quiet/live/depth/image')
        pubs = (ros.publisher(Image, '/quiet/live/image'),
                ros.publisher(CameraInfo, '/quiet/live/camera_info'))
        assert wait_for_subscribers(pubs[0]) and wait_for_publishers(depth.subscription)
        live = PairPublisher(*pubs, lambda stamp: _pair(rgb, k, stamp), 5.0)
        try:
            msg = diag.wait_for(lambda m: any('dead depth' in s.name and 'no image on '
                                              '/quiet/dead/image' in s.message
                                              for s in m.status), 10.0)
        finally:
            live.close()
        assert msg is not None
        levels = {s.name.split(': ')[-1]: s.level for s in msg.status}
        assert levels['dead depth'] == DiagnosticStatus.WARN
        assert levels['live depth'] == DiagnosticStatus.OK
        assert not [m for m in rosout.messages() if m.level >= 40 and 'dead' in m.msg]


def test_lifecycle_keeps_the_model_when_inactive_and_frees_it_at_cleanup(tiny_model_dir,
                                                                          rgb_k):
    """configure loads, activate subscribes, deactivate unsubscribes (model kept), cleanup
    frees; the cycle runs again."""
    rgb, k = rgb_k
    with RosHarness('lifecycle_test') as ros:
        node = ros.add_node(DepthNode(context=ros.context, namespace='/lc', parameter_overrides=[
            Parameter('model_path', value=str(tiny_model_dir)), Parameter('device', value='cpu'),
            Parameter('processing_resolution', value=32)]), activate=False)
        depth = ros.collector(Image, '/lc/depth/image')
        image_pub = ros.publisher(Image, '/lc/image')
        assert node.pipeline is None and node.count_subscribers('/lc/image') == 0
        for cycle in range(2):
            assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
            model = node.pipeline
            assert model is not None and node.count_subscribers('/lc/image') == 0
            assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
            assert wait_for_subscribers(image_pub) and wait_for_publishers(depth.subscription)
            stamp = 100 + cycle
            image_pub.publish(image_msg(rgb, stamp))
            assert depth.wait_for(lambda m: stamp_of(m) == stamp, 20.0) is not None
            assert node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS
            assert wait_until(lambda: image_pub.get_subscription_count() == 0, 10.0)
            assert node.pipeline is model  # kept while inactive
            assert node.trigger_cleanup() == TransitionCallbackReturn.SUCCESS
            assert node.pipeline is None and node.streams == ()


def test_a_bad_camera_list_fails_at_start_naming_the_parameter(tiny_pipeline):
    from metricgold_ros.errors import InputError

    with RosHarness('names_test') as ros:
        for cameras, words in ((['front', 'front'], 'twice'), (['9lives'], 'not a stream name'),
                               (['front', ''], 'not a stream name')):
            with pytest.raises(InputError, match=f'cameras: .*{words}'):
                _node(ros, tiny_pipeline, '/names', cameras=cameras)


def test_the_environment_is_not_read_for_faults(tiny_pipeline, monkeypatch):
    """Fault injection is passed in; METRICGOLD_FAULT in the environment is main's to read."""
    monkeypatch.setitem(os.environ, 'METRICGOLD_FAULT', 'unet:error')
    with RosHarness('env_test') as ros:
        node = ros.add_node(_node(ros, tiny_pipeline, '/env', cameras=['']))
        assert tiny_pipeline.stage_hook is None
        node.close()

