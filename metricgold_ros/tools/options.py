"""Inference options shared by ``metricgold infer`` and ``metricgold bag`` (one definition).

The flags are generated from the node's parameter table (:data:`metricgold_ros.node.parameters.
PARAMETERS`): ``--denoising-steps`` is the node's ``denoising_steps``, with its type, limits,
default and help, and parsed flags become FrameOptions through the node's own mapping, so a
setting tried offline carries over to the live node unchanged.
Malformed values are argparse usage errors (exit code 2); a model that cannot be used is a
:class:`~metricgold_ros.errors.CheckpointError` (exit code 1).
"""

import argparse
import dataclasses
import os
import sys
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Tuple

from metricgold_ros.depth_frame import FrameOptions
from metricgold_ros.faults import FAULT_ENV, fault_injector_from_env
from metricgold_ros.model_paths import load_model
from metricgold_ros.node.parameters import (PARAMETERS, SPECS, ParamSpec, check_parameter,
                                            frame_options)

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


def _parse(kind: type, text: str) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f'{text!r} is not {"an integer" if kind is int else "a number"}') from None


@dataclasses.dataclass(frozen=True)
class Flag:
    """A command-line flag generated from the node parameter ``param`` (one definition: its
    type, limits, choices, default and help come from :data:`node.parameters.PARAMETERS`).
    ``dest`` is the attribute it parses into; ``aliases`` are older spellings."""

    param: str
    dest: str = ''
    aliases: Tuple[str, ...] = ()
    metavar: Optional[str] = None

    @property
    def spec(self) -> ParamSpec:
        """The node parameter's spec."""
        return SPECS[self.param]

    def add(self, group: Any) -> None:
        """Add this flag to an argparse ``group``."""
        spec = self.spec
        names = ('--' + self.param.replace('_', '-'), *self.aliases)
        limits = spec.int_range or spec.float_range
        text = spec.description + (f' [{limits[0]}..{limits[1]}]' if limits else '')
        kwargs: Dict[str, Any] = dict(dest=self.dest or self.param, default=spec.default,
                                      help=text + ' (default: %(default)s)')
        if isinstance(spec.default, bool):
            kwargs['action'] = argparse.BooleanOptionalAction
        elif spec.choices is not None:
            kwargs.update(choices=spec.choices, metavar=self.metavar)
        else:
            kwargs.update(type=_node_value(spec), metavar=self.metavar)
        group.add_argument(*names, **kwargs)


def _node_value(spec: ParamSpec) -> Callable[[str], Any]:
    """argparse type: ``text`` as the node parameter's type, checked as the node checks it."""
    defaults = {other.name: other.default for other in PARAMETERS}

    def parse(text: str) -> Any:
        value = _parse(type(spec.default), text) if not isinstance(spec.default, str) else text
        reason = check_parameter(spec.name, value, defaults)
        if reason is not None:
            raise argparse.ArgumentTypeError(reason)
        return value
    parse.__name__ = type(spec.default).__name__  # argparse names the type in its errors
    return parse


# The node parameters that are also flags of `infer` and `bag`, by group. Dests are the node's
# names, so frame_options() (the node's own mapping) turns parsed flags into FrameOptions.
MODEL_FLAGS = (
    Flag('model_path', 'model', aliases=('--model',), metavar='DIR|ID'),
    Flag('variant', metavar='NAME'), Flag('decoder', metavar='DIR|ID'),
    Flag('device'), Flag('dtype'),
)
INFERENCE_FLAGS = (
    Flag('denoising_steps', metavar='N'), Flag('ensemble_size', metavar='N'),
    Flag('processing_resolution', metavar='PX'),
    Flag('fallback_processing_resolution', metavar='PX'),
    Flag('seed'), Flag('warm_start'), Flag('warm_start_strength', metavar='F'),
    Flag('edge_refine'),
)
OUTPUT_FLAGS = (
    Flag('output_scale', metavar='F'), Flag('publish_colored', aliases=('--colored',)),
    Flag('colormap', metavar='NAME'), Flag('color_min_depth', metavar='M'),
    Flag('color_max_depth', metavar='M'), Flag('publish_points', aliases=('--points',)),
    Flag('points_stride', metavar='N'), Flag('points_rgb'), Flag('max_depth', metavar='M'),
)
MOUNTING_FLAGS = (Flag('camera_height_m', metavar='M'), Flag('camera_pitch_deg', metavar='DEG'),
                  Flag('camera_roll_deg', metavar='DEG'))


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--model-path`` (``--model``) and the pipeline's run-time choices to ``parser``."""
    group = parser.add_argument_group('model and inference (the node parameters of the same '
                                      'names)')
    for flag in MODEL_FLAGS + INFERENCE_FLAGS:
        flag.add(group)
    group.add_argument('--allow-pickle', action='store_true',
                       help='also load pickled (.bin/.ckpt) weights; only for checkpoints you '
                            'trust, pickles can run code')


def add_output_arguments(parser: argparse.ArgumentParser, *, points_help: str) -> None:
    """Add the flags of what is derived from depth (colour image, cloud), as the node has;
    ``points_help`` says what the tool does with points."""
    group = parser.add_argument_group(f'outputs (the node parameters of the same names; '
                                      f'points: {points_help})')
    for flag in OUTPUT_FLAGS:
        flag.add(group)


def add_mounting_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the camera's mounting (the ground fit's metric scale), as the node's parameters."""
    group = parser.add_argument_group(
        'metric scale from the mounting (the node parameters camera_height_m, ...): the floor '
        'at a known height fixes the scale; relative models then give metres and clouds')
    for flag in MOUNTING_FLAGS:
        flag.add(group)


def options_from_args(args: argparse.Namespace) -> FrameOptions:
    """FrameOptions from parsed flags, through the node's own mapping (:func:`frame_options`):
    ``0`` steps or ``-1`` resolution mean the checkpoint's default, ``--seed -1`` fresh noise,
    ``--max-depth 0`` no limit, as the node's parameters of the same names."""
    values = {spec.name: getattr(args, spec.name, spec.default) for spec in PARAMETERS}
    return frame_options(values)


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
    Flag('max_pixels', metavar='N').add(group)
