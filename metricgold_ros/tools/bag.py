"""``metricgold bag INPUT OUTPUT``: add metric depth and point clouds to a rosbag.

The command line of :mod:`metricgold_ros.tools.bag_convert`: the flags are parsed into a
:class:`~metricgold_ros.tools.bag_convert.BagJob` here, at the edge, and the library converts
it. With several INPUTs, or a folder to search, OUTPUT is a folder and the bags are converted
by worker processes or on a Ray cluster (:mod:`metricgold_ros.tools.fleet_run`), each as here.
"""

import argparse
import json
from pathlib import Path
from typing import Any, Dict

from metricgold_ros.depth_frame import OUTPUT_TOPICS
from metricgold_ros.tools import bag_output, fleet, fleet_run, fleet_summary
from metricgold_ros.tools.bag_convert import BagJob, BagResult, convert
from metricgold_ros.tools.options import (
    add_inference_arguments, add_max_pixels_argument, add_mounting_arguments,
    add_output_arguments, load_pipeline, non_negative_float, options_from_args, positive_float,
    positive_int)


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
    sel.add_argument('--start', type=non_negative_float, metavar='S',
                     help='skip the first S seconds of the bag')
    sel.add_argument('--end', type=positive_float, metavar='S',
                     help='stop S seconds after the bag start')
    sel.add_argument('--skip-bad-frames', action='store_true',
                     help='skip images that cannot be decoded instead of stopping')
    add_max_pixels_argument(sel)
    add_mounting_arguments(parser)
    add_inference_arguments(parser)
    parser.add_argument('--quiet', '-q', action='store_true',
                        help='no progress bar; print only a final JSON summary line')
    fleet_run.add_arguments(parser)
    parser.set_defaults(_parser=parser)


def job_from_args(args: argparse.Namespace) -> BagJob:
    """The :class:`BagJob` the parsed flags describe (for many bags: the template of each)."""
    inputs = args.input if isinstance(args.input, str) else args.input[0]
    return BagJob(
        input=Path(inputs), output=Path(args.output), options=options_from_args(args),
        image_topic=args.image_topic, camera_info_topic=args.camera_info_topic,
        prefix=args.prefix, storage=args.storage, copy=args.copy, overwrite=args.overwrite,
        max_frames=args.max_frames, start_s=args.start, end_s=args.end,
        skip_bad_frames=args.skip_bad_frames, max_pixels=args.max_pixels,
        fallback_processing_resolution=args.fallback_processing_resolution, quiet=args.quiet)


def run(args: argparse.Namespace) -> int:
    """Process the bag (or many); raise MetricGoldError for data problems (exit 1)."""
    _check_usage(args)
    if fleet.wants_fleet(args.input):
        return fleet_run.run(args, args.input, job_from_args(args))
    if args.ray is not None or args.workers:
        args._parser.error('--ray and --workers are for many bags: give several INPUTs or '
                           'a folder of bags')
    result = convert(job_from_args(args), load_pipeline=lambda: load_pipeline(args))
    data = result.summary()
    _report(args.quiet, data, result)
    if args.summary_json:
        fleet_summary.write_summary(args.summary_json, data)
    result.raise_failures()
    return 0


def _check_usage(args: argparse.Namespace) -> None:
    """Flag combinations argparse cannot check: a usage error (exit code 2)."""
    parser = args._parser  # (--start >= 0 and a finite --end > 0 are their types' checks)
    if args.end is not None and args.end <= (args.start or 0.0):
        parser.error(f'--end {args.end}: must be after --start ({args.start or 0.0} s)')


def _report(quiet: bool, data: Dict[str, Any], result: BagResult) -> None:
    """``data`` (the result's summary) as one JSON line with ``quiet``, else a short human
    summary on stdout."""
    output, plan, counts, stats = result.output, result.plan, result.counts, result.stats
    seconds, load_s = result.seconds, result.model_load_s
    if quiet:
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
