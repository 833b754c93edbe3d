"""The networks a run starts from: a Stable Diffusion 2 folder, a MetricGold checkpoint, or tiny.

* SD2 folder (``unet/`` with a 4-channel ``conv_in``, ``vae/``, ``scheduler/``,
  ``text_encoder/`` + ``tokenizer/``): ``conv_in`` is widened to 8 channels
  (:func:`training.recipe.widen_conv_in`) and the empty-prompt embedding is computed once with
  the core's :func:`compute_empty_text_embedding` and stored with every checkpoint written.
* MetricGold checkpoint (8-channel UNet, ``metricgold.json``): fine-tuning continues from it; its
  depth range is kept unless the config gives another.
* ``tiny``: the tiny architecture of ``metricgold_ros.model.tiny``, randomly initialised (the
  VAE is trained first by ``training/vae_stage.py``).

The training noise scheduler is a ``DDPMScheduler`` with the starting point's schedule and
v-prediction (Marigold's choice); the checkpoint gets the same schedule as a ``DDIMScheduler``
with trailing spacing, which the pipeline uses.
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from metricgold_ros.errors import CheckpointError
from metricgold_ros.model.checkpoint import (
    METADATA_FILE, compute_empty_text_embedding, load_checkpoint)
from metricgold_ros.model.tiny import (
    TINY_CROSS_ATTENTION_DIM, TINY_TEXT_TOKENS, tiny_scheduler_config, tiny_unet_config,
    tiny_vae_config)
from training.config import ModelConfig
from training.recipe import widen_conv_in

LOGGER = logging.getLogger(__name__)


@dataclass
class Components:
    """Everything a run trains or keeps frozen, on the CPU in float32."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    noise_scheduler: object  # DDPMScheduler, v-prediction: adds noise, gives targets
    scheduler_config: dict  # the DDIM (trailing) config written into checkpoints
    empty_text_embedding: torch.Tensor  # [1,T,C]
    d_min_m: float
    d_max_m: float


def load_components(model: ModelConfig, seed: int) -> Components:
    """Build the starting networks that ``model`` describes (nothing is downloaded)."""
    if model.tiny:
        return _tiny(model, seed)
    path = Path(model.pretrained).expanduser()
    if not path.is_dir():
        raise CheckpointError(f'model.pretrained: {path} is not a folder; give a local Stable '
                              'Diffusion 2 folder or a MetricGold checkpoint')
    unet_config = path / 'unet' / 'config.json'
    in_channels = json.loads(unet_config.read_text()).get('in_channels', 4) \
        if unet_config.is_file() else None
    if (path / METADATA_FILE).is_file() or in_channels == 8:
        return _metricgold(model, path)
    return _stable_diffusion(model, path)


def _schedulers(config: dict, model: ModelConfig, zero_terminal_snr_default: bool):
    """Training DDPM and checkpoint DDIM configs sharing one schedule (v-prediction).

    ``model.zero_terminal_snr`` (None: ``zero_terminal_snr_default``) rescales the betas so
    that the last timestep is pure noise (Lin et al., "Common Diffusion Noise Schedules and
    Sample Steps are Flawed", WACV 2024). SD2's schedule keeps ~7% of the signal at t = T
    during training while inference starts from pure noise; a model trained from scratch learns
    to read its depth from that leak and then guesses at inference, and Marigold v1.1 trains
    with the rescaled schedule (and trailing spacing) for the same reason. The flag is stored
    in the checkpoint's scheduler config, so the pipeline samples with the same schedule.
    """
    from diffusers import DDIMScheduler, DDPMScheduler

    config = {k: v for k, v in config.items() if not k.startswith('_')}
    zero_snr = model.zero_terminal_snr
    config['rescale_betas_zero_snr'] = bool(
        zero_terminal_snr_default if zero_snr is None else zero_snr)
    noise = DDPMScheduler.from_config(config, prediction_type='v_prediction')
    ddim = DDIMScheduler.from_config(config, prediction_type='v_prediction',
                                     timestep_spacing='trailing')
    return noise, dict(ddim.config)


def _tiny(model: ModelConfig, seed: int) -> Components:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        vae = AutoencoderKL(**tiny_vae_config())
        unet = UNet2DConditionModel(**tiny_unet_config())
        # No text encoder at this size: a fixed random "empty prompt" conditioning.
        embedding = torch.randn(1, TINY_TEXT_TOKENS, TINY_CROSS_ATTENTION_DIM)
    finally:
        torch.random.set_rng_state(generator_state)
    noise, ddim = _schedulers(tiny_scheduler_config(), model, False)
    return Components(unet, vae, noise, ddim, embedding, model.d_min_m, model.d_max_m)


def _metricgold(model: ModelConfig, path: Path) -> Components:
    checkpoint = load_checkpoint(path, allow_pickle=model.allow_pickle)
    if checkpoint.metadata.relative and model.d_min_m is None:
        raise CheckpointError(f'model.pretrained: {path} is a relative-depth (Marigold) model; '
                              'give model.d_min_m and model.d_max_m to train it for metric depth')
    d_min = checkpoint.metadata.d_min_m if model.d_min_m is None else model.d_min_m
    d_max = checkpoint.metadata.d_max_m if model.d_max_m is None else model.d_max_m
    if not checkpoint.metadata.relative and (d_min, d_max) != (
            checkpoint.metadata.d_min_m, checkpoint.metadata.d_max_m):
        LOGGER.warning('model: fine-tuning a %g..%g m checkpoint with codec range %g..%g m',
                       checkpoint.metadata.d_min_m, checkpoint.metadata.d_max_m, d_min, d_max)
    noise, ddim = _schedulers(dict(checkpoint.scheduler.config), model, bool(
        checkpoint.scheduler.config.get('rescale_betas_zero_snr', False)))
    return Components(checkpoint.unet.requires_grad_(True), checkpoint.vae, noise, ddim,
                      checkpoint.empty_text_embedding, d_min, d_max)


def _stable_diffusion(model: ModelConfig, path: Path) -> Components:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if model.d_min_m is None:
        raise CheckpointError(f'model.pretrained: {path} is a Stable Diffusion folder; give '
                              'model.d_min_m and model.d_max_m (metres)')
    for part in ('unet', 'vae', 'scheduler', 'text_encoder', 'tokenizer'):
        if not (path / part).is_dir():
            raise CheckpointError(f'model.pretrained: {path / part} is missing; a Stable '
                                  'Diffusion 2 folder has unet/ vae/ scheduler/ text_encoder/ '
                                  'tokenizer/')
    kwargs = dict(local_files_only=True, use_safetensors=not model.allow_pickle)
    try:
        unet = UNet2DConditionModel.from_pretrained(str(path), subfolder='unet', **kwargs)
        vae = AutoencoderKL.from_pretrained(str(path), subfolder='vae', **kwargs)
    except (OSError, EnvironmentError, ValueError) as err:
        raise CheckpointError(f'model.pretrained: cannot load {path}: {err} (pickled .bin '
                              'weights need model.allow_pickle: true)') from err
    if unet.config.in_channels != vae.config.latent_channels:
        raise CheckpointError(f'{path}/unet: in_channels={unet.config.in_channels} but the VAE '
                              f'has {vae.config.latent_channels} latent channels')
    widen_conv_in(unet)
    scheduler_config = json.loads((path / 'scheduler' / 'scheduler_config.json').read_text())
    noise, ddim = _schedulers(scheduler_config, model, True)  # as Marigold v1.1 trains
    embedding = compute_empty_text_embedding(path)
    LOGGER.info('converted %s: conv_in 4 -> 8 channels, empty-text embedding %s', path,
                tuple(embedding.shape))
    return Components(unet.float(), vae.float(), noise, ddim, embedding, model.d_min_m,
                      model.d_max_m)


def load_trained_vae(folder: Path, device: Optional[torch.device] = None) -> torch.nn.Module:
    """The VAE written by the VAE stage, with freshly allocated (aligned) weights."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
    for param in vae.parameters():  # safetensors memory can be unaligned: oneDNN then sums in
        param.data = param.data.clone()  # another order, and a resumed run would drift
    return vae.to(device or 'cpu').eval().requires_grad_(False)
