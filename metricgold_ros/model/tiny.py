"""Tiny models of the real MetricGold architecture, for tests and the bundled small model.

Same classes as Stable Diffusion 2 (``AutoencoderKL`` with 8x downsampling and 4 latent
channels, ``UNet2DConditionModel`` with an 8-channel ``conv_in`` and cross-attention), scaled
down so that a 640x480 frame infers on a laptop CPU in about a second. Attention sits only at
the lowest resolution (as in SD's VAE mid-block and the UNet's deepest block), because
attention at full latent resolution is what makes a 512-px frame take minutes on a CPU.
"""

from typing import Optional

import torch

from metricgold_ros.model.checkpoint import Checkpoint, ModelMetadata

TINY_CROSS_ATTENTION_DIM = 64
TINY_TEXT_TOKENS = 2  # [BOS, EOS] of the empty prompt, as CLIP encodes it without padding


def tiny_vae_config() -> dict:
    return dict(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=('DownEncoderBlock2D',) * 4, up_block_types=('UpDecoderBlock2D',) * 4,
        block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=8,
        sample_size=256, scaling_factor=0.18215)


def tiny_unet_config() -> dict:
    return dict(
        sample_size=32, in_channels=8, out_channels=4, layers_per_block=1,
        down_block_types=('DownBlock2D', 'DownBlock2D', 'CrossAttnDownBlock2D'),
        up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D', 'UpBlock2D'),
        block_out_channels=(32, 64, 96), norm_num_groups=8,
        cross_attention_dim=TINY_CROSS_ATTENTION_DIM, attention_head_dim=8,
        use_linear_projection=True)  # SD2's choice


def tiny_scheduler_config() -> dict:
    """Stable Diffusion 2's noise schedule, as in Marigold's released scheduler configs."""
    return dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        beta_schedule='scaled_linear', clip_sample=False, set_alpha_to_one=False,
        steps_offset=1, prediction_type='v_prediction', timestep_spacing='trailing')


def build_tiny_checkpoint(seed: int = 0, d_min_m: float = 0.5, d_max_m: float = 80.0,
                          processing_resolution: int = 320, denoising_steps: int = 1,
                          unet: Optional[torch.nn.Module] = None,
                          vae: Optional[torch.nn.Module] = None) -> Checkpoint:
    """A randomly initialised (deterministic per ``seed``) tiny checkpoint in memory."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        vae = vae if vae is not None else AutoencoderKL(**tiny_vae_config())
        unet = unet if unet is not None else UNet2DConditionModel(**tiny_unet_config())
        embedding = torch.randn(1, TINY_TEXT_TOKENS, TINY_CROSS_ATTENTION_DIM)
    finally:
        torch.random.set_rng_state(generator_state)
    scheduler = DDIMScheduler(**tiny_scheduler_config())
    metadata = ModelMetadata(
        d_min_m=d_min_m, d_max_m=d_max_m, default_denoising_steps=denoising_steps,
        default_processing_resolution=processing_resolution).validate('tiny model')
    return Checkpoint(unet.eval().requires_grad_(False), vae.eval().requires_grad_(False),
                      scheduler, embedding, metadata)
