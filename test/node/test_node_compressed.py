"""depth_node with ``image_transport: compressed``: sensor_msgs/CompressedImage on
``<image>/compressed`` (as image_transport's ``compressed`` transport names it), in-process over
real DDS with the tiny real model. The real Raspberry Pi camera JPEG, PNG (16-bit mono too),
the pixel budget checked from the header before decoding, corrupt data."""

import array
from typing import Any, Iterator

import cv2
import numpy as np
import pytest

pytest.importorskip('rclpy')
pytest.importorskip('sensor_msgs.msg')

from rcl_interfaces.msg import Log  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2  # noqa: E402

from metricgold_ros.node.depth_node import DepthNode  # noqa: E402
from ros_helpers import (RosHarness, camera_info_msg, header, reliable_qos,  # noqa: E402
                         stamp_of, synthetic_frame, wait_for_publishers, wait_for_subscribers,
                         wait_until)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

NS = '/camc'
TOPIC = f'{NS}/image_raw/compressed'  # `image` remapped to image_raw, then /compressed
OUT_TIMEOUT_S = 30.0


class CompressedRig:
    """The node under test with compressed input, a camera publisher pair, output collectors."""

    def __init__(self, ros: RosHarness, node: DepthNode) -> None:
        self.ros, self.node = ros, node
        self.image_pub = ros.publisher(CompressedImage, TOPIC)
        self.info_pub = ros.publisher(CameraInfo, f'{NS}/camera_info')
        self.depth = ros.collector(Image, f'{NS}/depth/image', reliable_qos(),
                                   keep=lambda msg: (stamp_of(msg), msg.width, msg.height))
        self.points = ros.collector(PointCloud2, f'{NS}/points', reliable_qos(),
                                    keep=lambda msg: (stamp_of(msg), msg.width, msg.height))
        self.rosout = ros.collector(Log, '/rosout', reliable_qos(200))
        self._stamp = 1_700_000_000_000_000_000

    def send(self, data: bytes, fmt: str, info: Any = None) -> int:
        """Publish CameraInfo ``(k, (width, height))`` (unless None) and a CompressedImage."""
        self._stamp += 10_000_000
        if info is not None:
            self.info_pub.publish(camera_info_msg(self._stamp, *info[1], info[0]))
        msg = CompressedImage(header=header(self._stamp), format=fmt)
        msg.data = array.array('B', data)
        self.image_pub.publish(msg)
        return self._stamp

    def depth_of(self, stamp: int) -> Any:
        return self.depth.wait_for(lambda item: item[0] == stamp, OUT_TIMEOUT_S)

    def errors_naming(self, *words: str) -> list:
        return [log.msg for log in self.rosout.messages()
                if log.level >= 40 and all(word in log.msg for word in words)]


@pytest.fixture(scope='module')
def rig(tiny_model_dir) -> Iterator[CompressedRig]:
    with RosHarness('compressed_test') as ros:
        node = ros.add_node(DepthNode(
            context=ros.context, namespace=NS,
            cli_args=['--ros-args', '-r', 'image:=image_raw'],
            parameter_overrides=[Parameter('model_path', value=str(tiny_model_dir)),
                                 Parameter('device', value='cpu'),
                                 Parameter('image_transport', value='compressed'),
                                 Parameter('processing_resolution', value=64),
                                 Parameter('output_scale', value=0.25),
                                 Parameter('stats_period', value=0.0)]))
        rig = CompressedRig(ros, node)
        assert wait_for_subscribers(rig.image_pub) and wait_for_subscribers(rig.info_pub)
        for collector in (rig.depth, rig.points, rig.rosout):
            assert wait_for_publishers(collector.subscription)
        yield rig


def test_subscribes_to_the_compressed_topic_of_the_remapped_image(rig):
    assert rig.node.get_subscriptions_info_by_topic(TOPIC)
    assert not rig.node.get_subscriptions_info_by_topic(f'{NS}/image_raw')


def test_real_raspicam_jpeg_gives_depth_and_points(rig, raspicam):
    camera = raspicam
    (width, height) = camera['size']
    assert camera['format'] == 'jpg'  # the legacy name some drivers write
    stamp = rig.send(camera['data'], camera['format'], (camera['k'], camera['size']))
    assert rig.depth_of(stamp) == (stamp, width // 4, height // 4)
    assert rig.points.wait_for(lambda item: item[0] == stamp, OUT_TIMEOUT_S) == \
        (stamp, width // 4, height // 4)


@pytest.mark.parametrize('kind', ['png rgb', 'png mono16', 'jpeg'])
def test_png_and_jpeg_from_image_transport(rig, kind):
    rgb, k = synthetic_frame(1, 160, 120)
    if kind == 'png mono16':
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.uint16) * 257
        ok, data = cv2.imencode('.png', gray)
        fmt = 'mono16; png compressed '
    else:
        ext = '.png' if kind.startswith('png') else '.jpg'
        ok, data = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        fmt = f'bgr8; {ext[1:].replace("jpg", "jpeg")} compressed bgr8'
    assert ok
    stamp = rig.send(data.tobytes(), fmt, (k, (160, 120)))
    assert rig.depth_of(stamp) == (stamp, 40, 30), kind


def test_pixel_budget_is_checked_from_the_header_before_decoding(rig):
    # A PNG whose header claims 60000 x 60000 pixels and has no pixel data at all: refused for
    # its size (not as undecodable), so nothing was decoded or allocated.
    ihdr = (b'\x00\x00\x00\x0dIHDR' + (60000).to_bytes(4, 'big') * 2 + b'\x08\x02\x00\x00\x00'
            + b'\x00' * 4)
    before = rig.node.stats().errors
    rig.send(b'\x89PNG\r\n\x1a\n' + ihdr, 'png')
    assert wait_until(lambda: rig.errors_naming(TOPIC, 'pixel budget'), 10.0), \
        [log.msg for log in rig.rosout.messages()]
    assert rig.node.stats().errors == before + 1


def test_corrupt_data_is_logged_and_the_next_frame_served(rig):
    rgb, k = synthetic_frame(2, 160, 120)
    ok, good = cv2.imencode('.jpg', cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    rig.send(good.tobytes()[:200], 'jpeg', (k, (160, 120)))
    assert wait_until(lambda: rig.errors_naming(TOPIC, 'JPEG'), 10.0), \
        [log.msg for log in rig.rosout.messages()]
    stamp = rig.send(good.tobytes(), 'jpeg', (k, (160, 120)))
    assert rig.depth_of(stamp) is not None


def test_raw_camera_with_compressed_transport_gets_a_hint(tiny_model_dir):
    """Nothing on <image>/compressed but a publisher on <image>: the warning says what to set."""
    with RosHarness('hint_test') as ros:
        ros.add_node(DepthNode(
            context=ros.context, namespace='/hint',
            cli_args=['--ros-args', '-r', 'image:=image_raw'],
            parameter_overrides=[Parameter('model_path', value=str(tiny_model_dir)),
                                 Parameter('device', value='cpu'),
                                 Parameter('image_transport', value='compressed'),
                                 Parameter('stats_period', value=0.0)]))
        rosout = ros.collector(Log, '/rosout', reliable_qos(200))
        ros.publisher(Image, '/hint/image_raw')  # a raw camera: never matches the node
        assert wait_for_publishers(rosout.subscription)
        hint = rosout.wait_for(lambda log: 'image_transport:=raw' in log.msg, 15.0)
        assert hint is not None and '/hint/image_raw/compressed' in hint.msg, \
            [log.msg for log in rosout.messages()]
