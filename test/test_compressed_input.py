"""The compressed input path the node shares with the bag tool (``messages.rgb_from_msg`` ->
``image_encodings.decode_compressed``), without ROS: 16-bit mono PNG maps like raw mono16, the
real raspicam JPEG's size comes from its header, and the budget is checked before decoding."""

from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from metricgold_ros.errors import InputError
from metricgold_ros.image_encodings import image_to_rgb
from metricgold_ros.messages import rgb_from_msg

RASPICAM_BAG = Path('bags') / 'raspicam_aruco_images' / 'aruco_images_mcap'


def _compressed(fmt: str, data: bytes) -> SimpleNamespace:
    """A CompressedImage's fields (what rgb_from_msg reads: ``format`` and ``data``)."""
    return SimpleNamespace(format=fmt, data=data)


def test_png_mono16_maps_like_raw_mono16():
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 2 ** 16, (30, 40), dtype=np.uint16)
    ok, png = cv2.imencode('.png', gray)
    assert ok
    from_png = rgb_from_msg(_compressed('mono16; png compressed mono16', png.tobytes()))
    raw = gray.astype('<u2').tobytes()
    from_raw = image_to_rgb('mono16', 30, 40, 80, 0, raw)
    assert from_png.dtype == np.uint8 and from_png.shape == (30, 40, 3)
    np.testing.assert_array_equal(from_png, from_raw)


def test_real_raspicam_jpeg_size_and_budget_from_its_header(shared_data):
    from rosbags.highlevel import AnyReader

    with AnyReader([shared_data / RASPICAM_BAG]) as reader:
        connection = next(c for c in reader.connections
                          if c.msgtype == 'sensor_msgs/msg/CompressedImage')
        _, _, raw = next(reader.messages(connections=[connection]))
        msg = reader.deserialize(raw, connection.msgtype)
    rgb = rgb_from_msg(msg)
    assert rgb.shape == (960, 1280, 3) and rgb.dtype == np.uint8
    assert 20 < float(rgb.mean()) < 235  # a real picture, not a blank
    with pytest.raises(InputError, match=r'960x1280 = 1228800 pixels exceeds the pixel budget'):
        rgb_from_msg(msg, pixel_budget=1280 * 960 - 1)
    # The budget is read from the header: a stream cut right after it is refused for its size.
    head = bytes(msg.data)[:1024]
    with pytest.raises(InputError, match='exceeds the pixel budget'):
        rgb_from_msg(_compressed(str(msg.format), head), pixel_budget=1000)
