"""Convert one rosbag: a :class:`BagJob` in, a :class:`BagResult` out (the library of
``metricgold bag``; :mod:`metricgold_ros.tools.bag` is its command line, fleet workers call it
for each bag of a many-bag run).

Every image of one camera topic goes through the same per-frame code as the live node
(:class:`~metricgold_ros.depth_frame.DepthFrameProcessor` and ``frame_messages``), in order,
none dropped. The new rosbag2 bag holds the input topics (ROS 1 input converted to ROS 2
definitions, ROS 2 input byte for byte) and ``PREFIX/depth/image``, ``depth/camera_info``,
``depth/colored``, ``depth/uncertainty`` and ``points`` (and ``depth/scale`` with a mounting or
a camera-aware checkpoint), stamped with each image's header and written at its log time. It is
written under a temporary name and renamed when complete. Times are seconds unless a name says
``_ns``.
"""

import dataclasses
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from metricgold_ros import messages
from metricgold_ros.constants import FRAME_STAGES
from metricgold_ros.depth_frame import (OUTPUT_TOPICS, DepthFrameProcessor, FrameOptions,
                                        frame_messages)
from metricgold_ros.errors import BagError, InputError
from metricgold_ros.faults import GuardedProcessor
from metricgold_ros.image_encodings import DEFAULT_PIXEL_BUDGET
from metricgold_ros.tools import bag_io, bag_output
from metricgold_ros.tools.signals import sigterm_as_interrupt


@dataclass(frozen=True)
class BagJob:
    """One bag to convert and how (the ``bag`` command's flags, parsed; plain data that
    pickles to a worker process or a Ray actor).

    ``None`` topics and prefix are chosen from the bag; ``start_s``/``end_s`` are seconds after
    the bag's start; ``max_pixels`` refuses larger images before decoding.
    """

    input: Path
    output: Path
    options: FrameOptions = field(default_factory=FrameOptions)
    image_topic: Optional[str] = None
    camera_info_topic: Optional[str] = None
    prefix: Optional[str] = None
    storage: str = 'mcap'
    copy: bool = True
    overwrite: bool = False
    max_frames: Optional[int] = None
    start_s: Optional[float] = None
    end_s: Optional[float] = None
    skip_bad_frames: bool = False
    max_pixels: Optional[int] = DEFAULT_PIXEL_BUDGET
    fallback_processing_resolution: int = 0
    quiet: bool = False

    def for_bag(self, input_path: Any, output: Any, **changes: Any) -> 'BagJob':
        """This job's settings for another bag (a fleet's jobs share one template)."""
        return dataclasses.replace(self, input=Path(input_path), output=Path(output), **changes)


@dataclass
class BagPlan:
    """What to read and where to write, settled before the model loads."""

    image_topic: str
    info_topic: Optional[str]
    prefix: str
    table: bag_io.CalibrationTable
    image_connections: List[Any]
    start_ns: Optional[int]
    stop_ns: Optional[int]
    total: Optional[int]


@dataclass
class RunStats:
    """Settings, counters and per-stage wall time (seconds) of one conversion."""

    quiet: bool
    skip_bad: bool = False
    pixel_budget: Optional[int] = None
    frames: int = 0
    skipped: int = 0
    failures: List[str] = field(default_factory=list)  # frames whose inference failed
    model_s: float = 0.0
    pairing: Counter = field(default_factory=Counter)
    fit_states: Counter = field(default_factory=Counter)  # ground fit state per frame
    stages_s: Dict[str, float] = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)
    progress: Any = None
    progress_source: Any = None  # a fleet worker's: ``.start(total)`` returns its bar

    def add(self, stage: str, seconds: float) -> None:
        self.stages_s[stage] = self.stages_s.get(stage, 0.0) + seconds

    def warn(self, text: str) -> None:
        """Report a problem once (stderr now, and in the summary)."""
        if text in self.warnings:
            return
        self.warnings.append(text)
        self._say(f'WARNING: {text}')

    def error(self, text: str) -> None:
        """Report a frame that failed (stderr now; the summary lists ``failures``)."""
        self._say(f'ERROR: {text}')

    def _say(self, line: str) -> None:
        if self.quiet:
            return
        if self.progress is not None:
            self.progress.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr)


@dataclass
class BagResult:
    """A converted bag: where it is, what was read, counts per topic and the run's numbers."""

    output: Path
    plan: BagPlan
    counts: Dict[str, int]
    stats: RunStats
    seconds: float
    model_load_s: float

    @property
    def frames(self) -> int:
        return self.stats.frames

    def summary(self) -> Dict[str, Any]:
        """The run's numbers as plain data (:func:`summary`)."""
        return summary(self.output.resolve(), self.plan, self.counts, self.stats, self.seconds,
                       self.model_load_s)

    def raise_failures(self) -> None:
        """BagError when inference failed on some images (the output holds the others)."""
        stats = self.stats
        if stats.failures:
            raise BagError(f'inference failed on {len(stats.failures)} image(s), skipped; '
                           f'{self.output} holds the other {stats.frames}. First: '
                           f'{stats.failures[0]}')


@dataclass
class _Context:
    """What every frame of one conversion shares."""

    reader: Any
    path: Path
    out: bag_output.OutputBag
    plan: BagPlan
    processor: GuardedProcessor
    options: FrameOptions
    types: messages.MessageTypes
    stats: RunStats


def convert(job: BagJob, *, pipeline: Any = None,
            load_pipeline: Optional[Callable[[], Any]] = None,
            progress: Any = None) -> BagResult:
    """Convert ``job``'s bag with ``pipeline`` (or the one ``load_pipeline()`` returns, called
    once the bag's topics are settled); a MetricGoldError for data problems.

    ``progress.start(total)`` returns the progress bar to use instead of the terminal's (a
    fleet worker's). Images whose inference failed do not raise here: see
    :meth:`BagResult.raise_failures`.
    """
    input_path, output = Path(job.input), Path(job.output)
    if not input_path.exists():
        raise BagError(f'INPUT {input_path}: no such file or folder')
    bag_output.check_output(output, input_path, job.overwrite)
    if pipeline is None and load_pipeline is None:
        raise ValueError('convert needs a pipeline or load_pipeline')
    stats = RunStats(quiet=job.quiet, skip_bad=job.skip_bad_frames, pixel_budget=job.max_pixels,
                     progress_source=progress)
    with sigterm_as_interrupt(), bag_io.open_bag(input_path) as reader:
        plan = _plan(reader, input_path, job, stats)
        start = time.perf_counter()
        pipeline = load_pipeline() if pipeline is None else pipeline
        load_s = time.perf_counter() - start
        start = time.perf_counter()
        with bag_output.OutputBag(output, storage=job.storage, overwrite=job.overwrite) as out:
            processor = GuardedProcessor(DepthFrameProcessor(pipeline),
                                         job.fallback_processing_resolution)
            ctx = _Context(reader, input_path, out, plan, processor, job.options,
                           messages.rosbags_types(out.typestore), stats)
            _process(ctx, job)
            finish = time.perf_counter()
            out.commit()
            stats.add('finalize', time.perf_counter() - finish)
            stats.add('writer_thread', out.writer_busy_s)  # overlaps the model
        seconds = time.perf_counter() - start
    return BagResult(output, plan, out.counts, stats, seconds, load_s)


def _plan(reader: Any, path: Path, job: BagJob, stats: RunStats) -> BagPlan:
    """Topics, output namespace, CameraInfo table and frame count."""
    connections = reader.connections
    image_topic = bag_io.select_image_topic(connections, job.image_topic)
    info_topic, how = bag_io.select_camera_info_topic(connections, image_topic,
                                                      job.camera_info_topic)
    infos = [c for c in connections if c.topic == info_topic]
    table = bag_io.CalibrationTable.read(reader, path, infos)
    if info_topic is None or not len(table):
        stats.warn(f'no CameraInfo for {image_topic} ({how}): writing depth only; point '
                   'clouds and depth/camera_info need CameraInfo (choose it with '
                   '--camera-info-topic)')
    elif how == 'only CameraInfo topic':
        stats.warn(f'using {info_topic}, the only CameraInfo topic, for {image_topic}')
    prefix = bag_io.camera_namespace(image_topic) if job.prefix is None \
        else ('/' + job.prefix.strip('/')).rstrip('/')
    if job.copy:
        existing = {bag_io.norm_topic(c.topic) for c in connections}
        clash = [f'{prefix}/{s}' for s in OUTPUT_TOPICS if f'{prefix}/{s}' in existing]
        if clash:
            raise BagError(f'the input bag already has {", ".join(clash)} (processed before?); '
                           'choose another --prefix, or --no-copy')
    image_connections = [c for c in connections if c.topic == image_topic]
    start_ns = stop_ns = None
    if job.start_s is not None:
        start_ns = reader.start_time + round(job.start_s * 1e9)
    if job.end_s is not None:
        stop_ns = reader.start_time + round(job.end_s * 1e9)
    if start_ns is None and stop_ns is None:
        total = sum(c.msgcount for c in image_connections)
    else:  # count the images in the window (reads them; cheap next to the model)
        total = sum(1 for _ in bag_io.guarded_messages(
            reader, path, connections=image_connections, start=start_ns, stop=stop_ns))
    if job.max_frames:
        total = min(total, job.max_frames)
    if total == 0 and not sum(c.msgcount for c in image_connections):
        raise BagError(f'{image_topic} has no messages in {path} (the topic was recorded, but '
                       'no image ever arrived: was the camera publishing?); topics with '
                       f'messages: {_with_messages(connections)}')
    if total == 0:
        raise BagError(f'no {image_topic} image in the selected part of the bag; check '
                       '--start/--end')
    return BagPlan(image_topic, info_topic, prefix, table, image_connections, start_ns, stop_ns,
                 total)


def _with_messages(connections: List[Any]) -> str:
    names = sorted({f'{c.topic} ({c.msgcount})' for c in connections if c.msgcount})
    return ', '.join(names) or 'none (the bag is empty)'


def _copied(reader: Any, connections: List[Any], out: bag_output.OutputBag,
            stats: RunStats) -> List[Any]:
    """Register the input connections for copying; those that cannot be copied are skipped."""
    copied = []
    for connection in connections:
        problem = bag_io.copy_problem(reader, connection)
        if problem is None:
            try:
                out.add_copy(reader, connection)
            except Exception as err:  # noqa: B902 - rosbags' type conversion raises many kinds
                problem = f'its type cannot be converted to ROS 2 ({type(err).__name__}: {err})'
        if problem is not None:
            stats.warn(f'{connection.topic} ({connection.msgtype}, {connection.msgcount} '
                       f'messages) is not copied: {problem}')
            continue
        copied.append(connection)
    return copied


def _process(ctx: '_Context', job: BagJob) -> None:
    """Copy the input topics and add each image's outputs, in log-time order."""
    reader, path, out, plan, stats = ctx.reader, ctx.path, ctx.out, ctx.plan, ctx.stats
    copied = _copied(reader, list(reader.connections), out, stats) if job.copy else []
    copied_ids = {connection.id for connection in copied}
    wanted = copied + [c for c in plan.image_connections if c.id not in copied_ids]
    stats.progress = stats.progress_source.start(plan.total) if stats.progress_source \
        else _progress_bar(plan.total, job.quiet)
    try:
        tick = time.perf_counter()
        for connection, log_ns, raw in bag_io.guarded_messages(
                reader, path, connections=wanted, start=plan.start_ns, stop=plan.stop_ns):
            read_done = time.perf_counter()
            stats.add('read', read_done - tick)
            if connection.id in copied_ids:
                out.write_copy(connection, log_ns, raw)
                stats.add('copy', time.perf_counter() - read_done)
            if connection.topic == plan.image_topic:
                _frame(ctx, connection, log_ns, raw)
                if stats.progress is not None:
                    stats.progress.update(1)
                if job.max_frames and stats.frames + stats.skipped >= job.max_frames:
                    break
            tick = time.perf_counter()
    finally:
        if stats.progress is not None:
            stats.progress.close()
            stats.progress = None
    if stats.frames == 0:
        raise BagError(f'no image of {plan.image_topic} could be processed ({stats.skipped} '
                       'skipped); nothing written')


def _frame(ctx: '_Context', connection: Any, log_ns: int, raw: bytes) -> None:
    """One image: decode, pair CameraInfo, run the shared per-frame code, write outputs."""
    reader, path, out, plan, stats = ctx.reader, ctx.path, ctx.out, ctx.plan, ctx.stats
    start = time.perf_counter()
    msg = bag_io.deserialize(reader, path, connection, raw)
    stamp = messages.stamp_ns(msg.header.stamp)
    try:
        rgb = messages.rgb_from_msg(msg, pixel_budget=stats.pixel_budget)
    except InputError as err:
        where = f'{connection.topic} image {stats.frames + stats.skipped + 1} (stamp {stamp} ns)'
        if not stats.skip_bad:
            raise InputError(f'{where}: {err}. Pass --skip-bad-frames to skip such '
                             'images') from err
        stats.skipped += 1
        stats.warn(f'skipped {where}: {err}')
        return
    stats.add('decode', time.perf_counter() - start)

    calibration, how = plan.table.lookup(stamp)
    stats.pairing[how] += 1
    outcome = ctx.processor.process(rgb, calibration, ctx.options)
    if outcome.failure is not None:
        where = f'{connection.topic} image at stamp {stamp} ns'
        if outcome.result is None:
            stats.failures.append(f'{where}: {outcome.report()}')
            stats.skipped += 1
        stats.error(f'{where}: {outcome.report()}')
        if outcome.result is None:
            return
    result = outcome.result
    if result.camera_problem is not None:
        stats.warn(f'{plan.info_topic}: {result.camera_problem}; no point cloud or '
                   'depth/camera_info for those images')
    if result.scale is not None:
        for note in result.scale.notes:
            stats.warn(note)
        if result.scale.fit.state != 'off':
            stats.fit_states[result.scale.fit.state] += 1
    for stage, seconds in result.timings_s.items():
        stats.add(stage, seconds)
        if stage not in FRAME_STAGES:
            stats.model_s += seconds

    start = time.perf_counter()
    outputs = frame_messages(ctx.types, msg.header, result)
    for suffix, out_msg in outputs.items():
        out.write_message(f'{plan.prefix}/{suffix}', log_ns, out_msg)
    stats.add('outputs', time.perf_counter() - start)
    stats.frames += 1


def _progress_bar(total: Optional[int], quiet: bool) -> Any:
    """A tqdm bar (frames, frames/s, ETA) when stderr is a terminal, else None."""
    if quiet or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit='frame', desc='depth', dynamic_ncols=True)


def summary(output: Path, plan: BagPlan, counts: Dict[str, int], stats: RunStats,
            seconds: float, load_s: float) -> Dict[str, Any]:
    """The run's numbers: frames, time, frames/s and where the time went (seconds)."""
    model_s = stats.model_s
    return {
        'output': str(output),
        'frames': stats.frames,
        'seconds': round(seconds, 3),
        'fps': round(stats.frames / seconds, 3) if seconds > 0 else None,
        'skipped_frames': stats.skipped,
        'image_topic': plan.image_topic,
        'camera_info_topic': plan.info_topic,
        'camera_info_pairing': dict(stats.pairing),
        'ground_fit': dict(stats.fit_states),
        'messages': dict(sorted(counts.items())),
        'model_load_s': round(load_s, 3),
        'model_s': round(model_s, 3),
        'outside_model_share': round(1.0 - model_s / seconds, 3) if seconds > 0 else None,
        'stages_s': {k: round(v, 3) for k, v in stats.stages_s.items()},
        'warnings': stats.warnings,
        'failures': stats.failures,
    }
