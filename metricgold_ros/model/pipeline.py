"""MetricGoldPipeline: one RGB image in, metric depth (and its spread) out.

Few-step DDIM with trailing timestep spacing over a Marigold-style UNet that denoises a depth
latent conditioned on the image latent. Members of an ensemble are one batch; they share one
RGB encoding and the cached empty-text embedding, and are combined by their median in log
space (no scale/shift alignment: the output is metric).

Relative (Marigold) checkpoints run in diffusers' ``MarigoldDepthPipeline``'s numerics instead,
so that the same weights, seed, steps and resolution give its depth (to float round-off): its
processing size, input normalisation and resizes, noise drawn in the networks' dtype, members
denoised and decoded one at a time, the checkpoint's own scheduler, output kept in the
networks' dtype until the end, and affine-aligned ensembles (:mod:`.ensemble`).

E2E-FT checkpoints (``metadata.e2e_ft``, metric or relative) run their single deterministic
step instead of sampling: a zero latent at ``t = T - 1``, the predicted x0 out
(:func:`.single_step.predict_x0_single_step`).
"""

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from metricgold_ros.errors import InputError
from metricgold_ros.model import image_ops
from metricgold_ros.model.checkpoint import Checkpoint, load_checkpoint, load_decoder
from metricgold_ros.model.codec import decode_depth
from metricgold_ros.model.ensemble import ensemble_affine, ensemble_members
from metricgold_ros.model.single_step import predict_x0_single_step

LOGGER = logging.getLogger(__name__)

MAX_BATCH_LATENTS = 8  # default chunk of MetricGoldPipeline.max_batch_latents
DTYPES = {'float32': torch.float32, 'float16': torch.float16, 'bfloat16': torch.bfloat16}


@dataclass
class DepthPrediction:
    """Result of one pipeline call.

    Attributes:
        depth: ``[H,W]`` float32 at the requested output size. Metres for a MetricGold model;
            affine-invariant values when ``relative`` (use :attr:`depth_m` for metres): one
            member is the decoded value mapped to [0, 1], an ensemble spans [0, 1] exactly.
        relative: True when the checkpoint is a relative-depth (Marigold) model.
        uncertainty: ``[H,W]`` float32 spread of the ensemble in the units of ``depth`` (metres:
            ``depth * std(log depth)`` over members; relative: the median absolute deviation of
            the aligned members over their range, as diffusers defines it; E2E-FT: zeros, its
            members are identical), ``None`` when ``ensemble_size == 1``.
        rgb_latent: ``[1,4,h,w]`` image latent, reusable while the image is unchanged.
        depth_latent: ``[E,4,h,w]`` final depth latents, the warm start of the next video frame
            (``[1,4,h,w]`` for E2E-FT, whose members are one).
        timings_s: wall time of each stage in seconds.
    """

    depth: np.ndarray
    relative: bool
    uncertainty: Optional[np.ndarray]
    rgb_latent: torch.Tensor
    depth_latent: torch.Tensor
    timings_s: Dict[str, float] = field(default_factory=dict)

    @property
    def depth_m(self) -> np.ndarray:
        """Depth in metres; refuses relative models, whose output has no metric scale."""
        if self.relative:
            raise InputError('this model predicts relative depth (a Marigold checkpoint), not '
                             'metres: use a MetricGold checkpoint for metric depth and clouds')
        return self.depth


def resolve_device(device: str = 'auto') -> torch.device:
    """'auto' -> the first CUDA GPU when present, else CPU; 'cpu', 'cuda', 'cuda:N' as given."""
    if device == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise InputError(f"device={device!r} is not valid; use 'auto', 'cpu' or 'cuda[:N]'") \
            from err
    if resolved.type == 'cuda' and not torch.cuda.is_available():
        raise InputError(f"device={device!r} but this torch has no CUDA GPU; use 'cpu' or 'auto'")
    return resolved


def resolve_dtype(dtype: Union[str, torch.dtype], device: torch.device,
                  weights: Optional[torch.dtype] = None) -> torch.dtype:
    """'auto' -> ``weights`` when given, else float16 on CUDA and float32 elsewhere; or one of
    float32/float16/bfloat16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == 'auto' and weights is not None:
        return weights
    if dtype == 'auto':
        return torch.float16 if device.type == 'cuda' else torch.float32
    if dtype not in DTYPES:
        raise InputError(f'dtype={dtype!r} is not supported; use auto or one of {list(DTYPES)}')
    return DTYPES[dtype]


class MetricGoldPipeline:
    """Metric depth from RGB with a MetricGold (or, in relative mode, Marigold) checkpoint.

    Relative checkpoints give what diffusers' ``MarigoldDepthPipeline`` gives for the same
    weights, seed (a CPU generator seeded with ``seed``), steps and processing resolution; E2E-FT
    checkpoints run their one deterministic step (see the module docstring).
    """

    def __init__(self, checkpoint: Checkpoint, device: Union[str, torch.device] = 'cpu',
                 dtype: Union[str, torch.dtype] = 'float32', channels_last: bool = False,
                 compile_unet: bool = False, decoder: Optional[torch.nn.Module] = None) -> None:
        """Place the checkpoint's networks on ``device`` in ``dtype``.

        Args:
            channels_last: NHWC weights (and activations), the layout tensor-core
                convolutions use natively. Opt-in because it converts the checkpoint's modules
                in place (training validates with its live networks); on the CPU the
                activations of MetricGold models are channels-last either way.
            compile_unet: ``torch.compile`` the UNet (opt-in: the first frame of each input
                size then takes seconds to minutes to compile).
            dtype: ``'auto'`` is float16 on CUDA for MetricGold models; relative (Marigold)
                and E2E-FT models run in their weights' dtype, as diffusers and E2E-FT's
                reference do (float32 as loaded).
            decoder: a light decoder (``AutoencoderTiny``/TAESD or a second
                ``AutoencoderKL``, see :func:`.checkpoint.load_decoder`) used instead of the
                VAE's decoder; encoding stays with the VAE. None: the VAE decodes.
        """
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.metadata = checkpoint.metadata
        weights = next(checkpoint.unet.parameters()).dtype \
            if self.metadata.relative or self.metadata.e2e_ft else None
        self.dtype = resolve_dtype(dtype, self.device, weights)
        self.scheduler = checkpoint.scheduler
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.vae = _place(checkpoint.vae, self.device, self.dtype, self.memory_format)
        self.decoder = None if decoder is None else \
            _place(decoder, self.device, self.dtype, self.memory_format)
        self.unet = _place(checkpoint.unet, self.device, self.dtype, self.memory_format)
        # Layout of the activations fed to the networks. On the CPU channels-last for MetricGold
        # models: oneDNN then runs NHWC convolutions whatever the weights' layout, 12-14 %
        # faster for the tiny VAE and neutral for SD2-size networks (BENCHMARKS.md), with no
        # change to the (shared) modules. Relative models keep diffusers' layout (NCHW unless
        # asked): NHWC convolutions sum in another order.
        self.activation_format = torch.channels_last if channels_last or (
            self.device.type == 'cpu' and not self.metadata.relative) else torch.contiguous_format
        if compile_unet:
            self.unet = torch.compile(self.unet)
        self.empty_text_embedding = checkpoint.empty_text_embedding.to(self.device, self.dtype)
        self.latent_scale = float(self.vae.config.scaling_factor)
        # Debug hook (tests, fault drills): called with the stage name before each stage.
        self.stage_hook: Optional[Callable[[str], None]] = None
        self.current_stage = ''  # the stage running now (or that last ran): fault reports
        # Latents per UNet/decoder call: an ensemble (or a batch of cameras) larger than this
        # runs in chunks, so memory is bounded by the chunk, not by ensemble_size x cameras.
        self.max_batch_latents: Optional[int] = MAX_BATCH_LATENTS
        self._warned_ensemble = False

    @classmethod
    def from_pretrained(cls, path: Union[str, Path], *, device: str = 'auto',
                        dtype: str = 'auto', allow_pickle: bool = False,
                        variant: Optional[str] = None,
                        decoder: Optional[Union[str, Path]] = None,
                        **kwargs) -> 'MetricGoldPipeline':
        """Load a local checkpoint folder (nothing is downloaded) onto ``device``.

        ``variant`` reads ``*.{variant}.safetensors`` weights (e.g. ``'fp16'``); ``decoder``
        is a local light-decoder folder (hub ids: :func:`metricgold_ros.model_paths.load_model`).
        """
        checkpoint = load_checkpoint(path, allow_pickle=allow_pickle, variant=variant)
        if decoder is not None:
            kwargs['decoder'] = load_decoder(  # its own plain weights, as diffusers loads it
                decoder, latent_channels=int(checkpoint.vae.config.latent_channels),
                allow_pickle=allow_pickle)
        return cls(checkpoint, device=device, dtype=dtype, **kwargs)

    @property
    def relative(self) -> bool:
        """True for affine-invariant (Marigold) checkpoints: depth in [0, 1], not metres."""
        return self.metadata.relative

    @property
    def e2e_ft(self) -> bool:
        """True for single-step E2E-FT checkpoints: deterministic, one step, one member."""
        return self.metadata.e2e_ft

    def check_inputs(self, denoising_steps: Optional[int], ensemble_size: int,
                     processing_resolution: Optional[int], warm_start_strength: float) -> None:
        """Validate arguments up front, each with its own message."""
        if denoising_steps is None:
            raise InputError(
                'denoising_steps=None and the checkpoint states no default_denoising_steps '
                '(model_index.json); pass denoising_steps (--steps; node parameter '
                'denoising_steps), e.g. the value its model card recommends')
        if processing_resolution is None:
            raise InputError(
                'processing_resolution=None and the checkpoint states no '
                'default_processing_resolution (model_index.json); pass processing_resolution '
                '(--processing-resolution; node parameter processing_resolution), e.g. 768')
        if not isinstance(denoising_steps, int) or denoising_steps < 1:
            raise InputError(f'denoising_steps={denoising_steps!r}, expected an integer >= 1')
        if self.e2e_ft and denoising_steps != 1:
            raise InputError(f'denoising_steps={denoising_steps!r} but this is an E2E-FT model, '
                             'trained for exactly one step: use denoising_steps=1 (or None)')
        if not isinstance(ensemble_size, int) or ensemble_size < 1:
            raise InputError(f'ensemble_size={ensemble_size!r}, expected an integer >= 1')
        if not isinstance(processing_resolution, int) or processing_resolution < 0 or \
                0 < processing_resolution < image_ops.LATENT_FACTOR:
            raise InputError(f'processing_resolution={processing_resolution!r}, expected 0 '
                             f'(native size) or an integer >= {image_ops.LATENT_FACTOR}')
        if not 0.0 < warm_start_strength <= 1.0:
            raise InputError(
                f'warm_start_strength={warm_start_strength!r}, expected a number in (0, 1]')

    @torch.no_grad()
    def __call__(self, rgb: np.ndarray, *, denoising_steps: Optional[int] = None,
                 ensemble_size: int = 1, processing_resolution: Optional[int] = None,
                 seed: Optional[int] = 0, init_latent: Optional[torch.Tensor] = None,
                 warm_start_strength: float = 0.5,
                 output_size: Optional[Tuple[int, int]] = None) -> DepthPrediction:
        """Predict depth for one RGB uint8 ``[H,W,3]`` image (grayscale/RGBA accepted).

        Args:
            denoising_steps: DDIM steps; ``None`` uses the checkpoint's default (an error when
                it states none). E2E-FT models run exactly one.
            ensemble_size: independent predictions combined by their log-space median (relative
                models: aligned, then the median). E2E-FT models are deterministic: their
                members would be identical, so one is computed and the uncertainty is zero.
            processing_resolution: longer side fed to the networks; ``None`` uses the
                checkpoint's default, 0 the native size.
            seed: seeds the initial noise (same seed, same output); ``None`` draws a fresh one.
            init_latent: ``[E,4,h,w]`` depth latent of the previous frame (warm start): it is
                re-noised to ``warm_start_strength`` of the schedule instead of starting from
                pure noise; ignored (cold start) when its shape does not match this frame, and
                by E2E-FT models.
            output_size: ``(H, W)`` of the returned maps; default the input size.
        """
        return self.predict_batch(
            [rgb], denoising_steps=denoising_steps, ensemble_size=ensemble_size,
            processing_resolution=processing_resolution, seeds=[seed],
            init_latents=[init_latent], warm_start_strength=warm_start_strength,
            output_sizes=[output_size])[0]

    @torch.no_grad()
    def predict_batch(self, rgbs: Sequence[np.ndarray], *,
                      denoising_steps: Optional[int] = None, ensemble_size: int = 1,
                      processing_resolution: Optional[int] = None,
                      seeds: Optional[Sequence[Optional[int]]] = None,
                      init_latents: Optional[Sequence[Optional[torch.Tensor]]] = None,
                      warm_start_strength: float = 0.5,
                      output_sizes: Optional[Sequence[Optional[Tuple[int, int]]]] = None
                      ) -> List[DepthPrediction]:
        """Predict depth for several images (e.g. one per camera) with shared settings.

        Images whose processing size and warm-start state match run through the networks as
        one batch (``N x ensemble_size`` latents); the others run in turn. Each image gets what
        :meth:`__call__` would give it alone (its own seed and warm start), to float round-off
        of batched kernels. Relative (Marigold) models run one image at a time, so that each
        stays bit-identical to diffusers. A batch's stage times are shared by its images.

        Args:
            rgbs: ``N`` RGB uint8 ``[H,W,3]`` images (sizes may differ).
            seeds, init_latents, output_sizes: one per image (default: 0, None, None); see
                :meth:`__call__` for the rest.
        """
        count = len(rgbs)
        seeds = [0] * count if seeds is None else list(seeds)
        init_latents = [None] * count if init_latents is None else list(init_latents)
        output_sizes = [None] * count if output_sizes is None else list(output_sizes)
        for name, values in (('seeds', seeds), ('init_latents', init_latents),
                             ('output_sizes', output_sizes)):
            if len(values) != count:
                raise InputError(f'{name}: {len(values)} values for {count} images; give one '
                                 'per image')
        meta = self.metadata
        steps = meta.default_denoising_steps if denoising_steps is None else denoising_steps
        resolution = meta.default_processing_resolution \
            if processing_resolution is None else processing_resolution
        self.check_inputs(steps, ensemble_size, resolution, warm_start_strength)
        if self.e2e_ft and ensemble_size > 1 and not self._warned_ensemble:
            LOGGER.warning('ensemble_size=%d with an E2E-FT model: its prediction is '
                           'deterministic, so one member is computed (uncertainty zero); use '
                           'ensemble_size=1', ensemble_size)
            self._warned_ensemble = True
        members = 1 if self.e2e_ft else ensemble_size
        # 1. Each image -> [1,3,PH,PW] in [-1, 1], padded to multiples of 8; then groups of
        #    images that can share one pass through the networks.
        prepared, groups = [], {}
        for index, rgb in enumerate(rgbs):
            timings: Dict[str, float] = {}
            with self._stage('preprocess', timings):
                prepare = image_ops.prepare_image_exact if self.relative \
                    else image_ops.prepare_image
                image, padding, input_size = prepare(rgb, resolution, self.device, self.dtype)
            prepared.append((self._layout(image), padding, input_size, timings))
            latent_shape = (members, int(self.vae.config.latent_channels),
                            image.shape[-2] // image_ops.LATENT_FACTOR,
                            image.shape[-1] // image_ops.LATENT_FACTOR)  # [E,4,h,w]
            warm = not self.e2e_ft and self._warm(init_latents[index], latent_shape)
            key = index if self.relative else (tuple(image.shape), warm)
            groups.setdefault(key, []).append(index)
        results: List[Optional[DepthPrediction]] = [None] * count
        for indices in groups.values():
            images = [prepared[i] for i in indices]
            group = self._predict_group(
                torch.cat([image for image, _, _, _ in images]), steps, members,
                [seeds[i] for i in indices], [init_latents[i] for i in indices],
                warm_start_strength)
            for i, (depth_latent, x, rgb_latent, timings) in zip(indices, group):
                _, padding, input_size, own = prepared[i]
                results[i] = self._finish_prediction(
                    x, padding, output_sizes[i] or input_size, ensemble_size, rgb_latent,
                    depth_latent, {**own, **timings})
        return results

    def _predict_group(self, image: torch.Tensor, steps: int, members: int,
                       seeds: List[Optional[int]], init_latents: List[Optional[torch.Tensor]],
                       strength: float) -> List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                      Dict[str, float]]]:
        """Networks for ``N`` prepared images ``[N,3,PH,PW]`` of one size and warm state.

        Returns per image: its depth latents ``[E,4,h,w]``, decoded members ``[E,1,PH,PW]``,
        RGB latent ``[1,4,h,w]`` and the group's stage times.
        """
        timings: Dict[str, float] = {}
        count = image.shape[0]
        # 2. One RGB latent per image for all its ensemble members and all steps.
        with self._stage('vae_encode', timings):
            rgb_latent = self.vae.encode(image).latent_dist.mode() * self.latent_scale  # [N,4,h,w]
        # 3. Initial depth latents: noise, or the previous frame's latent partly re-noised;
        #    each image's from its own seed.
        if not self.e2e_ft:
            starts = [self._prepare_latents(rgb_latent[i:i + 1], members, steps, seeds[i],
                                            init_latents[i], strength) for i in range(count)]
            timesteps, generator = starts[0][0], starts[0][2]
            depth_latent = torch.cat([latent for _, latent, _ in starts])  # [N*E,4,h,w]
        # 4. Denoise: E2E-FT's one step, else the sampler (relative: a member at a time), in
        #    chunks of at most max_batch_latents latents (memory stays bounded).
        batch = 1 if self.relative else min(count * members,
                                            self.max_batch_latents or count * members)
        with self._stage('unet', timings):
            if self.e2e_ft:
                depth_latent = torch.cat([predict_x0_single_step(
                    self.unet, self.scheduler, part, self.empty_text_embedding)
                    for part in rgb_latent.split(batch)])
            else:
                rgb_batch = rgb_latent.repeat_interleave(members, dim=0)  # [N*E,4,h,w]
                depth_latent = torch.cat([
                    self._denoise(rgb_batch[i:i + batch], depth_latent[i:i + batch], steps,
                                  timesteps, generator)
                    for i in range(0, count * members, batch)])
            # Returned in the networks' layout: decoding it again gives the same numbers.
            depth_latent = self._layout(depth_latent)
        # 5. Decode; the 3 output channels are one value replicated: average them.
        with self._stage('vae_decode', timings):
            x = torch.cat([self._decode(part)
                           for part in depth_latent.split(batch)])  # [N*E,1,PH,PW]
        return [(depth_latent[i * members:(i + 1) * members], x[i * members:(i + 1) * members],
                 rgb_latent[i:i + 1], timings) for i in range(count)]

    def _finish_prediction(self, x: torch.Tensor, padding: Tuple[int, int],
                           size: Tuple[int, int], ensemble_size: int, rgb_latent: torch.Tensor,
                           depth_latent: torch.Tensor, timings: Dict[str, float]
                           ) -> DepthPrediction:
        """6. Ensemble one image's members ``[E,1,PH,PW]``, resize once, map to depth."""
        timings = dict(timings)
        with self._stage('postprocess', timings):
            if self.relative:
                depth, uncertainty = self._finish_relative(image_ops.unpad(x, padding), size)
            else:
                depth, uncertainty = self._finish(image_ops.unpad(x, padding).float(), size)
            if self.e2e_ft and ensemble_size > 1:
                uncertainty = np.zeros_like(depth)
        return DepthPrediction(depth, self.relative, uncertainty, rgb_latent, depth_latent,
                               timings)

    def _denoise(self, rgb_batch: torch.Tensor, depth_latent: torch.Tensor, steps: int,
                 timesteps: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Run the sampler over ``timesteps`` for the members ``[B,4,h,w]`` of one batch."""
        self.scheduler.set_timesteps(steps, device=self.device)  # resets stateful samplers
        text = self.empty_text_embedding.expand(depth_latent.shape[0], -1, -1)  # [B,T,C]
        for t in timesteps:
            model_input = self._layout(torch.cat([rgb_batch, depth_latent], dim=1))  # [B,8,h,w]
            model_output = self.unet(model_input, t, encoder_hidden_states=text,
                                     return_dict=False)[0]  # [B,4,h,w]
            # The generator feeds samplers that add noise between steps (LCM), in diffusers'
            # order; DDIM (eta = 0) draws nothing.
            depth_latent = self.scheduler.step(model_output, t, depth_latent,
                                               generator=generator).prev_sample
        return depth_latent

    def _decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Depth latents ``[n,4,h,w]`` -> values ``[n,1,PH,PW]`` in [-1, 1] (the light decoder
        when there is one: its latents are the UNet's divided by its own scaling factor)."""
        if self.decoder is not None:
            latent = self._layout(latent / float(self.decoder.config.scaling_factor))
            decoded = self.decoder.decode(latent, return_dict=False)[0]
            return decoded.mean(dim=1, keepdim=True).clamp(-1.0, 1.0)
        latent = self._layout(latent / self.latent_scale)
        decoded = self.vae.decode(latent, return_dict=False)[0]
        return decoded.mean(dim=1, keepdim=True).clamp(-1.0, 1.0)

    def _layout(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` in the activation layout. Relative models in NCHW mode keep the layout
        diffusers' own operations give (its input image is a channels-last view, for one):
        convolutions sum in another order in another layout."""
        if self.relative and self.activation_format == torch.contiguous_format:
            return tensor
        return tensor.contiguous(memory_format=self.activation_format)

    def _prepare_latents(self, rgb_latent: torch.Tensor, ensemble_size: int, steps: int,
                         seed: Optional[int], init_latent: Optional[torch.Tensor],
                         strength: float
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Generator]:
        """Timesteps to run, the starting latent ``[E,4,h,w]`` and the seeded generator.

        The noise is one draw of ``[E,4,h,w]`` from a CPU generator, as diffusers draws it
        (relative models draw in the networks' dtype, as diffusers does; MetricGold models in
        float32).
        """
        shape = (ensemble_size, *rgb_latent.shape[1:])
        generator = torch.Generator(device='cpu')
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(int(seed))
        noise_dtype = self.dtype if self.relative else torch.float32
        noise = torch.randn(shape, generator=generator, dtype=noise_dtype).to(
            self.device, self.dtype)
        self.scheduler.set_timesteps(steps, device=self.device)
        timesteps = self.scheduler.timesteps
        if not self._warm(init_latent, shape):
            return timesteps, noise, generator
        # img2img-style warm start: skip the noisiest part of the schedule, keep >= 1 step.
        keep = max(1, min(steps, round(steps * strength)))
        timesteps = timesteps[steps - keep:]
        start = self.scheduler.add_noise(init_latent.to(self.device, self.dtype), noise,
                                         timesteps[:1])
        return timesteps, start, generator

    @staticmethod
    def _warm(init_latent: Optional[torch.Tensor], shape: Tuple[int, ...]) -> bool:
        """Whether ``init_latent`` can warm-start latents of ``shape`` ``[E,4,h,w]``."""
        return init_latent is not None and tuple(init_latent.shape) == tuple(shape)

    def _finish(self, x: torch.Tensor, output_size: Tuple[int, int]
                ) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """Metric members ``[E,1,h,w]`` in [-1, 1] -> depth and uncertainty at ``output_size``."""
        median, spread = ensemble_members(x)  # [1,1,h,w] each (spread None for one member)
        depth = self.to_depth(image_ops.resize(median, output_size)[0, 0])
        uncertainty = None
        if spread is not None:
            spread = image_ops.resize(spread, output_size)[0, 0]
            uncertainty = _to_numpy(self.to_uncertainty(depth, spread))
        return _to_numpy(depth), uncertainty

    def _finish_relative(self, x: torch.Tensor, output_size: Tuple[int, int]
                         ) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """Relative members ``[E,1,h,w]`` in [-1, 1] -> depth and uncertainty, as diffusers.

        Mapped to [0, 1] and ensembled in the networks' dtype, resized without antialiasing,
        and only then made float32.
        """
        depth = (x + 1.0) / 2.0
        uncertainty = None
        if depth.shape[0] > 1:
            depth, uncertainty = ensemble_affine(depth)
            uncertainty = _to_numpy(image_ops.resize_exact(uncertainty, output_size)[0, 0])
        return _to_numpy(image_ops.resize_exact(depth, output_size)[0, 0]), uncertainty

    def to_depth(self, value: torch.Tensor) -> torch.Tensor:
        """Network value in [-1, 1] -> metres (MetricGold) or [0, 1] (relative Marigold)."""
        meta = self.metadata
        if meta.relative:
            return (value + 1.0) * 0.5
        return decode_depth(value, meta.d_min_m, meta.d_max_m)

    def to_uncertainty(self, depth: torch.Tensor, spread: torch.Tensor) -> torch.Tensor:
        """Std of the members' values -> std in the units of ``depth`` (first-order)."""
        meta = self.metadata
        if meta.relative:
            return spread * 0.5
        return depth * spread * (0.5 * float(np.log(meta.d_max_m / meta.d_min_m)))  # d(log d)/dx

    @contextmanager
    def _stage(self, name: str, timings: Dict[str, float]) -> Iterator[None]:
        self.current_stage = name
        if self.stage_hook is not None:
            self.stage_hook(name)
        start = time.perf_counter()
        yield
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
        timings[name] = time.perf_counter() - start


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """float32 C-contiguous numpy, copied only when needed (a 640x480 copy is ~0.05 ms)."""
    return np.ascontiguousarray(tensor.cpu().numpy(), dtype=np.float32)


def _place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype,
           memory_format: torch.memory_format) -> torch.nn.Module:
    """Move ``module``; cast only when the dtype changes (diffusers warns on every cast)."""
    module = module.to(device)
    if next(module.parameters()).dtype != dtype:
        module = module.to(dtype)
    if memory_format == torch.channels_last:
        module = module.to(memory_format=memory_format)
    return module
