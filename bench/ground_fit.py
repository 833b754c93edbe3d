"""Metric scale from the camera's mounting: accuracy and steadiness on held-out synthetic data.

    python bench/ground_fit.py --per-kind 100 --json bench/results/ground_fit_bundled_tiny.json

Held-out rooms and streets (scene seeds from ``--seed``, default 2_100_000: training used
0-1999, the other benches 900_000+ and 1_000_000+, and the fit's thresholds were chosen on
2_000_000-2_000_059), each frame rendered with its exact depth and
mounting, predicted once by the model, then scored (AbsRel, delta1 with ``metricgold eval``'s
code, valid depth below 80 m) as:

* ``model``: the model's own metric depth;
* ``model + ground fit``: scaled by :func:`metricgold_ros.ground.fit_ground` (frames without a
  fit keep the model's scale, as the node does);
* ``model + fit, pitch +2 deg``: the same with a mounting whose pitch is 2 degrees off;
* ``relative + ground fit``: the same prediction min-max normalised to [0, 1] (what a relative
  checkpoint gives: no scale, no shift) and given scale and shift by the fit; frames without a
  fit publish nothing and are counted, not scored;
* ``model`` and ``model + ground fit`` again on only the frames where the relative fit
  succeeded, for a like-for-like comparison;
* two oracles that know the ground truth: the model times the exact scale of the floor pixels
  the fit may use (what a perfect scale fit reaches), and times the median ratio of true to
  predicted depth over the whole frame (what any single scale can reach).

Jitter: the demo's sequences (``synthetic/camera.py`` ``demo_frames``: a room, then a street,
filmed from ``DEMO_MOUNTING``; 10 fps) with that mounting, the per-frame fitted scale with and
without :class:`ScaleFilter`: std of the change of log scale between consecutive frames that
both have a fit.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout
from metricgold_ros.canonical_camera import for_camera  # noqa: E402
from metricgold_ros.evaluation import evaluate_image, get_protocol  # noqa: E402
from metricgold_ros.ground import (GroundFitSettings, Mounting, ScaleFilter,  # noqa: E402
                                   fit_ground, floor_depth_m)
from metricgold_ros.synthetic.camera import DEMO_MOUNTING, demo_frames  # noqa: E402
from metricgold_ros.synthetic.scenes import KINDS, Sample, render_sample  # noqa: E402

PROTOCOL = get_protocol('generic', max_depth_m=80.0)
METHODS = ('model', 'model + ground fit', 'model + fit, pitch +2 deg', 'relative + ground fit',
           'model (frames with a relative fit)', 'model + fit (frames with a relative fit)',
           'oracle: model x true scale of its floor', 'oracle: model x true global scale')


def predict(pipeline, sample: Sample) -> np.ndarray:
    """The model's metric depth for ``sample`` (a camera-aware one told the camera)."""
    return for_camera(pipeline(sample.rgb).depth_m, pipeline.metadata, sample.intrinsics,
                      pipeline.metadata.default_processing_resolution)


def mounting(sample: Sample, pitch_error_deg: float = 0.0) -> Mounting:
    return Mounting(sample.camera_height_m, sample.camera_pitch_deg + pitch_error_deg,
                    sample.camera_roll_deg)


def min_max(depth: np.ndarray) -> np.ndarray:
    """Depth stripped of scale and shift, as a relative checkpoint gives it: [0, 1]."""
    low, high = float(np.nanmin(depth)), float(np.nanmax(depth))
    return ((depth - low) / max(high - low, 1e-12)).astype(np.float32)


def score(pred_m: np.ndarray, sample: Sample) -> Dict[str, float]:
    metrics = evaluate_image(pred_m, sample.depth_m, PROTOCOL).metrics
    return {'abs_rel': metrics['abs_rel'], 'delta1': metrics['delta1']}


def accuracy(pipeline, kind: str, per_kind: int, seed: int, width: int, height: int,
             settings: GroundFitSettings) -> dict:
    """Per-method mean metrics over ``per_kind`` held-out frames of ``kind``."""
    rows: Dict[str, List[Dict[str, float]]] = {m: [] for m in METHODS}
    states: Dict[str, int] = {}
    shares, scales = [], []
    for index in range(per_kind):
        sample = render_sample(seed + index, kind, width, height)
        camera = sample.intrinsics
        depth_m = predict(pipeline, sample)
        fit = fit_ground(depth_m, camera, mounting(sample), relative=False, settings=settings)
        states[fit.state] = states.get(fit.state, 0) + 1
        shares.append(fit.inlier_share)
        if fit.ok:
            scales.append(fit.floor_scale)
        off = fit_ground(depth_m, camera, mounting(sample, 2.0), relative=False,
                         settings=settings)
        relative = min_max(depth_m)
        rel_fit = fit_ground(relative, camera, mounting(sample), relative=True,
                             settings=settings)
        rows['oracle: model x true global scale'].append(score(depth_m * float(np.median(
            sample.depth_m[sample.valid] / depth_m[sample.valid])), sample))
        floor = floor_depth_m(camera, mounting(sample), settings.max_range_m, 1,
                              settings.min_depression_deg)
        seen = sample.valid & (np.abs(sample.depth_m / floor - 1) < 1e-3)  # NaN: False
        if seen.sum() >= 50:
            rows['oracle: model x true scale of its floor'].append(score(depth_m * float(
                np.median(sample.depth_m[seen] / depth_m[seen])), sample))
        rows['model'].append(score(depth_m, sample))
        rows['model + ground fit'].append(score(fit.apply(depth_m), sample))
        rows['model + fit, pitch +2 deg'].append(score(off.apply(depth_m), sample))
        if rel_fit.ok:
            rows['relative + ground fit'].append(score(rel_fit.apply(relative), sample))
            rows['model (frames with a relative fit)'].append(rows['model'][-1])
            rows['model + fit (frames with a relative fit)'].append(
                rows['model + ground fit'][-1])
    return {
        'methods': {m: {'abs_rel': _mean(r, 'abs_rel'), 'delta1': _mean(r, 'delta1'),
                        'frames': len(r)} for m, r in rows.items()},
        'fit_states': states, 'median_inlier_share': round(float(np.median(shares)), 3),
        'fitted_scale_p10_p50_p90': [round(float(v), 3) for v in np.percentile(
            scales, [10, 50, 90])] if scales else [],
    }


def _mean(rows: List[Dict[str, float]], key: str) -> Optional[float]:
    return round(float(np.mean([r[key] for r in rows])), 4) if rows else None


def jitter(pipeline, frames: int, width: int, height: int, fps: float,
           settings: GroundFitSettings) -> dict:
    """Frame-to-frame std of log scale on the demo's sequences, raw and filtered."""
    out = {}
    sequence = demo_frames(2 * frames, width, height, fps)  # a room, then a street
    for kind in KINDS:
        scale_filter = ScaleFilter()
        raw, filtered = [], []
        absrel: Dict[str, List[float]] = {'model': [], 'raw': [], 'filtered': []}
        for sample in (s for s in sequence if s.kind == kind):
            depth_m = predict(pipeline, sample)
            fit = fit_ground(depth_m, sample.intrinsics, Mounting(*DEMO_MOUNTING),
                             relative=False, settings=settings)
            absrel['model'].append(score(depth_m, sample)['abs_rel'])
            if not fit.ok:  # the node publishes the model's own scale
                raw.append(math.nan)
                filtered.append(math.nan)
                absrel['raw'].append(absrel['model'][-1])
                absrel['filtered'].append(absrel['model'][-1])
                continue
            step = scale_filter.update(fit.scale)
            raw.append(math.log(fit.scale))
            filtered.append(math.log(step.scale))
            absrel['raw'].append(score(depth_m * fit.scale, sample)['abs_rel'])
            absrel['filtered'].append(score(depth_m * step.scale, sample)['abs_rel'])
        out[kind] = {
            'frames': frames, 'frames_with_fit': int(np.isfinite(raw).sum()),
            'jitter_raw': _jitter(raw), 'jitter_filtered': _jitter(filtered),
            **{f'abs_rel_{key}': _round(np.mean(values)) for key, values in absrel.items()},
        }
    return out


def _jitter(log_scales: List[float]) -> Optional[float]:
    steps = np.diff(np.asarray(log_scales))
    steps = steps[np.isfinite(steps)]
    return _round(np.std(steps)) if steps.size > 1 else None


def _round(value: float) -> float:
    return round(float(value), 4)


def format_table(summary: dict) -> str:
    lines = ['| domain | method | frames scored | AbsRel | delta1 |',
             '| --- | --- | ---: | ---: | ---: |']
    for kind, result in summary['accuracy'].items():
        for method, metrics in result['methods'].items():
            absrel = '-' if metrics['abs_rel'] is None else f'{metrics["abs_rel"]:.3f}'
            delta1 = '-' if metrics['delta1'] is None else f'{metrics["delta1"]:.3f}'
            lines.append(f'| {kind} | {method} | {metrics["frames"]} | {absrel} | {delta1} |')
    lines += ['', '| sequence | frames (with a fit) | jitter: per-frame fit | jitter: filtered '
              '| AbsRel: model | AbsRel: per-frame fit | AbsRel: filtered |',
              '| --- | ---: | ---: | ---: | ---: | ---: | ---: |']
    for kind, result in summary['jitter'].items():
        lines.append(f'| {kind} | {result["frames"]} ({result["frames_with_fit"]}) | '
                     f'{result["jitter_raw"]:.4f} | {result["jitter_filtered"]:.4f} | '
                     f'{result["abs_rel_model"]:.3f} | {result["abs_rel_raw"]:.3f} | '
                     f'{result["abs_rel_filtered"]:.3f} |')
    return '\n'.join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', type=Path, help='model folder (default: the bundled model)')
    parser.add_argument('--per-kind', type=int, default=100, help='held-out frames per domain')
    parser.add_argument('--seed', type=int, default=2_100_000, help='first held-out scene seed')
    parser.add_argument('--size', default='256x192', help='rendered WIDTHxHEIGHT')
    parser.add_argument('--sequence-frames', type=int, default=100,
                        help='frames of each demo sequence for the jitter')
    parser.add_argument('--fps', type=float, default=10.0, help='demo sequence frame rate')
    parser.add_argument('--threads', type=int, default=1, help='torch threads')
    parser.add_argument('--json', type=Path, help='write the summary here')
    args = parser.parse_args(argv)
    import torch

    from metricgold_ros.model import MetricGoldPipeline
    from metricgold_ros.model_paths import bundled_model_path

    torch.set_num_threads(args.threads)
    model = args.model or bundled_model_path()
    if model is None:
        raise SystemExit('no bundled model found: pass --model DIR')
    width, height = (int(v) for v in args.size.lower().split('x'))
    pipeline = MetricGoldPipeline.from_pretrained(model, device='cpu', dtype='float32')
    settings = GroundFitSettings()
    start = time.perf_counter()
    summary = {
        'model': str(model), 'seed': args.seed, 'per_kind': args.per_kind,
        'size': [width, height], 'settings': settings.__dict__,
        'accuracy': {kind: accuracy(pipeline, kind, args.per_kind, args.seed, width, height,
                                    settings) for kind in KINDS},
        'jitter': jitter(pipeline, args.sequence_frames, width, height, args.fps, settings),
    }
    summary['wall_s'] = round(time.perf_counter() - start, 1)
    print(format_table(summary))
    for kind, result in summary['accuracy'].items():
        print(f'{kind}: fit states {result["fit_states"]}, median inlier share '
              f'{result["median_inlier_share"]}, fitted scale p10/p50/p90 '
              f'{result["fitted_scale_p10_p50_p90"]}')
    print(f'wall {summary["wall_s"]} s')
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
