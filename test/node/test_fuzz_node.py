"""Property-based fuzzing of depth_node's image and CameraInfo paths through real messages.

Hypothesis builds hostile ``sensor_msgs/Image`` and ``CameraInfo`` messages (random and
garbage encodings, sizes from 0 to 2^32-1, step and data too short or too long, big-endian
flags, NaN/inf/zero/negative K and D, mismatched sizes, stamps going backwards); each is
published over DDS to a running node (the tiny real model at processing_resolution 32, a
pixel budget of 4096 keeping every allocation small). After each one the node must answer a
valid frame with the right depth and intrinsics, and every error it logged must name a field.
The number of examples tried per target is printed.
"""

import math
import re
import time

import numpy as np
import pytest

pytest.importorskip('rclpy')
hypothesis = pytest.importorskip('hypothesis')

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image  # noqa: E402

from metricgold_ros.errors import InputError  # noqa: E402
from metricgold_ros.image_encodings import SUPPORTED_ENCODINGS, decode_compressed  # noqa: E402
from conftest import NodeRig  # noqa: E402
from ros_helpers import (camera_info_msg, header, image_array,  # noqa: E402
                         image_msg, reliable_qos, stamp_of, synthetic_frame,
                         wait_for_publishers, wait_until)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

NS = '/fuzz'
W, H = 48, 32
PIXEL_BUDGET = 4096
IMAGE_EXAMPLES = 160
INFO_EXAMPLES = 100
UINT32 = 2 ** 32 - 1
FIRST_STAMP = 1_900_000_000_000_000_000
BYTES_PER_PIXEL = {'rgb8': 3, 'bgr8': 3, 'rgba8': 4, 'bgra8': 4, 'mono8': 1, 'mono16': 2,
                   'uyvy': 2, 'yuv422': 2, 'yuyv': 2, 'yuv422_yuy2': 2, 'bayer_rggb8': 1,
                   'bayer_bggr8': 1, 'bayer_gbrg8': 1, 'bayer_grbg8': 1}
# Every error the node logs about input starts by naming the field (or the budget) at fault.
FIELD_NAMES = re.compile(r': (encoding|height|width|step|data|height x width|K|D|fx_px|fy_px|'
                         r'cx_px|cy_px|camera_info is for)\b')
SETTINGS = dict(deadline=None, database=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])


class FuzzRig(NodeRig):
    """The node rig with compact output collectors and a valid reference frame."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.depth = self.ros.collector(Image, f'{NS}/depth/image', keep=lambda m: (
            stamp_of(m), m.width, m.height, image_array(m)))
        self.info_out = self.ros.collector(CameraInfo, f'{NS}/depth/camera_info',
                                           keep=lambda m: (stamp_of(m), tuple(m.k)))
        self.rgb, self.k = synthetic_frame(2, W, H)
        self.stamp = FIRST_STAMP
        self.reference = None
        self.outcomes = {}

    def next_stamp(self) -> int:
        self.stamp += 10_000_000
        return self.stamp

    def counters(self):
        s = self.node.stats()
        return s.received, s.errors + s.published + s.failed

    def publish_and_wait(self, info, image, publishes: bool = False) -> str:
        """Publish (info and) an image and wait until the worker is done with it (published,
        rejected or failed; with ``publishes``: published): the outcome."""
        before = self.node.stats()
        received, done = self.counters()
        if info is not None:
            self.info_pub.publish(info)
            time.sleep(0.005)  # the info callback runs before the image's
        self.image_pub.publish(image)
        assert wait_until(lambda: self.counters()[0] > received, 10.0), 'image not received'
        if publishes:
            assert wait_until(lambda: self.node.stats().published > before.published, 20.0), \
                'a valid image was not published'
        else:
            assert wait_until(lambda: self.counters()[1] > done, 20.0), 'image never processed'
        after = self.node.stats()
        assert after.dropped == before.dropped, 'a fuzz frame was dropped unprocessed'
        outcome = 'published' if after.published > before.published else 'rejected'
        if after.errors > before.errors and outcome == 'published':
            outcome = 'published, camera_info rejected'
        return outcome

    def count(self, what: str) -> None:
        self.outcomes[what] = self.outcomes.get(what, 0) + 1

    def check_valid_frame(self) -> None:
        """A valid frame now gets the reference depth and the right intrinsics."""
        stamp = self.next_stamp()
        self.publish_and_wait(camera_info_msg(stamp, W, H, self.k),
                              image_msg(self.rgb, stamp, 'rgb8'), publishes=True)
        got = wait_until(lambda: next((m for m in self.depth.messages() if m[0] == stamp),
                                      None), 10.0)
        assert got is not None, 'no depth for the valid frame after a hostile one'
        _, width, height, depth = got
        assert (width, height) == (W, H)
        if self.reference is None:
            self.reference = depth
        np.testing.assert_allclose(depth, self.reference, rtol=1e-5)
        info = wait_until(lambda: next((m for m in self.info_out.messages()
                                        if m[0] == stamp), None), 5.0)
        assert info is not None, 'no depth/camera_info for the valid frame'
        fx, fy, cx, cy = self.k
        np.testing.assert_allclose(np.reshape(info[1], (3, 3))[[0, 1, 0, 1], [0, 1, 2, 2]],
                                   [fx, fy, cx, cy], rtol=1e-9)
        self.depth.clear()
        self.info_out.clear()

    def node_errors(self):
        return [log.msg for log in self.rosout.messages()
                if log.level >= 40 and log.name == 'fuzz.depth_node']


@pytest.fixture(scope='module')
def rig(node_rig):
    rig = node_rig(NS, image_topic='image', width=W, height=H, rig=FuzzRig,
                   pub_qos=reliable_qos(), processing_resolution=32, max_pixels=PIXEL_BUDGET,
                   qos='reliable', publish_colored=False, stats_period=0.0)
    assert wait_for_publishers(rig.depth.subscription)
    rig.check_valid_frame()
    yield rig


# Stamps relative to the last valid frame's: mostly backwards, sometimes ahead, sometimes the
# very same (its CameraInfo is replaced). Relative, so that examples replay identically.
STAMP_OFFSETS = st.one_of(st.integers(-FIRST_STAMP, -1), st.integers(1, 10 ** 12), st.just(0))


def _stamp(rig, offset: int) -> int:
    return max(0, rig.stamp + offset)


def _stamp_header(stamp_ns: int, nanosec_garbage: bool):
    msg = header(stamp_ns)
    if nanosec_garbage:
        msg.stamp.nanosec = UINT32  # > 1e9: not a normalised time
    return msg


encodings = st.one_of(st.sampled_from(SUPPORTED_ENCODINGS),
                      st.sampled_from(['32FC1', '16UC1', 'bayer_rggb16', 'nv12', 'RGB8', '']),
                      st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126),
                              max_size=24))


@st.composite
def plausible_images(draw, rig):
    """A well-formed Image of any supported encoding: padded rows, spare bytes, either
    endianness flag, any size within the budget (so conversion and inference run)."""
    encoding = draw(st.sampled_from(SUPPORTED_ENCODINGS))
    bpp = BYTES_PER_PIXEL[encoding]
    width, height = draw(st.integers(1, 64)), draw(st.integers(1, 64))
    if bpp == 2 and encoding != 'mono16':
        width += width % 2  # 4:2:2 needs an even width
    step = width * bpp + draw(st.sampled_from([0, 0, 1, 2, 3, 8]))
    step += step % 2 if encoding == 'mono16' else 0
    data = draw(st.binary(min_size=64, max_size=64)) * ((height * step) // 64 + 1)
    data = data[:height * step + draw(st.sampled_from([0, 0, 2, 16]))]
    msg = Image(header=_stamp_header(_stamp(rig, draw(STAMP_OFFSETS)), False), height=height,
                width=width, encoding=encoding, is_bigendian=draw(st.sampled_from([0, 1])),
                step=step)
    msg.data = data
    return msg


@st.composite
def hostile_images(draw, rig):
    """An Image whose fields disagree with each other in every way a publisher can get wrong."""
    encoding = draw(encodings)
    bpp = BYTES_PER_PIXEL.get(encoding, draw(st.integers(1, 4)))
    if draw(st.booleans()):  # sizes from nothing to absurd
        width = draw(st.sampled_from([0, 1, 2, 3, 65535, 100_000, UINT32]) | st.integers(0, 200))
        height = draw(st.sampled_from([0, 1, 65535, UINT32]) | st.integers(0, 200))
    else:  # within the budget, so the conversion itself runs
        width, height = draw(st.integers(1, 64)), draw(st.integers(1, 64))
    step = draw(st.one_of(
        st.just(width * bpp), st.integers(-8, 8).map(lambda d: max(0, width * bpp + d)),
        st.integers(0, UINT32)))
    step = min(step, UINT32)
    if draw(st.booleans()):  # the length the fields imply, give or take
        wanted = min(height * step, 20_000) + draw(st.integers(-16, 16))
    else:
        wanted = draw(st.integers(0, 20_000))
    data = draw(st.binary(min_size=0, max_size=64)) * (max(wanted, 0) // 64 + 1)
    data = data[:max(wanted, 0)]
    msg = Image(header=_stamp_header(_stamp(rig, draw(STAMP_OFFSETS)), draw(st.booleans())),
                height=height,
                width=width, encoding=encoding, is_bigendian=draw(st.sampled_from([0, 1, 255])),
                step=step)
    msg.data = data
    return msg


floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from([0.0, -0.0, -1.0, 1e-300, 1e300, math.nan, math.inf,
                                    -math.inf]))


@st.composite
def hostile_infos(draw, rig, stamp_ns):
    """A CameraInfo with broken K, D and size, stamped like the image it will be paired with."""
    fx, fy, cx, cy = rig.k
    k = [fx, 0.0, cx, 0.0, fy, cy, 0.0, 0.0, 1.0]
    for index in draw(st.sets(st.sampled_from([0, 2, 4, 5, 8]), max_size=4)):
        k[index] = draw(floats)
    width, height = draw(st.one_of(
        st.just((W, H)), st.just((2 * W, 2 * H)), st.just((W, 2 * H)),
        st.tuples(st.sampled_from([0, 1, W, UINT32]), st.sampled_from([0, 1, H, UINT32])),
        st.tuples(st.integers(0, 5000), st.integers(0, 5000))))
    info = camera_info_msg(stamp_ns, width, height, (fx, fy, cx, cy))
    info.k = k
    info.d = draw(st.lists(floats, max_size=14))
    info.distortion_model = draw(st.sampled_from(['plumb_bob', 'rational_polynomial', '', 'x']))
    return info


@settings(max_examples=IMAGE_EXAMPLES, **SETTINGS)
@given(data=st.data())
def test_fuzz_image_messages(rig, data):
    image = data.draw(st.one_of(hostile_images(rig), hostile_images(rig),
                                plausible_images(rig)))
    outcome = rig.publish_and_wait(None, image)
    rig.count('image: ' + outcome)
    pixels = image.height * image.width
    if image.encoding in BYTES_PER_PIXEL and pixels > PIXEL_BUDGET:
        assert outcome == 'rejected'  # refused by the budget before any allocation
        assert wait_until(lambda: any(f'{pixels} pixels exceeds the pixel budget' in e
                                      for e in rig.node_errors()), 5.0)
    rig.check_valid_frame()


@settings(max_examples=INFO_EXAMPLES, **SETTINGS)
@given(data=st.data())
def test_fuzz_camera_info(rig, data):
    stamp = _stamp(rig, data.draw(STAMP_OFFSETS))
    info = data.draw(hostile_infos(rig, stamp))
    rgb = rig.rgb if data.draw(st.booleans()) else rig.rgb[:H // 2]  # and another image size
    rig.count('camera_info: ' + rig.publish_and_wait(info, image_msg(rgb, stamp, 'rgb8'),
                                                     publishes=True))
    rig.check_valid_frame()


def test_fuzz_summary(rig, capsys):
    """Runs after the fuzz targets: every error named a field; print the counts."""
    errors = rig.node_errors()
    assert errors, 'the fuzz produced no error at all'
    unnamed = [e for e in errors if not FIELD_NAMES.search(e)]
    assert not unnamed, unnamed[:5]
    assert not [e for e in errors if 'unexpected' in e], 'an input reached an unexpected path'
    stats = rig.node.stats()
    assert len(errors) <= stats.errors  # rate-limited: never more lines than errors
    tried = {target: sum(n for what, n in rig.outcomes.items() if what.startswith(target))
             for target in ('image', 'camera_info')}
    with capsys.disabled():
        print(f'\n[fuzz] examples tried: image {tried["image"]}, camera_info '
              f'{tried["camera_info"]}, each followed by a valid frame; outcomes '
              f'{dict(sorted(rig.outcomes.items()))}; node errors {stats.errors}, logged '
              f'{len(errors)} lines (rate-limited); published {stats.published}, dropped '
              f'{stats.dropped}')
    assert tried['image'] >= IMAGE_EXAMPLES // 2 and tried['camera_info'] >= INFO_EXAMPLES // 2


def test_same_bad_frame_is_logged_once_per_period(rig):
    before = len(rig.node_errors())
    for _ in range(10):
        stamp = rig.next_stamp()
        bad = image_msg(rig.rgb, stamp, 'rgb8')
        bad.encoding = 'definitely_not_an_encoding'
        rig.publish_and_wait(None, bad)
    rig.check_valid_frame()
    time.sleep(0.2)
    lines = [e for e in rig.node_errors()[before:] if 'definitely_not_an_encoding' in e]
    assert len(lines) == 1, lines


@pytest.mark.parametrize('codec', ['jpeg', 'png'])
def test_compressed_header_over_budget_is_refused_before_decoding(codec):
    """A few bytes claiming 60000 x 60000 pixels: refused from the header, nothing decoded."""
    if codec == 'png':
        data = (b'\x89PNG\r\n\x1a\n' + (13).to_bytes(4, 'big') + b'IHDR' +
                (60000).to_bytes(4, 'big') * 2 + b'\x08\x02\x00\x00\x00' + bytes(4))
    else:
        data = (b'\xff\xd8' + b'\xff\xc0' + (17).to_bytes(2, 'big') + b'\x08' +
                (60000).to_bytes(2, 'big') * 2 + b'\x03' + bytes(9))
    with pytest.raises(InputError, match='60000x60000 = 3600000000 pixels exceeds the pixel '
                                         f'budget {PIXEL_BUDGET}'):
        decode_compressed(codec, data, pixel_budget=PIXEL_BUDGET)
