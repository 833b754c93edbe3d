"""The depth node's parameters: the table, their validation and the per-frame options.

Nothing here imports rclpy, so all of it is unit-tested without ROS. ``PARAMETERS`` is the
single source of truth for the node's parameters: the node declares exactly these, and the
launch-file and ``config/depth.yaml`` tests check their keys against it.
"""

import math
import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple, Union

from metricgold_ros.colorize import COLORMAPS
from metricgold_ros.constants import DTYPE_CHOICES, LATENT_FACTOR
from metricgold_ros.depth_frame import FrameOptions
from metricgold_ros.image_encodings import DEFAULT_PIXEL_BUDGET

ParamValue = Union[bool, int, float, str, List[str]]

QOS_CHOICES = ('sensor_data', 'reliable')
TRANSPORT_CHOICES = ('raw', 'compressed')  # image_transport's names
_DEVICE_RE = re.compile(r'^(auto|cpu|cuda(:\d+)?)$')


@dataclass(frozen=True)
class ParamSpec:
    """One node parameter: default (its type is the parameter's type), doc and limits.

    ``runtime`` parameters change live (``ros2 param set``); the others are read-only because
    a change would need the model or the subscriptions rebuilt (restart the node).
    """

    name: str
    default: ParamValue
    description: str
    runtime: bool = True
    int_range: Optional[Tuple[int, int]] = None
    float_range: Optional[Tuple[float, float]] = None
    choices: Optional[Tuple[str, ...]] = None


PARAMETERS: Tuple[ParamSpec, ...] = (
    ParamSpec('cameras', [''], 'Names of the camera streams this node serves with one model: '
              'stream NAME subscribes NAME/image and NAME/camera_info and publishes NAME/depth/'
              '... and NAME/points; [\'\'] (default): one stream on image, camera_info, depth/'
              '..., points', runtime=False),
    ParamSpec('autostart', True, 'Configure and activate at start; false: stay unconfigured '
              'for a lifecycle manager (ros2 lifecycle set ... configure / activate)',
              runtime=False),
    ParamSpec('model_path', '', 'The checkpoint: a local folder, or a Hugging Face repo id '
              '(org/name[@revision]) resolved through the hub cache (HF_HOME; downloaded once '
              'at configure, HF_HUB_OFFLINE=1 honoured); empty: the bundled model',
              runtime=False),
    ParamSpec('variant', '', 'Weights variant, as diffusers names it (fp16: '
              '*.fp16.safetensors); empty: the plain weights', runtime=False),
    ParamSpec('decoder', '', 'Light VAE decoder (AutoencoderTiny/TAESD or AutoencoderKL): a '
              'folder or repo id, used for decoding only; empty: the checkpoint\'s VAE',
              runtime=False),
    ParamSpec('device', 'auto', 'auto (first CUDA GPU, else CPU), cpu, cuda or cuda:N',
              runtime=False),
    ParamSpec('dtype', 'auto', 'auto (float16 on CUDA, float32 on CPU), float32, float16, '
              'bfloat16', runtime=False, choices=DTYPE_CHOICES),
    ParamSpec('denoising_steps', 0, 'DDIM steps per frame; 0: the checkpoint default',
              int_range=(0, 50)),
    ParamSpec('ensemble_size', 1, 'Predictions per frame, median-combined; > 1 adds '
              'depth/uncertainty', int_range=(1, 32)),
    ParamSpec('processing_resolution', -1, 'Longer side (px) fed to the model; -1: the '
              'checkpoint default, 0: the input size', int_range=(-1, 4096)),
    ParamSpec('fallback_processing_resolution', 0, 'On out-of-memory, retry the frame once '
              'at this longer side (px, below processing_resolution); 0: skip the frame',
              int_range=(0, 4096)),
    ParamSpec('seed', 0, 'Seed of the initial noise (same frame, same depth); -1: fresh noise '
              'every frame', int_range=(-1, 2 ** 31 - 1)),
    ParamSpec('warm_start', False, 'Start each frame from the previous frame\'s latent'),
    ParamSpec('warm_start_strength', 0.5, 'Share of the schedule re-run on a warm start',
              float_range=(0.05, 1.0)),
    ParamSpec('edge_refine', True, 'Move depth edges onto the image\'s edges with the '
              'checkpoint\'s guided filter (its metricgold.json edge_refine_radius_px; '
              'checkpoints without one: no effect); false: the model\'s depth as is'),
    ParamSpec('output_scale', 1.0, 'Depth size relative to the input image (camera_info and '
              'points follow)', float_range=(0.05, 1.0)),
    ParamSpec('publish_colored', True, 'Publish depth/colored (bgr8 false colour)'),
    ParamSpec('publish_uncertainty', True, 'Publish depth/uncertainty when ensemble_size > 1'),
    ParamSpec('publish_points', True, 'Publish points (needs camera_info)'),
    ParamSpec('points_stride', 1, 'Use every n-th pixel in both directions for points',
              int_range=(1, 64)),
    ParamSpec('points_rgb', False, 'Add the packed rgb field to points'),
    ParamSpec('max_depth', 0.0, 'Points farther than this (m) become NaN; 0: no limit',
              float_range=(0.0, 1.0e4)),
    ParamSpec('colormap', 'turbo', 'OpenCV colormap of depth/colored (turbo, viridis, jet, ...)',
              choices=tuple(sorted(COLORMAPS))),
    ParamSpec('color_min_depth', 0.0, 'Depth (m) at the colormap\'s start; 0: automatic (2nd '
              'percentile)', float_range=(0.0, 1.0e4)),
    ParamSpec('color_max_depth', 0.0, 'Depth (m) at the colormap\'s end; 0: automatic (98th '
              'percentile)', float_range=(0.0, 1.0e4)),
    ParamSpec('camera_height_m', 0.0, 'Camera (optical centre) height above a level floor, '
              'metres: the floor then fixes the metric scale (ground fit, depth/scale); 0: off',
              float_range=(0.0, 100.0)),
    ParamSpec('camera_pitch_deg', 0.0, 'Optical axis below the horizon, degrees (positive: '
              'looking down)', float_range=(-90.0, 90.0)),
    ParamSpec('camera_roll_deg', 0.0, 'Camera turned about its optical axis, degrees '
              '(positive: the image\'s right side dips)', float_range=(-180.0, 180.0)),
    ParamSpec('max_pixels', DEFAULT_PIXEL_BUDGET, 'Images with more pixels are refused before any '
              'allocation', runtime=False, int_range=(1, 2 ** 31 - 1)),
    ParamSpec('max_work_megapixels', 32.0, 'Work budget of one frame: processed pixels (the '
              'longer side squared; max_pixels at processing_resolution 0) x ensemble_size, '
              'in megapixels; settings over it are refused when set, so no parameter change '
              'can make a frame exhaust memory', runtime=False, float_range=(0.01, 1.0e4)),
    ParamSpec('batch_wait_ms', 0.0, 'When the model is free and some cameras have a frame '
              'waiting, wait at most this long for the others to join the batch; 0: take what '
              'is there', float_range=(0.0, 1000.0)),
    ParamSpec('max_batch_size', 0, 'At most this many cameras\' frames in one batch (the '
              'cameras take turns); 0: every waiting frame', int_range=(0, 256)),
    ParamSpec('image_transport', 'raw', 'Input transport, named as image_transport names it: '
              'raw (sensor_msgs/Image on image) or compressed (sensor_msgs/CompressedImage, '
              'jpeg or png, on <image>/compressed)', runtime=False, choices=TRANSPORT_CHOICES),
    ParamSpec('qos', 'sensor_data', 'QoS of the image and camera_info subscriptions: '
              'sensor_data (best effort, REP 2003: matches every camera driver) or reliable',
              runtime=False, choices=QOS_CHOICES),
    ParamSpec('output_qos', 'reliable', 'QoS of the outputs: reliable (REP 2003: serves '
              'reliable and best-effort subscribers) or sensor_data (best effort)',
              runtime=False, choices=QOS_CHOICES),
    ParamSpec('stats_period', 10.0, 'Seconds between info-level summaries and /diagnostics; '
              '0: off', runtime=False, float_range=(0.0, 3600.0)),
    ParamSpec('publish_diagnostics', True, 'Publish diagnostic_msgs/DiagnosticArray on '
              '/diagnostics every stats_period', runtime=False),
)
SPECS: Dict[str, ParamSpec] = {spec.name: spec for spec in PARAMETERS}
# What each stream (camera) may set for itself as <stream>.<name>; unset: the node's value.
STREAM_PARAMETERS: Tuple[str, ...] = ('camera_height_m', 'camera_pitch_deg', 'camera_roll_deg')
_STREAM_NAME_RE = re.compile(r'^[A-Za-z][A-Za-z0-9_]*(/[A-Za-z][A-Za-z0-9_]*)*$')


def stream_parameter(stream: str, name: str) -> str:
    """The name of stream ``stream``'s own ``name`` (``front.camera_height_m``)."""
    return f'{stream.replace("/", ".")}.{name}'


def split_stream_parameter(full_name: str, streams: Tuple[str, ...]
                           ) -> Optional[Tuple[str, str]]:
    """``(stream, name)`` of a per-stream parameter name, or None for a node parameter."""
    for stream in streams:
        for name in STREAM_PARAMETERS:
            if stream and full_name == stream_parameter(stream, name):
                return stream, name
    return None


def check_cameras(cameras: List[str]) -> Optional[str]:
    """Why the ``cameras`` list is refused, or None."""
    if cameras == ['']:
        return None
    if not cameras:
        return "cameras: empty; give at least one name, or [''] for one unnamed stream"
    for name in cameras:
        if not _STREAM_NAME_RE.match(name):
            return (f'cameras: {name!r} is not a stream name; use letters, digits and _ '
                    "(starting with a letter, '/' between parts), e.g. front, rear, arm/wrist; "
                    "[''] alone for one unnamed stream")
    if len(set(cameras)) != len(cameras):
        return f'cameras: {cameras} names a camera twice; each stream once'
    return None


def check_parameter(name: str, value: ParamValue, values: Mapping[str, ParamValue]
                    ) -> Optional[str]:
    """Why ``name := value`` is refused (type, range, choice), or None when it is fine.

    ``values`` are the other parameters' current values (for rules spanning two parameters).
    """
    spec = SPECS.get(name)
    if spec is None:
        return None  # not ours (use_sim_time, ...)
    if type(value) is not type(spec.default):
        return (f'{name}: {value!r} is a {type(value).__name__}; expected '
                f'{type(spec.default).__name__}')
    if name == 'cameras':
        return check_cameras(value)
    limits = spec.int_range or spec.float_range
    if limits is not None and not limits[0] <= value <= limits[1]:
        return f'{name}: {value} is outside [{limits[0]}, {limits[1]}]'
    if spec.choices is not None and value not in spec.choices:
        return f'{name}: {value!r} is not one of {", ".join(spec.choices)}'
    if name == 'device' and not _DEVICE_RE.match(value):
        return f"device: {value!r} is not valid; use auto, cpu, cuda or cuda:N"
    if name == 'fallback_processing_resolution' and 0 < value < LATENT_FACTOR:
        return (f'fallback_processing_resolution: {value} px is too small; use 0 (skip the '
                f'frame) or >= {LATENT_FACTOR}')
    if name in ('processing_resolution', 'ensemble_size', 'max_pixels', 'max_work_megapixels'):
        return check_work({**values, name: value})
    if name in ('color_min_depth', 'color_max_depth'):
        low = value if name == 'color_min_depth' else values['color_min_depth']
        high = value if name == 'color_max_depth' else values['color_max_depth']
        if low > 0 and high > 0 and not low < high:
            return (f'color_min_depth {low} must be < color_max_depth {high} (0 for an '
                    'automatic end)')
    return None


def work_megapixels(values: Mapping[str, ParamValue],
                    default_resolution: Optional[int] = None) -> Optional[float]:
    """Pixels x ensemble members one frame asks of the model, in megapixels (an upper bound:
    the longer side squared); None when it depends on a checkpoint default not known here."""
    resolution = values['processing_resolution']
    if resolution < 0:
        resolution = default_resolution
    if resolution is None:
        return None
    pixels = values['max_pixels'] if resolution == 0 else resolution * resolution
    return pixels * values['ensemble_size'] / 1e6


def check_work(values: Mapping[str, ParamValue],
               default_resolution: Optional[int] = None) -> Optional[str]:
    """Why ``values`` ask more of one frame than ``max_work_megapixels``, or None."""
    work = work_megapixels(values, default_resolution)
    budget = values['max_work_megapixels']
    if work is None or work <= budget:
        return None
    resolution = values['processing_resolution']
    side = (f'processing_resolution {resolution}' if resolution >= 0 else
            f"the checkpoint's processing resolution {default_resolution}")
    if resolution == 0:
        side = f'processing_resolution 0 (input size, up to max_pixels {values["max_pixels"]})'
    return (f'{side} x ensemble_size {values["ensemble_size"]} is {work:.1f} megapixels of '
            f'work per frame, over max_work_megapixels {budget:g}: lower processing_resolution '
            'or ensemble_size (max_work_megapixels is read-only: raise it at start only if the '
            'device holds that much)')


def frame_options(values: Mapping[str, ParamValue],
                  stream: Optional[Mapping[str, ParamValue]] = None) -> FrameOptions:
    """The per-frame options for the node's parameter ``values`` (by name); ``stream`` holds a
    stream's own values of :data:`STREAM_PARAMETERS` (those it set), which win."""
    if stream:
        values = {**values, **stream}
    return FrameOptions(
        denoising_steps=values['denoising_steps'] or None,
        ensemble_size=values['ensemble_size'],
        processing_resolution=(None if values['processing_resolution'] < 0
                               else values['processing_resolution']),
        seed=None if values['seed'] < 0 else values['seed'],
        warm_start=values['warm_start'],
        warm_start_strength=values['warm_start_strength'],
        edge_refine=values['edge_refine'],
        output_scale=values['output_scale'],
        colored=values['publish_colored'],
        colormap=values['colormap'],
        color_min_m=values['color_min_depth'] or None,
        color_max_m=values['color_max_depth'] or None,
        points=values['publish_points'],
        points_stride=values['points_stride'],
        points_rgb=values['points_rgb'],
        max_depth_m=values['max_depth'] or math.inf,
        uncertainty=values['publish_uncertainty'],
        camera_height_m=values['camera_height_m'],
        camera_pitch_deg=values['camera_pitch_deg'],
        camera_roll_deg=values['camera_roll_deg'])
