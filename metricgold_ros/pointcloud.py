"""Depth image to organized point cloud, the depth_image_proc way, and PLY export."""

import math
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import List, Optional, Tuple, Union

import cv2
import numpy as np

from metricgold_ros.atomic import atomic_file
from metricgold_ros.camera import Intrinsics
from metricgold_ros.depth_traits import valid_depth
from metricgold_ros.errors import InputError

FLOAT32 = 7  # sensor_msgs/PointField.FLOAT32


@dataclass(frozen=True)
class Cloud:
    """An organized point cloud ready for ``sensor_msgs/PointCloud2``.

    Attributes:
        points: structured array [H', W'] with little-endian float32 fields ``x, y, z`` (metres,
            camera optical frame; NaN where the depth was invalid) and, when colour was given,
            ``rgb`` (PCL packing: uint32 ``0x00RRGGBB`` reinterpreted as float32).
        fields: ``(name, offset_bytes, datatype, count)`` per field, datatype 7 = FLOAT32.
        point_step: bytes per point; ``row_step``: bytes per row (``point_step * width``).
    """

    points: np.ndarray
    fields: Tuple[Tuple[str, int, int, int], ...]
    point_step: int
    row_step: int

    @property
    def height(self) -> int:
        """Rows of the organized cloud."""
        return int(self.points.shape[0])

    @property
    def width(self) -> int:
        """Columns of the organized cloud."""
        return int(self.points.shape[1])

    @property
    def has_rgb(self) -> bool:
        """Whether the points carry a packed ``rgb`` field."""
        return 'rgb' in (self.points.dtype.names or ())


def _point_dtype(names: List[str]) -> np.dtype:
    return np.dtype({'names': names, 'formats': ['<f4'] * len(names),
                     'offsets': [4 * i for i in range(len(names))], 'itemsize': 4 * len(names)})


@lru_cache(maxsize=16)
def _rays(intr: Intrinsics, stride: int) -> Tuple[np.ndarray, np.ndarray]:
    """Per-column (u - cx) / fx [W'] and per-row (v - cy) / fy [H'] of the sampled pixels."""
    u = np.arange(0, intr.width, stride, dtype=np.float64)
    v = np.arange(0, intr.height, stride, dtype=np.float64)
    ray_x = ((u - intr.cx_px) / intr.fx_px).astype(np.float32)
    ray_y = ((v - intr.cy_px) / intr.fy_px).astype(np.float32)[:, None]
    ray_x.flags.writeable = False
    ray_y.flags.writeable = False
    return ray_x, ray_y


def depth_to_points(depth_m: np.ndarray, intr: Intrinsics, stride: int = 1,
                    max_depth_m: float = math.inf, rgb: Optional[np.ndarray] = None) -> Cloud:
    """Project depth [H,W] metres to an organized cloud of ceil(H/stride) x ceil(W/stride).

    As depth_image_proc: ``x = (u - cx) z / fx``, ``y = (v - cy) z / fy``, ``z = depth`` for
    the sampled pixel (u, v) = (column, row). Depth that is NaN, inf, <= 0 or > ``max_depth_m``
    gives NaN x, y, z. ``intr`` must describe the depth image (use ``Intrinsics.scaled_to``);
    ``rgb`` (uint8 [H,W,3], same size) adds a packed colour per point.
    """
    depth_m = np.asarray(depth_m)
    if depth_m.ndim != 2 or depth_m.dtype.kind != 'f':
        raise InputError(f'depth_m: {depth_m.dtype} array of shape {depth_m.shape}; pass a '
                         'float [H,W] depth image in metres')
    height, width = depth_m.shape
    if (intr.width, intr.height) != (width, height):
        raise InputError(f'intr: intrinsics are for {intr.width}x{intr.height} but the depth is '
                         f'{width}x{height}; scale them with Intrinsics.scaled_to({width}, '
                         f'{height})')
    if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or stride < 1:
        raise InputError(f'stride: {stride!r} must be an integer >= 1')
    if not max_depth_m > 0:
        raise InputError(f'max_depth_m: {max_depth_m} must be > 0 (inf for no limit)')
    if rgb is not None:
        rgb = np.asarray(rgb)
        if rgb.dtype != np.uint8 or rgb.shape != (height, width, 3):
            raise InputError(f'rgb: {rgb.dtype} array of shape {rgb.shape}; pass uint8 '
                             f'[{height},{width},3] matching the depth image')
    ray_x, ray_y = _rays(intr, int(stride))
    depth_s = depth_m[::stride, ::stride]  # [H',W']
    names = ['x', 'y', 'z'] + (['rgb'] if rgb is not None else [])
    # One buffer, filled in place: fresh large allocations cost page faults on every frame.
    flat = np.empty(depth_s.shape + (len(names),), np.float32)  # [H',W',C] interleaved
    z = flat[:, :, 2]
    z[...] = depth_s
    # One comparison pair rejects NaN, inf, <= 0 and too far: NaN compares False.
    np.copyto(z, np.float32(np.nan), where=~valid_depth(depth_s, max_depth_m))
    np.multiply(z, ray_x, out=flat[:, :, 0])  # NaN z gives NaN x, y
    np.multiply(z, ray_y, out=flat[:, :, 1])
    if rgb is not None:
        bgra = cv2.cvtColor(np.ascontiguousarray(rgb[::stride, ::stride]), cv2.COLOR_RGB2BGRA)
        # little-endian uint32 0x00RRGGBB = bytes B, G, R, 0; written as bits, not as floats
        np.bitwise_and(bgra.view('<u4')[:, :, 0], np.uint32(0x00FFFFFF),
                       out=flat[:, :, 3].view(np.uint32))
    dtype = _point_dtype(names)
    points = flat.view(dtype).reshape(z.shape)
    fields = tuple((name, 4 * i, FLOAT32, 1) for i, name in enumerate(names))
    return Cloud(points=points, fields=fields, point_step=dtype.itemsize,
                 row_step=dtype.itemsize * points.shape[1])


def unpack_rgb(points: np.ndarray) -> np.ndarray:
    """The ``rgb`` field of cloud points back to uint8 [..., 3] (R, G, B)."""
    packed = np.ascontiguousarray(points['rgb']).view('<u4')
    return np.stack([(packed >> 16) & 0xFF, (packed >> 8) & 0xFF, packed & 0xFF],
                    axis=-1).astype(np.uint8)


def write_ply(path: Union[str, 'os.PathLike[str]'], cloud: Cloud) -> int:
    """Write the finite points as binary little-endian PLY, atomically; return their count.

    A temporary file in the target folder is renamed over ``path`` only when complete, so no
    reader ever sees half a file.
    """
    pts = cloud.points.reshape(-1)
    finite = np.isfinite(pts['x']) & np.isfinite(pts['y']) & np.isfinite(pts['z'])
    names = ['x', 'y', 'z']
    formats = ['<f4'] * 3
    if cloud.has_rgb:
        names += ['red', 'green', 'blue']
        formats += ['u1'] * 3
    vertices = np.empty(int(finite.sum()), dtype=np.dtype({'names': names, 'formats': formats}))
    for name in ('x', 'y', 'z'):
        vertices[name] = pts[name][finite]
    header = ['ply', 'format binary_little_endian 1.0', f'element vertex {vertices.size}',
              'property float x', 'property float y', 'property float z']
    if cloud.has_rgb:
        colours = unpack_rgb(pts[finite])
        for i, name in enumerate(('red', 'green', 'blue')):
            vertices[name] = colours[:, i]
            header.append(f'property uchar {name}')
    header.append('end_header')
    with atomic_file(path) as handle:
        handle.write(('\n'.join(header) + '\n').encode('ascii'))
        handle.write(vertices.tobytes())
    return int(vertices.size)
