"""Synthetic camera bags for tests, written with ``rosbags`` (rosbag2 mcap/sqlite3, ROS 1).

Frames come from :mod:`metricgold_ros.synthetic.scenes` (a rendered scene with exact intrinsics), so
a test can check what ``metricgold bag`` wrote against the K it was given. Times are integer
nanoseconds.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import cv2
import numpy as np

from metricgold_ros.camera import Intrinsics
from metricgold_ros.tools.cli import main
from metricgold_ros.image_encodings import rgb_to_buffer
from metricgold_ros.synthetic.scenes import camera_sequence

START_NS = 1_700_000_000_000_000_000
PERIOD_NS = 100_000_000  # 10 Hz
EXTRA_TOPIC = '/chatter'


@dataclass
class CameraBag:
    """What a helper wrote: topics, per-frame stamps (ns), the camera and the frames."""

    path: Path
    image_topic: str
    info_topic: Optional[str]
    stamps_ns: List[int]
    camera: Intrinsics
    rgbs: List[np.ndarray] = field(repr=False)
    extra_topic: Optional[str] = EXTRA_TOPIC


def frames(count: int, width: int, height: int, seed: int = 0):
    """``count`` rendered RGB frames and their Intrinsics."""
    samples = list(camera_sequence(seed, 'indoor', count, width, height))
    return [x.rgb for x in samples], samples[0].intrinsics


def image_msg(types: Any, header: Any, rgb: np.ndarray, encoding: str,
              row_padding: int = 0) -> Any:
    """sensor_msgs/Image of ``rgb`` in ``encoding``, each row padded by ``row_padding`` bytes."""
    data, step = rgb_to_buffer(rgb, encoding)
    rows = np.frombuffer(data, np.uint8).reshape(rgb.shape[0], step)
    if row_padding:
        rows = np.concatenate(
            [rows, np.full((rows.shape[0], row_padding), 0xAB, np.uint8)], axis=1)
    return types['sensor_msgs/msg/Image'](
        header=header, height=rgb.shape[0], width=rgb.shape[1], encoding=encoding,
        is_bigendian=0, step=step + row_padding, data=np.ascontiguousarray(rows).reshape(-1))


def compressed_msg(types: Any, header: Any, rgb: np.ndarray, codec: str,
                   fmt: Optional[str] = None) -> Any:
    """sensor_msgs/CompressedImage (``codec`` 'jpeg' or 'png') of ``rgb``."""
    ok, buf = cv2.imencode('.jpg' if codec == 'jpeg' else '.png',
                           cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return types['sensor_msgs/msg/CompressedImage'](
        header=header, format=fmt or f'rgb8; {codec} compressed bgr8',
        data=np.frombuffer(buf.tobytes(), np.uint8))


def camera_info_msg(types: Any, header: Any, camera: Intrinsics, ros1: bool = False,
                    k: Optional[Any] = None, size: Optional[Any] = None,
                    d: Optional[Any] = None) -> Any:
    """sensor_msgs/CameraInfo of ``camera`` (plumb_bob, zero distortion).

    ``k`` (9 numbers), ``size`` ``(width, height)`` and ``d`` override the camera's, to make a
    broken calibration.
    """
    roi = types['sensor_msgs/msg/RegionOfInterest'](
        x_offset=0, y_offset=0, height=0, width=0, do_rectify=False)
    k = camera.k.reshape(-1) if k is None else np.asarray(k, np.float64)
    width, height = (camera.width, camera.height) if size is None else size
    arrays = {'d': np.zeros(5) if d is None else np.asarray(d, np.float64), 'k': k, 'r': np.eye(3).reshape(-1),
              'p': camera.p.reshape(-1)}
    if ros1:
        arrays = {key.upper(): value for key, value in arrays.items()}
    return types['sensor_msgs/msg/CameraInfo'](
        header=header, height=height, width=width, distortion_model='plumb_bob',
        binning_x=0, binning_y=0, roi=roi, **arrays)


def _header(types: Any, stamp_ns: int, ros1: bool, seq: int = 0) -> Any:
    stamp = types['builtin_interfaces/msg/Time'](sec=stamp_ns // 1_000_000_000,
                                                 nanosec=stamp_ns % 1_000_000_000)
    extra: Dict[str, Any] = {'seq': seq} if ros1 else {}
    return types['std_msgs/msg/Header'](stamp=stamp, frame_id='camera_optical', **extra)


def write_camera_bag(path: Path, *, storage: str = 'mcap', ros1: bool = False,
                     count: int = 3, width: int = 160, height: int = 120,
                     encoding: str = 'rgb8', row_padding: int = 0,
                     compressed: Optional[str] = None, camera_info: bool = True,
                     image_topic: str = '/camera/image_raw',
                     info_topic: str = '/camera/camera_info',
                     info_offset_ns: int = 0, extra_topic: bool = True,
                     declared_encoding: Optional[str] = None, info_k: Optional[Any] = None,
                     info_size: Optional[Any] = None, info_d: Optional[Any] = None,
                     seed: int = 0) -> CameraBag:
    """Write a camera recording: ``count`` images, CameraInfo beside each, a chatter topic.

    ``compressed`` ('jpeg'/'png') writes CompressedImage instead of Image. CameraInfo is
    stamped ``info_offset_ns`` after its image (0: the same stamp) and logged just before it.
    ``ros1`` writes a ROS 1 ``.bag`` (``path`` should end in .bag) instead of rosbag2.
    ``declared_encoding`` overrides the Image's encoding field (a wrong or unsupported one);
    ``info_k`` / ``info_size`` / ``info_d`` the CameraInfo's K, (width, height) and D.
    """
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS1_NOETIC if ros1 else Stores.ROS2_HUMBLE)
    types = store.types
    rgbs, camera = frames(count, width, height, seed)
    image_type = 'sensor_msgs/msg/CompressedImage' if compressed else 'sensor_msgs/msg/Image'
    writer = _open_writer(path, storage, ros1)
    with writer:
        conn_image = writer.add_connection(image_topic, image_type, typestore=store)
        conn_info = writer.add_connection(info_topic, 'sensor_msgs/msg/CameraInfo',
                                          typestore=store) if camera_info else None
        conn_extra = writer.add_connection(EXTRA_TOPIC, 'std_msgs/msg/String',
                                           typestore=store) if extra_topic else None
        serialize = store.serialize_ros1 if ros1 else store.serialize_cdr
        stamps = []
        for i, rgb in enumerate(rgbs):
            stamp = START_NS + i * PERIOD_NS
            stamps.append(stamp)
            if conn_info is not None:
                info = camera_info_msg(types, _header(types, stamp + info_offset_ns, ros1, i),
                                       camera, ros1, info_k, info_size, info_d)
                writer.write(conn_info, stamp, serialize(info, 'sensor_msgs/msg/CameraInfo'))
            header = _header(types, stamp, ros1, i)
            msg = compressed_msg(types, header, rgb, compressed) if compressed else \
                image_msg(types, header, rgb, encoding, row_padding)
            if declared_encoding is not None:
                msg.encoding = declared_encoding
            writer.write(conn_image, stamp + 1000, serialize(msg, image_type))
            if conn_extra is not None:
                text = types['std_msgs/msg/String'](data=f'frame {i}')
                writer.write(conn_extra, stamp + 2000, serialize(text, 'std_msgs/msg/String'))
    return CameraBag(Path(path), image_topic, info_topic if camera_info else None, stamps,
                     camera, rgbs, EXTRA_TOPIC if extra_topic else None)


def _open_writer(path: Path, storage: str, ros1: bool) -> Any:
    if ros1:
        from rosbags.rosbag1 import Writer as Writer1

        return Writer1(Path(path))
    from rosbags.rosbag2 import StoragePlugin, Writer

    plugin = StoragePlugin.MCAP if storage == 'mcap' else StoragePlugin.SQLITE3
    return Writer(Path(path), version=8, storage_plugin=plugin)


def read_bag(path: Path) -> Dict[str, List[Any]]:
    """Every message of a bag: topic -> [(log_ns, raw bytes, message, connection)]."""
    from rosbags.highlevel import AnyReader

    out: Dict[str, List[Any]] = {}
    with AnyReader([Path(path)]) as reader:
        for connection, log_ns, raw in reader.messages():
            msg = reader.deserialize(raw, connection.msgtype)
            out.setdefault(connection.topic, []).append((log_ns, bytes(raw), msg, connection))
    return out


def run_bag(capsys, *argv):
    """``metricgold bag ... --quiet`` in-process: (exit code, JSON summary or None, stderr)."""
    code = main(['bag', *map(str, argv), '--quiet'])
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    return code, (json.loads(lines[-1]) if code == 0 else None), captured.err
