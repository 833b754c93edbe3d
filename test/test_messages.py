"""Output messages for rclpy and rosbags, checked after a real CDR round trip in each system."""

import array

import cv2
import numpy as np
import pytest
from rclpy.serialization import deserialize_message, serialize_message
from rosbags.typesys import get_typestore, Stores

from metricgold_ros import messages
from metricgold_ros.camera import Intrinsics
from metricgold_ros.errors import InputError
from metricgold_ros.image_encodings import image_to_rgb
from metricgold_ros.pointcloud import depth_to_points

TYPESTORE = get_typestore(Stores.ROS2_HUMBLE)
INTR = Intrinsics(fx_px=20.0, fy_px=21.0, cx_px=7.5, cy_px=5.25, width=16, height=12)
MSGTYPES = {'Image': 'sensor_msgs/msg/Image', 'CameraInfo': 'sensor_msgs/msg/CameraInfo',
            'PointCloud2': 'sensor_msgs/msg/PointCloud2'}


@pytest.fixture(params=['rclpy', 'rosbags'])
def types(request) -> messages.MessageTypes:
    if request.param == 'rclpy':
        return messages.rclpy_types()
    return messages.rosbags_types(TYPESTORE)


def _header(types):
    return types.Header(stamp=types.Time(sec=1700000000, nanosec=123456789),
                        frame_id='camera_optical')


def _round_trip(types, msg, kind):
    """Serialize and deserialize with the system's own CDR implementation."""
    if types.system == 'rclpy':
        return deserialize_message(serialize_message(msg), type(msg))
    raw = TYPESTORE.serialize_cdr(msg, MSGTYPES[kind])
    return TYPESTORE.deserialize_cdr(raw, MSGTYPES[kind])


def _assert_header(msg):
    assert (msg.header.stamp.sec, msg.header.stamp.nanosec) == (1700000000, 123456789)
    assert msg.header.frame_id == 'camera_optical'


@pytest.fixture
def depth_m() -> np.ndarray:
    depth = np.random.default_rng(2).uniform(0.3, 8.0, (12, 16)).astype(np.float32)
    depth[0, :3] = [np.nan, np.inf, 0.0]
    depth[5, 5] = -2.0
    return depth


def test_depth_image_is_32fc1_metres_nan_invalid(types, depth_m):
    msg = _round_trip(types, messages.depth_image_msg(types, _header(types), depth_m), 'Image')
    _assert_header(msg)
    assert (msg.encoding, msg.height, msg.width, msg.step) == ('32FC1', 12, 16, 64)
    assert msg.is_bigendian == 0
    values = np.frombuffer(bytes(msg.data), '<f4').reshape(12, 16)
    invalid = ~(np.isfinite(depth_m) & (depth_m > 0))
    assert invalid.sum() == 4
    assert np.all(np.isnan(values[invalid]))
    np.testing.assert_array_equal(values[~invalid], depth_m[~invalid])


def test_float_image_keeps_values(types):
    values = np.array([[0.0, 1.5], [-2.0, np.nan]], np.float64)
    msg = _round_trip(types, messages.float_image_msg(types, _header(types), values), 'Image')
    np.testing.assert_array_equal(np.frombuffer(bytes(msg.data), '<f4').reshape(2, 2),
                                  values.astype(np.float32))


def test_bgr8_and_rgb_images_decode_back(types):
    rgb = np.random.default_rng(4).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    bgr_msg = messages.bgr8_image_msg(types, _header(types), np.ascontiguousarray(rgb[..., ::-1]))
    for built in (bgr_msg, messages.rgb_image_msg(types, _header(types), rgb, 'mono8'),
                  messages.rgb_image_msg(types, _header(types), rgb, 'rgb8')):
        msg = _round_trip(types, built, 'Image')
        _assert_header(msg)
        out = messages.rgb_from_msg(msg)
        if msg.encoding == 'mono8':
            np.testing.assert_array_equal(out[..., 0], cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
        else:
            np.testing.assert_array_equal(out, rgb)
        assert messages.image_fields(msg).step == msg.step


def test_camera_info_carries_k_p_r_and_round_trips_to_intrinsics(types):
    msg = messages.camera_info_msg(types, _header(types), INTR)
    msg = _round_trip(types, msg, 'CameraInfo')
    _assert_header(msg)
    assert (msg.width, msg.height, msg.distortion_model) == (16, 12, 'plumb_bob')
    np.testing.assert_array_equal(np.asarray(msg.k).reshape(3, 3), INTR.k)
    np.testing.assert_array_equal(np.asarray(msg.p).reshape(3, 4), INTR.p)
    np.testing.assert_array_equal(np.asarray(msg.r).reshape(3, 3), np.eye(3))
    assert list(msg.d) == [0.0] * 5
    assert (msg.binning_x, msg.binning_y) == (0, 0)
    roi = msg.roi
    assert (roi.x_offset, roi.y_offset, roi.width, roi.height, roi.do_rectify) == (0, 0, 0, 0,
                                                                                  False)
    assert messages.calibration_from_info(msg).camera == INTR
    custom = messages.camera_info_msg(types, _header(types), INTR, 'rational_polynomial',
                                      d=[0.1] * 8)
    assert list(_round_trip(types, custom, 'CameraInfo').d) == [0.1] * 8


@pytest.mark.parametrize('with_rgb', [False, True])
def test_pointcloud_fields_and_data(types, depth_m, with_rgb):
    rgb = np.full((12, 16, 3), (10, 20, 30), np.uint8) if with_rgb else None
    cloud = depth_to_points(depth_m, INTR, stride=2, rgb=rgb)
    msg = _round_trip(types, messages.pointcloud_msg(types, _header(types), cloud),
                      'PointCloud2')
    _assert_header(msg)
    assert (msg.height, msg.width) == (6, 8)
    assert (msg.point_step, msg.row_step) == (cloud.point_step, cloud.point_step * 8)
    assert bool(msg.is_bigendian) is False and bool(msg.is_dense) is False
    assert [(f.name, f.offset, f.datatype, f.count) for f in msg.fields] == list(cloud.fields)
    assert len(msg.data) == msg.row_step * msg.height
    points = np.frombuffer(bytes(msg.data), cloud.points.dtype).reshape(6, 8)
    for name in cloud.points.dtype.names:
        np.testing.assert_array_equal(points[name].view('<u4'), cloud.points[name].view('<u4'))
    if with_rgb:
        assert points['rgb'].view('<u4')[3, 3] == 0x0A141E


def test_rclpy_messages_pass_strict_field_checks(depth_m, monkeypatch):
    # Humble always type-checks every field setter; Kilted only with ROS_PYTHON_CHECK_FIELDS=1,
    # read when the message module is imported: switch it on in each module we build.
    import importlib
    for module in ('sensor_msgs.msg._image', 'sensor_msgs.msg._camera_info',
                   'sensor_msgs.msg._point_cloud2', 'sensor_msgs.msg._point_field',
                   'sensor_msgs.msg._region_of_interest', 'std_msgs.msg._header',
                   'builtin_interfaces.msg._time'):
        monkeypatch.setattr(importlib.import_module(module), 'ros_python_check_fields', '1')
    types = messages.rclpy_types()
    header = _header(types)
    assert header._check_fields  # the switch works
    cloud = depth_to_points(depth_m, INTR, rgb=np.zeros((12, 16, 3), np.uint8))
    built = [messages.depth_image_msg(types, header, depth_m),
             messages.camera_info_msg(types, header, INTR),
             messages.pointcloud_msg(types, header, cloud)]
    assert isinstance(built[0].data, array.array) and built[0].data.typecode == 'B'
    assert built[0].header is header  # the input header is reused as-is
    info = types.CameraInfo()
    with pytest.raises(AssertionError):  # the checks do bite: numpy is refused for d
        info.d = np.zeros(5)


def test_header_from_the_other_system_is_copied(depth_m):
    rclpy_header = _header(messages.rclpy_types())
    bag_types = messages.rosbags_types(TYPESTORE)
    msg = messages.depth_image_msg(bag_types, rclpy_header, depth_m)
    assert isinstance(msg.header, bag_types.Header)
    _assert_header(_round_trip(bag_types, msg, 'Image'))


def test_compressed_image_from_either_system(types):
    rgb = np.random.default_rng(8).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    ok, png = cv2.imencode('.png', cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    if types.system == 'rclpy':
        from sensor_msgs.msg import CompressedImage
        msg = CompressedImage(header=_header(types), format='png')
        msg.data = array.array('B', png.tobytes())
        msg = deserialize_message(serialize_message(msg), CompressedImage)
    else:
        cls = TYPESTORE.types['sensor_msgs/msg/CompressedImage']
        msg = cls(header=_header(types), format='png', data=png.reshape(-1))
    np.testing.assert_array_equal(messages.rgb_from_msg(msg), rgb)


def test_ros1_camera_info_with_upper_case_k():
    ros1 = get_typestore(Stores.ROS1_NOETIC)
    cls = ros1.types['sensor_msgs/msg/CameraInfo']
    assert 'K' in cls.__dataclass_fields__
    header = ros1.types['std_msgs/msg/Header'](
        seq=0, stamp=ros1.types['builtin_interfaces/msg/Time'](sec=0, nanosec=0), frame_id='c')
    roi = ros1.types['sensor_msgs/msg/RegionOfInterest'](
        x_offset=0, y_offset=0, height=0, width=0, do_rectify=False)
    msg = cls(header=header, height=12, width=16, distortion_model='plumb_bob',
              D=np.zeros(5), K=INTR.k.reshape(-1), R=np.eye(3).reshape(-1),
              P=INTR.p.reshape(-1), binning_x=0, binning_y=0, roi=roi)
    assert messages.calibration_from_info(msg).camera == INTR


def test_image_fields_feed_the_decoder(types):
    rgb = np.arange(2 * 4 * 3, dtype=np.uint8).reshape(2, 4, 3)
    msg = messages.rgb_image_msg(types, _header(types), rgb, 'bgr8')
    fields = messages.image_fields(msg)
    assert (fields.encoding, fields.height, fields.width, fields.step) == ('bgr8', 2, 4, 12)
    np.testing.assert_array_equal(image_to_rgb(*fields), rgb)


def test_bad_inputs_raise(types):
    header = _header(types)
    with pytest.raises(InputError, match=r'depth_m: uint8 array of shape \(2, 2\)'):
        messages.depth_image_msg(types, header, np.zeros((2, 2), np.uint8))
    with pytest.raises(InputError, match=r'bgr: uint8 array of shape \(2, 2\)'):
        messages.bgr8_image_msg(types, header, np.zeros((2, 2), np.uint8))
    zero_k = types.CameraInfo(header=header, height=12, width=16, distortion_model='',
                              d=np.zeros(0), k=np.zeros(9), r=np.zeros(9), p=np.zeros(12),
                              binning_x=0, binning_y=0,
                              roi=types.RegionOfInterest(x_offset=0, y_offset=0, height=0,
                                                         width=0, do_rectify=False))
    calibration = messages.calibration_from_info(zero_k)
    assert calibration.camera is None and 'K: fx=0.0, fy=0.0' in calibration.problem
