"""One camera frame -> every output the node and the bag tool publish (one implementation).

``DepthFrameProcessor.process`` runs the pipeline and derives the depth image, uncertainty,
colour visualisation, the intrinsics of the depth image and the point cloud as numpy arrays;
``frame_messages`` turns them into ROS messages of either type system (rclpy or rosbags), all
stamped with the input frame's header. Neither imports rclpy.

The CameraInfo policy (:mod:`metricgold_ros.camera`) is applied here, once per frame: a
calibration that cannot serve this image leaves depth untouched and ``FrameResult.
camera_problem`` says why there are no points; the adapters report it.
"""

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

import numpy as np

from metricgold_ros import messages
from metricgold_ros.camera import Calibration, Intrinsics
from metricgold_ros.colorize import colorize_depth
from metricgold_ros.errors import InputError
from metricgold_ros.pointcloud import Cloud, depth_to_points

if TYPE_CHECKING:
    from metricgold_ros.model import MetricGoldPipeline

# The topics every adapter publishes or writes (relative to its output namespace), in order.
OUTPUT_TOPICS = ('depth/image', 'depth/camera_info', 'depth/colored', 'depth/uncertainty',
                 'points')


@dataclass
class FrameOptions:
    """Per-frame choices; the node maps its parameters onto these, the bag tool its flags."""

    denoising_steps: Optional[int] = None  # None: the checkpoint's default
    ensemble_size: int = 1
    processing_resolution: Optional[int] = None  # None: the checkpoint's default
    seed: Optional[int] = 0
    warm_start: bool = False
    warm_start_strength: float = 0.5
    output_scale: float = 1.0  # depth size relative to the input image
    colored: bool = True
    colormap: str = 'turbo'
    color_min_m: Optional[float] = None  # None: automatic (2nd percentile)
    color_max_m: Optional[float] = None  # None: automatic (98th percentile)
    points: bool = True
    points_stride: int = 1
    points_rgb: bool = False
    max_depth_m: float = math.inf
    uncertainty: bool = True  # publish/write the ensemble spread when ensemble_size > 1


@dataclass
class FrameResult:
    """Outputs of one frame, at the depth image's size ``[H,W]``.

    ``intrinsics`` describe the depth image (``None`` without a usable calibration, then
    ``camera_problem`` says why when there was one); ``cloud`` is ``None`` without intrinsics,
    for relative models, or when points are off. ``distortion_model``/``distortion`` are the
    input calibration's: the depth image shares the input image's geometry.
    """

    depth: np.ndarray
    relative: bool
    uncertainty: Optional[np.ndarray]
    intrinsics: Optional[Intrinsics]
    colored_bgr: Optional[np.ndarray]
    cloud: Optional[Cloud]
    timings_s: Dict[str, float] = field(default_factory=dict)
    camera_problem: Optional[str] = None
    distortion_model: str = 'plumb_bob'
    distortion: Tuple[float, ...] = ()


class DepthFrameProcessor:
    """Runs the pipeline on frames of one stream, keeping the warm-start latent between them."""

    def __init__(self, pipeline: 'MetricGoldPipeline') -> None:
        self.pipeline = pipeline
        self._previous_latent = None

    def reset(self) -> None:
        """Forget the previous frame (stream restarted, resolution changed, seek)."""
        self._previous_latent = None

    def process(self, rgb: np.ndarray, calibration: Optional[Calibration],
                options: FrameOptions) -> FrameResult:
        """Depth and its derived products for one RGB uint8 ``[H,W,3]`` frame.

        ``calibration`` is the frame's camera (None: none known); one that does not fit the
        image gives depth without intrinsics and points (``FrameResult.camera_problem``).
        """
        height, width = rgb.shape[:2]
        if not 0.0 < options.output_scale <= 1.0:
            raise InputError(f'output_scale={options.output_scale}, expected a number in (0, 1]')
        out_h = max(1, round(height * options.output_scale))
        out_w = max(1, round(width * options.output_scale))
        # The depth image's intrinsics, known before any inference time is spent.
        depth_camera, camera_problem = (None, None) if calibration is None else \
            calibration.for_image(out_w, out_h)
        prediction = self.pipeline(
            rgb, denoising_steps=options.denoising_steps, ensemble_size=options.ensemble_size,
            processing_resolution=options.processing_resolution, seed=options.seed,
            init_latent=self._previous_latent if options.warm_start else None,
            warm_start_strength=options.warm_start_strength, output_size=(out_h, out_w))
        self._previous_latent = prediction.depth_latent if options.warm_start else None
        timings = dict(prediction.timings_s)

        colored = None
        if options.colored:
            start = time.perf_counter()
            colored = colorize_depth(prediction.depth, options.color_min_m,
                                     options.color_max_m, options.colormap)
            timings['colorize'] = time.perf_counter() - start
        cloud = None
        if options.points and depth_camera is not None and not prediction.relative:
            start = time.perf_counter()
            colour = None
            if options.points_rgb:
                colour = rgb if (out_h, out_w) == (height, width) else _resize_rgb(
                    rgb, out_w, out_h)
            cloud = depth_to_points(prediction.depth_m, depth_camera, options.points_stride,
                                    options.max_depth_m, colour)
            timings['cloud'] = time.perf_counter() - start
        return FrameResult(
            prediction.depth, prediction.relative,
            prediction.uncertainty if options.uncertainty else None, depth_camera, colored,
            cloud, timings, camera_problem,
            calibration.distortion_model if calibration is not None else 'plumb_bob',
            calibration.d if calibration is not None else ())


def _resize_rgb(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    import cv2

    return cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA)


def frame_messages(types: 'messages.MessageTypes', header: Any,
                   result: FrameResult) -> Dict[str, Any]:
    """ROS messages for ``result`` keyed by output topic (relative to the output namespace).

    ``types`` is :func:`messages.rclpy_types` or :func:`messages.rosbags_types`; every message
    carries ``header`` (the input frame's stamp and frame_id). The depth image shares the
    input image's geometry, so its CameraInfo keeps the input's distortion model and D.
    """
    out: Dict[str, Any] = {'depth/image': messages.depth_image_msg(types, header, result.depth)}
    if result.intrinsics is not None:
        out['depth/camera_info'] = messages.camera_info_msg(
            types, header, result.intrinsics, distortion_model=result.distortion_model,
            d=result.distortion or None)
    if result.colored_bgr is not None:
        out['depth/colored'] = messages.bgr8_image_msg(types, header, result.colored_bgr)
    if result.uncertainty is not None:
        out['depth/uncertainty'] = messages.float_image_msg(types, header, result.uncertainty)
    if result.cloud is not None:
        out['points'] = messages.pointcloud_msg(types, header, result.cloud)
    return out
