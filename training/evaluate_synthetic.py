"""Score a model on a held-out synthetic split next to two model-free baselines.

    python training/evaluate_synthetic.py --model DIR --per-kind 100 --json FILE

Renders held-out rooms and streets (scene seeds from ``--seed``, far from the training seeds),
predicts depth with the model (a camera-aware one is given each image's focal length, as the
node gets it from CameraInfo), and scores three predictions per image with ``metricgold eval``
(the same code, through its command line): the model; the best constant depth (the median of
the training split's valid depth, per domain); and an oracle-scaled constant (per image, the
constant with the lowest AbsRel against that image's ground truth: the 1/depth-weighted median,
which a model would have to know the scene's scale to match).
Beside AbsRel and delta1 each method gets depth-boundary precision / recall / F1 against the
generator's exact discontinuities (:func:`metricgold_ros.boundaries.boundary_counts`: jumps of
more than 10 %, found in the prediction as steps over 3 px - a 128-px model's jump spreads over
2.5 px at 320x240; the exact depth shrunk to 128x96 and enlarged back scores F1 0.93 indoors,
0.76 outdoors - matched within 2 px, pooled over a domain's images), and the model's edge frame
is measured on ``--walls`` flat walls seen square on (border AbsRel, a band of 1/32 of the
width, against the centre's, the prediction scale-fitted per image:
:func:`metricgold_ros.boundaries.border_abs_rel`).
The per-image scale ambiguity is reported beside them: the share of scenes whose median
predicted / true depth is off by more than 1.5x either way, and the worst scene's seed.
Ground truth is written as 16-bit PNG with 256 units per metre (the KITTI convention: outdoor
depth reaches 80 m, beyond uint16 millimetres); predictions as ``.npy`` metres.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Dict, Optional, Sequence

import cv2
import numpy as np

try:
    from metricgold_ros.tools import cli
except ImportError:  # run from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from metricgold_ros.tools import cli
from metricgold_ros.canonical_camera import for_camera
from metricgold_ros.boundaries import BoundaryCounts, border_abs_rel, boundary_counts
from metricgold_ros.model import MetricGoldPipeline
from metricgold_ros.synthetic.scenes import KINDS, flat_wall, render_sample

GT_UNITS_PER_M = 256.0
METHODS = ('model', 'constant', 'oracle_constant')
BOUNDARY_JUMP = 0.10  # a depth boundary: neighbours more than 10 % apart
BOUNDARY_BASELINE_PX = 3  # ... in the prediction, over 3 px
BOUNDARY_TOLERANCE_PX = 2
WALL_DISTANCES_M = (1.0, 2.0, 3.5, 6.0)
WALL_BAND_FRACTION = 1 / 32  # of the width: 10 px at 320 px, 4 px of a 128-px model's output
SCALE_OFF = 1.5  # an image's scale is off when its median pred / true is beyond 1.5x either way


def training_medians(train_seed: int, count: int, width: int, height: int) -> Dict[str, float]:
    """Median valid depth (metres) per domain over the first ``count`` training scenes."""
    medians = {}
    for kind in KINDS:
        values = [render_sample(train_seed + i, kind, width, height) for i in range(count)]
        medians[kind] = float(np.median(np.concatenate([s.depth_m[s.valid] for s in values])))
    return medians


def best_constant_m(depth_m: np.ndarray) -> float:
    """The constant c minimising mean(|c - g| / g): the median of g weighted by 1 / g."""
    order = np.sort(depth_m.ravel())
    weights = np.cumsum(1.0 / order)
    return float(order[np.searchsorted(weights, weights[-1] / 2)])


def scale_check(ratios: Dict[int, float]) -> dict:
    """The per-image scale ambiguity: median predicted / true depth of each scene (by seed).

    A share of scenes off by more than ``SCALE_OFF`` either way, the 5th and 95th percentile of
    the ratio, and the worst scene (the seed to look at).
    """
    seeds, values = zip(*sorted(ratios.items()))
    values = np.asarray(values)
    worst = int(np.argmax(np.abs(np.log(values))))
    return {'off_share': round(float(np.mean(np.abs(np.log(values)) > np.log(SCALE_OFF))), 4),
            'p05': round(float(np.percentile(values, 5)), 3),
            'p95': round(float(np.percentile(values, 95)), 3),
            'worst_seed': int(seeds[worst]), 'worst_ratio': round(float(values[worst]), 3)}


def wall_border(pipeline: MetricGoldPipeline, count: int, seed: int, width: int,
                height: int, edge_refine: bool = True) -> dict:
    """The edge frame on ``count`` flat walls: mean border and centre AbsRel (scale-fitted)."""
    resolution = pipeline.metadata.default_processing_resolution
    rows = []
    for index in range(count):
        sample = flat_wall(seed + index, WALL_DISTANCES_M[index % len(WALL_DISTANCES_M)],
                           width, height)
        depth = for_camera(pipeline(sample.rgb, edge_refine=edge_refine).depth_m,
                           pipeline.metadata, sample.intrinsics, resolution)
        rows.append(border_abs_rel(depth, sample.depth_m, sample.valid,
                                   max(1, round(width * WALL_BAND_FRACTION)), 'scale'))
    border, centre = (float(np.mean(values)) for values in zip(*rows))
    return {'border_abs_rel': round(border, 4), 'centre_abs_rel': round(centre, 4),
            'ratio': round(border / centre, 3), 'count': count}


def evaluate(model: Path, per_kind: int, seed: int, width: int, height: int,
             medians: Dict[str, float], workdir: Path, steps: Optional[int] = None,
             walls: int = 0, decoder: Optional[Path] = None, edge_refine: bool = True) -> dict:
    """``{kind: {method: metrics mean}}`` plus the settings, scored by ``metricgold eval``.

    ``decoder``: a light decoder folder for the decode stage (the model's VAE when None);
    ``edge_refine``: the checkpoint's edge refinement (guided filter) on, as the node runs it.
    """
    pipeline = MetricGoldPipeline.from_pretrained(model, device='cpu', dtype='float32',
                                                  decoder=decoder)
    resolution = pipeline.metadata.default_processing_resolution
    results: dict = {}
    for kind in KINDS:
        boundaries = {m: BoundaryCounts() for m in METHODS}
        ratios = {}
        gt_dir = workdir / 'gt' / kind
        gt_dir.mkdir(parents=True)
        pred_dirs = {m: workdir / m / kind for m in METHODS}
        for folder in pred_dirs.values():
            folder.mkdir(parents=True)
        for index in range(per_kind):
            sample = render_sample(seed + index, kind, width, height)
            name = f'{kind}_{seed + index:07d}'
            gt_units = np.where(sample.valid, np.round(sample.depth_m * GT_UNITS_PER_M), 0)
            cv2.imwrite(str(gt_dir / f'{name}.png'), gt_units.astype(np.uint16))
            depth = for_camera(pipeline(sample.rgb, denoising_steps=steps,
                                        edge_refine=edge_refine).depth_m,
                               pipeline.metadata, sample.intrinsics, resolution)
            predictions = {'model': depth, 'constant': np.full_like(depth, medians[kind]),
                           'oracle_constant': np.full_like(
                               depth, best_constant_m(sample.depth_m[sample.valid]))}
            ratios[seed + index] = float(np.median(depth[sample.valid] /
                                                   sample.depth_m[sample.valid]))
            for method, prediction in predictions.items():
                np.save(pred_dirs[method] / f'{name}.npy', prediction)
                boundaries[method] += boundary_counts(
                    prediction, sample.depth_m, sample.valid, BOUNDARY_JUMP,
                    BOUNDARY_TOLERANCE_PX, BOUNDARY_BASELINE_PX, planar_gt=True)
        results[kind] = {}
        for method, folder in pred_dirs.items():
            report = workdir / f'{method}_{kind}.json'
            code = cli.main(['eval', '--pred', str(folder), '--gt', str(gt_dir), '--gt-scale',
                             str(GT_UNITS_PER_M), '--max-depth', '80', '--json', str(report)])
            if code != 0:
                raise SystemExit(f'metricgold eval failed for {method}/{kind} (exit {code})')
            mean = json.loads(report.read_text())['mean']
            counts = boundaries[method]
            results[kind][method] = {
                **{k: round(mean[k], 4) for k in ('abs_rel', 'delta1')},
                'boundary_precision': round(counts.precision, 4),
                'boundary_recall': round(counts.recall, 4), 'boundary_f1': round(counts.f1, 4)}
        results[kind]['model']['scale'] = scale_check(ratios)
    summary = {'results': results}
    if walls:
        summary['wall_border'] = wall_border(pipeline, walls, seed, width, height, edge_refine)
    return {**summary, 'per_kind': per_kind, 'seed': seed, 'size': [width, height],
            'training_median_m': medians, 'denoising_steps': steps or
            pipeline.metadata.default_denoising_steps, 'model': str(model),
            'edge_refine': bool(edge_refine and pipeline.metadata.edge_refine_radius_px),
            **({'decoder': str(decoder)} if decoder is not None else {})}


def format_table(summary: dict) -> str:
    lines = ['| domain | method | AbsRel | delta1 | boundary P / R / F1 |',
             '| --- | --- | --- | --- | --- |']
    for kind, methods in summary['results'].items():
        for method, metrics in methods.items():
            lines.append(f'| {kind} | {method} | {metrics["abs_rel"]:.3f} | '
                         f'{metrics["delta1"]:.3f} | {metrics["boundary_precision"]:.3f} / '
                         f'{metrics["boundary_recall"]:.3f} / {metrics["boundary_f1"]:.3f} |')
    for kind, methods in summary['results'].items():
        scale = methods['model']['scale']
        lines.append(f'\n{kind}: the model\'s scale (median pred / true per image) is off by '
                     f'> {SCALE_OFF}x in {100 * scale["off_share"]:.0f} % of the images '
                     f'(5-95 %: {scale["p05"]:.2f}-{scale["p95"]:.2f}; worst: seed '
                     f'{scale["worst_seed"]}, {scale["worst_ratio"]:.2f}x)')
    wall = summary.get('wall_border')
    if wall:
        lines.append(f'\nedge frame, {wall["count"]} flat walls: border AbsRel '
                     f'{wall["border_abs_rel"]:.3f}, centre {wall["centre_abs_rel"]:.3f} '
                     f'(ratio {wall["ratio"]:.2f})')
    return '\n'.join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', type=Path, required=True, help='model folder')
    parser.add_argument('--per-kind', type=int, default=100, help='held-out images per domain')
    parser.add_argument('--seed', type=int, default=900_000, help='first held-out scene seed')
    parser.add_argument('--size', default='320x240', help='rendered WIDTHxHEIGHT')
    parser.add_argument('--steps', type=int, help='DDIM steps (default: the model\'s)')
    parser.add_argument('--train-seed', type=int, default=0, help='first training scene seed')
    parser.add_argument('--train-count', type=int, default=200,
                        help='training scenes per domain for the constant baseline')
    parser.add_argument('--walls', type=int, default=0,
                        help='flat walls (scene seeds from --seed) to measure the edge frame on')
    parser.add_argument('--decoder', type=Path,
                        help='light decoder folder (AutoencoderTiny) for the decode stage')
    parser.add_argument('--edge-refine', action=argparse.BooleanOptionalAction, default=True,
                        help='the checkpoint\'s edge refinement (guided filter), as the node '
                             'runs it by default')
    parser.add_argument('--json', type=Path, help='write the summary here')
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split('x'))
    medians = training_medians(args.train_seed, args.train_count, 128, 96)
    with tempfile.TemporaryDirectory(prefix='metricgold-eval-') as workdir:
        summary = evaluate(args.model, args.per_kind, args.seed, width, height, medians,
                           Path(workdir), args.steps, args.walls, args.decoder,
                           args.edge_refine)
    print(format_table(summary))
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
