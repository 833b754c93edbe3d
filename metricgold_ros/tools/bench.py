"""``metricgold bench``: wall time of every stage of one frame, against diffusers' Marigold.

For each input size it times (median of ``--repeats`` after ``--warmup``) the path a frame takes
through the node: the incoming message to an RGB array, the pipeline's own stages (resize,
VAE encode, UNet x steps, VAE decode, ensemble, resize back, codec), the point cloud (stride 1
and 4, with and without colour), the colour image and the output messages (rclpy and rosbags).
In the same run diffusers' ``MarigoldDepthPipeline`` is built from the very same UNet, VAE and
scheduler and timed interleaved with ours at the same steps, resolution and seed.

``--sweep`` instead scores steps x ensemble size on held-out synthetic frames (AbsRel and time
per frame), to choose the defaults. ``--json FILE`` writes everything with machine details.
Speed claims live here and in BENCHMARKS.md, never in timed tests.
"""

import argparse
import datetime
import os
import platform
import statistics
import time
from typing import Any, Callable, Dict, List, Tuple

import numpy as np

from metricgold_ros.atomic import write_json_atomic
from metricgold_ros.errors import InputError
from metricgold_ros.model_paths import load_model
from metricgold_ros.tools.bench_sweep import (SWEEP_ENSEMBLES, SWEEP_STEPS, format_sweep,
                                              run_sweep, sync)

SIZES = ((640, 480), (1280, 720))
REFERENCE_NOTE = (
    "diffusers MarigoldDepthPipeline on the same UNet/VAE/scheduler objects, text_encoder=None: "
    "its empty_text_embedding is set to the checkpoint's, so it runs no text encoder; "
    "batch_size=1 (its default); for ensembles of metric models its ensemble_depth is a plain "
    "median/std, because diffusers' metric path (scale_invariant=shift_invariant=False) raises "
    "'Unrecognized alignment.'; relative models use its own affine ensembling")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--model', metavar='DIR', help='model folder (default: the bundled model)')
    parser.add_argument('--quick', action='store_true',
                        help='640x480 only, fewer repeats, no ensemble reference (< 2 min)')
    parser.add_argument('--json', metavar='FILE', help='write the results as JSON')
    parser.add_argument('--sweep', action='store_true',
                        help='steps x ensemble on held-out synthetic frames instead of stages')
    parser.add_argument('--steps', type=int, help="denoising steps (default: the model's)")
    parser.add_argument('--ensemble', type=int, default=1, help='ensemble size (default 1)')
    parser.add_argument('--processing-resolution', type=int,
                        help="longer side fed to the networks (default: the model's)")
    parser.add_argument('--repeats', type=int, help='timed runs per stage (default 10, quick 5)')
    parser.add_argument('--warmup', type=int, default=None, help='untimed runs first (default 2)')
    parser.add_argument('--threads', type=int, default=1,
                        help='CPU threads for torch and OpenCV (default 1: one core; 0: library '
                             'defaults)')
    parser.add_argument('--device', default='cpu', help="'cpu', 'cuda', 'cuda:N' or 'auto'")
    parser.add_argument('--dtype', default='float32', help='float32, float16, bfloat16 or auto')
    parser.add_argument('--channels-last', action='store_true',
                        help='channels-last (NHWC) weights and activations')
    parser.add_argument('--compile', action='store_true', help='torch.compile the UNet')
    parser.add_argument('--no-reference', dest='reference', action='store_false',
                        help='skip the diffusers reference')
    parser.add_argument('--sweep-steps', default=','.join(map(str, SWEEP_STEPS)),
                        help='comma-separated steps for --sweep (default 1,2,4,10)')
    parser.add_argument('--sweep-ensembles', default=','.join(map(str, SWEEP_ENSEMBLES)),
                        help='comma-separated ensemble sizes for --sweep (default 1,3)')
    parser.add_argument('--sweep-frames', type=int, default=8,
                        help='held-out synthetic frames, half indoor, half outdoor (default 8)')
    parser.add_argument('--sweep-size', default='640x480', help='sweep frame size WIDTHxHEIGHT')


def run(args: argparse.Namespace) -> int:
    import torch

    set_threads(args.threads)
    for name in ('steps', 'processing_resolution', 'repeats', 'warmup'):
        value = getattr(args, name)
        if value is not None and value < (0 if name == 'warmup' else 1):
            raise InputError(f"--{name.replace('_', '-')} {value}: expected a positive integer")
    pipeline = load_model(args.model, '--model', device=args.device, dtype=args.dtype,
                          channels_last=args.channels_last, compile_unet=args.compile)
    report: Dict[str, Any] = {'date': datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec='seconds'), 'machine': machine_info(pipeline.device), 'settings': {
        'model': str(args.model or 'bundled'), 'device': str(pipeline.device),
        'dtype': str(pipeline.dtype).replace('torch.', ''), 'channels_last': args.channels_last,
        'compile': args.compile, 'threads': torch.get_num_threads(),
        'processing_resolution': args.processing_resolution or
        pipeline.metadata.default_processing_resolution,
        'steps': args.steps or pipeline.metadata.default_denoising_steps,
        'ensemble': args.ensemble, 'attention': sorted({
            type(proc).__name__ for module in (pipeline.unet, pipeline.vae)
            for proc in getattr(module, 'attn_processors', {}).values()})}}
    if args.sweep:
        report['sweep'] = run_sweep(pipeline, args)
        print(format_sweep(report['sweep']))
    else:
        report.update(run_stages(pipeline, args))
        print(format_report(report))
    if args.json:
        write_json_atomic(args.json, report)
        print(f'wrote {args.json}')
    return 0


def set_threads(threads: int) -> None:
    """Use ``threads`` CPU threads in torch and OpenCV (0: the libraries' defaults)."""
    import cv2
    import torch

    if threads < 0:
        raise InputError(f'--threads {threads}: expected 0 (library defaults) or a count >= 1')
    if threads:
        torch.set_num_threads(threads)
        cv2.setNumThreads(threads)


def machine_info(device: Any) -> Dict[str, Any]:
    """CPU, GPU, library versions and load: what a timing needs to be read."""
    import cv2
    import diffusers
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo', encoding='utf-8') as handle:
            cpu = next((line.split(':', 1)[1].strip() for line in handle
                        if line.startswith('model name')), cpu)
    except OSError:
        pass
    info = {'cpu': cpu, 'cpu_count': os.cpu_count(), 'torch_threads': torch.get_num_threads(),
            'torch': torch.__version__, 'diffusers': diffusers.__version__,
            'numpy': np.__version__, 'opencv': cv2.__version__,
            'python': platform.python_version(), 'platform': platform.platform(),
            'load_average': list(os.getloadavg()) if hasattr(os, 'getloadavg') else None}
    if getattr(device, 'type', '') == 'cuda':
        info['gpu'] = torch.cuda.get_device_name(device)
    return info


def median_ms(fn: Callable[[], Any], repeats: int, warmup: int) -> Tuple[float, float]:
    """Median wall and CPU (process) milliseconds of ``fn()`` over ``repeats`` after warm-up."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start_wall)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall) * 1e3, statistics.median(cpu) * 1e3


def run_stages(pipeline: Any, args: argparse.Namespace) -> Dict[str, Any]:
    """Stage table for each size, the diffusers reference and the headline numbers."""
    repeats = args.repeats or (5 if args.quick else 10)
    warmup = 1 if args.quick and args.warmup is None else (2 if args.warmup is None
                                                           else args.warmup)
    sizes = SIZES[:1] if args.quick else SIZES
    out: Dict[str, Any] = {'sizes': {}, 'reference': {}, 'reference_note': REFERENCE_NOTE}
    for width, height in sizes:
        key = f'{width}x{height}'
        rgb = textured_frame(width, height)
        out['sizes'][key] = time_frame(pipeline, rgb, args, repeats, warmup)
        if args.reference:
            ensembles = (args.ensemble,) if args.quick or key != '640x480' else \
                sorted({args.ensemble, 3})
            out['reference'][key] = {f'E{ens}': compare_reference(
                pipeline, rgb, args, ens, max(repeats, 8), warmup) for ens in ensembles}
    first = out['sizes']['640x480']
    out['overhead_ms_640x480'] = first['overhead_ms']
    out['overhead_cpu_ms_640x480'] = first['overhead_cpu_ms']
    reference = out['reference'].get('640x480', {}).get(f'E{args.ensemble}')
    out['reference_ratio'] = reference['ratio'] if reference else None
    out['reference_ratio_wall'] = reference['ratio_wall'] if reference else None
    return out


def textured_frame(width: int, height: int) -> np.ndarray:
    """A textured RGB uint8 frame (smooth gradients plus noise, like a camera image),
    deterministic."""
    rng = np.random.default_rng(0)
    v, u = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([u / width, v / height, 0.5 + 0.5 * np.sin(u / 37.0 + v / 23.0)], axis=-1)
    return np.clip(base * 200 + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def reference_diff(pipeline: Any, depth: np.ndarray, reference: Any) -> np.ndarray:
    """Per pixel, ours vs diffusers' ``MarigoldDepthPipeline`` output ``reference``: |log depth
    difference| (metric checkpoints) or |depth difference| (relative ones)."""
    import torch

    ref_x = 2.0 * np.asarray(reference.prediction, np.float32)[0, :, :, 0] - 1.0
    ref_depth = pipeline.to_depth(torch.from_numpy(ref_x)).numpy()
    if pipeline.relative:
        return np.abs(depth - ref_depth)
    return np.abs(np.log(depth) - np.log(ref_depth))


def time_frame(pipeline: Any, rgb: np.ndarray, args: argparse.Namespace, repeats: int,
               warmup: int) -> Dict[str, Any]:
    """Every stage of one frame of ``rgb``'s size: ms (wall median) and CPU ms."""
    from metricgold_ros import messages

    micro = max(repeats, 20)  # cheap stages: more samples for a stable median
    stages: Dict[str, Tuple[float, float]] = {}
    systems = _message_systems()
    name, types = systems[0]
    header = messages.header_msg(types, 1_000_000_002, 'camera_optical_frame')
    msg = messages.rgb_image_msg(types, header, rgb, 'bgr8')
    stages[f'message -> array (bgr8, {name})'] = median_ms(
        lambda: messages.rgb_from_msg(msg), micro, 3)
    depth = _time_pipeline(pipeline, rgb, args, repeats, warmup, stages)
    proc = _time_postprocess(pipeline, rgb, args, micro, stages)
    _time_outputs(depth, rgb, systems, micro, stages)
    overhead_keys = [f'message -> array (bgr8, {name})', 'resize + normalise + pad',
                     'ensemble + resize back + codec', 'cloud stride 1 xyz',
                     'colorize (auto range)', f'messages: depth, info, colored, cloud ({name})']
    return {
        'stages_ms': {k: round(v[0], 3) for k, v in stages.items()},
        'stages_cpu_ms': {k: round(v[1], 3) for k, v in stages.items() if v[1] == v[1]},
        'processing_size': list(proc),
        'overhead_ms': round(sum(stages[k][0] for k in overhead_keys), 3),
        'overhead_cpu_ms': round(sum(stages[k][1] for k in overhead_keys), 3),
        'overhead_stages': overhead_keys,
        'message_system': name,
    }


def _time_pipeline(pipeline: Any, rgb: np.ndarray, args: argparse.Namespace, repeats: int,
                   warmup: int, stages: Dict[str, Tuple[float, float]]) -> np.ndarray:
    """Whole pipeline calls and the stage times they report (wall only); the last depth."""
    calls: List[Any] = []
    walls: List[Tuple[float, float]] = []

    def call() -> None:
        calls.append(pipeline(rgb, denoising_steps=args.steps, ensemble_size=args.ensemble,
                              processing_resolution=args.processing_resolution, seed=0))
        sync(pipeline)

    for _ in range(warmup):
        call()
    calls.clear()
    for _ in range(repeats):
        walls.append(median_ms(call, 1, 0))
    steps = args.steps or pipeline.metadata.default_denoising_steps
    labels = {'preprocess': 'resize + normalise + pad', 'vae_encode': 'VAE encode',
              'unet': f'UNet x {steps} step(s), {args.ensemble} member(s)',
              'vae_decode': 'VAE decode', 'postprocess': 'ensemble + resize back + codec'}
    for key, label in labels.items():  # the pipeline times wall only; CPU: isolated runs below
        ms = statistics.median(c.timings_s[key] for c in calls) * 1e3
        stages[label] = (ms, float('nan'))
    stages['pipeline total (one call)'] = (statistics.median(w for w, _ in walls),
                                           statistics.median(c for _, c in walls))
    return calls[-1].depth_m


def _time_postprocess(pipeline: Any, rgb: np.ndarray, args: argparse.Namespace, micro: int,
                      stages: Dict[str, Tuple[float, float]]) -> Tuple[int, int]:
    """The pre- and postprocess stages split: the same functions on members of the processed
    size (CPU times); the processed size."""
    import torch

    from metricgold_ros.model import image_ops
    from metricgold_ros.model.ensemble import ensemble_members

    height, width = rgb.shape[:2]
    resolution = args.processing_resolution or pipeline.metadata.default_processing_resolution
    proc = image_ops.processing_size(height, width, resolution)
    members = torch.rand((args.ensemble, 1, *proc), generator=torch.Generator().manual_seed(0))
    members = members.to(pipeline.device) * 2 - 1
    median, _ = ensemble_members(members)
    value = image_ops.resize(median, (height, width))[0, 0]
    stages['resize + normalise + pad'] = (stages['resize + normalise + pad'][0], median_ms(
        lambda: image_ops.prepare_image(rgb, resolution, pipeline.device, pipeline.dtype),
        micro, 3)[1])
    stages[f'  ensemble ({args.ensemble} member(s))'] = median_ms(
        lambda: ensemble_members(members), micro, 3)
    stages['  resize back'] = median_ms(lambda: image_ops.resize(median, (height, width)),
                                        micro, 3)
    parts = [f'  ensemble ({args.ensemble} member(s))', '  resize back']
    refine = pipeline.edge_refiner(rgb, (height, width), proc)
    if refine is not None:  # the checkpoint's guided filter (metricgold.json edge_refine_*)
        stages['  edge refinement (guided filter, with its guide)'] = median_ms(
            lambda: pipeline.edge_refiner(rgb, (height, width), proc)(value[None, None]),
            micro, 3)
        parts.append('  edge refinement (guided filter, with its guide)')
    stages['  codec (log depth -> m) + to numpy'] = median_ms(
        lambda: pipeline.to_depth(value).cpu().numpy(), micro, 3)
    parts.append('  codec (log depth -> m) + to numpy')
    post = 'ensemble + resize back + codec'
    stages[post] = (stages[post][0], sum(stages[k][1] for k in parts))
    return proc


def _time_outputs(depth: np.ndarray, rgb: np.ndarray, systems: List[Tuple[str, Any]],
                  micro: int, stages: Dict[str, Tuple[float, float]]) -> None:
    """Clouds, the colour image and the output messages of one frame's depth."""
    from metricgold_ros import messages
    from metricgold_ros.camera import Intrinsics
    from metricgold_ros.colorize import colorize_depth
    from metricgold_ros.depth_frame import FrameResult, frame_messages
    from metricgold_ros.pointcloud import depth_to_points

    height, width = depth.shape
    camera = Intrinsics(fx_px=0.8 * width, fy_px=0.8 * width, cx_px=(width - 1) / 2,
                        cy_px=(height - 1) / 2, width=width, height=height)
    for stride in (1, 4):
        stages[f'cloud stride {stride} xyz'] = median_ms(
            lambda: depth_to_points(depth, camera, stride), micro, 3)
        stages[f'cloud stride {stride} xyz+rgb'] = median_ms(
            lambda: depth_to_points(depth, camera, stride, rgb=rgb), micro, 3)
    stages['colorize (auto range)'] = median_ms(lambda: colorize_depth(depth), micro, 3)
    result = FrameResult(depth, False, None, camera, colorize_depth(depth),
                         depth_to_points(depth, camera, 1))
    for system, system_types in systems:
        system_header = messages.header_msg(system_types, 1_000_000_002, 'camera_optical_frame')
        stages[f'messages: depth, info, colored, cloud ({system})'] = median_ms(
            lambda: frame_messages(system_types, system_header, result), micro, 3)


def _message_systems() -> List[Tuple[str, Any]]:
    """('rclpy', types) when rclpy's messages import, then ('rosbags', types)."""
    from metricgold_ros import messages

    systems = []
    try:
        systems.append(('rclpy', messages.rclpy_types()))
    except ImportError:
        pass
    systems.append(('rosbags', messages.rosbags_types()))
    return systems


def build_reference(pipeline: Any) -> Any:
    """diffusers' MarigoldDepthPipeline around ``pipeline``'s own networks (no text encoder)."""
    from diffusers import MarigoldDepthPipeline

    meta = pipeline.metadata
    reference = MarigoldDepthPipeline(
        unet=pipeline.unet, vae=pipeline.vae,
        scheduler=type(pipeline.scheduler).from_config(pipeline.scheduler.config),
        text_encoder=None,
        tokenizer=None, prediction_type='depth', scale_invariant=meta.relative,
        shift_invariant=meta.relative, default_denoising_steps=meta.default_denoising_steps,
        default_processing_resolution=meta.default_processing_resolution)
    reference.empty_text_embedding = pipeline.empty_text_embedding
    if not meta.relative:
        reference.ensemble_depth = _median_ensemble
    reference.set_progress_bar_config(disable=True)
    return reference


def _median_ensemble(depth: Any, scale_invariant: bool = False, shift_invariant: bool = False,
                     output_uncertainty: bool = False, **_: Any) -> Tuple[Any, Any]:
    """Stand-in for diffusers' ``ensemble_depth`` on metric members: median (and std)."""
    spread = depth.std(dim=0, keepdim=True) if output_uncertainty else None
    return depth.median(dim=0, keepdim=True).values, spread


def compare_reference(pipeline: Any, rgb: np.ndarray, args: argparse.Namespace,
                      ensemble: int, repeats: int, warmup: int) -> Dict[str, Any]:
    """Ours vs diffusers, calls interleaved; ``ratio`` < 1 means ours is faster."""
    import torch

    reference = build_reference(pipeline)
    steps = args.steps or pipeline.metadata.default_denoising_steps
    resolution = args.processing_resolution or pipeline.metadata.default_processing_resolution
    outputs: Dict[str, Any] = {}

    def ours() -> None:
        outputs['ours'] = pipeline(rgb, denoising_steps=steps, ensemble_size=ensemble,
                                   processing_resolution=resolution, seed=0)
        sync(pipeline)

    def theirs() -> None:
        outputs['reference'] = reference(
            rgb, num_inference_steps=steps, ensemble_size=ensemble,
            processing_resolution=resolution, output_uncertainty=ensemble > 1,
            generator=torch.Generator().manual_seed(0), output_type='np')
        sync(pipeline)

    for _ in range(warmup):
        ours()
        theirs()
    times: Dict[str, List[Tuple[float, float]]] = {'ours': [], 'reference': []}
    for _ in range(repeats):
        for name, fn in (('ours', ours), ('reference', theirs)):
            times[name].append(median_ms(fn, 1, 0))
    (ours_ms, theirs_ms), (ours_cpu, theirs_cpu) = (
        [statistics.median(t[i] for t in times[k]) for k in ('ours', 'reference')]
        for i in (0, 1))
    # Same noise, same networks: the outputs agree up to the input resize (uint8 vs float).
    log_diff = reference_diff(pipeline, outputs['ours'].depth, outputs['reference'])
    # On the CPU the ratio of CPU times: the same work, without the waits for a core that a
    # shared machine adds to wall time at random. On a GPU, wall time.
    on_cpu = pipeline.device.type == 'cpu'
    return {'ours_ms': round(ours_ms, 2), 'diffusers_ms': round(theirs_ms, 2),
            'ratio_wall': round(ours_ms / theirs_ms, 4),
            'ours_cpu_ms': round(ours_cpu, 2), 'diffusers_cpu_ms': round(theirs_cpu, 2),
            'ratio_cpu': round(ours_cpu / theirs_cpu, 4),
            'ratio': round(ours_cpu / theirs_cpu if on_cpu else ours_ms / theirs_ms, 4),
            'ratio_basis': 'cpu time' if on_cpu else 'wall time',
            'steps': steps, 'ensemble': ensemble,
            'processing_resolution': resolution,
            'max_abs_log_depth_diff': float(log_diff.max()),
            'mean_abs_log_depth_diff': float(log_diff.mean())}


def format_report(report: Dict[str, Any]) -> str:
    """The stage table (one column per size) and the reference lines, for stdout."""
    settings, machine = report['settings'], report['machine']
    sizes = list(report['sizes'])
    lines = [f"metricgold bench  {report['date']}  {machine['cpu']}  torch "
             f"{machine['torch']}  threads {settings['threads']}  device {settings['device']} "
             f"{settings['dtype']}  channels_last {settings['channels_last']}",
             f"model {settings['model']}  steps {settings['steps']}  ensemble "
             f"{settings['ensemble']}  processing resolution "
             f"{settings['processing_resolution']}  (median wall ms; CPU ms in brackets)", '']
    width = max(len(k) for s in sizes for k in report['sizes'][s]['stages_ms']) + 2
    lines.append('stage'.ljust(width) + ''.join(s.rjust(22) for s in sizes))
    for key in report['sizes'][sizes[0]]['stages_ms']:
        cells = []
        for size in sizes:
            wall = report['sizes'][size]['stages_ms'][key]
            cpu = report['sizes'][size]['stages_cpu_ms'].get(key)
            cells.append((f'{wall:9.2f}' + (f' ({cpu:8.2f})' if cpu is not None else ' ' * 11))
                         .rjust(22))
        lines.append(key.ljust(width) + ''.join(cells))
    lines.append('overhead outside the networks'.ljust(width) + ''.join(
        f"{report['sizes'][s]['overhead_ms']:9.2f} ({report['sizes'][s]['overhead_cpu_ms']:8.2f})"
        .rjust(22) for s in sizes))
    if report.get('reference'):
        lines += ['', 'reference: ' + report['reference_note']]
        for size, by_ensemble in report['reference'].items():
            for entry in by_ensemble.values():
                lines.append(
                    f"  {size} steps {entry['steps']} ensemble {entry['ensemble']}: ours "
                    f"{entry['ours_ms']:.1f} ms (CPU {entry['ours_cpu_ms']:.1f}), diffusers "
                    f"{entry['diffusers_ms']:.1f} ms (CPU {entry['diffusers_cpu_ms']:.1f}); "
                    f"ratio {entry['ratio']:.3f} ({entry['ratio_basis']}; wall "
                    f"{entry['ratio_wall']:.3f}); max |log depth diff| "
                    f"{entry['max_abs_log_depth_diff']:.2e}")
    lines.append(f"reference_ratio {report.get('reference_ratio')}  overhead_ms_640x480 "
                 f"{report['overhead_ms_640x480']} (CPU {report['overhead_cpu_ms_640x480']})")
    return '\n'.join(lines)
