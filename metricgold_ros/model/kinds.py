"""The kinds of checkpoint, one small class per difference, behind two interfaces.

A checkpoint is run by a :class:`DepthOutput` (what the network's values mean, how images are
prepared and members combined) and a :class:`Sampler` (how the depth latent is produced):

- :class:`MetricDepth`: MetricGold, log-scaled metric depth (the codec of :mod:`.codec`),
  members combined by their log-space median; the node's fast numerics.
- :class:`RelativeDepth`: Marigold, affine-invariant depth in diffusers'
  ``MarigoldDepthPipeline`` numerics (its processing size, resizes, noise in the networks'
  dtype, a member per network call, NCHW activations, affine-aligned ensembles), so that the
  same weights, seed and settings give its depth bit for bit on shared modules.
- :class:`DDIMSampler`: few-step sampling with the checkpoint's scheduler (trailing DDIM for
  ours), from seeded noise or a warm start.
- :class:`SingleStep`: E2E-FT, one deterministic step (zero latent at ``t = T - 1``, the
  predicted x0 out); one member, no noise.

:func:`kind_of` picks the pair from :class:`~.checkpoint.ModelMetadata`. Adding a kind is one
class here and its detection in :mod:`.checkpoint`.
"""

from typing import Any, Callable, List, Optional, Protocol, Tuple

import numpy as np
import torch

from metricgold_ros.errors import InputError
from metricgold_ros.model import image_ops
from metricgold_ros.model.checkpoint import ModelMetadata
from metricgold_ros.model.codec import decode_depth
from metricgold_ros.model.ensemble import ensemble_affine, ensemble_members
from metricgold_ros.model.single_step import predict_x0_single_step



class DepthOutput:
    """What a checkpoint's network values mean, and the numerics around the networks."""

    relative = False
    # One member per network call and one image per batch (diffusers' order and rounding).
    one_member_per_call = False
    # The networks run in the weights' dtype under dtype 'auto' (as the kind's reference does).
    weights_dtype = False

    def __init__(self, metadata: ModelMetadata) -> None:
        self.metadata = metadata

    def prepare(self, rgb: np.ndarray, resolution: int, device: torch.device,
                dtype: torch.dtype) -> Tuple[torch.Tensor, Tuple[int, int], Tuple[int, int]]:
        """RGB uint8 ``[H,W,3]`` -> ``[1,3,PH,PW]`` in [-1, 1], its padding, the input size."""
        return image_ops.prepare_image(rgb, resolution, device, dtype)

    def layout(self, tensor: torch.Tensor, activation_format: torch.memory_format
               ) -> torch.Tensor:
        """``tensor`` in the layout the networks get."""
        return tensor.contiguous(memory_format=activation_format)

    def cpu_activation_format(self) -> torch.memory_format:
        """The activation layout on the CPU unless channels-last is asked for."""
        return torch.channels_last

    def noise_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype the initial noise is drawn in (then cast to ``dtype``)."""
        return torch.float32

    def finish(self, x: torch.Tensor, output_size: Tuple[int, int],
               refine: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
               ) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """Members ``[E,1,h,w]`` in [-1, 1] (unpadded) -> depth and uncertainty ``[H,W]``.

        ``refine`` maps the ensembled value ``[1,1,H,W]`` at the output size (log depth) to
        its edge-refined self (:mod:`.guided`); the uncertainty is not refined.
        """
        median, spread = ensemble_members(x.float())  # [1,1,h,w] each (spread: None for one)
        value = image_ops.resize(median, output_size)
        depth = self.to_depth((value if refine is None else refine(value))[0, 0])
        uncertainty = None
        if spread is not None:
            spread = image_ops.resize(spread, output_size)[0, 0]
            uncertainty = to_numpy(self.to_uncertainty(depth, spread))
        return to_numpy(depth), uncertainty

    def to_depth(self, value: torch.Tensor) -> torch.Tensor:
        """Network value in [-1, 1] -> metres."""
        return decode_depth(value, self.metadata.d_min_m, self.metadata.d_max_m)

    def to_uncertainty(self, depth: torch.Tensor, spread: torch.Tensor) -> torch.Tensor:
        """Std of the members' values -> std in metres (first order: d(log d)/dx)."""
        meta = self.metadata
        return depth * spread * (0.5 * float(np.log(meta.d_max_m / meta.d_min_m)))


class MetricDepth(DepthOutput):
    """MetricGold: log-scaled metric depth (the base class's behaviour)."""


class RelativeDepth(DepthOutput):
    """Marigold: affine-invariant depth in [0, 1], in diffusers' numerics (module docstring)."""

    relative = True
    one_member_per_call = True
    weights_dtype = True

    def prepare(self, rgb: np.ndarray, resolution: int, device: torch.device,
                dtype: torch.dtype) -> Tuple[torch.Tensor, Tuple[int, int], Tuple[int, int]]:
        """diffusers' processing size, normalisation and resize."""
        return image_ops.prepare_image_exact(rgb, resolution, device, dtype)

    def layout(self, tensor: torch.Tensor, activation_format: torch.memory_format
               ) -> torch.Tensor:
        """In NCHW mode the layout diffusers' own operations give (its input image is a
        channels-last view, for one): convolutions sum in another order in another layout."""
        if activation_format == torch.contiguous_format:
            return tensor
        return tensor.contiguous(memory_format=activation_format)

    def cpu_activation_format(self) -> torch.memory_format:
        """diffusers' layout (NCHW unless channels-last is asked for)."""
        return torch.contiguous_format

    def noise_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """In the networks' dtype, as diffusers draws it."""
        return dtype

    def finish(self, x: torch.Tensor, output_size: Tuple[int, int],
               refine: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
               ) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """Mapped to [0, 1] and ensembled in the networks' dtype, resized without
        antialiasing, and only then made float32, as diffusers does (no ``refine``: relative
        checkpoints state none)."""
        depth = (x + 1.0) / 2.0
        uncertainty = None
        if depth.shape[0] > 1:
            depth, uncertainty = ensemble_affine(depth)
            uncertainty = to_numpy(image_ops.resize_exact(uncertainty, output_size)[0, 0])
        return to_numpy(image_ops.resize_exact(depth, output_size)[0, 0]), uncertainty

    def to_depth(self, value: torch.Tensor) -> torch.Tensor:
        """Network value in [-1, 1] -> [0, 1]."""
        return (value + 1.0) * 0.5

    def to_uncertainty(self, depth: torch.Tensor, spread: torch.Tensor) -> torch.Tensor:
        """Std of the members' values -> std in [0, 1] units."""
        return spread * 0.5


class Networks(Protocol):
    """What a sampler uses of the pipeline (:class:`~.pipeline.MetricGoldPipeline`)."""

    unet: Any
    scheduler: Any
    empty_text_embedding: torch.Tensor
    device: torch.device
    dtype: torch.dtype
    output: DepthOutput

    def layout(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` in the activation layout the networks get."""


class Sampler:
    """How the depth latent is produced from the RGB latent."""

    single_step = False
    # The networks run in the weights' dtype under dtype 'auto' (as the kind's reference does).
    weights_dtype = False

    def members(self, ensemble_size: int) -> int:
        """Members actually computed for ``ensemble_size``."""
        return ensemble_size

    def check_steps(self, steps: int) -> None:
        """Raise InputError when the kind cannot run ``steps``."""

    def warm(self, init_latent: Optional[torch.Tensor], shape: Tuple[int, ...]) -> bool:
        """Whether ``init_latent`` can warm-start latents of ``shape`` ``[E,4,h,w]``."""
        return init_latent is not None and tuple(init_latent.shape) == tuple(shape)

    def run(self, pipeline: Networks, rgb_latent: torch.Tensor, members: int,
            steps: int, seeds: List[Optional[int]], init_latents: List[Optional[torch.Tensor]],
            strength: float, batch: int) -> torch.Tensor:
        """RGB latents ``[N,4,h,w]`` -> depth latents ``[N*E,4,h,w]`` (image-major), the
        networks called on at most ``batch`` latents at a time."""
        raise NotImplementedError


class DDIMSampler(Sampler):
    """Few-step sampling with the checkpoint's scheduler, from seeded noise or a warm start."""

    def run(self, pipeline: Networks, rgb_latent: torch.Tensor, members: int,
            steps: int, seeds: List[Optional[int]], init_latents: List[Optional[torch.Tensor]],
            strength: float, batch: int) -> torch.Tensor:
        count = rgb_latent.shape[0]
        starts = [self._start(pipeline, rgb_latent[i:i + 1], members, steps, seeds[i],
                              init_latents[i], strength) for i in range(count)]
        timesteps, generator = starts[0][0], starts[0][2]  # one warm state per group
        latent = torch.cat([start for _, start, _ in starts])  # [N*E,4,h,w]
        rgb_batch = rgb_latent.repeat_interleave(members, dim=0)  # [N*E,4,h,w]
        return torch.cat([self._denoise(pipeline, rgb_batch[i:i + batch], latent[i:i + batch],
                                        steps, timesteps, generator)
                          for i in range(0, count * members, batch)])

    def _start(self, pipeline: Networks, rgb_latent: torch.Tensor, members: int,
               steps: int, seed: Optional[int], init_latent: Optional[torch.Tensor],
               strength: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Generator]:
        """Timesteps to run, the starting latent ``[E,4,h,w]`` and the seeded generator.

        The noise is one draw of ``[E,4,h,w]`` from a CPU generator, as diffusers draws it.
        """
        shape = (members, *rgb_latent.shape[1:])
        generator = torch.Generator(device='cpu')
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(int(seed))
        noise = torch.randn(shape, generator=generator,
                            dtype=pipeline.output.noise_dtype(pipeline.dtype)).to(
            pipeline.device, pipeline.dtype)
        scheduler = pipeline.scheduler
        scheduler.set_timesteps(steps, device=pipeline.device)
        timesteps = scheduler.timesteps
        if not self.warm(init_latent, shape):
            return timesteps, noise, generator
        # img2img-style warm start: skip the noisiest part of the schedule, keep >= 1 step.
        keep = max(1, min(steps, round(steps * strength)))
        timesteps = timesteps[steps - keep:]
        start = scheduler.add_noise(init_latent.to(pipeline.device, pipeline.dtype), noise,
                                    timesteps[:1])
        return timesteps, start, generator

    @staticmethod
    def _denoise(pipeline: Networks, rgb_batch: torch.Tensor,
                 depth_latent: torch.Tensor, steps: int, timesteps: torch.Tensor,
                 generator: torch.Generator) -> torch.Tensor:
        """Run the sampler over ``timesteps`` for the members ``[B,4,h,w]`` of one batch."""
        scheduler = pipeline.scheduler
        scheduler.set_timesteps(steps, device=pipeline.device)  # resets stateful samplers
        text = pipeline.empty_text_embedding.expand(depth_latent.shape[0], -1, -1)  # [B,T,C]
        for t in timesteps:
            model_input = pipeline.layout(torch.cat([rgb_batch, depth_latent], dim=1))
            model_output = pipeline.unet(model_input, t, encoder_hidden_states=text,
                                         return_dict=False)[0]  # [B,4,h,w]
            # The generator feeds samplers that add noise between steps (LCM), in diffusers'
            # order; DDIM (eta = 0) draws nothing.
            depth_latent = scheduler.step(model_output, t, depth_latent,
                                          generator=generator).prev_sample
        return depth_latent


class SingleStep(Sampler):
    """E2E-FT: one deterministic step; members would be identical, so one is computed."""

    single_step = True
    weights_dtype = True

    def members(self, ensemble_size: int) -> int:
        return 1

    def check_steps(self, steps: int) -> None:
        if steps != 1:
            raise InputError(f'denoising_steps={steps!r} but this is an E2E-FT model, trained '
                             'for exactly one step: use denoising_steps=1 (or None)')

    def warm(self, init_latent: Optional[torch.Tensor], shape: Tuple[int, ...]) -> bool:
        return False  # no noise to start from

    def run(self, pipeline: Networks, rgb_latent: torch.Tensor, members: int,
            steps: int, seeds: List[Optional[int]], init_latents: List[Optional[torch.Tensor]],
            strength: float, batch: int) -> torch.Tensor:
        return torch.cat([predict_x0_single_step(pipeline.unet, pipeline.scheduler, part,
                                                 pipeline.empty_text_embedding)
                          for part in rgb_latent.split(batch)])


def kind_of(metadata: ModelMetadata) -> Tuple[DepthOutput, Sampler]:
    """The output and sampler that run a checkpoint with ``metadata``."""
    output = RelativeDepth(metadata) if metadata.relative else MetricDepth(metadata)
    sampler = SingleStep() if metadata.e2e_ft else DDIMSampler()
    return output, sampler


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """float32 C-contiguous numpy, copied only when needed (a 640x480 copy is ~0.05 ms)."""
    return np.ascontiguousarray(tensor.cpu().numpy(), dtype=np.float32)
