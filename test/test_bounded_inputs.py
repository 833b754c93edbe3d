"""Bounded state and hostile inputs: the scale filter, CameraInfo D, ``infer`` (issue 22, 10-11).

Real files and messages; the tiny real model where ``infer`` runs.
"""

import json
import struct
import zlib

import numpy as np
import pytest

from metricgold_ros import messages
from metricgold_ros.camera import MAX_DISTORTION_COEFFICIENTS
from metricgold_ros.ground import ScaleFilter
from metricgold_ros.tools.cli import main

FAST = ['--processing-resolution', '64']


def test_scale_filter_keeps_only_the_frames_it_can_use():
    scale_filter = ScaleFilter(confirm_frames=3)
    scale_filter.update(1.0)
    for i in range(5000):  # outliers that never agree with each other: a broken floor fit
        step = scale_filter.update(4.0 if i % 2 else 0.25)
        assert step.event == 'outlier' and step.scale == pytest.approx(1.0)
    assert len(scale_filter._pending) <= scale_filter.confirm_frames
    for _ in range(2):
        assert scale_filter.update(2.0).event == 'outlier'
    assert scale_filter.update(2.0).event == 'jump'  # a real change is still confirmed


@pytest.mark.parametrize('count, usable', [(0, True), (5, True), (8, True), (14, True),
                                           (15, False), (100_000, False)])
def test_camera_info_distortion_length_is_bounded(count, usable):
    from rosbags.typesys import Stores, get_typestore

    types = get_typestore(Stores.ROS2_HUMBLE).types
    msg = types['sensor_msgs/msg/CameraInfo'](
        header=types['std_msgs/msg/Header'](
            stamp=types['builtin_interfaces/msg/Time'](sec=0, nanosec=0), frame_id='cam'),
        height=120, width=160, distortion_model='rational_polynomial', d=np.zeros(count),
        k=np.array([100.0, 0, 79.5, 0, 100.0, 59.5, 0, 0, 1]), r=np.eye(3).reshape(-1),
        p=np.zeros(12), binning_x=0, binning_y=0,
        roi=types['sensor_msgs/msg/RegionOfInterest'](x_offset=0, y_offset=0, height=0,
                                                      width=0, do_rectify=False))
    calibration = messages.calibration_from_info(msg)
    assert (calibration.camera is not None) == usable, calibration.problem
    if not usable:
        assert str(MAX_DISTORTION_COEFFICIENTS) in calibration.problem
        assert f'{count} distortion coefficients' in calibration.problem
        assert calibration.d == ()  # nothing of the hostile D is kept


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` RGB pixels and holds a few bytes of data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack('>I', len(data)) + kind + data + \
            struct.pack('>I', zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr)
            + chunk(b'IDAT', zlib.compress(b'\0' * 64)) + chunk(b'IEND', b''))


def test_infer_fails_bad_images_not_the_run(tmp_path, capsys, fast_model):
    from PIL import Image

    folder = tmp_path / 'in'
    folder.mkdir()
    Image.fromarray(np.full((48, 64, 3), 120, np.uint8)).save(folder / 'good.png')
    (folder / 'bomb.png').write_bytes(_png_header_only(30_000, 30_000))  # 900 Mpx claimed
    (folder / 'wide.png').write_bytes(_png_header_only(5_000, 4_000))  # 20 Mpx > default
    (folder / 'garbage.jpg').write_bytes(b'\xff\xd8\xff\xe0' + bytes(range(256)) * 4)
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(folder / 'small.png')
    code = main(['infer', str(folder), '--out', str(tmp_path / 'out'), '--quiet',
                 '--max-pixels', '2000', *FAST])
    captured = capsys.readouterr()
    assert code == 1
    summary = json.loads(captured.out.strip().splitlines()[-1])
    failed = {f['image'].rsplit('/', 1)[-1]: f['error'] for f in summary['failures']}
    assert set(failed) == {'bomb.png', 'wide.png', 'garbage.jpg', 'good.png'}
    assert '--max-pixels 2000' in failed['bomb.png'] and '--max-pixels' in failed['good.png']
    assert 'not a readable image' in failed['garbage.jpg']
    assert summary['images'] == 1 and (tmp_path / 'out' / 'small_depth.npy').is_file()
    # The default budget (the node's max_pixels) lets the ordinary images through.
    code = main(['infer', str(folder / 'good.png'), str(folder / 'bomb.png'), '--out',
                 str(tmp_path / 'out2'), '--quiet', *FAST])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 1 and summary['images'] == 1 and summary['failed'] == 1
    assert (tmp_path / 'out2' / 'good_depth.npy').is_file()
