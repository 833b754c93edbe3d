"""Output messages from numpy arrays, for rclpy and for rosbags, through one code path.

The node builds rclpy ``sensor_msgs`` messages, the bag tool builds rosbags typestore messages;
both call the functions here with a :class:`MessageTypes`. Nothing here imports rclpy or ROS
message packages at module level: :func:`rclpy_types` imports them when called.
"""

import array
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Optional, Sequence

import numpy as np

from metricgold_ros.camera import DISTORTION_SIZES, Calibration, Intrinsics
from metricgold_ros.depth_traits import valid_depth
from metricgold_ros.errors import InputError
from metricgold_ros.image_encodings import decode_compressed, image_to_rgb, rgb_to_buffer
from metricgold_ros.pointcloud import Cloud

if TYPE_CHECKING:
    from metricgold_ros.metric_scale import MetricScale


@dataclass(frozen=True)
class MessageTypes:
    """The message classes of one type system; ``system`` is 'rclpy' or 'rosbags'."""

    Image: Any
    CameraInfo: Any
    PointCloud2: Any
    PointField: Any
    RegionOfInterest: Any
    Header: Any
    Time: Any
    system: str
    DiagnosticArray: Any = None
    DiagnosticStatus: Any = None
    KeyValue: Any = None


class ImageFields(NamedTuple):
    """The fields of a ``sensor_msgs/Image`` that :func:`image_to_rgb` needs."""

    encoding: str
    height: int
    width: int
    step: int
    is_bigendian: int
    data: Any


def rclpy_types() -> MessageTypes:
    """rclpy's generated classes (imports sensor_msgs only now, so the core stays ROS-free)."""
    from builtin_interfaces.msg import Time
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
    from sensor_msgs.msg import CameraInfo, Image, PointCloud2, PointField, RegionOfInterest
    from std_msgs.msg import Header
    return MessageTypes(Image=Image, CameraInfo=CameraInfo, PointCloud2=PointCloud2,
                        PointField=PointField, RegionOfInterest=RegionOfInterest,
                        Header=Header, Time=Time, system='rclpy',
                        DiagnosticArray=DiagnosticArray, DiagnosticStatus=DiagnosticStatus,
                        KeyValue=KeyValue)


def rosbags_types(typestore: Any = None) -> MessageTypes:
    """Classes of a rosbags typestore (default: ROS 2 Humble's)."""
    if typestore is None:
        from rosbags.typesys import get_typestore, Stores
        typestore = get_typestore(Stores.ROS2_HUMBLE)
    found = typestore.types
    return MessageTypes(Image=found['sensor_msgs/msg/Image'],
                        CameraInfo=found['sensor_msgs/msg/CameraInfo'],
                        PointCloud2=found['sensor_msgs/msg/PointCloud2'],
                        PointField=found['sensor_msgs/msg/PointField'],
                        RegionOfInterest=found['sensor_msgs/msg/RegionOfInterest'],
                        Header=found['std_msgs/msg/Header'],
                        Time=found['builtin_interfaces/msg/Time'], system='rosbags',
                        DiagnosticArray=found['diagnostic_msgs/msg/DiagnosticArray'],
                        DiagnosticStatus=found['diagnostic_msgs/msg/DiagnosticStatus'],
                        KeyValue=found['diagnostic_msgs/msg/KeyValue'])


def _header(types: MessageTypes, header: Any) -> Any:
    """The input header itself, or a copy of its stamp and frame_id in ``types``' classes."""
    if isinstance(header, types.Header):
        return header
    stamp = types.Time(sec=int(header.stamp.sec), nanosec=int(header.stamp.nanosec))
    return types.Header(stamp=stamp, frame_id=str(header.frame_id))


def _with_data(types: MessageTypes, cls: Any, values: np.ndarray, **fields: Any) -> Any:
    """``cls(**fields)`` with ``values``' bytes as its ``uint8[] data``, the fast way per system.

    rosbags: a flat uint8 view sharing ``values`` (no copy). rclpy: an array.array('B') set
    after construction, two memcpys on every distro; passing it to the constructor costs one
    more copy, a memoryview or list loops per byte (~600 ms for a 640x480 cloud).
    """
    flat = np.ascontiguousarray(values).reshape(-1).view(np.uint8)
    if types.system == 'rosbags':
        return cls(**fields, data=flat)
    data = array.array('B')
    data.frombytes(flat)
    msg = cls(**fields)
    msg.data = data
    return msg


def _float64_field(types: MessageTypes, values: Sequence[float], fixed: bool) -> Any:
    """A float64[] field: numpy for rosbags and rclpy's fixed arrays, array('d') otherwise."""
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if types.system == 'rosbags' or fixed:
        return arr
    return array.array('d', arr.tobytes())


def _image(types: MessageTypes, header: Any, height: int, width: int, encoding: str,
           step: int, values: np.ndarray) -> Any:
    return _with_data(types, types.Image, values, header=_header(types, header),
                      height=int(height), width=int(width), encoding=encoding, is_bigendian=0,
                      step=int(step))


def _check_2d_float(name: str, values: np.ndarray) -> np.ndarray:
    values = np.asarray(values)
    if values.ndim != 2 or values.dtype.kind != 'f' or 0 in values.shape:
        raise InputError(f'{name}: {values.dtype} array of shape {values.shape}; pass a '
                         'non-empty float [H,W] image')
    return values


def float_image_msg(types: MessageTypes, header: Any, values: np.ndarray) -> Any:
    """32FC1 little-endian Image of ``values`` [H,W] as they are (e.g. uncertainty)."""
    values = _check_2d_float('values', values).astype('<f4', copy=False)
    return _image(types, header, values.shape[0], values.shape[1], '32FC1',
                  4 * values.shape[1], values)


def depth_image_msg(types: MessageTypes, header: Any, depth_m: np.ndarray) -> Any:
    """32FC1 depth in metres, NaN where invalid (NaN, inf, <= 0), as REP 118 asks."""
    depth_m = _check_2d_float('depth_m', depth_m)
    out = depth_m.astype('<f4', copy=True)
    np.copyto(out, np.float32(np.nan), where=~valid_depth(out))
    return _image(types, header, out.shape[0], out.shape[1], '32FC1', 4 * out.shape[1], out)


def bgr8_image_msg(types: MessageTypes, header: Any, bgr: np.ndarray) -> Any:
    """bgr8 Image of a uint8 [H,W,3] BGR array (e.g. from colorize_depth)."""
    bgr = np.asarray(bgr)
    if bgr.dtype != np.uint8 or bgr.ndim != 3 or bgr.shape[2] != 3 or 0 in bgr.shape:
        raise InputError(f'bgr: {bgr.dtype} array of shape {bgr.shape}; pass uint8 [H,W,3]')
    return _image(types, header, bgr.shape[0], bgr.shape[1], 'bgr8', 3 * bgr.shape[1], bgr)


def rgb_image_msg(types: MessageTypes, header: Any, rgb: np.ndarray,
                  encoding: str = 'rgb8') -> Any:
    """Image of an RGB uint8 [H,W,3] array in any writable encoding (demo and test streams)."""
    rgb = np.asarray(rgb)
    data, step = rgb_to_buffer(rgb, encoding)
    return _image(types, header, rgb.shape[0], rgb.shape[1], encoding, step,
                  np.frombuffer(data, np.uint8))


def camera_info_msg(types: MessageTypes, header: Any, intr: Intrinsics,
                    distortion_model: str = 'plumb_bob',
                    d: Optional[Sequence[float]] = None) -> Any:
    """CameraInfo of ``intr``: K, P = [K|0], R = I, no binning, no ROI.

    ``d`` defaults to zeros of the model's length (5 for plumb_bob): the right value for a
    depth image made from a rectified image.
    """
    if d is None:
        d = [0.0] * DISTORTION_SIZES.get(distortion_model, 0)
    roi = types.RegionOfInterest(x_offset=0, y_offset=0, height=0, width=0, do_rectify=False)
    return types.CameraInfo(
        header=_header(types, header), height=intr.height, width=intr.width,
        distortion_model=distortion_model, d=_float64_field(types, d, fixed=False),
        k=_float64_field(types, intr.k, fixed=True),
        r=_float64_field(types, np.eye(3), fixed=True),
        p=_float64_field(types, intr.p, fixed=True), binning_x=0, binning_y=0, roi=roi)


def pointcloud_msg(types: MessageTypes, header: Any, cloud: Cloud) -> Any:
    """Organized PointCloud2 of ``cloud`` (little-endian, ``is_dense`` False: NaN points)."""
    fields = [types.PointField(name=name, offset=offset, datatype=datatype, count=count)
              for name, offset, datatype, count in cloud.fields]
    return _with_data(types, types.PointCloud2, cloud.points, header=_header(types, header),
                      height=cloud.height, width=cloud.width, fields=fields, is_bigendian=False,
                      point_step=cloud.point_step, row_step=cloud.row_step, is_dense=False)


def scale_msg(types: MessageTypes, header: Any, scale: 'MetricScale') -> Any:
    """``diagnostic_msgs/DiagnosticArray`` of one frame's metric scale (``depth/scale``).

    One status named ``metric_scale``: level OK when the ground fit succeeded (or is off),
    WARN when it failed (the model's own scale was kept, or a relative checkpoint published
    no metric depth); ``message`` says why, ``values`` hold the scale, shift, inlier share,
    confidence, state and the camera-aware factor. The header is the input frame's.
    """
    ok = scale.fit.ok or scale.fit.state == 'off'
    status = types.DiagnosticStatus(  # OK/WARN: bytes in rclpy, int in rosbags, each its own
        level=types.DiagnosticStatus.OK if ok else types.DiagnosticStatus.WARN,
        name='metric_scale', message=scale.message, hardware_id='',
        values=[types.KeyValue(key=key, value=value) for key, value in scale.key_values()])
    return types.DiagnosticArray(header=_header(types, header), status=[status])


def image_fields(msg: Any) -> ImageFields:
    """Read an Image of either type system (or a ROS 1 one from rosbags) uniformly."""
    return ImageFields(encoding=str(msg.encoding), height=int(msg.height),
                       width=int(msg.width), step=int(msg.step),
                       is_bigendian=int(msg.is_bigendian), data=msg.data)


def rgb_from_msg(msg: Any, *, pixel_budget: Optional[int] = None) -> np.ndarray:
    """RGB uint8 [H,W,3] of an Image or a CompressedImage (told apart by ``format``)."""
    if hasattr(msg, 'format'):
        return decode_compressed(str(msg.format), msg.data, pixel_budget=pixel_budget)
    return image_to_rgb(*image_fields(msg), pixel_budget=pixel_budget)


def stamp_ns(stamp: Any) -> int:
    """Integer nanoseconds of a ``builtin_interfaces/Time`` (rclpy, rosbags, ROS 1 alike)."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def header_msg(types: MessageTypes, stamp_ns: int, frame_id: str) -> Any:
    """A ``std_msgs/Header`` in ``types``' classes stamped ``stamp_ns`` (integer nanoseconds)."""
    return types.Header(stamp=types.Time(sec=stamp_ns // 1_000_000_000,
                                         nanosec=stamp_ns % 1_000_000_000), frame_id=frame_id)


def calibration_from_info(msg: Any) -> Calibration:
    """The :class:`Calibration` of a CameraInfo of either type system or ROS version.

    ROS 2 names the fields ``k``/``d``, ROS 1 ``K``/``D``. Never raises: what cannot be used is
    the calibration's ``problem``.
    """
    k = msg.k if hasattr(msg, 'k') else getattr(msg, 'K', None)
    d = msg.d if hasattr(msg, 'd') else getattr(msg, 'D', ())
    if k is None:
        return Calibration(None, f'camera_info: a {type(msg).__name__} has no k/K field; pass '
                           'a sensor_msgs/CameraInfo')
    return Calibration.from_fields(k, d, str(getattr(msg, 'distortion_model', '')),
                                   getattr(msg, 'width', 0), getattr(msg, 'height', 0))
