"""Training at scale on the CPU: two processes == one with twice the accumulation, and the
Stable Diffusion 2 sized path end to end (convert, train, save, `metricgold infer`)."""

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch

from metricgold_ros.synthetic.vkitti import write_vkitti2

REPO_ROOT = Path(__file__).resolve().parents[2]
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


@pytest.mark.parametrize('name, machines, processes, accumulation', [
    ('1node_8gpu', 1, 8, 2), ('2node_8gpu', 2, 16, 1)])
def test_accelerate_configs_fit_the_sd2_recipe(tmp_path, name, machines, processes,
                                               accumulation):
    from accelerate.commands.config.config_args import load_config_from_file

    from training.config import load_config, resolve_accumulation

    launch = load_config_from_file(str(REPO_ROOT / 'training' / 'accelerate' / f'{name}.yaml'))
    assert (launch.num_machines, launch.num_processes) == (machines, processes)
    assert launch.distributed_type == 'MULTI_GPU' and launch.mixed_precision == 'bf16'
    recipe = load_config(REPO_ROOT / 'training' / 'configs' / 'metricgold_sd2.yaml', tmp_path)
    assert resolve_accumulation(recipe.train, launch.num_processes) == accumulation
    assert recipe.train.mixed_precision == launch.mixed_precision


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


def _limit_file_size(limit_bytes: int):
    """A ``preexec_fn``: files may not grow past ``limit_bytes`` (a write beyond fails with
    EFBIG, as on a full disk, instead of the default SIGXFSZ kill)."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return apply


def test_a_checkpoint_the_disk_cannot_hold_fails_clearly_and_null_trains_anyway(
        tmp_path, tiny_model_dir, synthetic_train):
    """Files capped at 15 MB: the tiny UNet's weights (9.8 MB) fit, Adam's moments (19.6 MB)
    do not. The run stops with an error naming the step, the folder and the ways out, leaves
    no half-written checkpoint, and `checkpoint_every: null` then trains to final/."""
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(REPO_ROOT)}
    config = _config(tmp_path / 'c.yaml', tiny_model_dir, synthetic_train, batch_size=1,
                     accumulation=1, steps=1, effective=1)
    runs = {}
    for name, every in (('full', '1000'), ('null', 'null')):
        config.write_text(config.read_text().replace('checkpoint_every: 1000',
                                                      f'checkpoint_every: {every}'))
        runs[name] = subprocess.run(
            [sys.executable, 'training/train.py', '--config', str(config), '--output',
             str(tmp_path / name)], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
            timeout=300, preexec_fn=_limit_file_size(15 * 10 ** 6))
    full, null = runs['full'], runs['null']
    assert full.returncode == 1, full.stderr[-3000:]
    assert 'ERROR: the checkpoint of step 1 could not be written to' in full.stderr
    assert 'train.checkpoint_every: null' in full.stderr and 'Traceback' not in full.stderr
    assert list((tmp_path / 'full' / 'checkpoints').iterdir()) == []  # nothing half-written
    assert not (tmp_path / 'full' / 'final').exists()
    assert null.returncode == 0, null.stderr[-3000:]
    assert not (tmp_path / 'null' / 'checkpoints').exists()
    assert 'no resumable checkpoints' in (tmp_path / 'null' / 'train.log').read_text()
    assert _unet_weights(tmp_path / 'null')


def _unet_weights_from(model: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model / 'unet' / 'diffusion_pytorch_model.safetensors'))


# -- Stable Diffusion 2 size ------------------------------------------------------------------

# stabilityai/stable-diffusion-2 (768 px, v-prediction), the configs of its diffusers folder.
SD2_UNET = {
    'act_fn': 'silu', 'attention_head_dim': [5, 10, 20, 20],
    'block_out_channels': [320, 640, 1280, 1280], 'center_input_sample': False,
    'cross_attention_dim': 1024,
    'down_block_types': ['CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D',
                         'DownBlock2D'],
    'downsample_padding': 1, 'dual_cross_attention': False, 'flip_sin_to_cos': True,
    'freq_shift': 0, 'in_channels': 4, 'layers_per_block': 2, 'mid_block_scale_factor': 1,
    'norm_eps': 1e-05, 'norm_num_groups': 32, 'out_channels': 4, 'sample_size': 96,
    'up_block_types': ['UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D',
                       'CrossAttnUpBlock2D'],
    'use_linear_projection': True,
}
SD2_VAE = {
    'act_fn': 'silu', 'block_out_channels': [128, 256, 512, 512],
    'down_block_types': ['DownEncoderBlock2D'] * 4, 'in_channels': 3, 'latent_channels': 4,
    'layers_per_block': 2, 'norm_num_groups': 32, 'out_channels': 3, 'sample_size': 768,
    'scaling_factor': 0.18215, 'up_block_types': ['UpDecoderBlock2D'] * 4,
}
SD2_SCHEDULER = {
    'beta_end': 0.012, 'beta_schedule': 'scaled_linear', 'beta_start': 0.00085,
    'clip_sample': False, 'num_train_timesteps': 1000, 'prediction_type': 'v_prediction',
    'set_alpha_to_one': False, 'steps_offset': 1, 'trained_betas': None,
}
SD2_TEXT_ENCODER = {  # OpenCLIP ViT-H/14's text tower as a transformers CLIPTextModel
    'attention_dropout': 0.0, 'bos_token_id': 0, 'dropout': 0.0, 'eos_token_id': 2,
    'hidden_act': 'gelu', 'hidden_size': 1024, 'initializer_factor': 1.0,
    'initializer_range': 0.02, 'intermediate_size': 4096, 'layer_norm_eps': 1e-05,
    'max_position_embeddings': 77, 'num_attention_heads': 16, 'num_hidden_layers': 23,
    'pad_token_id': 1, 'projection_dim': 512, 'vocab_size': 49408,
}
SD2_UNET_PARAMETERS = 865_910_724  # the published UNet's count, conv_in 4 channels


def _sd2_folder(path: Path) -> Path:
    """An SD2 diffusers folder with SD2's architectures and random weights (seeded).

    The tokenizer is the only part that is not SD2's: CLIP's 49,408-entry BPE vocabulary is
    data this machine does not have, so a few tokens (with SD2's special tokens and its "!"
    padding token) stand in; the empty prompt tokenizes to start + end either way.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD2_UNET)
    assert sum(p.numel() for p in unet.parameters()) == SD2_UNET_PARAMETERS
    unet.save_pretrained(path / 'unet', safe_serialization=True)
    del unet
    AutoencoderKL(**SD2_VAE).save_pretrained(path / 'vae', safe_serialization=True)
    DDIMScheduler(**SD2_SCHEDULER).save_pretrained(path / 'scheduler')
    encoder = CLIPTextModel(CLIPTextConfig(**SD2_TEXT_ENCODER))
    encoder.save_pretrained(path / 'text_encoder', safe_serialization=True)
    del encoder
    vocab = {'!': 0, '<|startoftext|>': 1, '<|endoftext|>': 2, 'a</w>': 3, 'room</w>': 4}
    source = path.parent / 'tokenizer_source'
    source.mkdir()
    (source / 'vocab.json').write_text(json.dumps(vocab))
    (source / 'merges.txt').write_text('#version: 0.2\n')
    CLIPTokenizer(str(source / 'vocab.json'), str(source / 'merges.txt'), pad_token='!',
                  model_max_length=77).save_pretrained(path / 'tokenizer')
    shutil.rmtree(source)
    return path


def _sd2_config(path: Path, sd2: Path, data: Path, *, checkpoint_every: Optional[int]) -> Path:
    """training/configs/metricgold_sd2.yaml as shipped, cut to 2 steps of 64x64 synthetic data."""
    import yaml

    config = yaml.safe_load((REPO_ROOT / 'training' / 'configs' /
                             'metricgold_sd2.yaml').read_text())
    config['model']['pretrained'] = str(sd2)
    config['model']['processing_resolution'] = 64
    vkitti2 = next(spec for spec in config['data']['train'] if spec['type'] == 'vkitti2')
    vkitti2.update(root=str(data), resolution=[64, 64], probability=1.0)  # Scene02 = outdoor
    config['data']['train'] = [vkitti2]
    config['data']['val'] = []  # `metricgold infer` runs the pipeline on the result
    config['data']['num_workers'] = 0
    config['train'].update(steps=2, batch_size=1, effective_batch_size=1, warmup_steps=1,
                           checkpoint_every=checkpoint_every, log_every=1)  # bf16, grad. ckpt.
    config.update(cpu_threads=2, tensorboard=False)
    path.write_text(yaml.safe_dump(config))
    return path


def _available_memory_gb() -> float:
    for line in Path('/proc/meminfo').read_text().splitlines():
        if line.startswith('MemAvailable:'):
            return int(line.split()[1]) / 2 ** 20
    return float('inf')


# Disk the SD2-size test needs (measured): the SD2 folder 4.9 GB, final/ 3.6 GB, and with
# resumable checkpoints the accelerator state (UNet 3.5 GB + Adam's moments 6.9 GB) and the
# checkpoint's model/ 3.6 GB (final/ is then hard links to it). 1.5 GB of margin each.
SD2_DISK_GB = {'checkpoints': 20.5, 'final only': 10.0}


@pytest.mark.slow
def test_stable_diffusion_2_size_trains_saves_and_infers(tmp_path):
    """SD2-size networks (865M UNet, 83M VAE, 340M text encoder; random weights) through the
    shipped SD2 recipe: convert, 2 training steps, save, `metricgold infer` the result.

    Peak memory is the UNet in float32 four times over (weights, gradients, Adam's two
    moments: 3.5 GB each): 14.1 GB RSS measured for the training process. Disk: ~19 GB with
    the recipe's resumable checkpoint, ~8.5 GB without one (``checkpoint_every: null``); the
    test takes the first where the disk allows, else the second, and skips, with the reason,
    on a machine with less than 16 GB of memory or 10 GB of disk available. Time on a shared
    2-core machine: 1.5-7 min (folder ~55 s, training 30-270 s, of which the first step alone
    can take ~2 min, `metricgold infer` 15-75 s), set by moving 865M float32 parameters through
    forward, backward and Adam on two cores and writing the checkpoints.
    """
    if _available_memory_gb() < 16:
        pytest.skip(f'SD2-size training needs ~16 GB of free memory, '
                    f'{_available_memory_gb():.1f} GB available')
    free_gb = shutil.disk_usage(tmp_path).free / 1e9
    mode = next((m for m, need in SD2_DISK_GB.items() if free_gb >= need), None)
    if mode is None:
        pytest.skip(f'SD2-size training needs ~{SD2_DISK_GB["final only"]:.0f} GB of free disk '
                    f'in {tmp_path}, {free_gb:.1f} GB available')
    start = time.perf_counter()
    sd2 = _sd2_folder(tmp_path / 'sd2')
    build_s = time.perf_counter() - start
    data = tmp_path / 'data'
    write_vkitti2(data, 1, seed=7, width=64, height=64)
    config = _sd2_config(tmp_path / 'sd2.yaml', sd2, data,
                         checkpoint_every=2 if mode == 'checkpoints' else None)
    env = {**os.environ, 'PYTHONPATH': str(REPO_ROOT), 'OMP_NUM_THREADS': '2'}
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, 'training/train.py', '--config', str(config), '--output',
         str(tmp_path / 'run')], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
        timeout=900)
    train_s = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-4000:]
    train_peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20
    print(f'\nSD2 size ({mode}, {free_gb:.0f} GB free): folder built in {build_s:.0f} s; '
          f'training {train_s:.0f} s, peak RSS {train_peak_gb:.1f} GB; '
          f'stages {_stage_times(tmp_path / "run" / "metrics.json")}')
    final = tmp_path / 'run' / 'final'
    unet_config = json.loads((final / 'unet' / 'config.json').read_text())
    assert unet_config['in_channels'] == 8 and unet_config['cross_attention_dim'] == 1024
    scheduler = json.loads((final / 'scheduler' / 'scheduler_config.json').read_text())
    assert scheduler['rescale_betas_zero_snr'] and scheduler['timestep_spacing'] == 'trailing'
    log = (tmp_path / 'run' / 'train.log').read_text()
    assert 'effective batch 1 = 1 per device x 1 accumulated x 1 process(es)' in log
    metrics = json.loads((tmp_path / 'run' / 'metrics.json').read_text())
    assert len(metrics['loss']) == 2 and all(np.isfinite(metrics['loss']))
    weights = Path('unet') / 'diffusion_pytorch_model.safetensors'
    if mode == 'checkpoints':  # resumable, and final/ is no second copy of the weights
        step = tmp_path / 'run' / 'checkpoints' / 'step_000002'
        assert {'optimizer.bin', 'progress.json', 'model'} <= {p.name for p in step.iterdir()}
        assert (final / weights).samefile(step / 'model' / weights)
    else:
        assert not (tmp_path / 'run' / 'checkpoints').exists()
    # The checkpoint, unchanged, through the user's command.
    shutil.copy(next((data / 'Scene01').rglob('rgb_*.jpg')), tmp_path / 'frame.jpg')
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, '-m', 'metricgold_ros.tools.cli', 'infer', '--model', str(final),
         '--out', str(tmp_path / 'infer'), '--device', 'cpu', '--quiet',
         str(tmp_path / 'frame.jpg')],
        env=env, capture_output=True, text=True, timeout=600)
    infer_s = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-4000:]
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20
    depth = np.load(tmp_path / 'infer' / 'frame_depth.npy')
    assert depth.shape == (64, 64) and depth.dtype == np.float32
    outputs = sorted(p.name for p in (tmp_path / 'infer').iterdir())
    print(f'SD2 size: infer {infer_s:.0f} s (children peak RSS {peak_gb:.1f} GB); '
          f'outputs {outputs}')


def _stage_times(metrics_path: Path) -> str:
    if not metrics_path.is_file():
        return '(no metrics.json)'
    wall = json.loads(metrics_path.read_text()).get('wall_time_s', {})
    return ', '.join(f'{key} {value:.0f} s' for key, value in wall.items())
