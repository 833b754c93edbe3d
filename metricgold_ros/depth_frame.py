"""One camera frame -> every output the node and the bag tool publish (one implementation).

``DepthFrameProcessor.process`` runs the pipeline and derives the depth image, uncertainty,
colour visualisation, the intrinsics of the depth image and the point cloud as numpy arrays;
``frame_messages`` turns them into ROS messages of either type system (rclpy or rosbags), all
stamped with the input frame's header. Neither imports rclpy.

The CameraInfo policy (:mod:`metricgold_ros.camera`) is applied here, once per frame: a
calibration that cannot serve this image leaves depth untouched and ``FrameResult.
camera_problem`` says why there are no points; the adapters report it.

So are the metric-scale corrections (:mod:`metricgold_ros.metric_scale`), right after the
pipeline and before anything is derived from depth: a camera-aware checkpoint's ``f / f_c``
and the ground fit from the camera's mounting, which also turns a relative checkpoint's depth
into metres (and so gives it points) when the floor is found.
"""

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from metricgold_ros import messages
from metricgold_ros.camera import Calibration, Intrinsics
from metricgold_ros.colorize import colorize_depth
from metricgold_ros.errors import InputError
from metricgold_ros.ground import Mounting
from metricgold_ros.metric_scale import MetricScale, MetricScaler
from metricgold_ros.pointcloud import Cloud, depth_to_points

if TYPE_CHECKING:
    from metricgold_ros.model import MetricGoldPipeline
    from metricgold_ros.model.pipeline import DepthPrediction

@dataclass
class FrameOptions:
    """Per-frame choices; the node maps its parameters onto these, the bag tool its flags."""

    denoising_steps: Optional[int] = None  # None: the checkpoint's default
    ensemble_size: int = 1
    processing_resolution: Optional[int] = None  # None: the checkpoint's default
    seed: Optional[int] = 0
    warm_start: bool = False
    warm_start_strength: float = 0.5
    edge_refine: bool = True  # the checkpoint's guided filter onto the image's edges
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
    camera_height_m: float = 0.0  # mounting over a level floor; 0: no ground fit
    camera_pitch_deg: float = 0.0  # optical axis below the horizon (positive: looking down)
    camera_roll_deg: float = 0.0  # turn about the optical axis (positive: right side down)
    scale_filter: bool = True  # smooth the fitted scale over the stream (video)

    def mounting(self) -> Mounting:
        """The camera's mounting (InputError naming the option when impossible)."""
        return Mounting(self.camera_height_m, self.camera_pitch_deg, self.camera_roll_deg)


@dataclass
class FrameResult:
    """Outputs of one frame, at the depth image's size ``[H,W]``.

    ``intrinsics`` describe the depth image (``None`` without a usable calibration, then
    ``camera_problem`` says why when there was one); ``cloud`` is ``None`` without intrinsics,
    for relative depth, or when points are off. ``relative`` is True when ``depth`` has no
    metric scale: a relative checkpoint whose ground fit did not succeed (with one, depth is
    metres). ``scale`` says how the depth got its scale. ``distortion_model``/``distortion``
    are the input calibration's: the depth image shares the input image's geometry.
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
    scale: Optional[MetricScale] = None


class DepthFrameProcessor:
    """Runs the pipeline on frames of one stream, keeping the warm-start latent between them.

    Streams (cameras) sharing one pipeline each have their own processor; :func:`process_frames`
    runs the frames of several in one batch.
    """

    def __init__(self, pipeline: 'MetricGoldPipeline') -> None:
        self.pipeline = pipeline
        self._previous_latent = None
        self._scaler = MetricScaler()

    def reset(self) -> None:
        """Forget the previous frame and the stream's scale (restart, new resolution, seek)."""
        self._previous_latent = None
        self._scaler.reset()

    def process(self, rgb: np.ndarray, calibration: Optional[Calibration],
                options: FrameOptions) -> FrameResult:
        """Depth and its derived products for one RGB uint8 ``[H,W,3]`` frame.

        ``calibration`` is the frame's camera (None: none known); one that does not fit the
        image gives depth without intrinsics and points (``FrameResult.camera_problem``).
        """
        return process_frames([FrameJob(self, rgb, calibration, options)])[0]

    def _finish(self, job: 'FrameJob', prepared: '_Prepared',
                prediction: 'DepthPrediction') -> FrameResult:
        """The frame's outputs from its prediction: metric scale, colours, points."""
        rgb, options = job.rgb, job.options
        height, width = rgb.shape[:2]
        out_h, out_w = prepared.output_size
        depth_camera = prepared.depth_camera
        self._previous_latent = prediction.depth_latent if options.warm_start else None
        timings = dict(prediction.timings_s)

        # Metric scale: a camera-aware checkpoint's f / f_c, then the ground fit.
        start = time.perf_counter()
        resolution = options.processing_resolution
        if resolution is None:
            resolution = self.pipeline.metadata.default_processing_resolution
        depth, uncertainty, scale = self._scaler.correct(
            prediction.depth, prediction.uncertainty if options.uncertainty else None,
            relative=prediction.relative, camera=depth_camera, image_size=(width, height),
            processing_resolution=resolution, metadata=self.pipeline.metadata,
            mounting=prepared.mounting, use_filter=options.scale_filter)
        timings['metric_scale'] = time.perf_counter() - start

        colored = None
        if options.colored:
            start = time.perf_counter()
            colored = colorize_depth(depth, options.color_min_m, options.color_max_m,
                                     options.colormap)
            timings['colorize'] = time.perf_counter() - start
        cloud = None
        if options.points and depth_camera is not None and scale.metric:
            start = time.perf_counter()
            colour = None
            if options.points_rgb:
                colour = rgb if (out_h, out_w) == (height, width) else _resize_rgb(
                    rgb, out_w, out_h)
            cloud = depth_to_points(depth, depth_camera, options.points_stride,
                                    options.max_depth_m, colour)
            timings['cloud'] = time.perf_counter() - start
        calibration = job.calibration
        return FrameResult(
            depth, not scale.metric, uncertainty, depth_camera, colored, cloud, timings,
            prepared.camera_problem,
            calibration.distortion_model if calibration is not None else 'plumb_bob',
            calibration.d if calibration is not None else (), scale)


@dataclass
class FrameJob:
    """One frame of one stream for :func:`process_frames`: RGB uint8 ``[H,W,3]``, its camera
    (None: none known) and the options of its stream."""

    processor: DepthFrameProcessor
    rgb: np.ndarray
    calibration: Optional[Calibration]
    options: FrameOptions


@dataclass(frozen=True)
class _Prepared:
    """What a frame needs before inference: checked options and the depth image's camera."""

    output_size: Tuple[int, int]  # (H, W) of the depth image
    mounting: Mounting
    depth_camera: Optional[Intrinsics]
    camera_problem: Optional[str]


def _prepare(job: FrameJob) -> _Prepared:
    """Check a frame's options and find the depth image's intrinsics, before any inference."""
    options = job.options
    height, width = job.rgb.shape[:2]
    if not 0.0 < options.output_scale <= 1.0:
        raise InputError(f'output_scale={options.output_scale}, expected a number in (0, 1]')
    out_h = max(1, round(height * options.output_scale))
    out_w = max(1, round(width * options.output_scale))
    mounting = options.mounting()
    depth_camera, camera_problem = (None, None) if job.calibration is None else \
        job.calibration.for_image(out_w, out_h)
    return _Prepared((out_h, out_w), mounting, depth_camera, camera_problem)


def _inference_key(options: FrameOptions) -> Tuple[Any, ...]:
    """The options one pipeline call shares: frames that agree on them can run as a batch."""
    return (options.denoising_steps, options.ensemble_size, options.processing_resolution,
            options.warm_start_strength, options.edge_refine)


def process_frames(jobs: Sequence[FrameJob]) -> List[FrameResult]:
    """Depth and derived products for frames of several streams sharing one pipeline.

    Frames whose inference options agree go through the pipeline as one batch
    (:meth:`~metricgold_ros.model.MetricGoldPipeline.predict_batch`, which runs images of one
    processing size together); each frame keeps its own stream's warm start, scale filter and
    camera. Bad options raise before any inference (InputError naming the option).
    """
    if not jobs:
        return []
    pipeline = jobs[0].processor.pipeline
    if any(job.processor.pipeline is not pipeline for job in jobs):
        raise InputError('process_frames: the frames\' processors use different pipelines; '
                         'batch only the streams of one pipeline')
    prepared = [_prepare(job) for job in jobs]
    groups: Dict[Tuple[Any, ...], List[int]] = {}
    for index, job in enumerate(jobs):
        groups.setdefault(_inference_key(job.options), []).append(index)
    predictions: List[Optional['DepthPrediction']] = [None] * len(jobs)
    for indices in groups.values():
        options = jobs[indices[0]].options
        batch = pipeline.predict_batch(
            [jobs[i].rgb for i in indices], denoising_steps=options.denoising_steps,
            ensemble_size=options.ensemble_size,
            processing_resolution=options.processing_resolution,
            seeds=[jobs[i].options.seed for i in indices],
            init_latents=[jobs[i].processor._previous_latent if jobs[i].options.warm_start
                          else None for i in indices],
            warm_start_strength=options.warm_start_strength,
            output_sizes=[prepared[i].output_size for i in indices],
            edge_refine=options.edge_refine)
        for i, prediction in zip(indices, batch):
            predictions[i] = prediction
    return [job.processor._finish(job, ready, prediction)
            for job, ready, prediction in zip(jobs, prepared, predictions)]


def _resize_rgb(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    import cv2

    return cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA)


@dataclass(frozen=True)
class Output:
    """One output topic: its name (relative to the adapter's output namespace), its message
    type (an attribute of :class:`messages.MessageTypes`) and the builder of its message for a
    frame (None: nothing to publish for this frame)."""

    topic: str
    msg_type: str
    build: Callable[['messages.MessageTypes', Any, FrameResult], Optional[Any]]


def _depth_image(types: 'messages.MessageTypes', header: Any, result: FrameResult) -> Any:
    return messages.depth_image_msg(types, header, result.depth)


def _depth_camera_info(types: 'messages.MessageTypes', header: Any,
                       result: FrameResult) -> Optional[Any]:
    """The depth image shares the input image's geometry: the input's distortion model and D."""
    if result.intrinsics is None:
        return None
    return messages.camera_info_msg(types, header, result.intrinsics,
                                    distortion_model=result.distortion_model,
                                    d=result.distortion or None)


def _colored(types: 'messages.MessageTypes', header: Any, result: FrameResult) -> Optional[Any]:
    if result.colored_bgr is None:
        return None
    return messages.bgr8_image_msg(types, header, result.colored_bgr)


def _uncertainty(types: 'messages.MessageTypes', header: Any,
                 result: FrameResult) -> Optional[Any]:
    if result.uncertainty is None:
        return None
    return messages.float_image_msg(types, header, result.uncertainty)


def _points(types: 'messages.MessageTypes', header: Any, result: FrameResult) -> Optional[Any]:
    if result.cloud is None:
        return None
    return messages.pointcloud_msg(types, header, result.cloud)


def _scale(types: 'messages.MessageTypes', header: Any, result: FrameResult) -> Optional[Any]:
    """Only while a metric-scale correction is configured (``MetricScale.active``)."""
    if result.scale is None or not result.scale.active:
        return None
    return messages.scale_msg(types, header, result.scale)


# Every output the adapters publish or write, in order: adding one is one line here.
OUTPUTS: Tuple[Output, ...] = (
    Output('depth/image', 'Image', _depth_image),
    Output('depth/camera_info', 'CameraInfo', _depth_camera_info),
    Output('depth/colored', 'Image', _colored),
    Output('depth/uncertainty', 'Image', _uncertainty),
    Output('points', 'PointCloud2', _points),
    Output('depth/scale', 'DiagnosticArray', _scale),
)
OUTPUT_TOPICS: Tuple[str, ...] = tuple(output.topic for output in OUTPUTS)


def frame_messages(types: 'messages.MessageTypes', header: Any,
                   result: FrameResult) -> Dict[str, Any]:
    """ROS messages for ``result`` keyed by output topic (relative to the output namespace).

    ``types`` is :func:`messages.rclpy_types` or :func:`messages.rosbags_types`; every message
    carries ``header`` (the input frame's stamp and frame_id).
    """
    built = ((output.topic, output.build(types, header, result)) for output in OUTPUTS)
    return {topic: msg for topic, msg in built if msg is not None}
