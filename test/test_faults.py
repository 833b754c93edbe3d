"""depth_node under faults: inference raising (real faults injected through the pipeline's
debug stage hook, ``METRICGOLD_FAULT``), SIGINT/SIGTERM while a frame is being inferred, and a
camera that restarts at another resolution."""

import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip('rclpy')

from sensor_msgs.msg import CameraInfo, Image, PointCloud2  # noqa: E402

from metricgold_ros.errors import InputError  # noqa: E402
from metricgold_ros.faults import FAULT_ENV, FaultInjector  # noqa: E402
from metricgold_ros.node.parameters import PARAMETERS, check_parameter  # noqa: E402
from metricgold_ros.node.runtime import StampCache  # noqa: E402
from node_zygote import start_node, wait_for_text  # noqa: E402
from conftest import NodeRig  # noqa: E402
from ros_helpers import (REPO_ROOT, RosHarness, camera_info_msg, image_array,  # noqa: E402
                         image_msg, reliable_qos, ros_env, stamp_of, synthetic_frame,
                         wait_for_publishers, wait_until)

pytestmark = pytest.mark.timeout(120)

W, H = 96, 72
RESOLUTION = 32
FALLBACK = 16
OUT_TIMEOUT_S = 20.0
EXIT_TIMEOUT_S = 2.0


class FaultRig(NodeRig):
    """The node rig with collectors of every output this module checks."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.depth = self.ros.collector(Image, f'{self.ns}/depth/image')
        self.info_out = self.ros.collector(CameraInfo, f'{self.ns}/depth/camera_info')
        self.points = self.ros.collector(PointCloud2, f'{self.ns}/points')
        self._subs += [c.subscription for c in (self.depth, self.info_out, self.points)]
        assert wait_for_publishers(self.depth.subscription)
        self.stamp = 1_800_000_000_000_000_000

    def send(self, rgb, k=None, info=True) -> int:
        self.stamp += 50_000_000
        height, width = rgb.shape[:2]
        if info:
            self.info_pub.publish(camera_info_msg(self.stamp, width, height, k))
        self.image_pub.publish(image_msg(rgb, self.stamp, 'rgb8'))
        return self.stamp

    def output(self, stamp, collector=None, timeout_s=OUT_TIMEOUT_S):
        collector = collector or self.depth
        return collector.wait_for(lambda m: stamp_of(m) == stamp, timeout_s)

    def errors(self, *words):
        return self.errors_naming(*words)


@pytest.fixture
def make_cam(node_rig):
    cams = []

    def make(fault=None, **params):
        values = {'stats_period': 0.0, 'processing_resolution': RESOLUTION,
                  'publish_colored': False, 'qos': 'reliable', **params}
        cams.append(node_rig(f'/fault{len(cams)}_{time.monotonic_ns()}', image_topic='image',
                             fault=fault, rig=FaultRig, pub_qos=reliable_qos(5), **values))
        return cams[-1]
    yield make
    for cam in cams:
        cam.close()


@pytest.fixture(scope='module')
def frame():
    return synthetic_frame(4, W, H)


def test_fault_injector_counts_calls_per_stage():
    faults = FaultInjector('vae_decode:oom:every=3, unet:error:times=1')
    outcomes = []
    for _ in range(7):
        try:
            faults('vae_decode')
            outcomes.append('ok')
        except RuntimeError as err:  # torch.OutOfMemoryError is a RuntimeError
            outcomes.append(type(err).__name__)
    assert outcomes == ['ok', 'ok', 'OutOfMemoryError', 'ok', 'ok', 'OutOfMemoryError', 'ok']
    with pytest.raises(RuntimeError, match='simulated failure.*before unet'):
        faults('unet')
    faults('unet')  # times=1: once only
    faults('preprocess')  # no rule


@pytest.mark.parametrize('spec', ['decode:oom', 'unet', 'unet:boom', 'unet:oom:every=0',
                                  'unet:oom:often=2', 'unet:sleep=-1', ' , '])
def test_fault_injector_refuses_bad_specs(spec):
    with pytest.raises(InputError, match=FAULT_ENV):
        FaultInjector(spec)


def test_fallback_resolution_parameter_and_stamp_cache_reset():
    values = {spec.name: spec.default for spec in PARAMETERS}
    assert check_parameter('fallback_processing_resolution', 0, values) is None
    assert check_parameter('fallback_processing_resolution', 256, values) is None
    assert 'too small' in check_parameter('fallback_processing_resolution', 4, values)
    cache = StampCache()
    cache.add(1, 'old mode')
    cache.add(2, 'new mode')
    cache.forget_all_but(3)
    assert cache.match(1) is None and cache.match(3) is None
    cache.add(4, 'a')
    cache.add(5, 'b')
    cache.forget_all_but(4)
    assert cache.match(4) == 'a' and cache.match(5) == 'a'  # the kept one is the latest


def _depth_at(pipeline, rgb, resolution):
    """What the pipeline gives for ``rgb`` at ``resolution`` (the node's defaults otherwise)."""
    return pipeline(rgb, processing_resolution=resolution, seed=0).depth


def test_out_of_memory_is_retried_at_the_fallback_resolution(make_cam, frame, tiny_pipeline):
    rgb, k = frame
    cam = make_cam('vae_decode:oom:every=2:times=1', fallback_processing_resolution=FALLBACK)
    assert cam.output(cam.send(rgb, k)) is not None  # the first frame decodes; the second not
    stamp = cam.send(rgb, k)
    depth = cam.output(stamp)
    assert depth is not None, 'the frame that hit out-of-memory was not retried'
    assert wait_until(lambda: cam.errors('OutOfMemoryError in vae_decode', 'retried once',
                                         f'fallback_processing_resolution={FALLBACK} px',
                                         f'instead of {RESOLUTION} px', FAULT_ENV), 5.0)
    # The retry really ran at the fallback resolution: the same depth as a clean run there.
    got = image_array(depth)
    np.testing.assert_allclose(got, _depth_at(tiny_pipeline, rgb, FALLBACK), rtol=1e-4)
    assert not np.allclose(got, _depth_at(tiny_pipeline, rgb, RESOLUTION), rtol=1e-3)
    assert cam.output(stamp, cam.points, 5.0) is not None  # every output of the frame
    following = cam.output(cam.send(rgb, k))
    np.testing.assert_allclose(image_array(following),
                               _depth_at(tiny_pipeline, rgb, RESOLUTION), rtol=1e-4)
    stats = cam.node.stats()
    assert (stats.failed, stats.retried, stats.published) == (1, 1, 3)


@pytest.mark.parametrize('fault, fallback, words', [
    ('vae_decode:oom:times=1', 0, ['OutOfMemoryError in vae_decode', 'frame skipped',
                                   'set fallback_processing_resolution']),
    ('vae_decode:oom:times=2', FALLBACK, ['OutOfMemoryError in vae_decode',
                                          f'the retry at {FALLBACK} px failed too']),
    ('unet:error:times=1', FALLBACK, ['RuntimeError in unet', 'simulated failure',
                                      'frame skipped']),
    ('vae_encode:oom:times=1', 64, ['OutOfMemoryError in vae_encode',
                                    'fallback_processing_resolution=64 is not below']),
], ids=['oom-no-fallback', 'oom-retry-fails', 'runtime-error', 'fallback-not-lower'])
def test_failed_frame_is_skipped_and_the_node_goes_on(make_cam, frame, fault, fallback, words):
    rgb, k = frame
    cam = make_cam(fault, fallback_processing_resolution=fallback)
    failed = cam.send(rgb, k)
    assert wait_until(lambda: cam.errors(*words), OUT_TIMEOUT_S), \
        [log.msg for log in cam.rosout.messages() if log.level >= 40]
    served = cam.send(rgb, k)
    assert cam.output(served) is not None, 'the node stopped after an inference failure'
    assert not [m for m in cam.depth.messages() if stamp_of(m) == failed]
    stats = cam.node.stats()
    assert (stats.failed, stats.retried, stats.published) == (1, 0, 1)


def test_every_third_decode_out_of_memory(make_cam, frame):
    """The issue's example: ``vae_decode:oom:every=3`` with a fallback loses no frame."""
    rgb, k = frame
    cam = make_cam('vae_decode:oom:every=3', fallback_processing_resolution=FALLBACK)
    for _ in range(6):
        assert cam.output(cam.send(rgb, k)) is not None
    stats = cam.node.stats()  # decode calls 3 and 6 fail: frames 3 and 5, each retried
    assert (stats.failed, stats.retried, stats.published, stats.errors) == (2, 2, 6, 0)


def test_bad_fault_spec_fails_at_start(node_rig):
    with pytest.raises(InputError, match=f'{FAULT_ENV}.*STAGE:KIND.*vae_decode'):
        node_rig('/badfault', fault='decode:oom')


def test_camera_restart_at_another_resolution(make_cam):
    """The stream stops, then resumes at another size and calibration: outputs follow."""
    cam = make_cam(warm_start=True)
    small, k_small = synthetic_frame(5, W, H)
    for _ in range(2):
        stamp = cam.send(small, k_small)
        assert cam.output(stamp) is not None
    time.sleep(0.5)  # the camera is off
    big, k_big = synthetic_frame(6, 2 * W, 2 * H)  # same aspect ratio, another zoom
    k_big = (k_big[0] * 1.3, k_big[1] * 1.3, k_big[2], k_big[3])
    # The restarted camera's first image comes before its CameraInfo: the old calibration
    # (same aspect, would be silently rescaled) must not be used for it.
    first = cam.send(big, info=False)
    depth = cam.output(first)
    assert depth is not None and (depth.width, depth.height) == (2 * W, 2 * H)
    assert wait_until(lambda: [log for log in cam.rosout.messages()
                               if f'from {W}x{H} to {2 * W}x{2 * H}' in log.msg], 5.0)
    assert cam.output(first, cam.info_out, 1.0) is None, 'stale intrinsics of the old mode'
    stamp = cam.send(big, k_big)
    info = cam.output(stamp, cam.info_out)
    cloud = cam.output(stamp, cam.points, 5.0)
    assert info is not None and cloud is not None
    assert (info.width, info.height, cloud.width, cloud.height) == (2 * W, 2 * H) * 2
    np.testing.assert_allclose(np.reshape(info.k, (3, 3))[[0, 1, 0, 1], [0, 1, 2, 2]], k_big)
    # And back to a third size with another aspect ratio.
    wide, k_wide = synthetic_frame(7, 120, 40)
    stamp = cam.send(wide, k_wide)
    info = cam.output(stamp, cam.info_out)
    assert info is not None and (info.width, info.height) == (120, 40)
    assert cam.node.stats().errors == 0


def _taken(log: str) -> bool:
    """Whether the node's last summary shows a frame taken by the worker (not skipped for
    want of subscribers, not replaced in the mailbox) and nothing out yet."""
    found = re.findall(r'frames in (\d+), out (\d+) .*?dropped (\d+), idle (\d+)', log)
    if not found:
        return False
    received, out, dropped, idle = (int(v) for v in found[-1])
    return out == 0 and received - dropped - idle >= 1


@pytest.mark.parametrize('sig, fault, size, resolution', [
    (signal.SIGINT, 'unet:sleep=3', (160, 120), RESOLUTION),  # a stalled stage
    (signal.SIGTERM, None, (640, 480), 0),  # real compute: the tiny model at 640x480
], ids=['SIGINT-stalled-stage', 'SIGTERM-computing'])
@pytest.mark.slow
def test_signal_during_inference_exits_quickly(tiny_model_dir, tmp_path, sig, fault, size,
                                               resolution):
    ns = f'/sig{int(sig)}'
    env = ros_env(**({FAULT_ENV: fault} if fault else {}))
    node = start_node(['--ros-args', '-p', f'model_path:={tiny_model_dir}', '-p', 'device:=cpu',
                       '-p', f'processing_resolution:={resolution}', '-p', 'stats_period:=0.2',
                       '-p', 'qos:=reliable', '-r', f'__ns:={ns}'], env, tmp_path)
    camera = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / 'test' / 'ros_helpers.py'), 'camera', '--rate', '5',
         '--width', str(size[0]), '--height', str(size[1]), '--image-topic', f'{ns}/image',
         '--info-topic', f'{ns}/camera_info'], env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        with RosHarness('signal_test') as ros:  # a subscriber, so the node does the work
            depth = ros.collector(Image, f'{ns}/depth/image')
            assert wait_for_publishers(depth.subscription, 1, 60.0), node.stderr()
            # The summary shows a frame taken by the worker and none out: it is inferring.
            assert wait_for_text(node, _taken, 60.0), node.stderr()
            time.sleep(0.3)
            assert not depth.messages(), 'the first inference should still be running'
            sent = time.monotonic()
            node.send_signal(sig)
            code = node.wait(10.0)
            exit_s = time.monotonic() - sent
    finally:
        node.kill()
        if camera.poll() is None:
            camera.kill()
        camera.wait(5)
    stderr = node.stderr()
    assert exit_s <= EXIT_TIMEOUT_S, f'{sig.name}: {exit_s:.2f} s to exit'
    assert code == 0, stderr
    assert 'Traceback' not in stderr and 'Exception' not in stderr, stderr
    if fault:
        assert f'{FAULT_ENV}=' in stderr and 'debug only' in stderr  # the warning at start
