"""The depth node's inference worker: frames of all streams in, one batch through the model,
each stream's outputs out; and the node's rate-limited reports.

:class:`BatchWorker` owns the newest-frame :class:`~metricgold_ros.node.runtime.Mailboxes` and
one thread. Each round it takes what waits in every stream's slot (waiting up to
``batch_wait_ms`` for partners, at most ``max_batch_size`` frames, streams taking turns),
converts each to RGB, runs them as one batch (:func:`metricgold_ros.faults.process_batch`:
same processing size together, the rest in turn) and publishes every stream's outputs with
its input frame's header. A camera sending garbage fails its own frame only.
"""

import threading
import time
import traceback
from typing import Any, Callable, List, Mapping, Tuple

from rclpy.logging import LoggingSeverity

from metricgold_ros import messages
from metricgold_ros.depth_frame import OUTPUTS, FrameResult
from metricgold_ros.errors import MetricGoldError
from metricgold_ros.faults import FrameOutcome, GuardedJob, process_batch
from metricgold_ros.node.parameters import ParamValue, frame_options
from metricgold_ros.node.runtime import Mailboxes, RateLimiter
from metricgold_ros.node.stream import Frame, Stream

ERROR_PERIOD_S = 5.0  # each distinct problem is logged at most this often
JOIN_TIMEOUT_S = 1.0  # stop() waits this long for the thread; an inference may outlive it
TAKE_TIMEOUT_S = 0.2  # the thread looks for a stop request this often


class Reporter:
    """The node's problem reports: each distinct one logged at most every ERROR_PERIOD_S
    (streams apart), with the count of those held back."""

    def __init__(self, logger: Any) -> None:
        self.logger = logger
        self._limiter = RateLimiter(ERROR_PERIOD_S)

    def error(self, stream: Stream, topic: str, text: str) -> None:
        """Count an input error of ``stream`` and log it."""
        stream.stats.count('errors')
        self._log('error', (topic, text), f'{topic}: {text}')

    def warn(self, key: Tuple[Any, ...], text: str) -> None:
        """A warning, each ``key`` at most every ERROR_PERIOD_S."""
        self._log('warning', key, text)

    def note(self, key: Tuple[Any, ...], text: str) -> None:
        """An info line, each ``key`` at most every ERROR_PERIOD_S."""
        self._log('info', key, text)

    def failure(self, stream: Stream, outcome: FrameOutcome) -> None:
        """A frame whose inference failed (counted; logged per stage, kind and action)."""
        stream.stats.count('failed')
        if outcome.retried:
            stream.stats.count('retried')
        failure = outcome.failure
        key = (stream.name, 'inference', failure.stage, failure.kind,
               outcome.action.split(':')[0][:40])
        self._log('error', key, f'{stream.image_topic}: {outcome.report()}')

    def _log(self, severity: str, key: Tuple[Any, ...], text: str) -> None:
        held = self._limiter.check(key)
        if held is None:
            return
        text += f' [and {held} more like this since the last report]' if held else ''
        # One call site per severity: rclpy refuses one site logging at two severities.
        if severity == 'error':
            self.logger.error(text)
        elif severity == 'warning':
            self.logger.warning(text)
        else:
            self.logger.info(text)


class BatchWorker:
    """One thread serving all streams with one model (see the module docstring)."""

    def __init__(self, streams: List[Stream], values: Callable[[], Mapping[str, ParamValue]],
                 now_ns: Callable[[], int], reporter: Reporter, types: Any) -> None:
        """``values``: the node's current parameter values; ``now_ns``: the node's clock (for
        stamp->publish latency); ``types``: :func:`messages.rclpy_types`."""
        self._streams = streams
        self._values = values
        self._now_ns = now_ns
        self._reporter = reporter
        self._types = types
        self.mailboxes: Mailboxes[Frame] = Mailboxes(len(streams))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name='depth_worker', daemon=True)
        self._thread.start()

    def put(self, index: int, frame: Frame) -> bool:
        """Hand stream ``index``'s newest frame over; True when it replaced a waiting one."""
        return self.mailboxes.put(index, frame)

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._stop.is_set()

    def stop(self) -> None:
        """Stop the thread; an inference in progress finishes in the background (daemon)."""
        self._stop.set()
        self.mailboxes.close()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(JOIN_TIMEOUT_S)

    def _run(self) -> None:
        while not self._stop.is_set():
            values = self._values()
            taken = self.mailboxes.take(timeout_s=TAKE_TIMEOUT_S,
                                        gather_s=values['batch_wait_ms'] * 1e-3,
                                        limit=values['max_batch_size'])
            if not taken or self._stop.is_set():
                continue
            try:
                self._process(taken)
            except Exception as err:  # noqa: B902 - one bad batch must not end the worker
                if self._stop.is_set():
                    return  # shutting down: publishers may already be gone
                for index, _ in taken:
                    stream = self._streams[index]
                    self._reporter.error(stream, stream.image_topic,
                                         f'unexpected {type(err).__name__}: {err} (please '
                                         'report this with the debug log)')
                self._reporter.logger.debug(traceback.format_exc())

    def _process(self, taken: List[Tuple[int, Frame]]) -> None:
        """Convert the frames taken from the mailboxes, run them as one batch, publish."""
        jobs, frames = [], []
        for index, frame in taken:
            stream = self._streams[index]
            if not stream.has_subscribers():
                stream.stats.count('idle')
                continue
            try:
                jobs.append(self._job(stream, frame))
                frames.append((stream, frame))
            except MetricGoldError as err:
                self._reporter.error(stream, stream.image_topic, str(err))
        if not jobs:
            return
        outcomes, batch_failure = process_batch(jobs)
        if batch_failure is not None:
            self._reporter.warn(('batch', batch_failure.stage, batch_failure.kind), (
                f'a batch of {len(jobs)} frames failed ({batch_failure.describe()}): ran them '
                'one at a time; lower max_batch_size if this repeats'))
        for (stream, frame), outcome in zip(frames, outcomes):
            if isinstance(outcome, MetricGoldError):
                self._reporter.error(stream, stream.image_topic, str(outcome))
                continue
            if outcome.failure is not None:
                self._reporter.failure(stream, outcome)
            if outcome.result is not None and not self._stop.is_set():
                self._publish(stream, frame, outcome.result)

    def _job(self, stream: Stream, frame: Frame) -> GuardedJob:
        """The frame as RGB with its CameraInfo and its stream's options (InputError when the
        image cannot be read)."""
        values = self._values()
        msg = frame.msg
        stamp = messages.stamp_ns(msg.header.stamp)
        rgb = messages.rgb_from_msg(msg, pixel_budget=values['max_pixels'])  # [H,W,3]
        change = stream.follow_size(rgb.shape[1], rgb.shape[0], stamp)
        if change is not None:
            self._reporter.note((stream.name, 'size'), f'{stream.image_topic}: {change}')
        calibration = stream.infos.match(stamp)
        if calibration is None:
            self._reporter.warn((stream.name, 'no camera_info'), (
                f'no CameraInfo on {stream.info_topic} yet: publishing depth without '
                'depth/camera_info and points; remap camera_info to the camera\'s info topic'))
        options = frame_options(values, stream.overrides)
        options.colored = options.colored and stream.has_subscribers('depth/colored')
        options.points = options.points and stream.has_subscribers('points')
        return GuardedJob(stream.guard, rgb, calibration, options)

    def _publish(self, stream: Stream, frame: Frame, result: FrameResult) -> None:
        """Publish a frame's outputs with its input header; record its latency and stages."""
        if result.camera_problem is not None:
            self._reporter.error(stream, stream.info_topic, f'{result.camera_problem} '
                                 '(publishing depth without depth/camera_info and points)')
        self._follow_scale(stream, result)
        header = frame.msg.header
        for output in OUTPUTS:
            message = output.build(self._types, header, result)
            if message is not None:
                stream.publishers[output.topic].publish(message)
        latency_s = (self._now_ns() - messages.stamp_ns(header.stamp)) * 1e-9
        stream.stats.record(latency_s, result.timings_s)
        logger = self._reporter.logger
        if logger.is_enabled_for(LoggingSeverity.DEBUG):
            logger.debug(
                f'{stream.label} frame ' + ', '.join(
                    f'{k} {v * 1e3:.1f} ms' for k, v in result.timings_s.items())
                + f'; stamp->publish {latency_s * 1e3:.0f} ms, '
                f'{(time.monotonic() - frame.received_s) * 1e3:.0f} ms since receipt')

    def _follow_scale(self, stream: Stream, result: FrameResult) -> None:
        """Keep the frame's metric scale for /diagnostics; log notes and changes of state."""
        scale = result.scale
        if scale is None:
            return
        for note in scale.notes:
            self._reporter.logger.warning(f'{stream.label}: {note}')
        previous = stream.scale.fit.state if stream.scale is not None else 'off'
        stream.scale = scale
        if scale.fit.state == previous:
            return
        text = f'{stream.label}: metric scale: {scale.message}'
        if scale.fit.ok or scale.fit.state == 'off':
            self._reporter.note((stream.name, 'scale', scale.fit.state), text)
        else:
            self._reporter.warn((stream.name, 'scale', scale.fit.state), text)

