"""Video warm start vs cold start on synthetic camera sequences: AbsRel, flicker and time.

Warm start initialises each frame's depth latent from the previous frame's, re-noised to
``strength`` of the schedule (the pipeline's ``init_latent``/``warm_start_strength``), so it runs
``round(steps * strength)`` UNet evaluations instead of ``steps``. Each setting runs over the
same held-out ``camera_sequence`` frames (indoor walk and outdoor drive) with the same seed.

    flicker = mean over consecutive frames of mean |log d_t - log d_(t-1)| on static pixels,
              i.e. pixels whose ground-truth depth changed by < 1 % (both valid).

A warm setting *wins* when both its AbsRel and its flicker are below those of the cold start
with the same number of UNet evaluations; the node keeps warm start off unless one does.

    python bench/warm_start.py --model DIR [--frames 20] [--json FILE]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metricgold_ros.tools import bench  # noqa: E402  (after the path fix for a source checkout)
from metricgold_ros.tools.bench_sweep import HELD_OUT_SEED  # noqa: E402
from metricgold_ros.atomic import write_json_atomic  # noqa: E402
from metricgold_ros.errors import MetricGoldError  # noqa: E402
from metricgold_ros.model_paths import load_model  # noqa: E402

STATIC_CHANGE = 0.01  # a pixel is static when its GT depth changed by less than 1 %
# (name, steps, warm_start_strength or None for a cold start)
SETTINGS: Tuple[Tuple[str, int, Optional[float]], ...] = (
    ('cold 1 step', 1, None), ('cold 2 steps', 2, None), ('cold 4 steps', 4, None),
    ('warm 1 step, strength 1.0', 1, 1.0), ('warm 2 steps, strength 0.5', 2, 0.5),
    ('warm 4 steps, strength 0.25', 4, 0.25), ('warm 4 steps, strength 0.5', 4, 0.5),
    ('warm 4 steps, strength 0.75', 4, 0.75))


def unet_evaluations(steps: int, strength: Optional[float]) -> int:
    """UNet calls per frame (per member), as MetricGoldPipeline runs them."""
    return steps if strength is None else max(1, min(steps, round(steps * strength)))


def run_setting(pipeline: Any, sequences: List[List[Any]], steps: int,
                strength: Optional[float]) -> Dict[str, float]:
    """AbsRel, flicker and median time per frame of one setting over all sequences."""
    from metricgold_ros.evaluation import depth_metrics

    abs_rel, flicker, times = [], [], []
    for frames in sequences:
        latent, previous = None, None
        for frame in frames:
            start = time.perf_counter()
            result = pipeline(frame.rgb, denoising_steps=steps, seed=0, init_latent=latent,
                              warm_start_strength=strength or 1.0)
            times.append(time.perf_counter() - start)
            latent = result.depth_latent if strength is not None else None
            abs_rel.append(depth_metrics(result.depth_m, frame.depth_m, frame.valid)['abs_rel'])
            if previous is not None:
                flicker.append(_flicker(previous, frame, result.depth_m))
            previous = (frame, result.depth_m)
    return {'abs_rel': float(np.mean(abs_rel)), 'flicker': float(np.nanmean(flicker)),
            'ms_per_frame': statistics.median(times) * 1e3}


def _flicker(previous: Tuple[Any, np.ndarray], frame: Any, depth_m: np.ndarray) -> float:
    """Mean |delta log depth| of the prediction on pixels whose GT changed < 1 %."""
    old_frame, old_depth = previous
    both = old_frame.valid & frame.valid
    with np.errstate(divide='ignore', invalid='ignore'):
        change = np.abs(frame.depth_m - old_frame.depth_m) / old_frame.depth_m
    static = both & (change < STATIC_CHANGE)
    if not static.any():
        return float('nan')
    return float(np.mean(np.abs(np.log(depth_m[static]) - np.log(old_depth[static]))))


def gt_flicker(sequences: List[List[Any]]) -> float:
    """The same measure on the ground truth itself: the floor a perfect model reaches."""
    values = [_flicker((a, a.depth_m), b, b.depth_m)
              for frames in sequences for a, b in zip(frames, frames[1:])]
    return float(np.nanmean(values))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', metavar='DIR', help='model folder (default: bundled model)')
    parser.add_argument('--frames', type=int, default=20, help='frames per sequence (20)')
    parser.add_argument('--size', default='640x480', help='frame size WIDTHxHEIGHT')
    parser.add_argument('--kinds', default='indoor,outdoor', help='sequence kinds')
    parser.add_argument('--seed', type=int, default=HELD_OUT_SEED,
                        help=f'scene seed (default {HELD_OUT_SEED}, held out)')
    parser.add_argument('--threads', type=int, default=1, help='CPU threads (default 1)')
    parser.add_argument('--device', default='cpu', help="'cpu', 'cuda' or 'auto'")
    parser.add_argument('--dtype', default='float32', help='float32, float16, bfloat16')
    parser.add_argument('--json', metavar='FILE', help='write the results as JSON')
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except MetricGoldError as err:
        print(f'ERROR: {err}', file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    from metricgold_ros.synthetic.scenes import camera_sequence

    bench.set_threads(args.threads)
    width, height = (int(v) for v in args.size.lower().split('x'))
    pipeline = load_model(args.model, '--model', device=args.device, dtype=args.dtype)
    sequences = [list(camera_sequence(args.seed, kind, args.frames, width, height))
                 for kind in args.kinds.split(',')]
    pipeline(sequences[0][0].rgb)  # warm-up
    rows = []
    for name, steps, strength in SETTINGS:
        row = {'setting': name, 'steps': steps, 'strength': strength,
               'unet_evaluations': unet_evaluations(steps, strength),
               **run_setting(pipeline, sequences, steps, strength)}
        rows.append(row)
        print(f"{name:30s} UNet x{row['unet_evaluations']}  AbsRel {row['abs_rel']:.4f}  "
              f"flicker {row['flicker']:.4f}  {row['ms_per_frame']:.0f} ms/frame", flush=True)
    cold = {r['unet_evaluations']: r for r in rows if r['strength'] is None}
    default_steps = pipeline.metadata.default_denoising_steps
    for row in rows:
        if row['strength'] is None:
            continue
        same = cold.get(row['unet_evaluations'])
        row['wins_vs_cold_same_evaluations'] = bool(
            same and row['abs_rel'] < same['abs_rel'] and row['flicker'] < same['flicker'])
        base = cold.get(default_steps)
        row['wins_vs_cold_default'] = bool(
            base and row['abs_rel'] < base['abs_rel'] and row['flicker'] < base['flicker'])
    winners = [r['setting'] for r in rows if r.get('wins_vs_cold_same_evaluations')]
    summary = {'gt_flicker': gt_flicker(sequences), 'winners_same_evaluations': winners,
               'recommendation': 'enable warm start' if winners else
               'keep warm start off (no setting wins on both AbsRel and flicker)'}
    print(f"GT flicker on static pixels: {summary['gt_flicker']:.4f}; winners at the same "
          f"UNet evaluations: {winners or 'none'} -> {summary['recommendation']}")
    if args.json:
        report = {'date': bench.datetime.datetime.now(bench.datetime.timezone.utc).isoformat(
            timespec='seconds'), 'machine': bench.machine_info(pipeline.device),
            'model': str(args.model or 'bundled'), 'frames_per_sequence': args.frames,
            'size': args.size, 'kinds': args.kinds, 'seed': args.seed,
            'static_change': STATIC_CHANGE, 'rows': rows, **summary}
        write_json_atomic(args.json, report)
        print(f'wrote {args.json}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
