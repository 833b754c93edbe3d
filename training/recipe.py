"""The MetricGold training recipe as small pure functions (torch only, no I/O).

What Marigold (Ke et al., "Repurposing Diffusion-Based Image Generators for Monocular Depth
Estimation", CVPR 2024, github.com/prs-eth/Marigold) does to turn Stable Diffusion 2 into a
depth model, and MetricGold repeats with log-scaled metric depth:

* :func:`widen_conv_in` - the UNet's first convolution takes ``[rgb_latent, depth_latent]``
  (8 channels) instead of one 4-channel latent. Both halves start as the pretrained weights,
  halved, so that the first activations keep their pretrained magnitude.
* :func:`multi_res_noise_like` - pyramid ("multi-resolution") noise, annealed with the timestep.
* :func:`velocity_target` - v-prediction target, ``v = sqrt(a_t) * eps - sqrt(1 - a_t) * x0``.
* :func:`latent_valid_mask` / :func:`masked_mse` - the loss only counts latent pixels whose
  whole 8x8 pixel footprint has valid ground-truth depth.
* :class:`WarmupExponentialDecay` - linear warm-up, then exponential decay of the learning rate.

And the single-step objective of Garcia et al. ("Fine-Tuning Image-Conditional Diffusion Models
is Easier than You Think", 2024, "E2E-FT"): the pipeline's own
``metricgold_ros.model.predict_x0_single_step`` turns the UNet's v output at t = T for a zero
depth latent into the predicted clean latent, which the frozen VAE decodes
(:func:`decoded_depth`) for a loss in depth space.
"""

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F


def widen_conv_in(unet: torch.nn.Module, factor: int = 2) -> torch.nn.Module:
    """Widen ``unet.conv_in`` in place from C to ``factor * C`` input channels (Marigold's way).

    The new weight is the old one repeated ``factor`` times along the input-channel axis and
    divided by ``factor``; the bias is kept. With ``factor = 2`` and input ``[a, b]`` the layer
    computes ``W (a + b) / 2 + bias``: for ``b = a`` exactly what the pretrained layer computed
    for ``a``, and for ``b = 0`` what it computed for ``a / 2``. The model config's
    ``in_channels`` is updated so that ``save_pretrained`` writes the new architecture.

    Returns:
        ``unet`` itself, modified.
    """
    old = unet.conv_in
    if not isinstance(old, torch.nn.Conv2d):
        raise TypeError(f'unet.conv_in is a {type(old).__name__}, expected torch.nn.Conv2d')
    new = torch.nn.Conv2d(
        old.in_channels * factor, old.out_channels, kernel_size=old.kernel_size,
        stride=old.stride, padding=old.padding, dilation=old.dilation, groups=old.groups,
        bias=old.bias is not None, padding_mode=old.padding_mode,
        device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(old.weight.repeat(1, factor, 1, 1) / factor)  # [O, factor*C, k, k]
        if old.bias is not None:
            new.bias.copy_(old.bias)
    new.weight.requires_grad_(old.weight.requires_grad)
    if new.bias is not None:
        new.bias.requires_grad_(old.bias.requires_grad)
    unet.conv_in = new
    unet.register_to_config(in_channels=old.in_channels * factor)
    return unet


def multi_res_noise_like(x: torch.Tensor, strength: Union[float, torch.Tensor] = 0.9,
                         generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Pyramid noise with the shape of ``x`` ``[B,C,H,W]``, normalised to unit std.

    Marigold's ``multi_res_noise_like`` with ``downscale_strategy='original'``
    (``src/util/multi_res_noise.py``), itself from J. Whitaker's report "Multi-Resolution Noise
    for Diffusion Model Training" (wandb.ai/johnowhitaker/multires_noise, 2023):
    ``noise = eps_0 + sum_i up(eps_i at size (H, W) / r_i^i ...) * strength^i`` for
    ``i = 0..9`` with ``r_i ~ U[2, 4)``, each level's size derived from the previous one (as
    the reference code does), stopping at a 1-pixel side, then ``noise / noise.std()`` over the
    whole batch. ``strength`` may be a ``[B]`` tensor: Marigold anneals it per sample as
    ``0.9 * t / T`` (see :func:`annealed_strength`).

    Random numbers come from ``generator`` on the CPU (same noise on every device), then move
    to ``x``'s device and dtype.
    """
    batch, channels, height, width = x.shape
    if torch.is_tensor(strength):
        strength = strength.reshape(-1, 1, 1, 1).to(torch.float32)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator, dtype=torch.float32)

    noise = randn(batch, channels, height, width)
    h, w = height, width
    for level in range(10):
        ratio = float(torch.rand(1, generator=generator)) * 2 + 2  # U[2, 4), not always 2x
        h, w = max(1, int(h / ratio ** level)), max(1, int(w / ratio ** level))
        coarse = F.interpolate(randn(batch, channels, h, w), size=(height, width),
                               mode='bilinear', align_corners=False)
        noise = noise + coarse * strength ** level
        if h == 1 or w == 1:
            break
    noise = noise / noise.std()
    return noise.to(device=x.device, dtype=x.dtype)


def annealed_strength(timesteps: torch.Tensor, num_train_timesteps: int,
                      strength: float = 0.9) -> torch.Tensor:
    """Marigold's annealing: pyramid-noise strength ``strength * t / T`` per sample ``[B]``."""
    return strength * timesteps.to(torch.float32).cpu() / float(num_train_timesteps)


def sample_timesteps(batch: int, num_train_timesteps: int, generator: torch.Generator,
                     sampling_timesteps: Optional[torch.Tensor] = None,
                     sampling_p: float = 0.0) -> torch.Tensor:
    """``[B]`` training timesteps: uniform (Marigold), or with probability ``sampling_p`` one
    of ``sampling_timesteps``, the steps few-step inference visits (``[999]`` for one trailing
    DDIM step). A deviation for models trained from scratch: with uniform sampling only ~5 %
    of samples train the t ~ T prediction that one-step inference uses, and a tiny model then
    learns denoising long before it learns depth (cf. Garcia et al., "Fine-Tuning
    Image-Conditional Diffusion Models is Easier than You Think", 2024, who train at t = T).
    """
    timesteps = torch.randint(0, num_train_timesteps, (batch,), generator=generator)
    if sampling_p > 0 and sampling_timesteps is not None and len(sampling_timesteps):
        pick = torch.rand(batch, generator=generator) < sampling_p
        choice = torch.randint(0, len(sampling_timesteps), (batch,), generator=generator)
        timesteps = torch.where(pick, sampling_timesteps.cpu().long()[choice], timesteps)
    return timesteps


def velocity_target(scheduler, x0: torch.Tensor, noise: torch.Tensor,
                    timesteps: torch.Tensor) -> torch.Tensor:
    """v-prediction target (Salimans & Ho 2022) from the DDPM scheduler's own schedule."""
    return scheduler.get_velocity(x0, noise, timesteps)


def latent_valid_mask(valid: torch.Tensor, factor: int = 8) -> torch.Tensor:
    """``[B,1,H,W]`` pixel validity -> ``[B,1,H/factor,W/factor]`` latent validity.

    A latent pixel is valid only when all ``factor x factor`` pixels it encodes are valid (a max
    pool of the invalid mask, as Marigold's trainer does): the VAE mixes every pixel of the
    block into the latent, so one invalid pixel makes the target latent partly made-up.
    """
    if valid.dim() != 4 or valid.shape[1] != 1:
        raise ValueError(f'valid has shape {tuple(valid.shape)}, expected [B,1,H,W]')
    invalid = (~valid.bool()).to(torch.float32)
    return ~F.max_pool2d(invalid, kernel_size=factor, stride=factor).bool()


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
               weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean squared error over the elements where ``mask`` ``[B,1,h,w]`` is True (all channels),
    weighted by ``weights`` (broadcast to the prediction; None: all 1) when given.

    The mean runs over every selected element of the batch (Marigold's ``mse_loss`` on the
    masked tensors). With nothing selected it returns a zero that still depends on
    ``prediction``, so backward and distributed gradient sync behave as usual.
    """
    if prediction.shape != target.shape:
        raise ValueError(f'prediction {tuple(prediction.shape)} and target '
                         f'{tuple(target.shape)} differ in shape')
    selected = mask.expand_as(prediction)
    if not bool(selected.any()):
        return prediction.sum() * 0.0
    diff = prediction.float()[selected] - target.float()[selected]
    if weights is None:
        return (diff * diff).mean()
    weight = weights.expand_as(prediction)[selected].float()
    return (weight * diff * diff).sum() / weight.sum()


def border_weights(height: int, width: int, border_px: int, weight: float) -> torch.Tensor:
    """``[1,1,H,W]`` loss weights: ``weight`` within ``border_px`` of the image's edge, else 1.

    The pixels along the edge see the least context and the convolutions' zero padding; a
    network trained on whole views learns to fill them from a prior (nearer than the centre,
    as rooms and streets are) instead of from the image. Weighting them up makes that prior
    cost more than it saves."""
    rows, cols = torch.arange(height), torch.arange(width)
    edge = torch.minimum(torch.minimum(rows, height - 1 - rows)[:, None],
                         torch.minimum(cols, width - 1 - cols)[None, :])
    return torch.where(edge < border_px, float(weight), 1.0)[None, None]


def masked_gradient_loss(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                         scales: int = 4) -> torch.Tensor:
    """Multi-scale gradient matching of the residual ``prediction - target`` ``[B,1,H,W]``.

    The mean of ``|d/dx R| + |d/dy R|`` over neighbouring pixel pairs that are both in ``mask``,
    at ``scales`` scales (every 1st, 2nd, 4th ... pixel), averaged over the scales: the
    gradient-matching term of MegaDepth (Li and Snavely, CVPR 2018) and MiDaS. On codec values,
    which are log depth, it asks for the target's steps where the squared error alone is
    content with a blur: a blurred step of height h costs about h per pixel pair it misses.
    With nothing selected it returns a zero that depends on ``prediction``, as ``masked_mse``.
    """
    if prediction.shape != target.shape or mask.shape != prediction.shape:
        raise ValueError(f'prediction {tuple(prediction.shape)}, target '
                         f'{tuple(target.shape)} and mask {tuple(mask.shape)} must match')
    residual, valid = prediction.float() - target.float(), mask.bool()
    total = prediction.sum() * 0.0
    for level in range(scales):
        step = 2 ** level
        r, m = residual[..., ::step, ::step], valid[..., ::step, ::step]
        pairs, cost = 0, 0.0
        for dim in (-1, -2):
            if r.shape[dim] < 2:
                continue
            both = m.narrow(dim, 0, m.shape[dim] - 1) & m.narrow(dim, 1, m.shape[dim] - 1)
            cost = cost + (r.diff(dim=dim).abs() * both).sum()
            pairs += int(both.sum())
        if pairs:
            total = total + cost / pairs
    return total / scales


@dataclass
class WarmupExponentialDecay:
    """LR factor for ``torch.optim.lr_scheduler.LambdaLR``, by optimizer step ``n`` (0-based).

    Marigold's ``IterExponential``: linear warm-up over ``warmup_steps``, then
    ``final_ratio ** ((n - warmup) / (decay_steps - warmup))`` until ``decay_steps``, then
    ``final_ratio``. One deviation: warm-up is ``(n + 1) / warmup_steps``, so the first step
    already learns (Marigold's ``n / warmup_steps`` makes it a no-op).
    """

    warmup_steps: int
    decay_steps: int
    final_ratio: float

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:  # (never true for warmup_steps = 0)
            return (step + 1) / self.warmup_steps
        if step >= self.decay_steps:
            return self.final_ratio
        span = max(1, self.decay_steps - self.warmup_steps)
        return math.exp((step - self.warmup_steps) / span * math.log(self.final_ratio))


def decoded_depth(vae: torch.nn.Module, latent: torch.Tensor) -> torch.Tensor:
    """The VAE's decoding of a scaled depth latent ``[B,4,h,w]``: codec value ``[B,1,H,W]``.

    Divides by ``vae.config.scaling_factor``, decodes, and averages the three channels (the
    codec's depth image is one value replicated, as the pipeline reads it back). Gradients
    flow through the decoder to ``latent``; the VAE's own weights may stay frozen.
    """
    scale = float(vae.config.scaling_factor)
    image = vae.decode(latent / scale).sample  # [B,3,H,W]
    return image.float().mean(dim=1, keepdim=True)
