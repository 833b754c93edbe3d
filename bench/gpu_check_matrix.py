"""The measuring sections of the GPU device check (``bench/gpu_check.py``).

``matrix``: ours vs diffusers' ``MarigoldDepthPipeline`` over dtype x layout x input x steps x
ensemble; ``tuning``: settings the pipeline does not have yet; ``compiled``: ``torch.compile``
of the networks. A section measures its cells in order of importance until its time budget,
and lists what it skipped; a failing cell is recorded and the next one runs.
"""

import statistics
import time
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

INPUTS = ((480, 640), (576, 768))  # (height, width) of the camera frames
DTYPE_NAMES = {'fp16': 'float16', 'bf16': 'bfloat16', 'fp32': 'float32'}


def padded_size(size: Tuple[int, int]) -> Tuple[int, int]:
    """(height, width) padded to multiples of 8, as the pipeline pads before the VAE."""
    return -(-size[0] // 8) * 8, -(-size[1] // 8) * 8


def floor_ms(check: Any, total_flops: float) -> Optional[float]:
    """Milliseconds ``total_flops`` take at the device's peak; None when it is unknown."""
    return total_flops / check.peak_flops * 1e3 if check.peak_flops else None


def _frame_flops(check: Any, height: int, width: int, steps: int, members: int
                 ) -> Optional[float]:
    """Total FLOPs of one frame, from the flops section's rows (None when it failed)."""
    from metricgold_ros.model import image_ops

    ph, pw = padded_size(image_ops.processing_size(height, width, check.args.resolution))
    rows = check.report['sections'].get('flops', {}).get('rows', [])
    return next((r['total_tflop'] * 1e12 for r in rows if r['size'] == f'{pw}x{ph}'
                 and r['steps'] == steps and r['ensemble'] == members), None)


# ----------------------------------------------------------------------------- matrix


def sync(torch: Any, device: Any) -> None:
    """Wait for the GPU's queued work (nothing to wait for on a CPU)."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], Any], repeats: int, torch: Any, device: Any) -> float:
    """Median wall milliseconds of ``fn()`` (synchronised) over ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(torch, device)
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e3, 3)


def make_pipeline(check: Any, dtype: str, channels_last: bool) -> Any:
    """A pipeline over the shared checkpoint, its modules set to ``dtype`` and the layout.

    The pipeline converts the checkpoint's modules in place, so each configuration is set
    explicitly, layout included (channels-last weights stay so until converted back).
    """
    import torch

    from metricgold_ros.model import MetricGoldPipeline

    layout = torch.channels_last if channels_last else torch.contiguous_format
    for module in (check.checkpoint.unet, check.checkpoint.vae):
        module.to(memory_format=layout)
    return MetricGoldPipeline(check.checkpoint, device=check.device,
                              dtype=DTYPE_NAMES[dtype], channels_last=channels_last)


def matrix_cells(check: Any) -> List[Dict[str, Any]]:
    """Every (dtype, layout, input, steps, ensemble), the most informative first.

    Order: fewest departures from the node's default (fp16, NCHW, 480x640, 1 step, 1 member),
    so a section stopped by its budget has measured the cells that matter most.
    """
    base = (check.args.dtypes[0], 'eager', INPUTS[0], check.args.steps[0],
            check.args.ensembles[0])
    cells = [{'dtype': d, 'layout': lay, 'input': size, 'steps': s, 'ensemble': e}
             for d in check.args.dtypes for lay in check.args.layouts
             for size in INPUTS for s in check.args.steps for e in check.args.ensembles]
    for cell in cells:
        cell['departures'] = sum(a != b for a, b in zip(
            (cell['dtype'], cell['layout'], cell['input'], cell['steps'], cell['ensemble']),
            base))
    return sorted((c for c in cells if c['departures'] <= check.args.max_departures),
                  key=lambda c: c['departures'])


def cell_key(cell: Dict[str, Any]) -> str:
    height, width = cell['input']
    return (f"{cell['dtype']}/{cell['layout']}/{height}x{width}/s{cell['steps']}/"
            f"e{cell['ensemble']}")


def measure_cell(check: Any, pipeline: Any, cell: Dict[str, Any], reference: Any,
                 warmup: int, repeats: int) -> Dict[str, Any]:
    """Ours (and diffusers when ``reference``), calls interleaved; times, diff, floor share."""
    import numpy as np
    import torch

    from metricgold_ros.tools.bench import reference_diff, textured_frame

    height, width = cell['input']
    rgb = textured_frame(width, height)
    steps, members = cell['steps'], cell['ensemble']
    outputs: Dict[str, Any] = {}

    def ours() -> None:
        outputs['ours'] = pipeline(rgb, denoising_steps=steps, ensemble_size=members,
                                   processing_resolution=check.args.resolution, seed=0)

    def theirs() -> None:
        outputs['reference'] = reference(
            rgb, num_inference_steps=steps, ensemble_size=members, batch_size=members,
            processing_resolution=check.args.resolution, output_uncertainty=members > 1,
            generator=torch.Generator().manual_seed(0), output_type='np')

    runs = [('ours', ours)] + ([('diffusers', theirs)] if reference is not None else [])
    start = time.perf_counter()
    for _ in range(warmup):
        for _, fn in runs:
            fn()
    first_s = time.perf_counter() - start
    cuda = check.device.type == 'cuda'
    times: Dict[str, List[float]] = {name: [] for name, _ in runs}
    stages: List[Dict[str, float]] = []
    peak_bytes = 0
    for _ in range(repeats):
        for name, fn in runs:
            if cuda and name == 'ours':
                torch.cuda.reset_peak_memory_stats(check.device)
            times[name].append(median_ms(fn, 1, torch, check.device))
            if cuda and name == 'ours':  # ours alone: the calls are interleaved
                peak_bytes = max(peak_bytes, torch.cuda.max_memory_allocated(check.device))
        stages.append(outputs['ours'].timings_s)
    row: Dict[str, Any] = {'ours_ms': round(statistics.median(times['ours']), 2),
                           'warmup_s': round(first_s, 2)}
    row['stages_ms'] = {k: round(statistics.median(s[k] for s in stages) * 1e3, 2)
                        for k in stages[0]}
    if cuda:
        row['peak_memory_gib'] = round(peak_bytes / 2**30, 2)
    total = _frame_flops(check, height, width, steps, members)
    if total is not None:
        row['tflop'] = round(total / 1e12, 3)
        row['achieved_tflops'] = round(total / row['ours_ms'] / 1e9, 1)
        floor = floor_ms(check, total)
        if floor is not None:
            row['floor_ms'] = round(floor, 2)
            row['floor_share'] = round(floor / row['ours_ms'], 4)
    depth = outputs['ours'].depth
    row['finite'] = bool(np.isfinite(depth).all())
    if reference is not None:
        row['diffusers_ms'] = round(statistics.median(times['diffusers']), 2)
        row['ratio'] = round(row['ours_ms'] / row['diffusers_ms'], 4)
        diff = reference_diff(pipeline, depth, outputs['reference'])
        row['max_abs_log_depth_diff'] = float(diff.max())
        row['mean_abs_log_depth_diff'] = float(diff.mean())
    return row


def run_cells(check: Any, cells: List[Dict[str, Any]], setup: Callable[[Dict[str, Any]], Any],
              with_reference: bool, warmup: int, repeats: int,
              new_batch_s: float = 0.0) -> Dict[str, Any]:
    """Measure ``cells`` in order until the section's budget; record errors and skips.

    A cell starts only when the section has time for it: 1.5 x the previous cell's steady-state
    calls, plus ``new_batch_s`` (a recompile) when its ensemble size is new.
    """
    from metricgold_ros.tools.bench import build_reference

    results: Dict[str, Any] = {}
    skipped: List[str] = []
    config: Optional[Tuple[str, str]] = None
    pipeline = reference = None
    last_s = 0.0
    batches = set()
    for cell in cells:
        key = cell_key(cell)
        need_s = 1.5 * last_s + 2.0 + (new_batch_s if batches and cell['ensemble'] not in
                                       batches else 0.0)
        if check.budget.section_left() < need_s:
            skipped.append(f'{key}: section budget ({check.budget.section_left():.0f} s left, '
                           f'{need_s:.0f} s needed)')
            continue
        batches.add(cell['ensemble'])
        try:
            if config != (cell['dtype'], cell['layout']):
                pipeline = setup(cell)
                reference = build_reference(pipeline) if with_reference else None
                config = (cell['dtype'], cell['layout'])
            results[key] = measure_cell(check, pipeline, cell, reference, warmup, repeats)
            row = results[key]
            last_s = (warmup + repeats) * (row['ours_ms'] + row.get('diffusers_ms', 0.0)) / 1e3
            check.log(f"{key}: ours {row['ours_ms']} ms, diffusers "
                      f"{row.get('diffusers_ms', '-')} ms, floor share "
                      f"{row.get('floor_share', '-')}")
        except Exception as err:  # noqa: BLE001 - one cell's failure must not end the section
            results[key] = {'error': f'{type(err).__name__}: {err}'[:500]}
            config = None  # rebuild: an out-of-memory may have left the modules half-moved
            check.log(f'{key}: {results[key]["error"][:200]}')
    return {'cells': results, 'skipped': skipped}


def section_matrix(check: Any) -> Dict[str, Any]:
    """Ours vs diffusers over dtype x layout x input x steps x ensemble (eager)."""
    warmup, repeats = (1, 2) if check.tiny else (2, 7)
    out = run_cells(check, matrix_cells(check),
                    lambda c: make_pipeline(check, c['dtype'], c['layout'] == 'channels_last'),
                    True, warmup, repeats)
    out.update({'warmup': warmup, 'repeats': repeats,
                'processing_resolution': check.args.resolution,
                'reference': 'diffusers MarigoldDepthPipeline on the same modules, '
                             'text_encoder=None (cached empty-text embedding), '
                             'batch_size=ensemble size, median/std ensembling (as '
                             'metricgold bench); ours: one batch of all members'})
    return out


# ----------------------------------------------------------------------------- tuning


@contextmanager
def _untimed_stage(name: str, timings: Dict[str, float]) -> Iterator[None]:
    """Stand-in for the pipeline's ``_stage``: no per-stage synchronisation, no timing."""
    timings[name] = 0.0
    yield


def section_tuning(check: Any) -> Dict[str, Any]:
    """Two settings the pipeline does not have yet, on the node's default cell (ours only).

    ``cudnn.benchmark`` (convolution algorithms tuned once per input size; the camera's size
    is fixed) and a frame without the pipeline's per-stage ``torch.cuda.synchronize`` (it
    drains the queue 5 times a frame for the stage timings; patched on this one pipeline
    object, for the measurement only).
    """
    import torch

    cell = {'dtype': check.args.dtypes[0], 'layout': 'eager', 'input': INPUTS[0],
            'steps': check.args.steps[0], 'ensemble': check.args.ensembles[0]}
    warmup, repeats = (1, 2) if check.tiny else (3, 9)
    cuda = check.device.type == 'cuda'
    variants = [('as is', False, False), ('no per-stage sync', False, True)]
    if cuda:
        variants += [('cudnn.benchmark', True, False),
                     ('cudnn.benchmark + no per-stage sync', True, True)]
    out: Dict[str, Any] = {'cell': cell_key(cell), 'variants': {},
                           'skipped': [] if cuda else ['cudnn.benchmark: no cuDNN on a CPU']}
    default_benchmark = torch.backends.cudnn.benchmark
    try:
        for name, benchmark, no_sync in variants:
            if check.budget.section_left() < 5.0:
                out['skipped'].append(f'{name}: section budget')
                continue
            torch.backends.cudnn.benchmark = benchmark
            pipeline = make_pipeline(check, cell['dtype'], False)
            if no_sync:
                pipeline._stage = _untimed_stage
            row = measure_cell(check, pipeline, cell, None, warmup, repeats)
            out['variants'][name] = {'ours_ms': row['ours_ms'],
                                     'floor_share': row.get('floor_share')}
            check.log(f"tuning {name}: {row['ours_ms']} ms")
    finally:
        torch.backends.cudnn.benchmark = default_benchmark
    return out


# ----------------------------------------------------------------------------- compiled


def section_compiled(check: Any) -> Dict[str, Any]:
    """torch.compile of UNet + VAE encoder/decoder, modes default and reduce-overhead."""
    import torch

    dtype = check.args.dtypes[0]
    cuda = check.device.type == 'cuda'
    backend = 'inductor' if cuda else 'eager'  # Inductor on a CPU compiles for minutes
    # CUDA graphs first: the best case of the two; the second compile reuses Inductor's
    # on-disk kernel cache, so it usually fits in what is left.
    modes = ['reduce-overhead', 'default'] if cuda else ['default']
    cells = [{'dtype': dtype, 'layout': 'channels_last', 'input': INPUTS[0], 'steps': s,
              'ensemble': check.args.ensembles[0]} for s in check.args.steps]
    cells += [{'dtype': dtype, 'layout': 'channels_last', 'input': INPUTS[-1],
               'steps': check.args.steps[0], 'ensemble': e} for e in check.args.ensembles]
    cells = cells[:check.args.compile_cells]
    out: Dict[str, Any] = {'backend': backend, 'dtype': dtype, 'modes': {}, 'skipped': []}
    if not cuda:
        out['skipped'].append('reduce-overhead: CUDA graphs need CUDA')
    warmup, repeats = (1, 2) if check.tiny else (2, 7)
    for mode in modes:
        if check.budget.section_left() < check.args.compile_estimate:
            out['skipped'].append(f'{mode}: {check.budget.section_left():.0f} s left, a compile '
                                  f'is estimated at {check.args.compile_estimate:.0f} s')
            continue
        modules = _compile_modules(check, torch, mode, backend)
        try:
            run = run_cells(check, cells, lambda _: _compiled_pipeline(check, dtype, modules),
                            False, warmup, repeats, new_batch_s=check.args.compile_estimate)
        finally:
            _restore_modules(check, modules)
            torch._dynamo.reset()
        out['modes'][mode] = run['cells']
        out['skipped'] += [f'{mode}: {s}' for s in run['skipped']]
    return out


def _compile_modules(check: Any, torch: Any, mode: str, backend: str) -> Dict[str, Any]:
    """Compiled wrappers of the UNet and the VAE's encoder/decoder, and the originals."""
    vae = check.checkpoint.vae
    options = {'mode': mode} if backend == 'inductor' else {}
    return {'originals': (check.checkpoint.unet, vae.encoder, vae.decoder),
            'compiled': tuple(torch.compile(m, backend=backend, **options) for m in (
                check.checkpoint.unet, vae.encoder, vae.decoder))}


def _compiled_pipeline(check: Any, dtype: str, modules: Dict[str, Any]) -> Any:
    pipeline = make_pipeline(check, dtype, True)
    unet, encoder, decoder = modules['compiled']
    pipeline.unet = unet
    pipeline.vae.encoder, pipeline.vae.decoder = encoder, decoder
    return pipeline


def _restore_modules(check: Any, modules: Dict[str, Any]) -> None:
    _, encoder, decoder = modules['originals']
    check.checkpoint.vae.encoder, check.checkpoint.vae.decoder = encoder, decoder
