"""The depth node's plain-Python parts: parameter table, mailbox, stats, rate limiting.

Nothing here imports rclpy, so all of it is unit-tested without ROS. ``PARAMETERS`` is the
single source of truth for the node's parameters: the node declares exactly these, and the
launch-file and ``config/depth.yaml`` tests check their keys against it.
"""

import math
import re
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import (Any, Callable, Deque, Dict, Generic, List, Mapping, Optional, Tuple,
                    TypeVar, Union)

import numpy as np

from metricgold_ros.colorize import COLORMAPS
from metricgold_ros.depth_frame import FrameOptions
from metricgold_ros.errors import InputError
from metricgold_ros.image_encodings import DEFAULT_PIXEL_BUDGET

ParamValue = Union[bool, int, float, str]
T = TypeVar('T')

QOS_CHOICES = ('sensor_data', 'reliable')
DTYPE_CHOICES = ('auto', 'float32', 'float16', 'bfloat16')
_DEVICE_RE = re.compile(r'^(auto|cpu|cuda(:\d+)?)$')
LATENT_FACTOR = 8  # the VAE's downsampling: the smallest processing resolution
FAULT_ENV = 'METRICGOLD_FAULT'  # debug only: see FaultInjector


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
    ParamSpec('model_path', '', 'Local MetricGold checkpoint folder; empty: the bundled model',
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
    ParamSpec('max_pixels', DEFAULT_PIXEL_BUDGET, 'Images with more pixels are refused before any '
              'allocation', int_range=(1, 2 ** 31 - 1)),
    ParamSpec('qos', 'sensor_data', 'QoS of the image and camera_info subscriptions: '
              'sensor_data (best effort) or reliable', runtime=False, choices=QOS_CHOICES),
    ParamSpec('output_qos', 'sensor_data', 'QoS of the outputs: sensor_data (best effort) or '
              'reliable (also serves reliable subscribers)', runtime=False, choices=QOS_CHOICES),
    ParamSpec('stats_period', 10.0, 'Seconds between info-level summaries and /diagnostics; '
              '0: off', runtime=False, float_range=(0.0, 3600.0)),
    ParamSpec('publish_diagnostics', True, 'Publish diagnostic_msgs/DiagnosticArray on '
              '/diagnostics every stats_period', runtime=False),
)
PARAMETER_NAMES: Tuple[str, ...] = tuple(spec.name for spec in PARAMETERS)
SPECS: Dict[str, ParamSpec] = {spec.name: spec for spec in PARAMETERS}


def default_values() -> Dict[str, ParamValue]:
    """Every parameter's default value, by name."""
    return {spec.name: spec.default for spec in PARAMETERS}


def check_parameter(name: str, value: Any, values: Mapping[str, Any]) -> Optional[str]:
    """Why ``name := value`` is refused (type, range, choice), or None when it is fine.

    ``values`` are the other parameters' current values (for rules spanning two parameters).
    """
    spec = SPECS.get(name)
    if spec is None:
        return None  # not ours (use_sim_time, ...)
    if type(value) is not type(spec.default):
        return (f'{name}: {value!r} is a {type(value).__name__}; expected '
                f'{type(spec.default).__name__}')
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
    if name in ('color_min_depth', 'color_max_depth'):
        low = value if name == 'color_min_depth' else values['color_min_depth']
        high = value if name == 'color_max_depth' else values['color_max_depth']
        if low > 0 and high > 0 and not low < high:
            return (f'color_min_depth {low} must be < color_max_depth {high} (0 for an '
                    'automatic end)')
    return None


def frame_options(values: Mapping[str, Any]) -> FrameOptions:
    """The per-frame options for the node's parameter ``values`` (by name)."""
    return FrameOptions(
        denoising_steps=values['denoising_steps'] or None,
        ensemble_size=values['ensemble_size'],
        processing_resolution=(None if values['processing_resolution'] < 0
                               else values['processing_resolution']),
        seed=None if values['seed'] < 0 else values['seed'],
        warm_start=values['warm_start'],
        warm_start_strength=values['warm_start_strength'],
        output_scale=values['output_scale'],
        colored=values['publish_colored'],
        colormap=values['colormap'],
        color_min_m=values['color_min_depth'] or None,
        color_max_m=values['color_max_depth'] or None,
        points=values['publish_points'],
        points_stride=values['points_stride'],
        points_rgb=values['points_rgb'],
        max_depth_m=values['max_depth'] or math.inf)


class Mailbox(Generic[T]):
    """A one-slot queue: ``put`` replaces a waiting item (counted), ``take`` waits for one.

    The camera callback never blocks and latency stays bounded: the worker always gets the
    newest frame, and a frame that waited while the model ran is dropped.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: Optional[T] = None
        self._full = False
        self._closed = False
        self.dropped = 0

    def put(self, item: T) -> bool:
        """Store ``item``; True when it replaced one nobody took (a dropped frame)."""
        with self._cond:
            replaced = self._full
            if replaced:
                self.dropped += 1
            self._item, self._full = item, True
            self._cond.notify()
            return replaced

    def take(self, timeout_s: Optional[float] = None) -> Optional[T]:
        """The waiting item (emptying the slot), or None on timeout or once closed."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._full or self._closed, timeout_s):
                return None
            if self._closed:
                return None
            item, self._item, self._full = self._item, None, False
            return item

    def close(self) -> None:
        """Wake the waiting ``take`` for good (shutdown)."""
        with self._cond:
            self._closed = True
            self._item, self._full = None, False
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return int(self._full)


@dataclass(frozen=True)
class StatsSnapshot:
    """Counters since start and, over the last period, latency and per-stage time."""

    received: int
    published: int
    dropped: int
    idle: int
    errors: int
    period_s: float
    period_published: int
    period_errors: int  # input errors and inference failures
    latency_p50_ms: float  # stamp -> publish, NaN when nothing was published in the period
    latency_p95_ms: float
    stage_ms: Dict[str, float]  # mean wall time of each stage over the period
    failed: int = 0  # frames whose inference raised (out of memory, ...)
    retried: int = 0  # of those, frames published after a retry at the fallback resolution

    def summary(self) -> str:
        """One log line."""
        rate = self.period_published / self.period_s if self.period_s > 0 else 0.0
        text = (f'frames in {self.received}, out {self.published} ({rate:.2f} Hz), dropped '
                f'{self.dropped}, idle {self.idle} (no subscribers), errors {self.errors}')
        if self.failed:
            text += (f', inference failures {self.failed} ({self.retried} retried at the '
                     'fallback resolution)')
        if self.period_published == 0:
            return text + '; nothing published in this period'
        stages = ', '.join(f'{name} {ms:.1f}' for name, ms in self.stage_ms.items())
        return (f'{text}; stamp->publish p50 {self.latency_p50_ms:.0f} ms, p95 '
                f'{self.latency_p95_ms:.0f} ms; stage ms: {stages}')

    def key_values(self) -> List[Tuple[str, str]]:
        """(key, value) pairs for a DiagnosticStatus."""
        pairs = [('frames received', str(self.received)), ('frames published',
                  str(self.published)), ('frames dropped', str(self.dropped)),
                 ('frames skipped (no subscribers)', str(self.idle)),
                 ('errors', str(self.errors)),
                 ('inference failures', str(self.failed)),
                 ('retried at fallback resolution', str(self.retried)),
                 ('publish rate (Hz)', f'{self.period_published / max(self.period_s, 1e-9):.2f}'),
                 ('latency p50 (ms)', f'{self.latency_p50_ms:.1f}'),
                 ('latency p95 (ms)', f'{self.latency_p95_ms:.1f}')]
        return pairs + [(f'{name} (ms)', f'{ms:.1f}') for name, ms in self.stage_ms.items()]


class FrameStats:
    """Thread-safe counters and a bounded window of latencies and stage times."""

    COUNTERS = ('received', 'published', 'dropped', 'idle', 'errors', 'failed', 'retried')

    def __init__(self, window: int = 1000, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._counts = dict.fromkeys(self.COUNTERS, 0)
        self._latencies_s: Deque[float] = deque(maxlen=window)
        self._stage_sum_s: Dict[str, float] = {}
        self._period_start = clock()
        self._period_published = 0
        self._period_errors = 0
        self._period_stage_frames = 0

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to counter ``name`` (one of ``COUNTERS``)."""
        with self._lock:
            self._counts[name] += n
            if name in ('errors', 'failed'):
                self._period_errors += n

    def record(self, latency_s: float, timings_s: Mapping[str, float]) -> None:
        """One published frame: its stamp->publish latency and the time of each stage."""
        with self._lock:
            self._counts['published'] += 1
            self._period_published += 1
            self._latencies_s.append(latency_s)
            self._period_stage_frames += 1
            for stage, seconds in timings_s.items():
                self._stage_sum_s[stage] = self._stage_sum_s.get(stage, 0.0) + seconds

    def snapshot(self, reset: bool = True) -> StatsSnapshot:
        """Counters and the period's figures; ``reset`` starts a new period."""
        with self._lock:
            now = self._clock()
            lat_ms = np.asarray(self._latencies_s, dtype=np.float64) * 1e3
            p50, p95 = (np.percentile(lat_ms, [50, 95]) if lat_ms.size else (math.nan,) * 2)
            frames = max(self._period_stage_frames, 1)
            snap = StatsSnapshot(
                period_s=now - self._period_start, period_published=self._period_published,
                period_errors=self._period_errors, latency_p50_ms=float(p50),
                latency_p95_ms=float(p95),
                stage_ms={k: v * 1e3 / frames for k, v in self._stage_sum_s.items()},
                **self._counts)
            if reset:
                self._latencies_s.clear()
                self._stage_sum_s = {}
                self._period_start = now
                self._period_published = self._period_errors = self._period_stage_frames = 0
            return snap


class RateLimiter:
    """At most one report per key every ``period_s``, counting what it held back.

    Keys are e.g. (topic, message): each distinct problem is reported promptly, a stream of
    the same bad frame once per period. Bounded: the oldest keys are forgotten.
    """

    def __init__(self, period_s: float = 5.0, max_keys: int = 256,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.period_s = period_s
        self._max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: 'OrderedDict[Any, List[float]]' = OrderedDict()  # key -> [last, held]

    def check(self, key: Any) -> Optional[int]:
        """None to stay silent, else how many reports of ``key`` were held back since the last."""
        now = self._clock()
        with self._lock:
            entry = self._keys.get(key)
            if entry is not None and now - entry[0] < self.period_s:
                entry[1] += 1
                return None
            held = int(entry[1]) if entry is not None else 0
            self._keys[key] = [now, 0]
            self._keys.move_to_end(key)
            while len(self._keys) > self._max_keys:
                self._keys.popitem(last=False)
            return held


class StampCache(Generic[T]):
    """The last few items (CameraInfo) by stamp, to pair an image with the info of its stamp."""

    def __init__(self, size: int = 32) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._items: 'OrderedDict[int, T]' = OrderedDict()
        self._latest: Optional[T] = None

    def add(self, stamp_ns: int, item: T) -> None:
        """Remember ``item`` as the one for ``stamp_ns`` and as the latest."""
        with self._lock:
            self._items[stamp_ns] = item
            self._items.move_to_end(stamp_ns)
            while len(self._items) > self._size:
                self._items.popitem(last=False)
            self._latest = item

    def match(self, stamp_ns: int) -> Optional[T]:
        """The item of exactly ``stamp_ns``, else the latest one, else None."""
        with self._lock:
            return self._items.get(stamp_ns, self._latest)

    def forget_all_but(self, stamp_ns: int) -> None:
        """Keep only the item of exactly ``stamp_ns`` (if any): the stream restarted."""
        with self._lock:
            kept = self._items.get(stamp_ns)
            self._items.clear()
            self._latest = kept
            if kept is not None:
                self._items[stamp_ns] = kept


def stamp_ns(stamp: Any) -> int:
    """Integer nanoseconds of a ``builtin_interfaces/Time``."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


PIPELINE_STAGES = ('preprocess', 'vae_encode', 'unet', 'vae_decode', 'postprocess')


class FaultInjector:
    """DEBUG ONLY: real faults before pipeline stages, for tests and fault drills.

    Built from the ``METRICGOLD_FAULT`` environment variable and installed through the
    pipeline's ``stage_hook``. A spec is ``STAGE:KIND[:every=N][:times=N]``, several joined by
    ``,``; e.g. ``vae_decode:oom:every=3`` raises ``torch.OutOfMemoryError`` (what CUDA raises)
    before every third VAE decode. STAGE is one of :data:`PIPELINE_STAGES`; KIND is ``oom``,
    ``error`` (a RuntimeError) or ``sleep=S`` (the stage takes S more seconds). ``every=N``
    counts the calls of that stage (default 1: every call), ``times=N`` stops after N faults.
    """

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self._rules: List[Dict[str, Any]] = [self._parse(part.strip())
                                             for part in spec.split(',') if part.strip()]
        if not self._rules:
            raise InputError(f'{FAULT_ENV}={spec!r} is empty; unset it, or see '
                             'node_support.FaultInjector for the syntax')
        self._calls: Dict[str, int] = {}
        self._lock = threading.Lock()
        self.injected = 0

    def _parse(self, part: str) -> Dict[str, Any]:
        fields = part.split(':')
        usage = (f'{FAULT_ENV}: {part!r} is not STAGE:KIND[:every=N][:times=N] with STAGE one '
                 f'of {", ".join(PIPELINE_STAGES)} and KIND oom, error or sleep=SECONDS')
        if len(fields) < 2 or fields[0] not in PIPELINE_STAGES:
            raise InputError(usage)
        rule: Dict[str, Any] = {'stage': fields[0], 'kind': fields[1], 'every': 1,
                                'times': None, 'sleep_s': 0.0, 'done': 0}
        try:
            if fields[1].startswith('sleep='):
                rule['kind'], rule['sleep_s'] = 'sleep', float(fields[1][len('sleep='):])
                if not 0.0 <= rule['sleep_s'] <= 3600.0:
                    raise ValueError(fields[1])
            elif fields[1] not in ('oom', 'error'):
                raise ValueError(fields[1])
            for option in fields[2:]:
                key, value = option.split('=', 1)
                if key not in ('every', 'times') or int(value) < 1:
                    raise ValueError(option)
                rule[key] = int(value)
        except ValueError as err:
            raise InputError(usage) from err
        return rule

    def __call__(self, stage: str) -> None:
        """The stage hook: count the call, and fail (or stall) when a rule says so."""
        with self._lock:
            calls = self._calls[stage] = self._calls.get(stage, 0) + 1
            due = [rule for rule in self._rules if rule['stage'] == stage
                   and calls % rule['every'] == 0
                   and (rule['times'] is None or rule['done'] < rule['times'])]
            for rule in due:
                rule['done'] += 1
                self.injected += 1
        for rule in due:
            if rule['kind'] == 'sleep':
                time.sleep(rule['sleep_s'])
                continue
            text = (f'injected by {FAULT_ENV}={self.spec!r} before {stage} (call {calls})')
            if rule['kind'] == 'oom':
                import torch

                raise torch.OutOfMemoryError(f'CUDA out of memory (simulated): {text}')
            raise RuntimeError(f'simulated failure: {text}')
