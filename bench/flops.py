"""FLOP floor of one MetricGold frame with the real (Stable Diffusion 2 size) networks.

Builds the SD2 UNet (``conv_in`` widened to 8 channels, as MetricGold/Marigold) and the SD2 VAE
from their configs on the *meta* device - no weights, no memory, no download - and counts the
FLOPs of one frame with ``torch.utils.flop_counter.FlopCounterMode``: VAE encode once, UNet once
per step, VAE decode once. The floor is that count divided by a GPU's dense bf16 peak: no real
run can be faster, so it says how far a measured time is from the hardware limit.

The counter counts matrix multiplies, convolutions and attention (2 FLOPs per multiply-add);
normalisation and activations are not counted (they are memory-bound, a few % of the time).

    python bench/flops.py                       # table for 512/768 px, 1 and 4 steps
    python bench/flops.py --json flops.json --aspect 1:1
"""

import argparse
import json
import sys
from typing import Dict, List, Tuple

import torch
from torch.utils.flop_counter import FlopCounterMode

# stabilityai/stable-diffusion-2 unet/config.json, with in_channels 8 ([rgb_latent, depth]).
SD2_UNET = dict(
    sample_size=96, in_channels=8, out_channels=4, layers_per_block=2,
    down_block_types=('CrossAttnDownBlock2D',) * 3 + ('DownBlock2D',),
    up_block_types=('UpBlock2D',) + ('CrossAttnUpBlock2D',) * 3,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20), use_linear_projection=True, norm_num_groups=32,
    flip_sin_to_cos=True, freq_shift=0, act_fn='silu')
# stabilityai/stable-diffusion-2 vae/config.json
SD2_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4,
    down_block_types=('DownEncoderBlock2D',) * 4, up_block_types=('UpDecoderBlock2D',) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
    sample_size=768, scaling_factor=0.18215, act_fn='silu')
TEXT_TOKENS = 2  # the empty prompt encoded without padding: [BOS, EOS]
GPUS = (('790 TFLOP/s bf16', 790e12), ('300 TFLOP/s bf16', 300e12))


def build_networks(device: str = 'meta') -> Tuple[torch.nn.Module, torch.nn.Module]:
    """SD2-size UNet and VAE from their configs (no weights on the meta device)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device(device):
        return UNet2DConditionModel(**SD2_UNET).eval(), AutoencoderKL(**SD2_VAE).eval()


def count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def frame_flops(unet: torch.nn.Module, vae: torch.nn.Module, height: int, width: int,
                device: str = 'meta') -> Dict[str, int]:
    """FLOPs of VAE encode, one UNet step and VAE decode for a ``height`` x ``width`` input."""
    image = torch.zeros(1, 3, height, width, device=device)
    latent = torch.zeros(1, 4, height // 8, width // 8, device=device)
    unet_in = torch.zeros(1, 8, height // 8, width // 8, device=device)
    text = torch.zeros(1, TEXT_TOKENS, unet.config.cross_attention_dim, device=device)
    timestep = torch.tensor(999, device=device)
    with torch.no_grad():
        return {
            'vae_encode': count(lambda: vae.encode(image).latent_dist.mode()),
            'unet_step': count(lambda: unet(unet_in, timestep, encoder_hidden_states=text)),
            'vae_decode': count(lambda: vae.decode(latent)),
        }


def processed_size(resolution: int, aspect: Tuple[int, int]) -> Tuple[int, int]:
    """(height, width) with the longer side ``resolution``, padded to multiples of 8."""
    aw, ah = aspect
    if aw >= ah:
        width, height = resolution, round(resolution * ah / aw)
    else:
        height, width = resolution, round(resolution * aw / ah)
    return -(-height // 8) * 8, -(-width // 8) * 8


def floor_table(resolutions: List[int], steps: List[int], aspect: Tuple[int, int]
                ) -> List[Dict[str, float]]:
    unet, vae = build_networks()
    rows = []
    for resolution in resolutions:
        height, width = processed_size(resolution, aspect)
        flops = frame_flops(unet, vae, height, width)
        for n in steps:
            total = flops['vae_encode'] + n * flops['unet_step'] + flops['vae_decode']
            row = {'resolution': resolution, 'size': f'{width}x{height}', 'steps': n,
                   'vae_encode_tflop': flops['vae_encode'] / 1e12,
                   'unet_step_tflop': flops['unet_step'] / 1e12,
                   'vae_decode_tflop': flops['vae_decode'] / 1e12, 'total_tflop': total / 1e12}
            for name, peak in GPUS:
                row[f'floor_ms_{name.split()[0]}'] = total / peak * 1e3
            rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--resolutions', default='512,768', help='processing resolutions')
    parser.add_argument('--steps', default='1,4', help='denoising steps')
    parser.add_argument('--aspect', default='4:3', help='frame aspect W:H (default 4:3)')
    parser.add_argument('--json', help='write the rows as JSON')
    args = parser.parse_args(argv)
    aspect = tuple(int(v) for v in args.aspect.split(':'))
    rows = floor_table([int(v) for v in args.resolutions.split(',')],
                       [int(v) for v in args.steps.split(',')], aspect)
    print(f'{"res":>4} {"size":>9} {"steps":>5} {"enc":>7} {"unet/step":>9} {"dec":>7} '
          f'{"total":>7} TFLOP   floor ms @790   @300')
    for r in rows:
        print(f"{r['resolution']:4d} {r['size']:>9} {r['steps']:5d} {r['vae_encode_tflop']:7.3f} "
              f"{r['unet_step_tflop']:9.3f} {r['vae_decode_tflop']:7.3f} {r['total_tflop']:7.3f}"
              f"        {r['floor_ms_790']:8.2f} {r['floor_ms_300']:6.2f}")
    if args.json:
        with open(args.json, 'w', encoding='utf-8') as handle:
            json.dump({'aspect': args.aspect, 'gpus': dict(GPUS), 'rows': rows}, handle,
                      indent=2)
    return 0


if __name__ == '__main__':
    sys.exit(main())
