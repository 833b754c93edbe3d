"""``metricgold bench --sweep``: AbsRel and time per frame over denoising steps x ensemble
size on held-out synthetic frames, and the knee (the cheapest setting near the best)."""

import argparse
import statistics
import time
from typing import Any, Dict, List

import numpy as np

from metricgold_ros.errors import InputError

SWEEP_STEPS = (1, 2, 4, 10)
SWEEP_ENSEMBLES = (1, 3)
HELD_OUT_SEED = 1_000_000  # synthetic scenes from here on are never used for training
KNEE_TOLERANCE = 0.05  # the knee: the cheapest setting within 5 % of the best AbsRel


def sync(pipeline: Any) -> None:
    """Wait for the device to finish queued work (timings on CUDA)."""
    if pipeline.device.type == 'cuda':
        import torch
        torch.cuda.synchronize(pipeline.device)


def _int_list(text: str, flag: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(',') if v.strip()]
    except ValueError as err:
        raise InputError(f'{flag} {text!r}: expected comma-separated integers') from err
    if not values or min(values) < 1:
        raise InputError(f'{flag} {text!r}: expected integers >= 1')
    return values


def run_sweep(pipeline: Any, args: argparse.Namespace) -> Dict[str, Any]:
    """AbsRel and time per frame for steps x ensemble on held-out synthetic frames."""
    from metricgold_ros.evaluation import depth_metrics
    from metricgold_ros.synthetic.scenes import KINDS, render_sample

    steps_list = _int_list(args.sweep_steps, '--sweep-steps')
    ensembles = _int_list(args.sweep_ensembles, '--sweep-ensembles')
    if getattr(pipeline, 'e2e_ft', False) and steps_list != [1]:
        # E2E-FT checkpoints run exactly one deterministic step (the pipeline refuses others).
        print(f'  E2E-FT model: one step only; --sweep-steps {args.sweep_steps} -> 1', flush=True)
        steps_list = [1]
    try:
        width, height = (int(v) for v in args.sweep_size.lower().split('x'))
    except ValueError as err:
        raise InputError(f'--sweep-size {args.sweep_size!r}: expected WIDTHxHEIGHT') from err
    if args.sweep_frames < 1:
        raise InputError(f'--sweep-frames {args.sweep_frames}: expected >= 1')
    frames = [render_sample(HELD_OUT_SEED + i // 2, KINDS[i % 2], width, height)
              for i in range(args.sweep_frames)]
    resolution = args.processing_resolution
    pipeline(frames[0].rgb, denoising_steps=1, processing_resolution=resolution)  # warm-up
    rows = []
    for steps in steps_list:
        for ensemble in ensembles:
            abs_rel: Dict[str, List[float]] = {kind: [] for kind in KINDS}
            times = []
            for frame in frames:
                start = time.perf_counter()
                depth = pipeline(frame.rgb, denoising_steps=steps, ensemble_size=ensemble,
                                 processing_resolution=resolution, seed=0).depth_m
                sync(pipeline)
                times.append(time.perf_counter() - start)
                abs_rel[frame.kind].append(
                    depth_metrics(depth, frame.depth_m, frame.valid)['abs_rel'])
            every = [v for values in abs_rel.values() for v in values]
            rows.append({'steps': steps, 'ensemble': ensemble,
                         'abs_rel': round(float(np.mean(every)), 4),
                         **{f'abs_rel_{k}': round(float(np.mean(v)), 4)
                            for k, v in abs_rel.items() if v},
                         'ms_per_frame': round(statistics.median(times) * 1e3, 1)})
            print(f"  steps {steps:2d} ensemble {ensemble}: AbsRel {rows[-1]['abs_rel']:.4f} "
                  f"{rows[-1]['ms_per_frame']:.0f} ms/frame", flush=True)
    best = min(row['abs_rel'] for row in rows)
    knee = min((row for row in rows if row['abs_rel'] <= best * (1 + KNEE_TOLERANCE)),
               key=lambda row: row['ms_per_frame'])
    default = {'steps': pipeline.metadata.default_denoising_steps, 'ensemble': 1}
    default_row = next((row for row in rows if row['steps'] == default['steps']
                        and row['ensemble'] == 1), None)
    on_knee = default_row is not None and default_row['abs_rel'] <= best * (1 + KNEE_TOLERANCE) \
        and default_row['ms_per_frame'] <= knee['ms_per_frame'] * 1.1
    return {'frames': args.sweep_frames, 'size': f'{width}x{height}',
            'held_out_seeds': [HELD_OUT_SEED, HELD_OUT_SEED + (args.sweep_frames - 1) // 2],
            'processing_resolution': resolution or
            pipeline.metadata.default_processing_resolution,
            'rows': rows, 'knee': {'steps': knee['steps'], 'ensemble': knee['ensemble']},
            'knee_rule': f'cheapest setting with AbsRel <= {1 + KNEE_TOLERANCE:.2f} x best',
            'default': default, 'default_on_knee': bool(on_knee)}


def format_sweep(sweep: Dict[str, Any]) -> str:
    lines = [f"sweep: {sweep['frames']} held-out synthetic frames {sweep['size']}, processing "
             f"resolution {sweep['processing_resolution']}",
             'steps  ensemble   AbsRel  indoor  outdoor  ms/frame']
    for row in sweep['rows']:
        lines.append(f"{row['steps']:5d}  {row['ensemble']:8d}  {row['abs_rel']:7.4f} "
                     f"{row.get('abs_rel_indoor', float('nan')):7.4f} "
                     f"{row.get('abs_rel_outdoor', float('nan')):8.4f}  "
                     f"{row['ms_per_frame']:8.0f}")
    lines.append(f"knee ({sweep['knee_rule']}): steps {sweep['knee']['steps']} ensemble "
                 f"{sweep['knee']['ensemble']}; default steps {sweep['default']['steps']} "
                 f"ensemble 1 on the knee: {sweep['default_on_knee']}")
    return '\n'.join(lines)
