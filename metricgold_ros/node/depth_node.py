"""``depth_node``: metric depth, its colour view and point clouds for one camera or several,
served by one model, as a managed (lifecycle) node.

Streams (:mod:`.stream`): parameter ``cameras`` names them; stream ``front`` subscribes
``front/image`` (or ``front/image/compressed`` with ``image_transport: compressed``) and
``front/camera_info`` and publishes ``front/`` + each topic of
:data:`metricgold_ros.depth_frame.OUTPUTS`; the default ``['']`` is one unnamed stream on
``image``, ``camera_info``, ``depth/...``, ``points``. All relative: remap them. A stream may
set its own mounting as ``<stream>.camera_height_m`` (``_pitch_deg``, ``_roll_deg``).
Callbacks only drop the newest frame into the stream's mailbox; one :class:`.worker.
BatchWorker` runs the waiting frames of all streams as one batch and publishes.

Lifecycle: configure loads the model (a folder, or a hub id resolved and downloaded here,
never in a frame callback), warms it up and creates the publishers; activate subscribes and
starts the worker; deactivate unsubscribes and stops it (the model stays); cleanup frees the
model. ``depth_node`` configures and activates at start unless ``autostart`` is false
(:mod:`.main`). Parameters (:data:`.parameters.PARAMETERS`) are checked in the on-set callback
and applied in the post-set one.

Faults: bad input is logged (rate-limited, naming the topic and the fix) and the frame
skipped, without touching the other streams; inference faults go through
:mod:`metricgold_ros.faults` (a failed batch runs again frame by frame, each retried once at
``fallback_processing_resolution`` or skipped). A stream whose camera goes quiet gets a WARN
on ``/diagnostics``, not an error. Fault injection (debug) is passed in as ``faults``.

Executors: spin this node in a SingleThreadedExecutor. rclpy's MultiThreadedExecutor before
ros2/rclpy#1547 (not in Humble, Jazzy or Kilted as released) busy-loops while callbacks are
queued and starves the inference thread of the GIL (the model period rose from 0.33 s to 4-7 s).
"""

import gc
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import (FloatingPointRange, IntegerRange, ParameterDescriptor,
                                SetParametersResult)
from rclpy.exceptions import ParameterUninitializedException
from rclpy.executors import MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo

from metricgold_ros import messages
from metricgold_ros.depth_frame import OUTPUTS, DepthFrameProcessor
from metricgold_ros.errors import InputError, MetricGoldError
from metricgold_ros.faults import FAULT_ENV, FaultInjector, GuardedProcessor
from metricgold_ros.model_paths import load_model
from metricgold_ros.node.parameters import (PARAMETERS, SPECS, STREAM_PARAMETERS, ParamSpec,
                                            ParamValue, check_parameter, check_work,
                                            frame_options, split_stream_parameter,
                                            stream_parameter)
from metricgold_ros.node.runtime import StatsSnapshot
from metricgold_ros.node.stream import Frame, Stream
from metricgold_ros.node.worker import BatchWorker, Reporter

if TYPE_CHECKING:
    from metricgold_ros.model import MetricGoldPipeline

NODE_NAME = 'depth_node'
# Each output's rclpy message class, from the one output table.
OUTPUT_TYPES: Dict[str, Any] = {output.topic: getattr(messages.rclpy_types(), output.msg_type)
                                for output in OUTPUTS}
TRANSPORT_HINT_PERIOD_S = 5.0  # until the first frame: is the camera on the other transport?


def _qos(choice: str) -> QoSProfile:
    """'sensor_data' (best effort, keep last 5) or 'reliable' (keep last 5)."""
    if choice == 'reliable':
        return QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
    return qos_profile_sensor_data


def _descriptor(spec: ParamSpec, name: Optional[str] = None) -> ParameterDescriptor:
    """The ROS descriptor of one parameter (named ``name``, default the spec's): doc,
    read-only, range, choices."""
    descriptor = ParameterDescriptor(name=name or spec.name, description=spec.description,
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


class DepthNode(LifecycleNode):
    """Metric depth for one or several camera streams with one model (see the module doc)."""

    def __init__(self, *, pipeline: Optional['MetricGoldPipeline'] = None,
                 faults: Optional[FaultInjector] = None, **kwargs: Any) -> None:
        """Declare and check the parameters; nothing is loaded or subscribed before configure.

        Args:
            pipeline: the model to serve (tests, embedding); None: configure loads
                ``model_path`` (and frees it at cleanup).
            faults: DEBUG ONLY, real faults injected before pipeline stages.
            kwargs: rclpy ``Node`` arguments (``context``, ``namespace``, ``cli_args``,
                ``parameter_overrides``, ...).
        """
        super().__init__(NODE_NAME, **kwargs)
        try:
            for spec in PARAMETERS:
                self.declare_parameter(spec.name, spec.default, _descriptor(spec))
            self._values: Dict[str, ParamValue] = {
                spec.name: self.get_parameter(spec.name).value for spec in PARAMETERS}
            for name, value in self._values.items():
                reason = check_parameter(name, value, self._values)
                if reason is not None:
                    raise InputError(reason)
            self._stream_names: Tuple[str, ...] = tuple(self._values['cameras'])
            self._overrides = self._declare_stream_parameters()
        except BaseException:
            self.destroy_node()
            raise
        self._injected = pipeline
        self._faults = faults
        self.configure_error: Optional[str] = None  # why the last configure failed
        self.pipeline: Optional['MetricGoldPipeline'] = None
        self._streams: List[Stream] = []
        self._worker: Optional[BatchWorker] = None  # while active
        self._timers: List[Any] = []
        self._diagnostics = None
        self._types = messages.rclpy_types()
        self._reporter = Reporter(self.get_logger())
        self._executor_checked = False
        self.add_on_set_parameters_callback(self._on_set_parameters)
        if hasattr(self, 'add_post_set_parameters_callback'):  # Iron and newer
            self.add_post_set_parameters_callback(self._on_parameters_set)

    @property
    def autostart(self) -> bool:
        """Whether the program configures and activates the node at start."""
        return bool(self._values['autostart'])

    @property
    def streams(self) -> Tuple[Stream, ...]:
        """The configured streams, in the order of ``cameras`` (none while unconfigured)."""
        return tuple(self._streams)

    def _declare_stream_parameters(self) -> Dict[str, Dict[str, ParamValue]]:
        """Declare ``<stream>.<name>`` for each named stream; the values set, by stream."""
        overrides: Dict[str, Dict[str, ParamValue]] = {}
        for stream in self._stream_names:
            overrides[stream] = {}
            if not stream:
                continue
            for name in STREAM_PARAMETERS:
                full = stream_parameter(stream, name)
                spec = SPECS[name]
                descriptor = _descriptor(spec, full)
                descriptor.description = f'{stream} only (unset: {name}): {spec.description}'
                self.declare_parameter(full, Parameter.Type.DOUBLE, descriptor)
                try:
                    value = self.get_parameter(full).value
                except ParameterUninitializedException:
                    continue  # not set: the stream follows the node's value
                reason = check_parameter(name, value, self._values)
                if reason is not None:
                    raise InputError(f'{full}: {reason}')
                overrides[stream][name] = value
        return overrides

    # -- lifecycle ---------------------------------------------------------------------------

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Load (or take) the model, warm it up, make the streams and their publishers."""
        try:
            pipeline = self._injected if self._injected is not None else self._load_model()
            for name, value in self._values.items():
                reason = self._model_refuses(name, value, pipeline)
                if reason is not None:
                    raise InputError(reason)
            self._warm_up(pipeline)
        except MetricGoldError as err:
            self.configure_error = str(err)
            self.get_logger().error(f'cannot configure: {err}')
            return TransitionCallbackReturn.FAILURE
        self.configure_error = None
        self.pipeline = pipeline
        if self._faults is not None:
            pipeline.stage_hook = self._faults
            self.get_logger().warning(
                f'{FAULT_ENV}={self._faults.spec!r}: injecting faults into the pipeline (debug '
                'only: unset it outside tests and fault drills)')
        out_qos = _qos(self._values['output_qos'])
        for name in self._stream_names:
            guard = GuardedProcessor(DepthFrameProcessor(pipeline),
                                     self._values['fallback_processing_resolution'],
                                     stopping=self._stopping)
            stream = Stream(name, guard)
            stream.overrides = self._overrides[name]
            stream.advertise(self, OUTPUT_TYPES, out_qos)
            self._streams.append(stream)
        if self._values['publish_diagnostics'] and self._values['stats_period'] > 0:
            self._diagnostics = self.create_lifecycle_publisher(
                DiagnosticArray, '/diagnostics', 10)
        return super().on_configure(state)

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Subscribe every stream and start the worker."""
        in_qos = _qos(self._values['qos'])
        compressed = self._values['image_transport'] == 'compressed'
        for index, stream in enumerate(self._streams):
            stream.subscribe(self, in_qos, compressed,
                             lambda msg, i=index: self._on_image(i, msg),
                             lambda msg, s=stream: self._on_camera_info(s, msg))
        if self._values['stats_period'] > 0:
            self._timers.append(self.create_timer(self._values['stats_period'], self._on_stats))
        self._timers.append(self.create_timer(TRANSPORT_HINT_PERIOD_S, self._on_transport_hint))
        self._worker = BatchWorker(self._streams, lambda: self._values,
                                   lambda: self.get_clock().now().nanoseconds, self._reporter,
                                   self._types)
        self.get_logger().info(
            f'active, {len(self._streams)} stream(s): listening on '
            + '; '.join(f'{s.image_sub.topic_name} + {s.info_sub.topic_name}'
                        for s in self._streams)
            + f' ({self._values["image_transport"]}, {self._values["qos"]} QoS); publishing '
            f'{", ".join(OUTPUT_TYPES)} per stream under {self.get_namespace()} '
            f'({self._values["output_qos"]} QoS)')
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Unsubscribe and stop the worker; the model and publishers stay."""
        self._stop_worker()
        for timer in self._timers:
            self.destroy_timer(timer)
        self._timers = []
        for stream in self._streams:
            stream.unsubscribe(self)
        self.get_logger().info('inactive: subscriptions dropped, model kept')
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Destroy the streams' publishers and free the model."""
        self._release()
        self.get_logger().info('unconfigured: model freed')
        return super().on_cleanup(state)

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        """From any state: stop, unsubscribe, free."""
        self._stop_worker()
        if state.label == 'active':
            self.on_deactivate(state)
        self._release()
        return super().on_shutdown(state)

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        """A transition raised: stop and free everything, back to unconfigured."""
        self._stop_worker()
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def _release(self) -> None:
        for stream in self._streams:
            stream.release(self)
        if self._diagnostics is not None:
            self.destroy_lifecycle_publisher(self._diagnostics)
            self._diagnostics = None
        self._streams = []
        if self.pipeline is not None:
            self.pipeline.stage_hook = None
            self.pipeline = None
            gc.collect()
            try:
                import torch
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except ImportError:  # pragma: no cover - torch is a dependency
                pass

    # -- start-up ----------------------------------------------------------------------------

    def _load_model(self) -> 'MetricGoldPipeline':
        """The pipeline of ``model_path`` (a folder, a hub id resolved and downloaded here, or
        the bundled model) with ``variant`` and ``decoder``; CheckpointError names it."""
        start = time.perf_counter()
        given = self._values['model_path']
        pipeline = load_model(given, 'model_path', device=self._values['device'],
                              dtype=self._values['dtype'], notify=self.get_logger().info,
                              variant=self._values['variant'], decoder=self._values['decoder'])
        meta = pipeline.metadata
        kind = 'RELATIVE depth (metric, with points, only while the ground fit finds the ' \
            'floor: set camera_height_m)' if pipeline.relative else \
            f'metric depth {meta.d_min_m:g}..{meta.d_max_m:g} m'
        self.get_logger().info(
            f'loaded {given or "the bundled model"} on {pipeline.device} '
            f'({str(pipeline.dtype).replace("torch.", "")}) in '
            f'{time.perf_counter() - start:.1f} s: {kind}')
        return pipeline

    def _warm_up(self, pipeline: 'MetricGoldPipeline') -> None:
        """One inference on a grey 4:3 frame at the processing resolution: the first camera
        frame then finds kernels chosen and memory allocated."""
        options = frame_options(self._values)
        side = options.processing_resolution or pipeline.metadata.default_processing_resolution
        side = max(8, int(side or 64))
        start = time.perf_counter()
        pipeline.predict_batch([np.full((side * 3 // 4, side, 3), 128, np.uint8)],
                               denoising_steps=options.denoising_steps,
                               processing_resolution=options.processing_resolution)
        self.get_logger().info(f'warmed up at {side} px in {time.perf_counter() - start:.2f} s')

    # -- callbacks (never block, never raise) ------------------------------------------------

    def _stopping(self) -> bool:
        """Whether the worker is stopping (inference faults then end it quietly)."""
        return self._worker is None or self._worker.stopping

    def _on_image(self, index: int, msg: Any) -> None:
        if not self._executor_checked:
            self._executor_checked = True
            self._check_executor()
        stream, worker = self._streams[index], self._worker
        stream.got_frame = True
        stream.last_frame_s = time.monotonic()
        stream.stats.count('received')
        if worker is None or not stream.has_subscribers():
            stream.stats.count('idle')
            return
        if worker.put(index, Frame(msg, stream.last_frame_s)):
            stream.stats.count('dropped')

    def _check_executor(self) -> None:
        """Warn once when spun by rclpy's MultiThreadedExecutor (see the module docstring)."""
        if isinstance(self.executor, MultiThreadedExecutor):
            self.get_logger().warning(
                'spun by a MultiThreadedExecutor: before ros2/rclpy#1547 it busy-loops while '
                'callbacks wait in its pool and can starve inference of the GIL (seen: 10-20x '
                'slower); spin this node in its own SingleThreadedExecutor or process')

    def _on_transport_hint(self) -> None:
        """Until a stream's first frame: warn when only the other transport has a publisher."""
        compressed = self._values['image_transport'] == 'compressed'
        for stream in self._streams:
            if stream.got_frame or stream.image_sub is None or \
                    self.count_publishers(stream.image_sub.topic_name) > 0:
                continue
            base = self.resolve_topic_name(stream.topic('image'))
            other = base if compressed else stream.compressed_topic(self)
            if self.count_publishers(other) > 0:
                self._reporter.warn((stream.name, 'transport'), (
                    f'{stream.image_sub.topic_name}: no publisher yet, but {other} has one: set '
                    f'image_transport:={"raw" if compressed else "compressed"} (parameter or '
                    'launch argument), or remap the image topic to the camera\'s'))

    def _on_camera_info(self, stream: Stream, msg: CameraInfo) -> None:
        try:
            stream.infos.add(messages.stamp_ns(msg.header.stamp),
                             messages.calibration_from_info(msg))
        except MetricGoldError as err:
            self._reporter.error(stream, stream.info_topic, str(err))

    def _on_set_parameters(self, params: List[Parameter]) -> SetParametersResult:
        """Validate a change (all or nothing); :meth:`_on_parameters_set` applies it."""
        values = dict(self._values)
        for param in params:
            per_stream = split_stream_parameter(param.name, self._stream_names)
            name = per_stream[1] if per_stream else param.name
            if param.value is None and per_stream:
                continue  # unset: the stream follows the node's value again
            reason = check_parameter(name, param.value, values) or \
                self._model_refuses(name, param.value, self.pipeline, values)
            if reason is not None:
                return SetParametersResult(successful=False, reason=reason)
            if per_stream is None and param.name in values:
                values[param.name] = param.value
        if not hasattr(self, 'add_post_set_parameters_callback'):  # Humble: apply here
            self._on_parameters_set(params)
        return SetParametersResult(successful=True)

    def _on_parameters_set(self, params: List[Parameter]) -> None:
        """Apply a validated change: one reference swap each, the worker sees it whole."""
        values = dict(self._values)
        for param in params:
            per_stream = split_stream_parameter(param.name, self._stream_names)
            if per_stream is not None:
                stream, name = per_stream
                overrides = dict(self._overrides[stream])
                if param.value is None:
                    overrides.pop(name, None)
                else:
                    overrides[name] = param.value
                self._overrides[stream] = overrides
            elif param.name in values:
                values[param.name] = param.value
        self._values = values
        for stream in self._streams:
            stream.overrides = self._overrides[stream.name]
            stream.guard.fallback_resolution = values['fallback_processing_resolution']

    def _model_refuses(self, name: str, value: Any, pipeline: Optional['MetricGoldPipeline'],
                       values: Optional[Dict[str, ParamValue]] = None) -> Optional[str]:
        """Why ``pipeline`` cannot run with ``name := value`` (the other parameters at
        ``values``, default the current ones), or None (also without a pipeline)."""
        if pipeline is None:
            return None
        if name in SPECS:  # the work budget at the checkpoint's own processing resolution
            reason = check_work({**(values or self._values), name: value},
                                pipeline.metadata.default_processing_resolution)
            if reason is not None:
                return reason
        if name == 'denoising_steps' and isinstance(value, int) and value > 1 and \
                pipeline.metadata.e2e_ft:
            return (f'denoising_steps: {value}: this model is single-step (E2E-FT, zero noise, '
                    'the predicted depth in one step); use 0 (its default) or 1')
        return None

    def _on_stats(self) -> None:
        now = time.monotonic()
        statuses = []
        for stream in self._streams:
            snap = stream.stats.snapshot()
            silent_s = stream.silent_for_s(now)
            quiet = silent_s > max(self._values['stats_period'], 1.0)
            self.get_logger().info(f'{stream.label}: {snap.summary()}'
                                   + (f'; no image for {silent_s:.0f} s' if quiet else ''))
            statuses += stream.statuses(
                self.get_fully_qualified_name(),
                str(self.pipeline.device) if self.pipeline is not None else '', snap,
                silent_s if quiet else None)
        if self._diagnostics is not None and statuses:
            self._diagnostics.publish(DiagnosticArray(
                header=self._types.Header(stamp=self.get_clock().now().to_msg()),
                status=statuses))

    # -- shutdown ----------------------------------------------------------------------------

    def _stop_worker(self) -> None:
        """Stop the worker; an inference in progress finishes in the background (daemon)."""
        if self._worker is not None:
            self._worker.stop()
        self._worker = None

    def close(self) -> None:
        """Stop the worker (before ``destroy_node``)."""
        self._stop_worker()

    def stats(self, stream: int = 0) -> StatsSnapshot:
        """Counters and period figures so far of stream ``stream`` (does not start a new
        period)."""
        return self._streams[stream].stats.snapshot(reset=False)

