"""One camera stream of the depth node: its topics, CameraInfo, frame state and statistics.

A :class:`Stream` holds everything that is per camera (the node holds one model for all):
the CameraInfo cache it pairs images with, its frame processor (warm-start latent, ground fit
and scale filter), its own mounting overrides, statistics, the last image size and metric
scale, and its ROS handles (publishers while configured, subscriptions while active).
Topics of stream ``front`` are ``front/image``, ``front/camera_info``, ``front/depth/...`` and
``front/points``; the unnamed stream ``''`` uses ``image``, ``camera_info``, ... as a
single-camera node always has.
"""

import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from diagnostic_msgs.msg import DiagnosticStatus, KeyValue
from sensor_msgs.msg import CameraInfo, CompressedImage, Image

from metricgold_ros.camera import Calibration
from metricgold_ros.depth_frame import DepthFrameProcessor
from metricgold_ros.faults import GuardedProcessor
from metricgold_ros.metric_scale import MetricScale
from metricgold_ros.node.parameters import ParamValue
from metricgold_ros.node.runtime import FrameStats, StampCache, StatsSnapshot

INPUT_TOPICS = ('image', 'camera_info')  # each stream's inputs, relative to its namespace


@dataclass
class Frame:
    """A received image waiting in its stream's mailbox."""

    msg: Union[Image, CompressedImage]
    received_s: float  # time.monotonic() at receipt


class Stream:
    """The per-camera part of the depth node (see the module docstring)."""

    def __init__(self, name: str, guard: GuardedProcessor) -> None:
        self.name = name
        self.guard = guard
        self.overrides: Dict[str, ParamValue] = {}  # <name>.camera_height_m etc. that are set
        self.infos: StampCache[Calibration] = StampCache()
        self.stats = FrameStats()
        self.image_size: Optional[Tuple[int, int]] = None  # (width, height) of the last frame
        self.scale: Optional[MetricScale] = None  # the last frame's, for /diagnostics
        self.got_frame = False
        self.last_frame_s: Optional[float] = None  # time.monotonic() of the last image
        self.started_s = time.monotonic()
        self.publishers: Dict[str, Any] = {}
        self.image_sub: Any = None
        self.info_sub: Any = None

    @property
    def processor(self) -> DepthFrameProcessor:
        """The stream's frame processor (warm start, scale filter)."""
        return self.guard.processor

    @property
    def label(self) -> str:
        """The stream's name for logs: its name, or ``camera`` for the unnamed stream."""
        return self.name or 'camera'

    def topic(self, relative: str) -> str:
        """``relative`` (``image``, ``depth/image``, ...) in this stream's namespace."""
        return f'{self.name}/{relative}' if self.name else relative

    def has_subscribers(self, output: Optional[str] = None) -> bool:
        """Whether anyone listens to ``output`` (default: to any output of this stream)."""
        pubs = [self.publishers[output]] if output else self.publishers.values()
        return any(pub.get_subscription_count() > 0 for pub in pubs)

    def follow_size(self, width: int, height: int, stamp_ns: int) -> Optional[str]:
        """Note the frame's size; on a change (a camera restarted in another mode) forget what
        belonged to the old size and return what to log.

        The warm-start latent has the old shape, and the CameraInfo kept as "latest" may
        describe the old mode; only the CameraInfo of this very frame's stamp is kept.
        """
        size, old = (width, height), self.image_size
        self.image_size = size
        if old is None or size == old:
            return None
        self.processor.reset()
        self.infos.forget_all_but(stamp_ns)
        return (f'image size changed from {old[0]}x{old[1]} to {width}x{height}: warm start '
                'and CameraInfo history reset')

    def silent_for_s(self, now_s: float) -> float:
        """Seconds since the last image (or since the stream started, when none came)."""
        return now_s - (self.last_frame_s if self.last_frame_s is not None else self.started_s)

    # -- ROS handles -------------------------------------------------------------------------

    def advertise(self, node: Any, types: Dict[str, Any], qos: Any) -> None:
        """Create the stream's lifecycle publishers, one per output (``types``: topic ->
        message class)."""
        self.publishers = {topic: node.create_lifecycle_publisher(msg_type, self.topic(topic),
                                                                  qos)
                           for topic, msg_type in types.items()}

    def subscribe(self, node: Any, qos: Any, compressed: bool,
                  on_image: Callable[[Any], None], on_info: Callable[[CameraInfo], None]
                  ) -> None:
        """Subscribe the image (raw, or ``<image>/compressed`` as image_transport's
        ``compressed`` transport names it: remapped and expanded, + ``/compressed``) and
        camera_info."""
        self.got_frame, self.last_frame_s, self.started_s = False, None, time.monotonic()
        image, info = (self.topic(name) for name in INPUT_TOPICS)
        if compressed:
            self.image_sub = node.create_subscription(
                CompressedImage, self.compressed_topic(node), on_image, qos)
        else:
            self.image_sub = node.create_subscription(Image, image, on_image, qos)
        self.info_sub = node.create_subscription(CameraInfo, info, on_info, qos)

    def compressed_topic(self, node: Any) -> str:
        """The stream's image topic, remapped and expanded by ``node``, + ``/compressed``."""
        return node.resolve_topic_name(self.topic(INPUT_TOPICS[0])) + '/compressed'

    def unsubscribe(self, node: Any) -> None:
        """Drop the subscriptions (deactivate)."""
        for sub in (self.image_sub, self.info_sub):
            if sub is not None:
                node.destroy_subscription(sub)
        self.image_sub = self.info_sub = None

    def release(self, node: Any) -> None:
        """Drop the publishers (cleanup)."""
        for pub in self.publishers.values():
            node.destroy_lifecycle_publisher(pub)
        self.publishers = {}

    @property
    def image_topic(self) -> str:
        """The image topic as subscribed (relative before activation), for reports."""
        return self.image_sub.topic_name if self.image_sub is not None else self.topic('image')

    @property
    def info_topic(self) -> str:
        """The camera_info topic as subscribed (relative before activation), for reports."""
        return self.info_sub.topic_name if self.info_sub is not None else \
            self.topic('camera_info')

    def statuses(self, prefix: str, device: str, snap: StatsSnapshot,
                 silent_s: Optional[float]) -> List[DiagnosticStatus]:
        """The stream's /diagnostics: its frames (WARN on input errors or, with ``silent_s``,
        a quiet camera) and, while a metric-scale correction runs, its scale."""
        if snap.period_errors:
            level, message = DiagnosticStatus.WARN, f'{snap.period_errors} input errors'
        elif silent_s is not None:
            level, message = DiagnosticStatus.WARN, (
                f'no image on {self.image_topic} for {silent_s:.0f} s: is the camera running?')
        else:
            level = DiagnosticStatus.OK
            message = f'{snap.period_published} frames in {snap.period_s:.0f} s'
        statuses = [DiagnosticStatus(
            level=level, name=f'{prefix}: {self.label} depth', hardware_id=device,
            message=message,
            values=[KeyValue(key=key, value=value) for key, value in snap.key_values()])]
        scale = self.scale
        if scale is not None and scale.active:
            statuses.append(DiagnosticStatus(
                level=DiagnosticStatus.OK if scale.fit.ok or scale.fit.state == 'off' else
                DiagnosticStatus.WARN, name=f'{prefix}: {self.label} metric scale',
                hardware_id=device, message=scale.message,
                values=[KeyValue(key=key, value=value) for key, value in scale.key_values()]))
        return statuses
