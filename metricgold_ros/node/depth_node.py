"""``depth_node``: camera images in, metric depth, its colour view and a point cloud out.

The image callback only drops the newest frame into a one-slot mailbox; a worker thread turns
it into RGB, runs :class:`~metricgold_ros.depth_frame.DepthFrameProcessor` (the per-frame code
shared with the bag tool) and publishes every output with the input frame's header. Frames
that arrive while the model runs replace the waiting one and are counted as dropped, so the
latency stays bounded when the camera is faster than the model.

Topics (relative, remap them): in ``image``, ``camera_info``; out ``depth/image``,
``depth/camera_info``, ``depth/colored``, ``depth/uncertainty``, ``points``; and
``/diagnostics``. Parameters: :data:`metricgold_ros.node.support.PARAMETERS`.

Faults: bad input is logged (rate-limited, naming the topic and the fix) and the frame
skipped. An inference that raises (CUDA out of memory, ...) is logged with the exception type
and stage; memory is freed and, for out-of-memory with ``fallback_processing_resolution`` set,
the frame is retried once at that resolution, else skipped. When the image size changes (a
camera restarted in another mode) the warm-start latent and the CameraInfo history are reset.
Debug only: ``METRICGOLD_FAULT=STAGE:KIND[:every=N][:times=N]`` (e.g. ``vae_decode:oom:every=3``)
injects real faults through the pipeline's stage hook, see
:class:`~metricgold_ros.node.support.FaultInjector`.
"""

import dataclasses
import gc
import logging
import math
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import (FloatingPointRange, IntegerRange, ParameterDescriptor,
                                SetParametersResult)
from rclpy.exceptions import ParameterException
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.logging import LoggingSeverity
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rclpy.signals import SignalHandlerOptions
from sensor_msgs.msg import CameraInfo, Image, PointCloud2

from metricgold_ros import messages
from metricgold_ros.camera import Intrinsics
from metricgold_ros.depth_frame import (DepthFrameProcessor, FrameOptions, FrameResult,
                                        camera_for_image, frame_messages)
from metricgold_ros.errors import CheckpointError, InputError, MetricGoldError
from metricgold_ros.model_paths import (bundled_model_notice, bundled_model_path,
                                         missing_model_message)
from metricgold_ros.node.support import (
    FAULT_ENV, PARAMETERS, FaultInjector, FrameStats, Mailbox, ParamSpec, RateLimiter,
    StampCache, StatsSnapshot, check_parameter, frame_options, stamp_ns)

NODE_NAME = 'depth_node'
OUTPUTS = {'depth/image': Image, 'depth/camera_info': CameraInfo, 'depth/colored': Image,
           'depth/uncertainty': Image, 'points': PointCloud2}
ERROR_PERIOD_S = 5.0  # each distinct input problem is logged at most this often
JOIN_TIMEOUT_S = 1.0  # shutdown waits this long for the worker; inference may outlive it
SPIN_PERIOD_S = 0.1  # how often the spin loop looks for a stop request


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

    msg: Image
    received_s: float


@dataclasses.dataclass(frozen=True)
class _Failure:
    """What an inference that raised left behind (the exception itself is not kept)."""

    stage: str
    kind: str  # the exception's class name
    text: str  # its message's first line
    out_of_memory: bool

    def describe(self) -> str:
        return f'{self.kind} in {self.stage}: {self.text}'


def _is_out_of_memory(err: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA), a CPU allocator failure or a MemoryError."""
    text = str(err).lower()
    return (isinstance(err, MemoryError) or type(err).__name__ == 'OutOfMemoryError'
            or 'out of memory' in text or "can't allocate memory" in text)


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
            fault_spec = os.environ.get(FAULT_ENV, '')
            self._faults = FaultInjector(fault_spec) if fault_spec.strip() else None
            self.pipeline = self._load_model()
        except BaseException:
            self.destroy_node()
            raise
        self._options = frame_options(self._values)
        self._processor = DepthFrameProcessor(self.pipeline)
        self._types = messages.rclpy_types()
        self._stats = FrameStats()
        self._limiter = RateLimiter(ERROR_PERIOD_S)
        self._mailbox: Mailbox[_Frame] = Mailbox()
        self._infos: StampCache[CameraInfo] = StampCache()
        self._stop = threading.Event()
        self._stage = ''  # the pipeline stage running now (worker thread)
        self._image_size: Optional[Tuple[int, int]] = None  # (width, height) of the last frame
        self.pipeline.stage_hook = self._on_stage
        if self._faults is not None:
            self.get_logger().warning(
                f'{FAULT_ENV}={self._faults.spec!r}: injecting faults into the pipeline (debug '
                'only: unset it outside tests and fault drills)')

        out_qos = _qos(self._values['output_qos'])
        self._pubs = {name: self.create_publisher(msg_type, name, out_qos)
                      for name, msg_type in OUTPUTS.items()}
        self._diagnostics = None
        if self._values['publish_diagnostics'] and self._values['stats_period'] > 0:
            self._diagnostics = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        in_qos = _qos(self._values['qos'])
        self._image_sub = self.create_subscription(Image, 'image', self._on_image, in_qos)
        self._info_sub = self.create_subscription(
            CameraInfo, 'camera_info', self._on_camera_info, in_qos)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        if self._values['stats_period'] > 0:
            self._stats_timer = self.create_timer(self._values['stats_period'], self._on_stats)
        self._worker = threading.Thread(target=self._work, name='depth_worker', daemon=True)
        self._worker.start()
        self.get_logger().info(
            f'listening on {self._image_sub.topic_name} + {self._info_sub.topic_name} '
            f'({self._values["qos"]} QoS); publishing {", ".join(OUTPUTS)} under '
            f'{self.get_namespace()}')

    # -- start-up ----------------------------------------------------------------------------

    def _load_model(self) -> Any:
        """The pipeline of ``model_path`` (or the bundled model); CheckpointError names it."""
        text = self._values['model_path']
        if text:
            path = Path(text).expanduser()
            if not path.is_dir():
                raise CheckpointError(
                    f'model_path={text!r} is not a folder: pass a local MetricGold checkpoint '
                    '(`metricgold init-model DIR --tiny` writes one; see README.md, section '
                    '"Model")')
        else:
            path = bundled_model_path()
            if path is None:
                raise CheckpointError(missing_model_message('model_path'))
            self.get_logger().info(bundled_model_notice(path, 'model_path'))
        from metricgold_ros.model import MetricGoldPipeline  # torch: imported once needed

        start = time.perf_counter()
        try:
            pipeline = MetricGoldPipeline.from_pretrained(
                path, device=self._values['device'], dtype=self._values['dtype'])
        except CheckpointError as err:
            raise CheckpointError(f'model_path={str(path)!r}: {err}') from err
        except (OSError, ValueError, RuntimeError, KeyError, TypeError, ImportError) as err:
            # A damaged checkpoint must end the start-up with its path, never a traceback.
            raise CheckpointError(f'model_path={str(path)!r} cannot be loaded: '
                                  f'{type(err).__name__}: {err}') from err
        meta = pipeline.metadata
        kind = 'RELATIVE depth (no metric scale, no points)' if pipeline.relative else \
            f'metric depth {meta.d_min_m:g}..{meta.d_max_m:g} m'
        self.get_logger().info(
            f'loaded {path} on {pipeline.device} ({str(pipeline.dtype).replace("torch.", "")}) '
            f'in {time.perf_counter() - start:.1f} s: {kind}')
        return pipeline

    # -- callbacks (never block, never raise) ------------------------------------------------

    def _on_image(self, msg: Image) -> None:
        self._stats.count('received')
        if not self._has_subscribers():
            self._stats.count('idle')
            return
        if self._mailbox.put(_Frame(msg, time.monotonic())):
            self._stats.count('dropped')

    def _on_camera_info(self, msg: CameraInfo) -> None:
        self._infos.add(stamp_ns(msg.header.stamp), msg)

    def _on_set_parameters(self, params: List[Any]) -> SetParametersResult:
        values = dict(self._values)
        for param in params:
            reason = check_parameter(param.name, param.value, values)
            if reason is not None:
                return SetParametersResult(successful=False, reason=reason)
            if param.name in values:
                values[param.name] = param.value
        self._options = frame_options(values)  # one reference swap: the worker sees it whole
        self._values = values
        return SetParametersResult(successful=True)

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
        self._diagnostics.publish(DiagnosticArray(
            header=self._types.Header(stamp=self.get_clock().now().to_msg()), status=[status]))

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
        values = self._values
        rgb = messages.rgb_from_msg(msg, pixel_budget=values['max_pixels'])  # [H,W,3]
        self._follow_size(rgb.shape[1], rgb.shape[0], stamp_ns(msg.header.stamp))
        info = self._infos.match(stamp_ns(msg.header.stamp))
        camera = self._camera(info, rgb.shape[1], rgb.shape[0])
        options = dataclasses.replace(
            self._options,
            colored=self._options.colored and self._has_subscribers('depth/colored'),
            points=self._options.points and self._has_subscribers('points'))
        result = self._infer(rgb, camera, options)
        if result is None:
            return
        if camera is not None:
            out = frame_messages(self._types, msg.header, result, info.distortion_model,
                                 list(info.d) or None)
        else:
            out = frame_messages(self._types, msg.header, result)
        if self._stop.is_set():
            return
        for name, message in out.items():
            if name == 'depth/uncertainty' and not values['publish_uncertainty']:
                continue
            self._pubs[name].publish(message)
        latency_s = (self.get_clock().now().nanoseconds - stamp_ns(msg.header.stamp)) * 1e-9
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
            self._processor.reset()
            self._infos.forget_all_but(stamp)
            old = self._image_size
            self.get_logger().info(
                f'{self._image_sub.topic_name}: image size changed from {old[0]}x{old[1]} to '
                f'{width}x{height}: warm start and CameraInfo history reset',
                throttle_duration_sec=ERROR_PERIOD_S)
        self._image_size = size

    # -- inference faults ------------------------------------------------------------------

    def _on_stage(self, stage: str) -> None:
        """The pipeline's stage hook: remember the stage (for fault reports), inject faults."""
        self._stage = stage
        if self._faults is not None:
            self._faults(stage)

    def _infer(self, rgb: Any, camera: Optional[Intrinsics], options: FrameOptions
               ) -> Optional[FrameResult]:
        """The frame's result; None when inference failed (logged) and the frame is skipped.

        Out of memory with ``fallback_processing_resolution`` below the resolution in use:
        one retry at the fallback resolution.
        """
        result, failure = self._attempt(rgb, camera, options)
        if failure is None:
            return result
        self._stats.count('failed')
        fallback = self._values['fallback_processing_resolution']
        resolution = self._resolution(options, rgb.shape[1], rgb.shape[0])
        if failure.out_of_memory and 0 < fallback < resolution:
            retry = dataclasses.replace(options, processing_resolution=fallback,
                                        warm_start=False)
            result, second = self._attempt(rgb, camera, retry)
            if second is None:
                self._stats.count('retried')
                self._report_failure(failure, f'retried once at fallback_processing_resolution='
                                     f'{fallback} px instead of {resolution} px: published')
                return result
            self._report_failure(failure, f'the retry at {fallback} px failed too '
                                 f'({second.describe()}): frame skipped')
            return None
        if not failure.out_of_memory:
            action = 'frame skipped (the node goes on with the next frame)'
        elif fallback == 0:
            action = (f'frame skipped; set fallback_processing_resolution (e.g. '
                      f'{max(8, resolution // 2)}) to retry such frames at a lower resolution, '
                      'or lower processing_resolution')
        else:
            action = (f'frame skipped: fallback_processing_resolution={fallback} is not below '
                      f'the {resolution} px in use')
        self._report_failure(failure, action)
        return None

    def _attempt(self, rgb: Any, camera: Optional[Intrinsics], options: FrameOptions
                 ) -> Tuple[Optional[FrameResult], Optional[_Failure]]:
        """Run the model once: ``(result, None)``, or ``(None, failure)`` after freeing memory."""
        self._stage = 'setup'
        try:
            return self._processor.process(rgb, camera, options), None
        except MetricGoldError:
            raise  # bad input or options: reported by the worker loop
        except Exception as err:  # noqa: B902 - any inference fault: logged, frame skipped
            if self._stop.is_set():
                raise  # shutting down: the worker loop ends quietly
            failure = _Failure(self._stage, type(err).__name__,
                               (str(err).splitlines() or [''])[0][:300], _is_out_of_memory(err))
            if self.get_logger().is_enabled_for(LoggingSeverity.DEBUG):
                self.get_logger().debug(traceback.format_exc())
        # Out of the except block: the traceback no longer pins the failed stage's tensors.
        self._free_memory(failure.out_of_memory)
        return None, failure

    def _free_memory(self, out_of_memory: bool) -> None:
        """Drop the warm-start latent and return cached GPU memory after a failed inference."""
        self._processor.reset()
        if out_of_memory:
            gc.collect()
        if self.pipeline.device.type == 'cuda':
            import torch

            torch.cuda.empty_cache()

    def _resolution(self, options: FrameOptions, width: int, height: int) -> int:
        """The longer side (px) the model works at for ``options`` and this image."""
        if options.processing_resolution is None:
            return int(self.pipeline.metadata.default_processing_resolution)
        return options.processing_resolution or max(width, height)

    def _report_failure(self, failure: _Failure, action: str) -> None:
        """Log an inference failure, each kind (stage, type, outcome) at most every few s."""
        key = ('inference', failure.stage, failure.kind, action.split(':')[0][:40])
        held = self._limiter.check(key)
        if held is not None:
            more = f' [and {held} more like this since the last report]' if held else ''
            self.get_logger().error(f'{self._image_sub.topic_name}: inference failed with '
                                    f'{failure.describe()}; {action}{more}')

    # -- camera info -------------------------------------------------------------------------

    def _camera(self, info: Optional[CameraInfo], width: int, height: int
                ) -> Optional[Intrinsics]:
        """Intrinsics for an image of this size, or None (logged) when there are none."""
        if info is None:
            self.get_logger().warning(
                f'no CameraInfo on {self._info_sub.topic_name} yet: publishing depth without '
                'depth/camera_info and points; remap camera_info to the camera\'s info topic',
                throttle_duration_sec=ERROR_PERIOD_S)
            return None
        try:
            camera = messages.intrinsics_from_camera_info(info)
            camera_for_image(camera, width, height)  # validated now: depth goes out either way
            if not all(math.isfinite(value) for value in info.d):
                raise InputError(f'D: {list(info.d)[:8]} holds NaN/inf; fix the camera '
                                 'calibration (distortion coefficients)')
            return camera
        except InputError as err:
            self._report(self._info_sub.topic_name,
                         f'{err} (publishing depth without depth/camera_info and points)')
            return None

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


def _run(args: Optional[List[str]]) -> int:
    """Spin the node until SIGINT/SIGTERM; 1 when the configuration cannot work.

    The signals are handled here, not by rclpy: its handler thread triggers the executor's
    guard condition while this thread may already be destroying it (a segfault in about one
    shutdown in 30 here). A signal before spinning ends the start-up (a model load in
    progress) at once; while spinning it ends the loop within SPIN_PERIOD_S.
    """
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        already_stopping = stop.is_set()
        stop.set()
        if not spinning and not already_stopping:
            raise KeyboardInterrupt

    spinning = False
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    node = None
    executor = SingleThreadedExecutor()
    try:
        node = DepthNode()
        executor.add_node(node)
        spinning = True
        while not stop.is_set() and rclpy.ok():
            executor.spin_once(timeout_sec=SPIN_PERIOD_S)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except (MetricGoldError, ParameterException) as err:
        rclpy.logging.get_logger(NODE_NAME).fatal(f'cannot start: {err}')
        return 1
    finally:
        stop.set()  # from here a second signal changes nothing
        executor.shutdown(timeout_sec=0)
        if node is not None:
            node.close()
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


def _exit_process(code: int) -> None:
    """End the process now that the node and rclpy are shut down.

    What remains of a normal exit is Python tearing down the torch/diffusers modules, 1-3 s
    that a SIGINT/SIGTERM should not wait for. Logs are flushed first (rcl's spdlog file sink
    buffers; finalising it twice is harmless).
    """
    try:
        from rclpy.impl.implementation_singleton import rclpy_implementation
        rclpy_implementation.rclpy_logging_fini()
    except Exception:  # noqa: B902 - best effort: a log flush must not change the exit code
        pass
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(args: Optional[List[str]] = None, *, exit_process: Optional[bool] = None) -> int:
    """The ``depth_node`` program: run the node; the exit code (1: unusable configuration).

    ``exit_process`` (default: when this process is the ``depth_node`` executable) ends the
    process at once after the shutdown instead of returning.
    """
    code = _run(args)
    if exit_process is None:
        exit_process = Path(sys.argv[0]).name == NODE_NAME
    if exit_process:
        _exit_process(code)
    return code


if __name__ == '__main__':
    sys.exit(main())
