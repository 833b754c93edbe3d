"""``depth_node``: camera images in, metric depth, its colour view and a point cloud out.

The image callback only drops the newest frame into a one-slot mailbox; a worker thread turns
it into RGB, runs :class:`~metricgold_ros.depth_frame.DepthFrameProcessor` (the per-frame code
shared with the bag tool) and publishes every output with the input frame's header. Frames
that arrive while the model runs replace the waiting one and are counted as dropped, so the
latency stays bounded when the camera is faster than the model.

Topics (relative, remap them): in ``image`` (sensor_msgs/Image) or, with ``image_transport:
compressed``, ``<image>/compressed`` (sensor_msgs/CompressedImage, jpeg or png: the topic
image_transport's ``compressed`` transport uses), and ``camera_info``; out ``depth/image``,
``depth/camera_info``, ``depth/colored``, ``depth/uncertainty``, ``points``, ``depth/scale``
(``diagnostic_msgs/DiagnosticArray`` per frame while ``camera_height_m`` > 0 or the checkpoint
is camera-aware: the applied scale, the ground fit's inlier share and state); and
``/diagnostics``. QoS (REP 2003): inputs sensor-data, outputs reliable (parameters ``qos``,
``output_qos``). Parameters: :data:`metricgold_ros.node.parameters.PARAMETERS`. The
process around the node (signals, executor, exit) is :mod:`metricgold_ros.node.main`.

Faults: bad input is logged (rate-limited, naming the topic and the fix) and the frame
skipped; a CameraInfo that cannot serve the image gives depth without points (the policy of
:mod:`metricgold_ros.camera`). An inference that raises (CUDA out of memory, ...) is handled
by :class:`~metricgold_ros.faults.GuardedProcessor`, as in the offline tools: logged with the
exception type and stage, memory freed, retried once at ``fallback_processing_resolution`` or
skipped. When the image size changes (a camera restarted in another mode) the warm-start
latent and the CameraInfo history are reset. Debug only: ``METRICGOLD_FAULT=STAGE:KIND[:every=
N][:times=N]`` (e.g. ``vae_decode:oom:every=3``) injects real faults through the pipeline's
stage hook, see :class:`~metricgold_ros.faults.FaultInjector`.

Executors: ``depth_node`` spins a SingleThreadedExecutor. In a process of your own, do not add
this node to rclpy's MultiThreadedExecutor before ros2/rclpy#1547 (not in Humble, Jazzy or
Kilted as released): that executor busy-loops while callbacks are queued in its pool and
starves the inference thread of the GIL (the model period rose from 0.33 s to 4-7 s here).
"""

import dataclasses
import os
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple, Union

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import (FloatingPointRange, IntegerRange, ParameterDescriptor,
                                SetParametersResult)
from rclpy.executors import MultiThreadedExecutor
from rclpy.logging import LoggingSeverity
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2

from metricgold_ros import messages
from metricgold_ros.camera import Calibration
from metricgold_ros.depth_frame import (OUTPUT_TOPICS, DepthFrameProcessor, FrameOptions,
                                        FrameResult, frame_messages)
from metricgold_ros.errors import InputError, MetricGoldError
from metricgold_ros.faults import FAULT_ENV, GuardedProcessor, fault_injector_from_env
from metricgold_ros.metric_scale import MetricScale
from metricgold_ros.model_paths import load_model, resolve_model_path
from metricgold_ros.node.parameters import PARAMETERS, ParamSpec, check_parameter, frame_options
from metricgold_ros.node.runtime import FrameStats, Mailbox, RateLimiter, StampCache, StatsSnapshot

if TYPE_CHECKING:
    import numpy as np

    from metricgold_ros.model import MetricGoldPipeline

NODE_NAME = 'depth_node'
OUTPUTS = dict(zip(OUTPUT_TOPICS, (Image, CameraInfo, Image, Image, PointCloud2,
                                   DiagnosticArray)))
ERROR_PERIOD_S = 5.0  # each distinct input problem is logged at most this often
JOIN_TIMEOUT_S = 1.0  # shutdown waits this long for the worker; inference may outlive it
TRANSPORT_HINT_PERIOD_S = 5.0  # until the first frame: is the camera on the other transport?


def _qos(choice: str) -> QoSProfile:
    """'sensor_data' (best effort, keep last 5) or 'reliable' (keep last 5)."""
    if choice == 'reliable':
        return QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
    return qos_profile_sensor_data


def _descriptor(spec: ParamSpec) -> ParameterDescriptor:
    """The ROS descriptor of one parameter: doc, read-only, range, choices."""
    descriptor = ParameterDescriptor(name=spec.name, description=spec.description,
                                     read_only=not spec.runtime)
    if spec.int_range is not None:
        descriptor.integer_range = [IntegerRange(
            from_value=spec.int_range[0], to_value=spec.int_range[1], step=1)]
    if spec.float_range is not None:
        descriptor.floating_point_range = [FloatingPointRange(
            from_value=spec.float_range[0], to_value=spec.float_range[1], step=0.0)]
    if spec.choices is not None:
        descriptor.additional_constraints = 'one of: ' + ', '.join(spec.choices)
    return descriptor


@dataclasses.dataclass
class _Frame:
    """A received image waiting in the mailbox."""

    msg: Union[Image, CompressedImage]
    received_s: float


class DepthNode(Node):
    """Metric depth from one camera stream (see the module docstring)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        try:
            for spec in PARAMETERS:
                self.declare_parameter(spec.name, spec.default, _descriptor(spec))
            self._values: Dict[str, Any] = {
                spec.name: self.get_parameter(spec.name).value for spec in PARAMETERS}
            for name, value in self._values.items():
                reason = check_parameter(name, value, self._values)
                if reason is not None:
                    raise InputError(reason)
            faults = fault_injector_from_env(os.environ)
            self.pipeline = self._load_model()
            for name, value in self._values.items():
                reason = self._model_refuses(name, value)
                if reason is not None:
                    raise InputError(reason)
        except BaseException:
            self.destroy_node()
            raise
        self._options = frame_options(self._values)
        self._stop = threading.Event()
        if faults is not None:
            self.pipeline.stage_hook = faults
            self.get_logger().warning(
                f'{FAULT_ENV}={faults.spec!r}: injecting faults into the pipeline (debug '
                'only: unset it outside tests and fault drills)')
        self._processor = GuardedProcessor(
            DepthFrameProcessor(self.pipeline), self._values['fallback_processing_resolution'],
            stopping=self._stop.is_set)
        self._types = messages.rclpy_types()
        self._stats = FrameStats()
        self._limiter = RateLimiter(ERROR_PERIOD_S)
        self._mailbox: Mailbox[_Frame] = Mailbox()
        self._infos: StampCache[Calibration] = StampCache()
        self._image_size: Optional[Tuple[int, int]] = None  # (width, height) of the last frame
        self._scale: Optional[MetricScale] = None  # the last frame's, for /diagnostics
        self._executor_checked = False
        self._got_frame = False

        out_qos = _qos(self._values['output_qos'])
        self._pubs = {name: self.create_publisher(msg_type, name, out_qos)
                      for name, msg_type in OUTPUTS.items()}
        self._diagnostics = None
        if self._values['publish_diagnostics'] and self._values['stats_period'] > 0:
            self._diagnostics = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        in_qos = _qos(self._values['qos'])
        if self._values['image_transport'] == 'compressed':
            self._image_sub = self.create_subscription(
                CompressedImage, self._compressed_topic(), self._on_image, in_qos)
        else:
            self._image_sub = self.create_subscription(Image, 'image', self._on_image, in_qos)
        self._info_sub = self.create_subscription(
            CameraInfo, 'camera_info', self._on_camera_info, in_qos)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        if self._values['stats_period'] > 0:
            self._stats_timer = self.create_timer(self._values['stats_period'], self._on_stats)
        self._worker = threading.Thread(target=self._work, name='depth_worker', daemon=True)
        self._worker.start()
        self._hint_timer = self.create_timer(TRANSPORT_HINT_PERIOD_S, self._on_transport_hint)
        self.get_logger().info(
            f'listening on {self._image_sub.topic_name} + {self._info_sub.topic_name} '
            f'({self._values["image_transport"]}, {self._values["qos"]} QoS); publishing '
            f'{", ".join(OUTPUTS)} under {self.get_namespace()} ({self._values["output_qos"]} '
            'QoS)')

    # -- start-up ----------------------------------------------------------------------------

    def _compressed_topic(self) -> str:
        """``<image>/compressed``: the ``image`` topic, remapped and expanded, + ``/compressed``.

        What image_transport's ``compressed`` subscriber does with its base topic, so
        ``-r image:=...`` (the launch file's ``image``) names the camera in both transports.
        """
        return self.resolve_topic_name('image') + '/compressed'

    def _load_model(self) -> 'MetricGoldPipeline':
        """The pipeline of ``model_path`` (or the bundled model); CheckpointError names it."""
        start = time.perf_counter()
        path = resolve_model_path(self._values['model_path'], 'model_path',
                                  self.get_logger().info)
        pipeline = load_model(str(path), 'model_path', device=self._values['device'],
                              dtype=self._values['dtype'])
        meta = pipeline.metadata
        kind = 'RELATIVE depth (metric, with points, only while the ground fit finds the ' \
            'floor: set camera_height_m)' if pipeline.relative else \
            f'metric depth {meta.d_min_m:g}..{meta.d_max_m:g} m'
        self.get_logger().info(
            f'loaded {path} on {pipeline.device} ({str(pipeline.dtype).replace("torch.", "")}) '
            f'in {time.perf_counter() - start:.1f} s: {kind}')
        return pipeline

    # -- callbacks (never block, never raise) ------------------------------------------------

    def _on_image(self, msg: Union[Image, CompressedImage]) -> None:
        if not self._executor_checked:
            self._executor_checked = True
            self._check_executor()
        self._got_frame = True
        self._stats.count('received')
        if not self._has_subscribers():
            self._stats.count('idle')
            return
        if self._mailbox.put(_Frame(msg, time.monotonic())):
            self._stats.count('dropped')

    def _check_executor(self) -> None:
        """Warn once when spun by rclpy's MultiThreadedExecutor (see the module docstring)."""
        if isinstance(self.executor, MultiThreadedExecutor):
            self.get_logger().warning(
                'spun by a MultiThreadedExecutor: before ros2/rclpy#1547 it busy-loops while '
                'callbacks wait in its pool and can starve inference of the GIL (seen: 10-20x '
                'slower); spin this node in its own SingleThreadedExecutor or process')

    def _on_transport_hint(self) -> None:
        """Until the first frame: warn when only the other image transport has a publisher."""
        if self._got_frame:
            self._hint_timer.cancel()
            return
        if self.count_publishers(self._image_sub.topic_name) > 0:
            return
        compressed = self._values['image_transport'] == 'compressed'
        base = self.resolve_topic_name('image')
        other = base if compressed else base + '/compressed'
        if self.count_publishers(other) > 0:
            self.get_logger().warning(
                f'{self._image_sub.topic_name}: no publisher yet, but {other} has one: set '
                f'image_transport:={"raw" if compressed else "compressed"} (parameter or '
                'launch argument), or remap image to the camera\'s topic',
                throttle_duration_sec=ERROR_PERIOD_S)

    def _on_camera_info(self, msg: CameraInfo) -> None:
        self._infos.add(messages.stamp_ns(msg.header.stamp), messages.calibration_from_info(msg))

    def _on_set_parameters(self, params: List[Parameter]) -> SetParametersResult:
        values = dict(self._values)
        for param in params:
            reason = check_parameter(param.name, param.value, values) or \
                self._model_refuses(param.name, param.value)
            if reason is not None:
                return SetParametersResult(successful=False, reason=reason)
            if param.name in values:
                values[param.name] = param.value
        self._options = frame_options(values)  # one reference swap: the worker sees it whole
        self._processor.fallback_resolution = values['fallback_processing_resolution']
        self._values = values
        return SetParametersResult(successful=True)

    def _model_refuses(self, name: str, value: Any) -> Optional[str]:
        """Why the loaded model cannot run with ``name := value``, or None."""
        if name == 'denoising_steps' and isinstance(value, int) and value > 1 and \
                self.pipeline.metadata.e2e_ft:
            return (f'denoising_steps: {value}: this model is single-step (E2E-FT, zero noise, '
                    'the predicted depth in one step); use 0 (its default) or 1')
        return None

    def _on_stats(self) -> None:
        snap = self._stats.snapshot()
        self.get_logger().info(snap.summary())
        if self._diagnostics is None:
            return
        status = DiagnosticStatus(
            level=DiagnosticStatus.WARN if snap.period_errors else DiagnosticStatus.OK,
            name=f'{self.get_fully_qualified_name()}: depth',
            hardware_id=str(self.pipeline.device),
            message=(f'{snap.period_errors} input errors' if snap.period_errors else
                     f'{snap.period_published} frames in {snap.period_s:.0f} s'),
            values=[KeyValue(key=key, value=value) for key, value in snap.key_values()])
        statuses = [status]
        scale = self._scale
        if scale is not None and scale.active:
            statuses.append(DiagnosticStatus(
                level=DiagnosticStatus.OK if scale.fit.ok or scale.fit.state == 'off' else
                DiagnosticStatus.WARN, name=f'{self.get_fully_qualified_name()}: metric scale',
                hardware_id=str(self.pipeline.device), message=scale.message,
                values=[KeyValue(key=key, value=value) for key, value in scale.key_values()]))
        self._diagnostics.publish(DiagnosticArray(
            header=self._types.Header(stamp=self.get_clock().now().to_msg()), status=statuses))

    # -- worker ------------------------------------------------------------------------------

    def _has_subscribers(self, name: Optional[str] = None) -> bool:
        pubs = [self._pubs[name]] if name else self._pubs.values()
        return any(pub.get_subscription_count() > 0 for pub in pubs)

    def _work(self) -> None:
        while not self._stop.is_set():
            frame = self._mailbox.take(timeout_s=0.2)
            if frame is None:
                continue
            try:
                self._process(frame)
            except MetricGoldError as err:
                self._report(self._image_sub.topic_name, str(err))
            except Exception as err:  # noqa: B902 - one bad frame must not end the worker
                if self._stop.is_set():
                    return  # shutting down: publishers may already be gone
                self._report(self._image_sub.topic_name,
                             f'unexpected {type(err).__name__}: {err} (please report this with '
                             'the debug log)')
                self.get_logger().debug(traceback.format_exc())

    def _process(self, frame: _Frame) -> None:
        if not self._has_subscribers():
            self._stats.count('idle')
            return
        msg = frame.msg
        stamp = messages.stamp_ns(msg.header.stamp)
        rgb = messages.rgb_from_msg(msg, pixel_budget=self._values['max_pixels'])  # [H,W,3]
        self._follow_size(rgb.shape[1], rgb.shape[0], stamp)
        calibration = self._infos.match(stamp)
        if calibration is None:
            self.get_logger().warning(
                f'no CameraInfo on {self._info_sub.topic_name} yet: publishing depth without '
                'depth/camera_info and points; remap camera_info to the camera\'s info topic',
                throttle_duration_sec=ERROR_PERIOD_S)
        options = dataclasses.replace(
            self._options,
            colored=self._options.colored and self._has_subscribers('depth/colored'),
            points=self._options.points and self._has_subscribers('points'))
        result = self._infer(rgb, calibration, options)
        if result is None:
            return
        if result.camera_problem is not None:
            self._report(self._info_sub.topic_name, f'{result.camera_problem} (publishing depth '
                         'without depth/camera_info and points)')
        self._follow_scale(result.scale)
        out = frame_messages(self._types, msg.header, result)
        if self._stop.is_set():
            return
        for name, message in out.items():
            self._pubs[name].publish(message)
        latency_s = (self.get_clock().now().nanoseconds - stamp) * 1e-9
        self._stats.record(latency_s, result.timings_s)
        if self.get_logger().is_enabled_for(LoggingSeverity.DEBUG):
            self.get_logger().debug(
                'frame ' + ', '.join(f'{k} {v * 1e3:.1f} ms' for k, v in result.timings_s.items())
                + f'; stamp->publish {latency_s * 1e3:.0f} ms, '
                f'{(time.monotonic() - frame.received_s) * 1e3:.0f} ms since receipt')

    def _follow_size(self, width: int, height: int, stamp: int) -> None:
        """A new image size (camera restarted in another mode): forget what belonged to the old.

        The warm-start latent has the old shape, and the CameraInfo kept as "latest" may
        describe the old mode; only the CameraInfo of this very frame's stamp is kept.
        """
        size = (width, height)
        if self._image_size is not None and size != self._image_size:
            self._processor.processor.reset()
            self._infos.forget_all_but(stamp)
            old = self._image_size
            self.get_logger().info(
                f'{self._image_sub.topic_name}: image size changed from {old[0]}x{old[1]} to '
                f'{width}x{height}: warm start and CameraInfo history reset',
                throttle_duration_sec=ERROR_PERIOD_S)
        self._image_size = size

    def _follow_scale(self, scale: Optional[MetricScale]) -> None:
        """Keep the frame's metric scale for /diagnostics; log notes and changes of state."""
        if scale is None:
            return
        for note in scale.notes:
            self.get_logger().warning(note)
        previous = self._scale.fit.state if self._scale is not None else 'off'
        self._scale = scale
        if scale.fit.state == previous:
            return
        # One call site per severity: rclpy refuses to throttle one site at two severities.
        if scale.fit.ok or scale.fit.state == 'off':
            self.get_logger().info(f'metric scale: {scale.message}',
                                   throttle_duration_sec=ERROR_PERIOD_S)
        else:
            self.get_logger().warning(f'metric scale: {scale.message}',
                                      throttle_duration_sec=ERROR_PERIOD_S)

    # -- inference faults ------------------------------------------------------------------

    def _infer(self, rgb: 'np.ndarray', calibration: Optional[Calibration],
               options: FrameOptions) -> Optional[FrameResult]:
        """The frame's result; None when inference failed (logged) and the frame is skipped."""
        outcome = self._processor.process(rgb, calibration, options)
        if outcome.failure is None:
            return outcome.result
        self._stats.count('failed')
        if outcome.retried:
            self._stats.count('retried')
        failure = outcome.failure
        key = ('inference', failure.stage, failure.kind, outcome.action.split(':')[0][:40])
        held = self._limiter.check(key)
        if held is not None:
            more = f' [and {held} more like this since the last report]' if held else ''
            self.get_logger().error(f'{self._image_sub.topic_name}: {outcome.report()}{more}')
        return outcome.result

    def _report(self, topic: str, text: str) -> None:
        """Count an input error and log it, each distinct one at most every few seconds."""
        self._stats.count('errors')
        held = self._limiter.check((topic, text))
        if held is not None:
            more = f' [and {held} more like this since the last report]' if held else ''
            self.get_logger().error(f'{topic}: {text}{more}')

    # -- shutdown ----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the worker; an inference in progress finishes in the background (daemon)."""
        self._stop.set()
        self._mailbox.close()
        if self._worker.is_alive() and self._worker is not threading.current_thread():
            self._worker.join(JOIN_TIMEOUT_S)

    def stats(self) -> StatsSnapshot:
        """Counters and period figures so far (does not start a new period)."""
        return self._stats.snapshot(reset=False)


if __name__ == '__main__':  # ``python -m metricgold_ros.node.depth_node``: the program
    import sys

    from metricgold_ros.node.main import main

    sys.exit(main())
