"""Inference options shared by ``metricgold infer`` and ``metricgold bag`` (one definition).

The flags carry the node's parameter names with dashes (``--denoising-steps`` is the node's
``denoising_steps``), so a setting tried offline carries over to the live node unchanged.
Malformed values are argparse usage errors (exit code 2); a model that cannot be used is a
:class:`~metricgold_ros.errors.CheckpointError` (exit code 1).
"""

import argparse
import dataclasses
import math
import os
import sys
from typing import TYPE_CHECKING, Any, Callable

from metricgold_ros.colorize import COLORMAPS
from metricgold_ros.constants import DTYPE_CHOICES
from metricgold_ros.depth_frame import FrameOptions
from metricgold_ros.faults import FAULT_ENV, fault_injector_from_env
from metricgold_ros.model_paths import load_model

if TYPE_CHECKING:
    from metricgold_ros.model import MetricGoldPipeline

def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = _parse(int, text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'{text!r} must be an integer >= 1')
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = _parse(int, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f'{text!r} must be an integer >= 0')
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = _parse(float, text)
    if not 0.0 < value < float('inf'):
        raise argparse.ArgumentTypeError(f'{text!r} must be a finite number > 0')
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    value = _parse(float, text)
    if not 0.0 <= value < float('inf'):
        raise argparse.ArgumentTypeError(f'{text!r} must be a finite number >= 0')
    return value


def fraction(text: str) -> float:
    """argparse type: a number in (0, 1]."""
    value = _parse(float, text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f'{text!r} must be a number in (0, 1]')
    return value


def _parse(kind: type, text: str) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f'{text!r} is not {"an integer" if kind is int else "a number"}') from None


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--model`` and the pipeline's run-time choices to ``parser``."""
    group = parser.add_argument_group('model and inference (the node parameters of the same '
                                      'names)')
    group.add_argument('--model', '--model-path', dest='model', metavar='DIR|ID',
                       help='checkpoint: a local folder, or a Hugging Face id org/name[@revision] '
                            'resolved through the hub cache (HF_HOME; downloaded once; '
                            'HF_HUB_OFFLINE=1 honoured); default: the bundled model')
    group.add_argument('--variant', metavar='NAME',
                       help='weights variant as diffusers names it (fp16: *.fp16.safetensors); '
                            'default: the plain weights')
    group.add_argument('--decoder', metavar='DIR|ID',
                       help='light VAE decoder (AutoencoderTiny/TAESD or AutoencoderKL), a '
                            "folder or hub id, used for decoding only; default: the model's VAE")
    group.add_argument('--denoising-steps', type=positive_int, metavar='N',
                       help="DDIM steps (default: the checkpoint's, usually 1-4)")
    group.add_argument('--ensemble-size', type=positive_int, default=1, metavar='N',
                       help='predictions per frame, combined by their median in log space; '
                            '> 1 also writes an uncertainty image (default 1)')
    group.add_argument('--processing-resolution', type=non_negative_int, metavar='PX',
                       help="longer side fed to the networks, 0 = native size (default: the "
                            "checkpoint's)")
    group.add_argument('--fallback-processing-resolution', type=non_negative_int, default=0,
                       metavar='PX',
                       help='on out-of-memory, retry the image once at this longer side (px); '
                            '0 (default): skip the image and report it')
    group.add_argument('--device', default='auto',
                       help="'auto' (a CUDA GPU when present, else CPU), 'cpu', 'cuda[:N]'")
    group.add_argument('--dtype', default='auto',
                       choices=DTYPE_CHOICES,
                       help='network precision (auto: float16 on CUDA, float32 on CPU)')
    group.add_argument('--seed', type=int, default=0,
                       help='seed of the initial noise: same seed, same depth (default 0); -1: '
                            'fresh noise every frame')
    group.add_argument('--warm-start', action='store_true',
                       help="start each frame from the previous frame's latent (video)")
    group.add_argument('--warm-start-strength', type=fraction, default=0.5, metavar='F',
                       help='share of the schedule re-run on a warm start (default 0.5)')
    group.add_argument('--allow-pickle', action='store_true',
                       help='also load pickled (.bin/.ckpt) weights; only for checkpoints you '
                            'trust, pickles can run code')


def add_output_arguments(parser: argparse.ArgumentParser, *, points_help: str) -> None:
    """Add the flags of what is derived from depth (colour image, cloud), as the node has."""
    group = parser.add_argument_group('outputs (the node parameters publish_*, points_*, ...)')
    group.add_argument('--output-scale', type=fraction, default=1.0, metavar='F',
                       help='depth size relative to the input image (default 1.0)')
    group.add_argument('--colored', '--publish-colored', dest='colored',
                       action=argparse.BooleanOptionalAction, default=True,
                       help='write the false-colour depth image (default on)')
    group.add_argument('--colormap', default='turbo', choices=sorted(COLORMAPS),
                       metavar='NAME', help='OpenCV colormap of the colour image (default turbo)')
    group.add_argument('--color-min-depth', dest='color_min_m', type=positive_float,
                       metavar='M', help='depth at the colormap start (default: 2nd percentile)')
    group.add_argument('--color-max-depth', dest='color_max_m', type=positive_float,
                       metavar='M', help='depth at the colormap end (default: 98th percentile)')
    group.add_argument('--points', '--publish-points', dest='points',
                       action=argparse.BooleanOptionalAction, default=True, help=points_help)
    group.add_argument('--points-stride', type=positive_int, default=1, metavar='N',
                       help='use every N-th pixel in both directions for points (default 1)')
    group.add_argument('--points-rgb', action='store_true',
                       help='colour the points with the image')
    group.add_argument('--max-depth', dest='max_depth_m', type=positive_float, default=math.inf,
                       metavar='M', help='points farther than this (m) become invalid')


def angle(low: float, high: float) -> Callable[[str], float]:
    """argparse type: a number of degrees in [low, high]."""
    def parse(text: str) -> float:
        value = _parse(float, text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f'{text!r} must be in [{low:g}, {high:g}] degrees')
        return value
    return parse


def add_mounting_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the camera's mounting (the ground fit's metric scale), as the node's parameters."""
    group = parser.add_argument_group(
        'metric scale from the mounting (the node parameters camera_height_m, ...): the floor '
        'at a known height fixes the scale; relative models then give metres and clouds')
    group.add_argument('--camera-height-m', dest='camera_height_m', type=non_negative_float,
                       default=0.0, metavar='M',
                       help='camera height above a level floor, metres (default 0: off)')
    group.add_argument('--camera-pitch-deg', dest='camera_pitch_deg', type=angle(-90, 90),
                       default=0.0, metavar='DEG',
                       help='optical axis below the horizon, degrees; positive looks down')
    group.add_argument('--camera-roll-deg', dest='camera_roll_deg', type=angle(-180, 180),
                       default=0.0, metavar='DEG',
                       help='turn about the optical axis, degrees; positive: the right side '
                            'dips')


def options_from_args(args: argparse.Namespace) -> FrameOptions:
    """FrameOptions from parsed flags: every field that has a flag of its name, else default.

    ``--seed -1`` means fresh noise for every frame (``seed=None``), as the node's ``seed``.
    """
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(FrameOptions)
              if hasattr(args, f.name)}
    if values.get('seed') is not None and values['seed'] < 0:
        values['seed'] = None
    return FrameOptions(**values)


def load_pipeline(args: argparse.Namespace) -> 'MetricGoldPipeline':
    """The MetricGoldPipeline that ``--model``/``--device``/``--dtype`` ask for.

    Debug only, as in the node: ``METRICGOLD_FAULT`` injects faults into its stages.
    """
    pipeline = load_model(getattr(args, 'model', None), '--model', device=args.device,
                          dtype=args.dtype, allow_pickle=args.allow_pickle,
                          variant=getattr(args, 'variant', None),
                          decoder=getattr(args, 'decoder', None))
    faults = fault_injector_from_env(os.environ)
    if faults is not None:
        print(f'metricgold: WARNING: {FAULT_ENV}={faults.spec!r}: injecting faults into the '
              'pipeline (debug only)', file=sys.stderr)
        pipeline.stage_hook = faults
    return pipeline


def add_max_pixels_argument(group: Any) -> None:
    """``--max-pixels N`` of ``bag`` and ``infer``: the node's ``max_pixels`` (one definition)."""
    from metricgold_ros.image_encodings import DEFAULT_PIXEL_BUDGET

    group.add_argument('--max-pixels', type=positive_int, default=DEFAULT_PIXEL_BUDGET,
                       metavar='N', help='refuse images (also compressed ones, before decoding) '
                       "with more pixels (default: %(default)s, as the node's max_pixels)")
