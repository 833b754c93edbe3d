"""Camera-aware checkpoints: depth predicted for a canonical focal length, rescaled to the camera.

A camera-aware checkpoint (Metric3D's canonical camera, label-scale form) was trained on depth
rescaled to one focal length ``f_c`` (``canonical_focal_px`` in its metadata): it predicts the
depth the scene would have if the networks' input had been taken with focal ``f_c``. Inference
multiplies by ``f / f_c``, with ``f`` the real focal length in pixels **at the processing
resolution** (the image the networks saw, longer side ``processing_resolution``): a 640 px
frame with fx 500 px processed at 320 px has ``f = 250``.

``f`` comes from the intrinsics (CameraInfo in the node and bag tool, ``--fx``/``--camera-info``
in ``metricgold infer``), the mean of fx and fy scaled to the processed size; without
intrinsics from :data:`ASSUMED_HFOV_DEG`, a typical webcam's horizontal field of view.
Checkpoints without ``canonical_focal_px`` get a factor of exactly 1.
"""

import math
from typing import Any, Optional, Tuple

import numpy as np

from metricgold_ros.camera import Intrinsics
from metricgold_ros.errors import InputError
from metricgold_ros.model.image_ops import processing_size

ASSUMED_HFOV_DEG = 60.0  # horizontal field of view assumed when no intrinsics are known


def canonical_focal_px(metadata: Any) -> Optional[float]:
    """The checkpoint's canonical focal length (px), ``None`` for a camera-unaware one."""
    value = getattr(metadata, 'canonical_focal_px', None)
    return None if value is None else float(value)


def processing_focal_px(camera: Optional[Intrinsics], width: int, height: int,
                        processing_resolution: int) -> Tuple[float, bool]:
    """Focal length (px) of a ``width`` x ``height`` frame once resized for the networks.

    Args:
        camera: intrinsics of the frame (any size of the same aspect ratio: they are scaled),
            or ``None``.
        width, height: the frame's size in pixels.
        processing_resolution: the longer side fed to the networks; 0 = the frame's size.

    Returns:
        ``(focal_px, assumed)``: the mean of fx and fy at the processed size, or with no
        ``camera`` the focal of a :data:`ASSUMED_HFOV_DEG` horizontal field of view
        (``assumed`` True).
    """
    proc_h, proc_w = processing_size(height, width, processing_resolution)
    if camera is None:
        return proc_w / 2 / math.tan(math.radians(ASSUMED_HFOV_DEG) / 2), True
    return mean_focal_px(camera, proc_w, proc_h), False


def mean_focal_px(camera: Intrinsics, width: int, height: int) -> float:
    """The mean of fx and fy (px) of ``camera``'s image resized to ``width`` x ``height``.

    The one definition of "the focal length" of camera-aware checkpoints, for training targets
    (at the training size) and inference (at the processing size) alike.
    """
    return (camera.fx_px * width / camera.width + camera.fy_px * height / camera.height) / 2


def canonical_scale(metadata: Any, focal_px: float) -> float:
    """``focal_px / canonical_focal_px``: multiplies a camera-aware checkpoint's depth; else 1."""
    canonical = canonical_focal_px(metadata)
    return 1.0 if canonical is None else focal_px / canonical


def for_camera(depth: np.ndarray, metadata: Any, camera: Optional[Intrinsics],
               processing_resolution: int) -> np.ndarray:
    """A prediction for ``camera``'s frame (the size fed to the pipeline, processed at
    ``processing_resolution``): a camera-aware checkpoint's depth times ``f / f_c``; any
    other checkpoint's depth as it is. For offline scoring, where the intrinsics are known
    (None is an error for a camera-aware checkpoint); the node and bag tool go through
    :class:`metricgold_ros.metric_scale.MetricScaler`, which may assume a field of view."""
    canonical = canonical_focal_px(metadata)
    if canonical is None:
        return depth
    if camera is None:
        raise InputError(f'a camera-aware checkpoint (canonical focal {canonical:g} px) is '
                         'scored without the frame\'s intrinsics: give each frame its camera')
    focal_px, _ = processing_focal_px(camera, camera.width, camera.height, processing_resolution)
    return depth * np.float32(canonical_scale(metadata, focal_px))
