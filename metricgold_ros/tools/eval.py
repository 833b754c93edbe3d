"""``metricgold eval``: score a folder of predicted depth against a folder of 16-bit GT PNGs.

Usage::

    metricgold eval --pred PRED_DIR --gt GT_DIR [--protocol generic|nyu|kitti]
        [--gt-scale UNITS_PER_M] [--align none|scale|scale-shift]
        [--min-depth M --max-depth M] [--json FILE] [--per-image]

All the logic lives in :mod:`metricgold_ros.evaluation`; this module only parses arguments,
picks defaults, prints the table and writes the JSON report.
"""

import argparse
from pathlib import Path

from metricgold_ros.atomic import write_json_atomic
from metricgold_ros.errors import InputError
from metricgold_ros.evaluation import (ALIGN_MODES, PROTOCOLS, evaluate_folder, format_table,
                                       get_protocol)

# GT PNG units per metre of each benchmark's published files. 'generic' has none on purpose: a
# guessed scale (1000 for mm, 5000 for TUM, 256 for KITTI-style) gives plausible wrong numbers.
DEFAULT_GT_SCALE = {'nyu': 1000.0, 'kitti': 256.0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``eval`` options to ``parser`` (called by :mod:`metricgold_ros.tools.cli`)."""
    parser.add_argument('--pred', required=True, type=Path, metavar='DIR',
                        help='predictions: <stem>.npy (float metres) or <stem>.png (16-bit '
                             'millimetres), same relative path and stem as the GT PNG')
    parser.add_argument('--gt', required=True, type=Path, metavar='DIR',
                        help='ground truth: 16-bit depth PNGs, searched recursively, 0 = invalid')
    parser.add_argument('--gt-scale', type=float, default=None, metavar='UNITS_PER_M',
                        help='GT PNG value per metre (default 1000 for nyu, 256 for kitti; '
                             'required for generic, e.g. 1000 mm, 5000 TUM, 256 KITTI-style)')
    parser.add_argument('--protocol', choices=sorted(PROTOCOLS), default='generic',
                        help='crop and depth caps: nyu = Eigen crop, 1e-3..10 m; kitti = Garg '
                             'crop, 1e-3..80 m; generic = no crop (default)')
    parser.add_argument('--align', choices=ALIGN_MODES, default='none',
                        help='least-squares alignment per image before scoring (default none: '
                             'MetricGold is metric)')
    parser.add_argument('--min-depth', type=float, default=None, metavar='M',
                        help='generic only: lower depth cap in metres (default 0.001)')
    parser.add_argument('--max-depth', type=float, default=None, metavar='M',
                        help='generic only: upper depth cap in metres (default none)')
    parser.add_argument('--json', type=Path, default=None, metavar='FILE',
                        help='also write the report (mean and per-image metrics) as JSON')
    parser.add_argument('--per-image', action='store_true',
                        help='print one table row per image, not only the mean')


def run(args: argparse.Namespace) -> int:
    """Evaluate, print the table, write the JSON; expected failures raise InputError."""
    protocol = get_protocol(args.protocol, args.min_depth, args.max_depth)
    gt_scale = args.gt_scale if args.gt_scale is not None else DEFAULT_GT_SCALE.get(protocol.name)
    if gt_scale is None:
        raise InputError('--gt-scale is required with --protocol generic: the GT PNG value per '
                         'metre (1000 for millimetres, 5000 for TUM, 256 for KITTI-style)')
    report = evaluate_folder(args.pred, args.gt, gt_scale, protocol, args.align)
    print(format_table(report, per_image=args.per_image))
    if args.json is not None:
        if not Path(args.json).parent.is_dir():
            raise InputError(f'--json {args.json}: folder {Path(args.json).parent} does not '
                             'exist')
        write_json_atomic(args.json, report.to_json())
        print(f'wrote {args.json}')
    return 0
