"""Stage 1 of a from-scratch (tiny) model: teach the AutoencoderKL RGB *and* log-depth.

SD2's VAE was trained on photographs only and MetricGold reuses it frozen; a tiny VAE trained
from scratch has to learn both inputs the UNet stage feeds it: RGB in [-1, 1] and the depth
codec's value replicated to 3 channels. The loss is the L1 reconstruction of both (depth only
on valid pixels) plus a small KL term; the MetricGold paper names VAE reconstruction of depth as
the accuracy bottleneck, so :func:`depth_reconstruction_metrics` reports the depth AbsRel of
encode -> decode alone. Afterwards the latent scaling factor is set to ``1 / std`` of training
latents, the way Rombach et al. fitted SD's 0.18215, so the UNet sees unit-variance latents.
"""

import logging
import time
from typing import Dict, Iterator, List, Tuple

import numpy as np
import torch

from metricgold_ros.evaluation import depth_metrics
from metricgold_ros.model import image_ops
from metricgold_ros.model.codec import decode_depth, encode_depth
from training.config import VaeStageConfig
from training.recipe import WarmupExponentialDecay

LOGGER = logging.getLogger(__name__)


def depth_as_image(depth_m: torch.Tensor, valid: torch.Tensor, d_min_m: float,
                   d_max_m: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``[B,1,H,W]`` metres -> the VAE's depth image ``[B,3,H,W]`` and the loss mask ``[B,1,H,W]``.

    Depth is clipped to the codec range and encoded (eq. 3 of the paper clips too); pixels
    without depth (``valid`` False: sky, no return) are shown as the far end, x = +1, the value
    Marigold's clipped normalisation gives Virtual KITTI's sky, so the VAE and the UNet see a
    plausible image instead of a hole. The mask, which is what any loss counts, holds only
    valid depth inside ``[d_min_m, d_max_m]``.
    """
    valid = valid.bool() & torch.isfinite(depth_m) & (depth_m > 0)
    clipped = torch.where(valid, depth_m, torch.full_like(depth_m, d_max_m))
    x, _ = encode_depth(clipped.clamp(d_min_m, d_max_m), d_min_m, d_max_m)
    in_range = valid & (depth_m >= d_min_m) & (depth_m <= d_max_m)
    return x.expand(-1, 3, -1, -1), in_range


def random_crop(batch: Dict[str, torch.Tensor], crop_px: int,
                generator: torch.Generator) -> Dict[str, torch.Tensor]:
    """The same random square window of ``rgb``, ``depth_m`` and ``valid``."""
    height, width = batch['rgb'].shape[-2:]
    size_h, size_w = min(crop_px, height), min(crop_px, width)
    top = int(torch.randint(0, height - size_h + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - size_w + 1, (1,), generator=generator))
    return {key: batch[key][..., top:top + size_h, left:left + size_w]
            for key in ('rgb', 'depth_m', 'valid')}


def train_vae(vae: torch.nn.Module, batches: Iterator[dict], config: VaeStageConfig,
              d_min_m: float, d_max_m: float, seed: int, device: torch.device,
              writer=None) -> Dict[str, object]:
    """Train ``vae`` in place for ``config.steps``; returns its loss curve and timing."""
    vae.to(device).train().requires_grad_(True)
    optimizer = torch.optim.Adam(vae.parameters(), lr=config.lr)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupExponentialDecay(0, config.steps, config.final_lr_ratio))
    generator = torch.Generator().manual_seed(seed)
    losses: List[float] = []
    start = time.perf_counter()
    for step in range(config.steps):
        batch = random_crop(next(batches), config.crop_px, generator)
        rgb = batch['rgb'].to(device)  # [B,3,c,c]
        depth, valid = depth_as_image(batch['depth_m'], batch['valid'], d_min_m, d_max_m)
        depth, valid = depth.to(device), valid.to(device)  # [B,3,c,c], [B,1,c,c]
        posterior = vae.encode(torch.cat([rgb, depth])).latent_dist
        sample = posterior.sample(generator=generator)  # CPU generator: device-independent
        recon = vae.decode(sample).sample  # [2B,3,c,c]
        rgb_loss = (recon[:len(rgb)] - rgb).abs().mean()
        depth_err = (recon[len(rgb):] - depth).abs().mean(dim=1, keepdim=True)  # [B,1,c,c]
        depth_loss = depth_err[valid].mean() if bool(valid.any()) else depth_err.sum() * 0
        kl = posterior.kl().mean() / sample[0].numel()  # per latent element
        loss = rgb_loss + depth_loss + config.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_scheduler.step()
        losses.append(float(loss.detach()))
        if writer is not None:
            writer.add_scalar('vae/loss', losses[-1], step)
            writer.add_scalar('vae/depth_l1', float(depth_loss.detach()), step)
        if step % 25 == 0 or step == config.steps - 1:
            LOGGER.info('vae step %d/%d: loss %.4f (rgb %.4f, depth %.4f, kl %.1f)', step + 1,
                        config.steps, losses[-1], *(float(v.detach()) for v in (
                            rgb_loss, depth_loss, kl)))
    vae.eval().requires_grad_(False)
    return {'steps': config.steps, 'loss': losses, 'wall_time_s': time.perf_counter() - start}


@torch.no_grad()
def fit_scaling_factor(vae: torch.nn.Module, batches: Iterator[dict], count: int,
                       d_min_m: float, d_max_m: float, device: torch.device) -> float:
    """Set ``vae.config.scaling_factor`` to 1 / std of RGB and depth latents; returns it."""
    latents = []
    for _ in range(max(1, count)):
        batch = next(batches)
        depth, _ = depth_as_image(batch['depth_m'], batch['valid'], d_min_m, d_max_m)
        images = torch.cat([batch['rgb'], depth])
        latents.append(vae.encode(images.to(device)).latent_dist.mode().flatten().cpu())
    factor = float(1.0 / torch.cat(latents).std().clamp_min(1e-6))
    vae.register_to_config(scaling_factor=factor)
    return factor


@torch.no_grad()
def depth_round_trip(vae: torch.nn.Module, depth_m: np.ndarray, valid: np.ndarray,
                     d_min_m: float, d_max_m: float, device: torch.device
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``[H,W]`` metres -> the codec value ``[1,1,H,W]`` (CPU, float32) after VAE encode
    (posterior mode) -> decode alone, and the mask of valid in-range pixels ``[1,1,H,W]``."""
    depth, in_range = depth_as_image(torch.from_numpy(depth_m)[None, None],
                                     torch.from_numpy(valid)[None, None],
                                     d_min_m, d_max_m)  # [1,3,H,W], [1,1,H,W]
    image, padding = image_ops.pad_to_multiple(depth.to(device))
    decoded = vae.decode(vae.encode(image).latent_dist.mode()).sample
    return image_ops.unpad(decoded.mean(dim=1, keepdim=True), padding).float().cpu(), in_range


@torch.no_grad()
def depth_reconstruction_metrics(vae: torch.nn.Module, items: List[dict], d_min_m: float,
                                 d_max_m: float, device: torch.device) -> Dict[str, float]:
    """Mean AbsRel / delta1 of depth after VAE encode -> decode alone, and RGB L1 (0..255)."""
    abs_rel, delta1, rgb_l1 = [], [], []
    for item in items:
        x, in_range = depth_round_trip(vae, item['depth_m'], item['valid'], d_min_m, d_max_m,
                                       device)
        pred_m = decode_depth(x[0, 0], d_min_m, d_max_m).numpy()
        metrics = depth_metrics(pred_m, item['depth_m'], in_range[0, 0].numpy())
        abs_rel.append(metrics['abs_rel'])
        delta1.append(metrics['delta1'])
        rgb = image_ops.rgb_to_tensor(item['rgb'], device, torch.float32)
        rgb_padded, padding = image_ops.pad_to_multiple(rgb)
        rgb_out = image_ops.unpad(vae.decode(vae.encode(rgb_padded).latent_dist.mode()).sample,
                                  padding).clamp(-1, 1)
        rgb_l1.append(float((rgb_out - rgb).abs().mean()) * 127.5)
    return {'depth_abs_rel': float(np.mean(abs_rel)), 'depth_delta1': float(np.mean(delta1)),
            'rgb_l1': float(np.mean(rgb_l1))}
