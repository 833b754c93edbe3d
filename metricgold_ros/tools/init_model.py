"""``metricgold init-model DIR --tiny``: write a randomly initialised tiny checkpoint.

For smoke tests of the node and tools, and as the starting point of training a small model
from scratch. Its predictions are meaningless until it is trained.
"""

import argparse
from pathlib import Path

from metricgold_ros.errors import InputError
from metricgold_ros.model.checkpoint import save_checkpoint
from metricgold_ros.model.tiny import build_tiny_checkpoint
from metricgold_ros.atomic import describe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('output', metavar='DIR', help='folder to create (must not exist)')
    parser.add_argument('--tiny', action='store_true', required=True,
                        help='the tiny architecture (the only one that can be made from nothing)')
    parser.add_argument('--seed', type=int, default=0, help='initialisation seed (default 0)')
    parser.add_argument('--d-min', type=float, default=0.5, help='codec minimum depth, metres')
    parser.add_argument('--d-max', type=float, default=80.0, help='codec maximum depth, metres')
    parser.add_argument('--processing-resolution', type=int, default=320,
                        help='default longer side fed to the networks (px)')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing DIR')


def run(args: argparse.Namespace) -> int:
    if not 0 < args.d_min < args.d_max:
        raise InputError(f'--d-min {args.d_min} / --d-max {args.d_max}: need 0 < d_min < d_max')
    check_replaceable_model(Path(args.output).expanduser(), args.overwrite)
    checkpoint = build_tiny_checkpoint(
        seed=args.seed, d_min_m=args.d_min, d_max_m=args.d_max,
        processing_resolution=args.processing_resolution)
    path = save_checkpoint(args.output, checkpoint, overwrite=args.overwrite)
    print(f'wrote a randomly initialised tiny MetricGold model to {path} '
          f'(depth range {args.d_min}..{args.d_max} m; untrained: predictions are noise)')
    return 0


def check_replaceable_model(path: Path, overwrite: bool) -> None:
    """InputError when DIR exists and is not a model folder that ``--overwrite`` may replace.

    ``--overwrite`` replaces only what this command writes: a folder with model_index.json.
    """
    if not (path.exists() or path.is_symlink()):
        return
    if not overwrite:
        raise InputError(f'DIR {path} exists ({describe(path)}); pass --overwrite to replace a '
                         'model folder, or choose another DIR')
    if not (path.is_dir() and (path / 'model_index.json').is_file()):
        raise InputError(f'DIR {path} is {describe(path)}, not a model folder: --overwrite '
                         'replaces only a folder with model_index.json. Choose another DIR, '
                         'or move that away yourself')
