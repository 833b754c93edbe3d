"""Single-step prediction of E2E-FT checkpoints, shared by inference and training.

End-to-end fine-tuning (Martin Garcia et al., "Fine-Tuning Image-Conditional Diffusion Models is
Easier than You Think", 2024) trains the denoiser for one fixed input: the depth latent is zero
and the timestep is the last one, ``t = T - 1`` (what DDIM with trailing spacing runs for a
single step). The network's output is turned into its estimate of the clean latent x0 with the
noise schedule, decoded, and the task loss is taken on that; inference does the same with no
noise anywhere, so the result is deterministic and an ensemble of it is one member repeated.

Training calls :func:`predict_x0_single_step` (with gradients) and inference calls it under
``torch.no_grad()``: one function, so the two cannot drift apart.
"""

from typing import Union

import torch

from metricgold_ros.errors import InputError


def final_timestep(scheduler: object) -> int:
    """The timestep E2E-FT models run at: the last training timestep, ``T - 1``."""
    return int(scheduler.config.num_train_timesteps) - 1


def x0_from_model_output(scheduler: object, model_output: torch.Tensor, sample: torch.Tensor,
                         timestep: Union[int, torch.Tensor]) -> torch.Tensor:
    """The clean latent the network predicts from ``sample`` at ``timestep``.

    With ``a`` the cumulative alpha of ``timestep`` in ``scheduler``'s schedule: v-prediction
    gives ``x0 = sqrt(a) * x_t - sqrt(1 - a) * v``, epsilon-prediction
    ``x0 = (x_t - sqrt(1 - a) * eps) / sqrt(a)`` and sample-prediction the output itself.

    Args:
        scheduler: a diffusers scheduler (its ``alphas_cumprod`` and ``prediction_type``).
        model_output: ``[B,4,h,w]`` UNet output.
        sample: ``[B,4,h,w]`` the latent the UNet saw (``x_t``).
        timestep: an integer timestep, or ``[B]`` of them.

    Returns:
        ``[B,4,h,w]`` predicted x0 in ``model_output``'s dtype.
    """
    kind = scheduler.config.prediction_type
    if kind == 'sample':
        return model_output
    alphas = scheduler.alphas_cumprod.to(model_output.device)
    alpha = alphas[torch.as_tensor(timestep, device=alphas.device).long()]
    alpha = alpha.reshape(-1, 1, 1, 1).to(model_output.dtype)  # [1 or B,1,1,1]
    sigma = (1 - alpha).sqrt()
    if kind == 'v_prediction':
        return alpha.sqrt() * sample - sigma * model_output
    if kind == 'epsilon':
        return (sample - sigma * model_output) / alpha.sqrt()
    raise InputError(f'scheduler prediction_type={kind!r} is not supported; expected '
                     "'v_prediction', 'epsilon' or 'sample' (the checkpoint's scheduler config)")


def predict_x0_single_step(unet: torch.nn.Module, scheduler: object, rgb_latent: torch.Tensor,
                           text_embedding: torch.Tensor) -> torch.Tensor:
    """E2E-FT's one step: a zero depth latent at ``t = T - 1`` -> the predicted x0 latent.

    Keeps the autograd graph (training back-propagates a loss on the decoded x0 through it);
    wrap the call in ``torch.no_grad()`` for inference.

    Args:
        unet: the 8-channel Marigold-style UNet.
        scheduler: the checkpoint's scheduler, for the noise schedule and prediction type.
        rgb_latent: ``[B,4,h,w]`` image latent, already multiplied by the VAE scaling factor.
        text_embedding: ``[1,T,C]`` or ``[B,T,C]`` empty-prompt embedding.

    Returns:
        ``[B,4,h,w]`` depth latent (divide by the VAE scaling factor before decoding).
    """
    batch = rgb_latent.shape[0]
    zero = torch.zeros_like(rgb_latent)
    timestep = final_timestep(scheduler)
    text = text_embedding.to(rgb_latent.dtype).expand(batch, -1, -1)  # [B,T,C]
    model_input = torch.cat([rgb_latent, zero], dim=1)  # [B,8,h,w]
    model_output = unet(model_input, timestep, encoder_hidden_states=text,
                        return_dict=False)[0]  # [B,4,h,w]
    return x0_from_model_output(scheduler, model_output, zero, timestep)
