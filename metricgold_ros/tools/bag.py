"""``metricgold bag INPUT OUTPUT``: add metric depth and point clouds to a rosbag.

With several INPUTs, or a folder to search, OUTPUT is a folder and the bags are converted by
worker processes or on a Ray cluster (:mod:`metricgold_ros.tools.fleet`), each as here.

Every image of one camera topic goes through the same per-frame code as the live node
(:class:`~metricgold_ros.depth_frame.DepthFrameProcessor` and ``frame_messages``), in order,
none dropped. The new rosbag2 bag holds the input topics (ROS 1 input converted to ROS 2
definitions, ROS 2 input byte for byte) and ``PREFIX/depth/image``, ``depth/camera_info``,
``depth/colored``, ``depth/uncertainty`` and ``points`` (and ``depth/scale`` with
``--camera-height-m`` or a camera-aware checkpoint), stamped with each image's header and
written at its log time. It is written under a temporary name and renamed when complete.
"""

import argparse
import contextlib
import json
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from metricgold_ros import messages
from metricgold_ros.constants import FRAME_STAGES
from metricgold_ros.depth_frame import (OUTPUT_TOPICS, DepthFrameProcessor, FrameOptions,
                                        frame_messages)
from metricgold_ros.errors import BagError, InputError
from metricgold_ros.faults import GuardedProcessor
from metricgold_ros.tools import bag_io, bag_output, fleet, fleet_summary
from metricgold_ros.tools.options import (
    add_inference_arguments, add_max_pixels_argument, add_mounting_arguments,
    add_output_arguments, load_pipeline, options_from_args, positive_int)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bag`` sub-command's flags."""
    parser.add_argument('input', metavar='INPUT', nargs='+',
                        help='rosbag2 folder, .mcap or .db3 file, or ROS 1 .bag; several, or '
                             'folders to search for them, for many bags at once')
    parser.add_argument('output', metavar='OUTPUT',
                        help='new rosbag2 folder to write (with many bags: the folder to write '
                             'them to, each at its path relative to the INPUT it was found in)')
    topics = parser.add_argument_group('topics')
    topics.add_argument('--image-topic', metavar='TOPIC',
                        help='Image or CompressedImage topic (default: the only one)')
    topics.add_argument('--camera-info-topic', metavar='TOPIC',
                        help='CameraInfo topic (default: camera_info beside the image)')
    topics.add_argument('--prefix', metavar='NS',
                        help="namespace of the output topics (default: the image's, e.g. "
                             '/camera for /camera/image_raw)')
    out = parser.add_argument_group('output bag')
    out.add_argument('--storage', choices=bag_output.STORAGES, default='mcap',
                     help='storage of the new bag (default mcap)')
    out.add_argument('--no-copy', dest='copy', action='store_false',
                     help='write only the new topics, not the input ones')
    out.add_argument('--overwrite', action='store_true', help='replace an existing OUTPUT')
    add_output_arguments(parser, points_help='write the point cloud (needs CameraInfo; '
                                             'default on)')
    sel = parser.add_argument_group('selection')
    sel.add_argument('--max-frames', type=positive_int, metavar='N',
                     help='stop after N images (the new bag ends there)')
    sel.add_argument('--start', type=float, metavar='S',
                     help='skip the first S seconds of the bag')
    sel.add_argument('--end', type=float, metavar='S',
                     help='stop S seconds after the bag start')
    sel.add_argument('--skip-bad-frames', action='store_true',
                     help='skip images that cannot be decoded instead of stopping')
    add_max_pixels_argument(sel)
    add_mounting_arguments(parser)
    add_inference_arguments(parser)
    parser.add_argument('--quiet', '-q', action='store_true',
                        help='no progress bar; print only a final JSON summary line')
    fleet.add_arguments(parser)
    parser.set_defaults(_parser=parser)


@dataclass
class _Plan:
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
class _Run:
    """Settings, counters and per-stage wall time (seconds) of one run."""

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


def run(args: argparse.Namespace) -> int:
    """Process the bag (or many); raise MetricGoldError for data problems (exit 1)."""
    _check_usage(args)
    if fleet.wants_fleet(args.input):
        return fleet.run(args, args.input)
    if args.ray is not None or args.workers:
        args._parser.error('--ray and --workers are for many bags: give several INPUTs or '
                           'a folder of bags')
    args.input = args.input[0]
    output, plan, counts, stats, seconds, load_s = _convert(args)
    data = summary(output.resolve(), plan, counts, stats, seconds, load_s)
    _report(args, data, output, plan, counts, stats, seconds, load_s)
    if args.summary_json:
        fleet_summary.write_summary(args.summary_json, data)
    _raise_failures(output, stats)
    return 0


def convert(args: argparse.Namespace, *, pipeline: Any,
            progress: Any = None) -> Dict[str, Any]:
    """One bag with a loaded ``pipeline`` (a fleet worker's); the run's :func:`summary`.

    ``progress.start(total)`` returns the progress bar to use instead of the terminal's. A bag
    with frames whose inference failed raises BagError (its output stays, as with one bag).
    """
    output, plan, counts, stats, seconds, load_s = _convert(args, pipeline, progress)
    _raise_failures(output, stats)
    return summary(output.resolve(), plan, counts, stats, seconds, load_s)


def _raise_failures(output: Path, stats: '_Run') -> None:
    if stats.failures:
        raise BagError(f'inference failed on {len(stats.failures)} image(s), skipped; {output} '
                       f'holds the other {stats.frames}. First: {stats.failures[0]}')


def _convert(args: argparse.Namespace, pipeline: Any = None, progress: Any = None) -> tuple:
    """``(output, plan, counts, stats, seconds, load_s)`` of converting the bag."""
    input_path, output = Path(args.input), Path(args.output)
    if not input_path.exists():
        raise BagError(f'INPUT {input_path}: no such file or folder')
    bag_output.check_output(output, input_path, args.overwrite)
    options = options_from_args(args)
    stats = _Run(quiet=args.quiet, skip_bad=args.skip_bad_frames, pixel_budget=args.max_pixels,
                 progress_source=progress)
    with _sigterm_as_interrupt(), bag_io.open_bag(input_path) as reader:
        plan = _plan(reader, input_path, args, stats)
        start = time.perf_counter()
        pipeline = load_pipeline(args) if pipeline is None else pipeline
        load_s = time.perf_counter() - start
        start = time.perf_counter()
        with bag_output.OutputBag(output, storage=args.storage,
                                  overwrite=args.overwrite) as out:
            processor = GuardedProcessor(DepthFrameProcessor(pipeline),
                                         args.fallback_processing_resolution)
            _process(reader, input_path, out, plan, processor, options, args, stats)
            finish = time.perf_counter()
            out.commit()
            stats.add('finalize', time.perf_counter() - finish)
            stats.add('writer_thread', out.writer_busy_s)  # overlaps the model
        seconds = time.perf_counter() - start
    return output, plan, out.counts, stats, seconds, load_s


def _check_usage(args: argparse.Namespace) -> None:
    """Flag combinations argparse cannot check: a usage error (exit code 2)."""
    parser = args._parser
    if args.start is not None and args.start < 0:
        parser.error(f'--start {args.start}: must be >= 0 seconds')
    if args.end is not None and args.end <= (args.start or 0.0):
        parser.error(f'--end {args.end}: must be after --start ({args.start or 0.0} s)')


def _plan(reader: Any, path: Path, args: argparse.Namespace, stats: _Run) -> _Plan:
    """Topics, output namespace, CameraInfo table and frame count."""
    connections = reader.connections
    image_topic = bag_io.select_image_topic(connections, args.image_topic)
    info_topic, how = bag_io.select_camera_info_topic(connections, image_topic,
                                                      args.camera_info_topic)
    infos = [c for c in connections if c.topic == info_topic]
    table = bag_io.CalibrationTable.read(reader, path, infos)
    if info_topic is None or not len(table):
        stats.warn(f'no CameraInfo for {image_topic} ({how}): writing depth only; point '
                   'clouds and depth/camera_info need CameraInfo (choose it with '
                   '--camera-info-topic)')
    elif how == 'only CameraInfo topic':
        stats.warn(f'using {info_topic}, the only CameraInfo topic, for {image_topic}')
    prefix = bag_io.camera_namespace(image_topic) if args.prefix is None \
        else ('/' + args.prefix.strip('/')).rstrip('/')
    if args.copy:
        existing = {bag_io.norm_topic(c.topic) for c in connections}
        clash = [f'{prefix}/{s}' for s in OUTPUT_TOPICS if f'{prefix}/{s}' in existing]
        if clash:
            raise BagError(f'the input bag already has {", ".join(clash)} (processed before?); '
                           'choose another --prefix, or --no-copy')
    image_connections = [c for c in connections if c.topic == image_topic]
    start_ns = stop_ns = None
    if args.start is not None:
        start_ns = reader.start_time + round(args.start * 1e9)
    if args.end is not None:
        stop_ns = reader.start_time + round(args.end * 1e9)
    if start_ns is None and stop_ns is None:
        total = sum(c.msgcount for c in image_connections)
    else:  # count the images in the window (reads them; cheap next to the model)
        total = sum(1 for _ in bag_io.guarded_messages(
            reader, path, connections=image_connections, start=start_ns, stop=stop_ns))
    if args.max_frames:
        total = min(total, args.max_frames)
    if total == 0 and not sum(c.msgcount for c in image_connections):
        raise BagError(f'{image_topic} has no messages in {path} (the topic was recorded, but '
                       'no image ever arrived: was the camera publishing?); topics with '
                       f'messages: {_with_messages(connections)}')
    if total == 0:
        raise BagError(f'no {image_topic} image in the selected part of the bag; check '
                       '--start/--end')
    return _Plan(image_topic, info_topic, prefix, table, image_connections, start_ns, stop_ns,
                 total)


def _with_messages(connections: List[Any]) -> str:
    names = sorted({f'{c.topic} ({c.msgcount})' for c in connections if c.msgcount})
    return ', '.join(names) or 'none (the bag is empty)'


def _copied(reader: Any, connections: List[Any], out: bag_output.OutputBag,
            stats: _Run) -> List[Any]:
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


def _process(reader: Any, path: Path, out: bag_output.OutputBag, plan: _Plan,
             processor: GuardedProcessor, options: FrameOptions, args: argparse.Namespace,
             stats: _Run) -> None:
    """Copy the input topics and add each image's outputs, in log-time order."""
    types = messages.rosbags_types(out.typestore)
    copied = _copied(reader, list(reader.connections), out, stats) if args.copy else []
    copied_ids = {connection.id for connection in copied}
    wanted = copied + [c for c in plan.image_connections if c.id not in copied_ids]
    stats.progress = stats.progress_source.start(plan.total) if stats.progress_source \
        else _progress_bar(plan.total, args.quiet)
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
                _frame(reader, path, out, plan, processor, options, types, stats,
                       connection, log_ns, raw)
                if stats.progress is not None:
                    stats.progress.update(1)
                if args.max_frames and stats.frames + stats.skipped >= args.max_frames:
                    break
            tick = time.perf_counter()
    finally:
        if stats.progress is not None:
            stats.progress.close()
            stats.progress = None
    if stats.frames == 0:
        raise BagError(f'no image of {plan.image_topic} could be processed ({stats.skipped} '
                       'skipped); nothing written')


def _frame(reader: Any, path: Path, out: bag_output.OutputBag, plan: _Plan,
           processor: GuardedProcessor, options: FrameOptions,
           types: messages.MessageTypes, stats: _Run,
           connection: Any, log_ns: int, raw: bytes) -> None:
    """One image: decode, pair CameraInfo, run the shared per-frame code, write outputs."""
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
    outcome = processor.process(rgb, calibration, options)
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
    outputs = frame_messages(types, msg.header, result)
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


def summary(output: Path, plan: _Plan, counts: Dict[str, int], stats: _Run, seconds: float,
            load_s: float) -> Dict[str, Any]:
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


def _report(args: argparse.Namespace, data: Dict[str, Any], output: Path, plan: _Plan,
            counts: Dict[str, int], stats: _Run, seconds: float, load_s: float) -> None:
    """``data`` (the :func:`summary`) as one JSON line with ``--quiet``, else a short human
    summary on stdout."""
    if args.quiet:
        print(json.dumps(data))
        return
    added = sum(n for topic, n in counts.items() if topic.startswith(f'{plan.prefix}/')
                and topic[len(plan.prefix) + 1:] in OUTPUT_TOPICS)
    print(f'wrote {output}: {stats.frames} frames of {plan.image_topic} in {seconds:.1f} s '
          f'({data["fps"]} frames/s; model load {load_s:.1f} s), {added} new messages, '
          f'{sum(counts.values()) - added} copied'
          + (f', {stats.skipped} images skipped' if stats.skipped else ''))
    stages = ', '.join(f'{k} {v:.2f}' for k, v in data['stages_s'].items())
    print(f'time per stage (s): {stages}; model {data["model_s"]:.2f} s, '
          f'{100 * (data["outside_model_share"] or 0):.0f}% of the run outside the model')


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt like Ctrl-C, so the partial output is removed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f'signal {signum}')

    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
