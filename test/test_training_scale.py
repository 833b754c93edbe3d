"""Training at scale on the CPU: two processes == one with twice the accumulation, and the
Stable Diffusion 2 sized path end to end (convert, train, save, `metricgold infer`)."""

import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from training.train import main as train_main  # noqa: E402

# Two processes all-reduce (average) their gradients where one process sums its accumulated
# micro-batches: the same numbers summed in another order. Adam divides by sqrt(v), so an
# element whose gradient is at rounding level could move by up to lr (1e-3). Measured here:
# bit-identical (halving is exact, so (g1 + g2) / 2 == g1 / 2 + g2 / 2); the tolerance leaves
# room for other reduction orders (more processes, bucketed all-reduce on GPUs).
WEIGHT_ATOL = 2e-5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


@pytest.fixture(scope='module')
def synthetic_train(tmp_path_factory) -> Path:
    from metricgold_ros.synthetic import write_vkitti2

    root = tmp_path_factory.mktemp('synthetic') / 'train'
    write_vkitti2(root, 4, seed=0, width=64, height=48)
    return root


def _config(path: Path, model: Path, data: Path, *, batch_size: int, accumulation: int,
            steps: int, effective: int) -> Path:
    path.write_text(f"""
seed: 5
cpu_threads: 1
tensorboard: false
model:
  pretrained: '{model}'
  processing_resolution: 64
data:
  train:
    - {{type: vkitti2, root: '{data}', probability: 0.5}}
    - {{type: vkitti2, root: '{data}', probability: 0.5}}
  resolution: [48, 64]
  cache: true
train:
  steps: {steps}
  batch_size: {batch_size}
  gradient_accumulation_steps: {accumulation}
  effective_batch_size: {effective}
  lr: 1.0e-3
  warmup_steps: 1
  checkpoint_every: 1000
  log_every: 1
""")
    return path


def _unet_weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / 'final' / 'unet' / 'diffusion_pytorch_model.safetensors'))


@pytest.mark.slow
def test_two_processes_match_one_with_twice_the_accumulation(tmp_path, tiny_model_dir,
                                                             synthetic_train):
    """`accelerate launch`, 2 CPU processes (gloo): after N optimizer steps the UNet
    equals a one-process run that accumulates twice as many micro-batches (the same batches:
    micro-batch m of step s on rank r is batch (s * accumulation + m) * world + r)."""
    steps = 3
    two = _config(tmp_path / 'two.yaml', tiny_model_dir, synthetic_train, batch_size=2,
                  accumulation=1, steps=steps, effective=4)
    one = _config(tmp_path / 'one.yaml', tiny_model_dir, synthetic_train, batch_size=2,
                  accumulation=2, steps=steps, effective=4)
    # `accelerate launch --cpu` starts one process unless mpirun is used; the torchrun
    # launcher (--multi_gpu) with ACCELERATE_USE_CPU (what --cpu sets) gives 2 gloo processes.
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(REPO_ROOT),
           'ACCELERATE_USE_CPU': 'true'}
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes',
         '2', '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no',
         '--main_process_port', str(_free_port()), 'training/train.py', '--config', str(two),
         '--output', str(tmp_path / 'two')],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    two_s = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-4000:]
    log = (tmp_path / 'two' / 'train.log').read_text()
    assert 'effective batch 4 = 2 per device x 1 accumulated x 2 process(es)' in log
    assert train_main(['--config', str(one), '--output', str(tmp_path / 'one')]) == 0
    weights = [_unet_weights(tmp_path / run) for run in ('two', 'one')]
    start_weights = _unet_weights_from(tiny_model_dir)
    moved = max(float((weights[1][k] - start_weights[k]).abs().max()) for k in weights[1])
    diff = max(float((weights[0][k] - weights[1][k]).abs().max()) for k in weights[0])
    print(f'\n2 processes x accumulation 1 vs 1 process x accumulation 2, {steps} steps: '
          f'max |diff| {diff:.3g} (tolerance {WEIGHT_ATOL:g}; weights moved up to '
          f'{moved:.3g}); 2-process run {two_s:.0f} s')
    assert moved > 10 * WEIGHT_ATOL  # training did something the comparison can see
    assert diff <= WEIGHT_ATOL
    losses = [json.loads((tmp_path / run / 'metrics.json').read_text())['loss']
              for run in ('two', 'one')]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5, atol=1e-7)


def _unet_weights_from(model: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model / 'unet' / 'diffusion_pytorch_model.safetensors'))
