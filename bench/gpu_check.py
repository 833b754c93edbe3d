"""One prepared GPU device check: the pipeline against diffusers, the FLOP floor, the node.

Runs in one process under a hard time budget (``--budget``, default 450 s) and writes
``gpu_check.json`` and ``gpu_check.md`` (the table for BENCHMARKS.md) to ``$OUT`` when set,
else ``--out``. Sections, each in its own try/except (an error is recorded, the rest runs),
each stopping cleanly at its own time budget and recording what it skipped:

- ``environment``: machine, driver, torch/CUDA, diffusers, rclpy, what is missing and why;
  the device's dense fp16/bf16 peak from a table of known GPUs, and a measured matmul rate;
- ``flops``: FLOPs of one frame (``bench/flops.py``'s counter on the meta device) per steps
  and ensemble size, and the floor (FLOPs / peak);
- ``transfers``: one 640x480 frame up (uint8) and its depth down (float32), pageable vs pinned;
- ``matrix``: ours vs diffusers' ``MarigoldDepthPipeline`` on the same modules, inputs 480x640
  and 576x768 at processing resolution 768, 1 and 4 steps, ensemble 1 and 5 (batched in both),
  fp16 and bf16, NCHW and channels-last; the share of the floor reached;
- ``node``: ``depth_node`` on the GPU behind a 30 Hz 640x480 camera process over loopback DDS
  (``bench/gpu_check_node.py``);
- ``compiled``: ``torch.compile`` of the UNet and the VAE encoder/decoder, mode ``default``
  and ``reduce-overhead`` (CUDA graphs), first-call (compile) time and steady state.

The sections live in ``bench/gpu_check_matrix.py`` (matrix, tuning, compiled),
``bench/gpu_check_node.py`` (node) and here (the rest); ``bench/gpu_check_report.py`` writes the
markdown.

The model is SD2-size (the UNet with an 8-channel ``conv_in`` and the VAE of Stable Diffusion
2, configs in ``bench/flops.py``) with random weights, built in code: nothing is downloaded.
Without CUDA (or with ``--tiny``) the same code runs at tiny sizes in about a minute on a CPU
(``test/bench/test_gpu_check.py``); compile then uses the ``eager`` backend (tracing only).

    bash bench/gpu_check.sh                       # on the GPU machine (see BENCHMARKS.md)
    python bench/gpu_check.py --tiny --out /tmp/gpu_check   # CPU rehearsal

Exit code: 0 every section ran (budget skips allowed), 1 a section failed (its error is in the
JSON), 2 torch does not import, 3 the hard budget stopped the run (what ran is saved).
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

REPO_ROOT = Path(__file__).resolve().parents[1]
for _path in (str(REPO_ROOT / 'bench'), str(REPO_ROOT)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import gpu_check_report as report_md  # noqa: E402
from gpu_check_matrix import (INPUTS, floor_ms, median_ms, padded_size,  # noqa: E402
                              section_compiled, section_matrix, section_tuning, sync)

# Dense (no sparsity) fp16/bf16 tensor-core peaks with fp32 accumulation, vendor datasheets;
# matched in order against torch.cuda.get_device_name() (e.g. 'NVIDIA H100 80GB HBM3').
PEAK_DENSE_FLOPS = (
    ('H200', 989.4e12, 'H200 SXM'), ('GH200', 989.4e12, 'GH200'),
    ('H100 PCIe', 756.5e12, 'H100 PCIe'), ('H100 NVL', 835.5e12, 'H100 NVL'),
    ('H100', 989.4e12, 'H100 SXM'), ('H800', 989.4e12, 'H800 SXM'),
    ('A100', 312e12, 'A100'), ('A800', 312e12, 'A800'), ('L40S', 362.1e12, 'L40S'),
    ('L40', 181e12, 'L40'), ('L4', 121e12, 'L4'), ('A10G', 70e12, 'A10G'),
    ('A10', 125e12, 'A10'), ('RTX 4090', 165.2e12, 'GeForce RTX 4090'),
    ('RTX 3090', 71e12, 'GeForce RTX 3090'), ('V100', 125e12, 'V100 SXM2'),
    ('T4', 65e12, 'T4'))


class Budget:
    """Wall-clock budget of the whole check and of the section in progress (monotonic s)."""

    def __init__(self, total_s: float) -> None:
        self.start = time.monotonic()
        self.total_s = total_s
        self.section_end = self.start + total_s

    def left(self) -> float:
        """Seconds left of the whole check."""
        return self.start + self.total_s - time.monotonic()

    def section_left(self) -> float:
        """Seconds left of the section in progress (never more than the whole check's)."""
        return min(self.section_end - time.monotonic(), self.left())

    def elapsed(self) -> float:
        return time.monotonic() - self.start


class Check:
    """State shared by the sections: arguments, budget, the report and where it is written."""

    def __init__(self, args: argparse.Namespace, out_dir: Path) -> None:
        self.args = args
        self.out_dir = out_dir
        self.budget = Budget(args.budget)
        self.lock = threading.Lock()
        self.report: Dict[str, Any] = {
            'check': 'metricgold_ros GPU device check', 'format_version': 1,
            'started_utc': datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec='seconds'),
            'argv': sys.argv[1:], 'budget_s': args.budget, 'sections': {}}
        self.tiny = bool(args.tiny)
        self.device: Any = None
        self.checkpoint: Any = None
        self.peak_flops: Optional[float] = None
        self.children: List[Any] = []  # processes a section started: killed at the deadline

    def log(self, text: str) -> None:
        print(f'[gpu_check {self.budget.elapsed():6.1f} s] {text}', flush=True)

    def save(self, final: bool = False) -> None:
        """Write the JSON and the markdown table (atomically); called after every section."""
        from metricgold_ros.atomic import write_atomic

        with self.lock:
            self.report['elapsed_s'] = round(self.budget.elapsed(), 1)
            self.report['finished'] = final
            text = json.dumps(self.report, indent=2, default=str)
            table = report_md.markdown(self.report)
        for name, content in (('gpu_check.json', text + '\n'), ('gpu_check.md', table)):
            write_atomic(self.out_dir / name, content.encode('utf-8'))

    def run_section(self, name: str, fn: Callable[['Check'], Dict[str, Any]],
                    budget_s: float) -> None:
        """Run one section under its budget; record its result or its error, then save."""
        self.budget.section_end = time.monotonic() + budget_s
        entry: Dict[str, Any] = {'status': 'running', 'budget_s': round(budget_s, 1)}
        self.report['sections'][name] = entry
        self.log(f'section {name} (budget {budget_s:.0f} s, {self.budget.left():.0f} s left)')
        start = time.monotonic()
        try:
            entry.update(fn(self))
            if entry['status'] == 'running':
                entry['status'] = 'partial' if entry.get('skipped') else 'ok'
        except Exception as err:  # noqa: BLE001 - one section's failure must not lose the rest
            entry['status'] = 'error'
            entry['error'] = f'{type(err).__name__}: {err}'[:2000]
            entry['traceback'] = traceback.format_exc().splitlines()[-12:]
            self.log(f'section {name} failed: {entry["error"][:300]}')
        entry['seconds'] = round(time.monotonic() - start, 1)
        self.log(f'section {name}: {entry["status"]} in {entry["seconds"]} s')
        self.save()


# ----------------------------------------------------------------------------- environment


def _nvidia_smi() -> Dict[str, Any]:
    fields = 'name,driver_version,memory.total,power.limit,clocks.max.sm'
    try:
        out = subprocess.run(['nvidia-smi', f'--query-gpu={fields}', '--format=csv,noheader'],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError) as err:
        return {'error': f'{type(err).__name__}: {err}'[:300]}
    values = [v.strip() for v in out.splitlines()[0].split(',')] if out.strip() else []
    return dict(zip(fields.split(','), values))


def _rclpy_probe() -> Dict[str, Any]:
    """Import rclpy and the node's message packages in a child (its DDS stays out of here)."""
    code = ('import rclpy, sensor_msgs.msg, diagnostic_msgs.msg; '
            'print(getattr(rclpy, "__file__", ""))')
    try:
        done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        return {'ok': False, 'error': f'{type(err).__name__}: {err}'}
    if done.returncode == 0:
        return {'ok': True, 'path': done.stdout.strip()}
    return {'ok': False, 'error': (done.stderr.strip().splitlines() or ['?'])[-1][:300]}


def peak_for(device_name: str) -> Tuple[Optional[float], str]:
    """Dense fp16/bf16 peak (FLOP/s) of a GPU named ``device_name``, and the table's label."""
    for key, peak, label in PEAK_DENSE_FLOPS:
        if key.lower() in device_name.lower():
            return peak, f'{label}: {peak / 1e12:.1f} TFLOP/s dense fp16/bf16 (vendor datasheet)'
    return None, f'unknown: {device_name!r} is not in the table of known peaks'


def _matmul_rate(torch: Any, device: Any, dtype: Any, size: int, repeats: int) -> float:
    """Measured FLOP/s of a ``size``-cubed matrix product (mean of ``repeats`` after 3)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(torch, device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(torch, device)
    return 2.0 * size ** 3 * repeats / (time.perf_counter() - start)


def section_environment(check: Check) -> Dict[str, Any]:
    """Machine, versions, what is missing (with the effect and the fix), peaks."""
    out: Dict[str, Any] = {
        'python': sys.version.split()[0], 'executable': sys.executable,
        'platform': platform.platform(), 'cpu_count': os.cpu_count(),
        'nvidia_smi': _nvidia_smi(), 'missing': []}
    try:
        with open('/proc/cpuinfo', encoding='utf-8') as handle:
            out['cpu'] = next((line.split(':', 1)[1].strip() for line in handle
                               if line.startswith('model name')), platform.machine())
    except OSError:
        out['cpu'] = platform.machine()
    import torch

    cuda = torch.cuda.is_available()
    out['torch'] = {'version': torch.__version__, 'cuda': torch.version.cuda,
                    'cuda_available': cuda, 'threads': torch.get_num_threads(),
                    'cudnn': torch.backends.cudnn.version() if cuda else None}
    if not cuda:
        out['missing'].append({'what': 'a CUDA GPU visible to torch',
                               'effect': 'tiny models on the CPU (a rehearsal, no GPU numbers)',
                               'fix': 'run on the GPU machine with its CUDA build of torch'})
    try:
        import diffusers
        out['diffusers'] = diffusers.__version__
    except ImportError as err:
        out['diffusers'] = None
        out['missing'].append({'what': f'diffusers ({err})', 'effect': 'nothing can run',
                               'fix': 'carry .whl (bash bench/gpu_check.sh --fetch-wheels)'})
    out['rclpy'] = _rclpy_probe()
    if not out['rclpy']['ok']:
        out['missing'].append({'what': f"rclpy ({out['rclpy']['error']})",
                               'effect': 'the node section is skipped',
                               'fix': 'carry .whl (bash bench/gpu_check.sh --fetch-wheels)'})
    check.device = torch.device('cuda' if cuda and not check.tiny else 'cpu')
    if check.device.type == 'cuda':
        props = torch.cuda.get_device_properties(check.device)
        name = torch.cuda.get_device_name(check.device)
        peak, source = peak_for(name)
        out['gpu'] = {'name': name, 'capability': f'{props.major}.{props.minor}',
                      'memory_gib': round(props.total_memory / 2 ** 30, 1),
                      'multiprocessors': props.multi_processor_count}
        rate = _matmul_rate(torch, check.device, torch.bfloat16, 8192, 10)
    else:
        peak, source = None, 'unknown: no GPU (CPU rehearsal)'
        rate = _matmul_rate(torch, check.device, torch.float32, 1024, 5)
    if peak is None:  # the floor then says how far from a plain matrix product on this device
        peak = rate
        source += f'; the floor uses the measured matrix-product rate, {rate / 1e12:.3f} TFLOP/s'
    check.peak_flops = peak
    out['peak_dense_flops'] = peak
    out['peak_source'] = source
    out['measured_matmul_tflops'] = round(rate / 1e12, 3)
    out['measured_matmul'] = ('bf16 8192^3, mean of 10 after 3' if check.device.type == 'cuda'
                              else 'fp32 1024^3 on the CPU, mean of 5 after 3')
    out['mode'] = 'gpu' if check.device.type == 'cuda' else 'tiny (CPU)'
    return out


# ----------------------------------------------------------------------------- model, flops


def build_checkpoint(check: Check) -> Any:
    """SD2-size random model on the GPU (tiny on the CPU), in memory; nothing downloaded."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from metricgold_ros.model.checkpoint import Checkpoint, ModelMetadata
    from metricgold_ros.model.tiny import build_tiny_checkpoint, tiny_scheduler_config

    if check.tiny or check.device.type != 'cuda':
        return build_tiny_checkpoint(seed=0, processing_resolution=check.args.resolution)
    import flops

    torch.manual_seed(0)
    with torch.device(check.device):  # random init on the GPU: seconds, not a minute
        unet = UNet2DConditionModel(**flops.SD2_UNET)
        vae = AutoencoderKL(**flops.SD2_VAE)
    embedding = torch.randn(1, flops.TEXT_TOKENS, flops.SD2_UNET['cross_attention_dim'])
    metadata = ModelMetadata(d_min_m=0.5, d_max_m=80.0, default_denoising_steps=1,
                             default_processing_resolution=check.args.resolution
                             ).validate('SD2-size random model')
    return Checkpoint(unet.eval().requires_grad_(False), vae.eval().requires_grad_(False),
                      DDIMScheduler(**tiny_scheduler_config()), embedding, metadata)


def section_model(check: Check) -> Dict[str, Any]:
    """Build the model under test; its size."""
    check.checkpoint = build_checkpoint(check)
    unet, vae = check.checkpoint.unet, check.checkpoint.vae
    return {'kind': 'tiny (metricgold_ros/model/tiny.py)' if check.tiny else
            'SD2-size (bench/flops.py configs), random weights',
            'unet_parameters_m': round(sum(p.numel() for p in unet.parameters()) / 1e6, 1),
            'vae_parameters_m': round(sum(p.numel() for p in vae.parameters()) / 1e6, 1),
            'processing_resolution': check.args.resolution}


def section_flops(check: Check) -> Dict[str, Any]:
    """FLOPs of one frame per (steps, ensemble) at the processed size; floor at the peak."""
    import torch

    import flops
    from metricgold_ros.model import image_ops

    with torch.device('meta'):  # same configs as the model under test, no weights
        unet = type(check.checkpoint.unet).from_config(check.checkpoint.unet.config).eval()
        vae = type(check.checkpoint.vae).from_config(check.checkpoint.vae.config).eval()
    sizes = sorted({padded_size(image_ops.processing_size(h, w, check.args.resolution))
                    for h, w in INPUTS})
    rows = []
    for height, width in sizes:
        parts = flops.frame_flops(unet, vae, height, width)
        for steps in check.args.steps:
            for members in check.args.ensembles:
                total = parts['vae_encode'] + members * (
                    steps * parts['unet_step'] + parts['vae_decode'])
                rows.append({'size': f'{width}x{height}', 'steps': steps, 'ensemble': members,
                             **{f'{k}_tflop': v / 1e12 for k, v in parts.items()},
                             'total_tflop': total / 1e12, 'floor_ms': floor_ms(check, total)})
    return {'rows': rows, 'peak_dense_flops': check.peak_flops,
            'note': 'FlopCounterMode on the meta device (bench/flops.py): convolutions, matrix '
                    'multiplies, attention; ensemble members share one encode'}


# ----------------------------------------------------------------------------- transfers


def section_transfers(check: Check) -> Dict[str, Any]:
    """A 640x480 frame up (uint8) and its depth down (float32): pageable vs pinned memory."""
    import numpy as np
    import torch

    rgb = np.zeros((480, 640, 3), np.uint8)
    depth = torch.zeros(480, 640, device=check.device)
    repeats = 50
    out: Dict[str, Any] = {'repeats': repeats}
    out['upload_pageable_ms'] = median_ms(
        lambda: torch.from_numpy(rgb).to(check.device), repeats, torch, check.device)
    out['download_pageable_ms'] = median_ms(lambda: depth.cpu().numpy(), repeats, torch,
                                             check.device)
    if check.device.type != 'cuda':
        out['skipped'] = ['pinned memory: needs CUDA']
        return out
    host_in = torch.empty(480, 640, 3, dtype=torch.uint8).pin_memory()
    host_out = torch.empty(480, 640).pin_memory()

    def upload() -> None:
        host_in.numpy()[...] = rgb
        host_in.to(check.device, non_blocking=True)

    def download() -> None:
        host_out.copy_(depth, non_blocking=True)
        torch.cuda.current_stream(check.device).synchronize()

    out['upload_pinned_ms'] = median_ms(upload, repeats, torch, check.device)
    out['download_pinned_ms'] = median_ms(download, repeats, torch, check.device)
    return out


# ----------------------------------------------------------------------------- main


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', type=Path, default=None,
                        help='folder for gpu_check.json/.md when $OUT is unset (default: a '
                             'new private folder, metricgold_gpu_check-XXXXXX in $TMPDIR)')
    parser.add_argument('--budget', type=float, default=450.0,
                        help='hard wall-clock budget of the whole check, s (default 450)')
    parser.add_argument('--tiny', action='store_true',
                        help='tiny models on the CPU (automatic without CUDA)')
    parser.add_argument('--skip', default='', help='comma-separated sections to skip')
    parser.add_argument('--node-seconds', type=float, default=None,
                        help='measured seconds of the node section (default 30; tiny 6)')
    return parser.parse_args(argv)


def _settings(args: argparse.Namespace, cuda: bool) -> None:
    """Matrix axes and budgets: the real sizes on a GPU, tiny ones on a CPU."""
    args.tiny = args.tiny or not cuda
    args.resolution = 64 if args.tiny else 768
    # Tiny: every axis value once (cells departing from the baseline in one axis at most).
    args.max_departures = 1 if args.tiny else 5
    args.compile_cells = 1 if args.tiny else 4
    args.steps = [1, 4]
    args.ensembles = [1, 5]
    args.dtypes = ['fp32'] if args.tiny else ['fp16', 'bf16']
    args.layouts = ['eager', 'channels_last']
    args.compile_estimate = 10.0 if args.tiny else 120.0
    if args.node_seconds is None:
        args.node_seconds = 4.0 if args.tiny else 30.0


def output_folder(out: Optional[Path]) -> Path:
    """$OUT, else ``--out`` (created), else a new folder of our own (never a fixed /tmp name
    that another user could have made first)."""
    if os.environ.get('OUT'):
        return Path(os.environ['OUT'])
    if out is None:
        folder = Path(tempfile.mkdtemp(prefix='metricgold_gpu_check-'))
        print(f'gpu_check: writing to {folder}', file=sys.stderr)
        return folder
    out.mkdir(parents=True, exist_ok=True)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse_args(argv)
    out_dir = output_folder(args.out)
    try:
        import torch
        cuda = torch.cuda.is_available()
    except ImportError as err:
        (out_dir / 'gpu_check.json').write_text(json.dumps(
            {'error': f'torch does not import: {err}', 'python': sys.executable}) + '\n')
        print(f'ERROR: torch does not import ({err}); nothing can run', flush=True)
        return 2
    _settings(args, cuda)
    if args.tiny:  # one thread: on a shared CPU, more spin in OpenMP barriers (10x slower here)
        from metricgold_ros.tools.bench import set_threads
        set_threads(1)
        os.environ['OMP_NUM_THREADS'] = '1'  # for the node's and the camera's processes
    check = Check(args, out_dir)
    watchdog = threading.Timer(args.budget, _on_deadline, (check,))
    watchdog.daemon = True
    watchdog.start()
    skip = {s.strip() for s in args.skip.split(',') if s.strip()}
    from gpu_check_node import section_node

    # Budgets (s) per section, GPU (tiny); compile gets what is left.
    plan = [('environment', section_environment, 60), ('model', section_model, 90),
            ('flops', section_flops, 40),
            ('transfers', section_transfers, 10), ('matrix', section_matrix, 100),
            ('tuning', section_tuning, 30),
            ('node', section_node, 60 + 1.5 * args.node_seconds + (0 if args.tiny else 60)),
            ('compiled', section_compiled, None)]
    for name, fn, budget_s in plan:
        if name in skip:
            check.report['sections'][name] = {'status': 'skipped', 'reason': '--skip'}
            continue
        needs = [] if name == 'environment' else ['environment'] if name in (
            'model', 'transfers') else ['environment', 'model']
        failed = [n for n in needs
                  if check.report['sections'].get(n, {}).get('status') != 'ok']
        if failed:
            check.report['sections'][name] = {'status': 'skipped',
                                              'reason': f'{failed[0]} section did not succeed'}
            continue
        left = check.budget.left() - 5.0
        check.run_section(name, fn, left if budget_s is None else min(budget_s, left))
    watchdog.cancel()
    check.save(final=True)
    check.log(f"wrote {out_dir / 'gpu_check.json'} and gpu_check.md")
    print(report_md.markdown(check.report), flush=True)
    return 1 if any(s.get('status') == 'error' for s in check.report['sections'].values()) else 0


def _on_deadline(check: Check) -> None:
    """The hard budget ran out: save what there is, mark the section in progress, exit."""
    check.log('hard time budget reached: saving and exiting')
    for child in check.children:
        if child.poll() is None:
            child.kill()
    for entry in check.report['sections'].values():
        if entry.get('status') == 'running':
            entry['status'] = 'interrupted'
            entry['error'] = 'stopped by the hard time budget (--budget)'
    try:
        for _ in range(3):  # the main thread may be changing the report right now
            try:
                check.save(final=False)
                break
            except RuntimeError:
                time.sleep(0.2)
    finally:
        os._exit(3)


if __name__ == '__main__':
    sys.exit(main())
