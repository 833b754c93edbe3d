"""Decode stage and whole frame: the SD2 VAE's decoder vs a light decoder (TAESD's size).

Stable Diffusion 2-size networks with random weights (bench/flops.py's configs: the UNet with an
8-channel ``conv_in``, the VAE) in a MetricGold pipeline, one 1-step frame at the input's size
(``--size``, default 640x480, processed at its native size), once with the VAE decoding and once
with a diffusers ``AutoencoderTiny`` of TAESD's published size (64 channels, decoder blocks
3/3/3/1) decoding. Both pipelines share the same UNet and VAE modules and the same frame; the
runs alternate (full, light, full, light ...) so that a busy machine slows both alike, and each
stage's time is the minimum over ``--repeats``. Prints and optionally writes JSON with the
stage times and the ratios full / light.

    python bench/light_decoder.py [--size 640x480] [--repeats 1] [--threads 1] [--json FILE]
"""

import argparse
import platform
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from flops import build_networks  # noqa: E402  (after the path fix for a source checkout)
from metricgold_ros.atomic import write_json_atomic  # noqa: E402
from metricgold_ros.model import Checkpoint, MetricGoldPipeline, ModelMetadata  # noqa: E402
from metricgold_ros.model.tiny import TINY_TEXT_TOKENS, tiny_scheduler_config  # noqa: E402

STAGES = ('preprocess', 'vae_encode', 'unet', 'vae_decode', 'postprocess')


def build_pipelines(device: str = 'cpu') -> Dict[str, MetricGoldPipeline]:
    """``{'full': VAE decoding, 'light': AutoencoderTiny decoding}`` over one set of networks."""
    from diffusers import AutoencoderTiny, DDIMScheduler

    torch.manual_seed(0)
    unet, vae = build_networks(device)
    checkpoint = Checkpoint(
        unet.requires_grad_(False), vae.requires_grad_(False),
        DDIMScheduler(**tiny_scheduler_config()),
        torch.randn(1, TINY_TEXT_TOKENS, int(unet.config.cross_attention_dim)),
        ModelMetadata(d_min_m=0.5, d_max_m=80.0, default_denoising_steps=1,
                      default_processing_resolution=0))
    light = AutoencoderTiny().eval().requires_grad_(False)  # TAESD's published configuration
    return {'full': MetricGoldPipeline(checkpoint, device=device, dtype='float32'),
            'light': MetricGoldPipeline(checkpoint, device=device, dtype='float32',
                                        decoder=light)}


def run(size: Sequence[int], repeats: int) -> dict:
    """Alternating full/light frames; per pipeline the minimum time of each stage."""
    width, height = size
    rgb = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    pipelines = build_pipelines()
    best: Dict[str, Dict[str, float]] = {name: {} for name in pipelines}
    for _ in range(repeats):
        for name, pipeline in pipelines.items():
            start = time.perf_counter()
            timings = pipeline(rgb, denoising_steps=1, processing_resolution=0).timings_s
            timings['frame'] = time.perf_counter() - start
            for stage, seconds in timings.items():
                best[name][stage] = min(best[name].get(stage, float('inf')), seconds)
    return {'size': [width, height], 'repeats': repeats, 'threads': torch.get_num_threads(),
            'seconds': best,
            'ratio_decode': best['full']['vae_decode'] / best['light']['vae_decode'],
            'ratio_frame': best['full']['frame'] / best['light']['frame'],
            'torch': torch.__version__, 'cpu': platform.processor() or platform.machine()}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--size', default='640x480', help='frame WIDTHxHEIGHT (default 640x480)')
    parser.add_argument('--repeats', type=int, default=1, help='frames per pipeline (min)')
    parser.add_argument('--threads', type=int, default=1, help='torch CPU threads')
    parser.add_argument('--json', type=Path, help='write the result here')
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    size = [int(v) for v in args.size.lower().split('x')]
    result = run(size, args.repeats)
    for name, seconds in result['seconds'].items():
        stages = ', '.join(f'{stage} {seconds[stage]:.2f} s' for stage in STAGES)
        print(f'{name:5}: frame {seconds["frame"]:.2f} s ({stages})')
    print(f'decode stage {result["ratio_decode"]:.1f}x faster, whole 1-step frame '
          f'{result["ratio_frame"]:.2f}x faster with the light decoder')
    if args.json is not None:
        write_json_atomic(args.json, result)
    return 0


if __name__ == '__main__':
    sys.exit(main())
