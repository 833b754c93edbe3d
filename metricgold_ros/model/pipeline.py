"""MetricGoldPipeline: one RGB image in, metric depth (and its spread) out.

Few-step DDIM with trailing timestep spacing over a Marigold-style UNet that denoises a depth
latent conditioned on the image latent. Members of an ensemble are one batch; they share one
RGB encoding and the cached empty-text embedding, and are combined by their median in log
space (no scale/shift alignment: the output is metric).

What differs between kinds of checkpoint lives in :mod:`.kinds`: relative (Marigold)
checkpoints run in diffusers' ``MarigoldDepthPipeline``'s numerics (:class:`.kinds.
RelativeDepth`), E2E-FT checkpoints their single deterministic step (:class:`.kinds.
SingleStep`). This module is the order of the stages, shared by all.
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
from metricgold_ros.model import guided, image_ops
from metricgold_ros.model.checkpoint import Checkpoint, load_checkpoint, load_decoder
from metricgold_ros.model.kinds import DepthOutput, Sampler, kind_of

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
        self._kind_for, self._kinds = self.metadata, kind_of(self.metadata)
        weights = next(checkpoint.unet.parameters()).dtype \
            if self.output.weights_dtype or self.sampler.weights_dtype else None
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
        self.activation_format = torch.channels_last if channels_last else \
            self.output.cpu_activation_format() if self.device.type == 'cpu' else \
            torch.contiguous_format
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
    def output(self) -> DepthOutput:
        """What the networks' values mean (:mod:`.kinds`), for the current ``metadata``."""
        return self._kind()[0]

    @property
    def sampler(self) -> Sampler:
        """How the depth latent is produced (:mod:`.kinds`), for the current ``metadata``."""
        return self._kind()[1]

    def _kind(self) -> Tuple[DepthOutput, Sampler]:
        """The kind of ``metadata``, made again only when ``metadata`` is replaced."""
        if self._kind_for is not self.metadata:
            self._kind_for, self._kinds = self.metadata, kind_of(self.metadata)
        return self._kinds

    @property
    def relative(self) -> bool:
        """True for affine-invariant (Marigold) checkpoints: depth in [0, 1], not metres."""
        return self.output.relative

    @property
    def e2e_ft(self) -> bool:
        """True for single-step E2E-FT checkpoints: deterministic, one step, one member."""
        return self.sampler.single_step

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
        self.sampler.check_steps(denoising_steps)
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
                 output_size: Optional[Tuple[int, int]] = None,
                 edge_refine: bool = True) -> DepthPrediction:
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
            edge_refine: apply the checkpoint's edge refinement (its ``metricgold.json``
                ``edge_refine_radius_px``; :mod:`.guided`), which moves depth edges onto the
                image's; False: the networks' depth, enlarged, as is.
        """
        return self.predict_batch(
            [rgb], denoising_steps=denoising_steps, ensemble_size=ensemble_size,
            processing_resolution=processing_resolution, seeds=[seed],
            init_latents=[init_latent], warm_start_strength=warm_start_strength,
            output_sizes=[output_size], edge_refine=edge_refine)[0]

    @torch.no_grad()
    def predict_batch(self, rgbs: Sequence[np.ndarray], *,
                      denoising_steps: Optional[int] = None, ensemble_size: int = 1,
                      processing_resolution: Optional[int] = None,
                      seeds: Optional[Sequence[Optional[int]]] = None,
                      init_latents: Optional[Sequence[Optional[torch.Tensor]]] = None,
                      warm_start_strength: float = 0.5,
                      output_sizes: Optional[Sequence[Optional[Tuple[int, int]]]] = None,
                      edge_refine: bool = True) -> List[DepthPrediction]:
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
        if self.sampler.single_step and ensemble_size > 1 and not self._warned_ensemble:
            LOGGER.warning('ensemble_size=%d with an E2E-FT model: its prediction is '
                           'deterministic, so one member is computed (uncertainty zero); use '
                           'ensemble_size=1', ensemble_size)
            self._warned_ensemble = True
        members = self.sampler.members(ensemble_size)
        # 1. Each image -> [1,3,PH,PW] in [-1, 1], padded to multiples of 8; then groups of
        #    images that can share one pass through the networks.
        prepared, groups = [], {}
        for index, rgb in enumerate(rgbs):
            timings: Dict[str, float] = {}
            with self._stage('preprocess', timings):
                image, padding, input_size = self.output.prepare(rgb, resolution, self.device,
                                                                 self.dtype)
            prepared.append((self.layout(image), padding, input_size, timings))
            latent_shape = (members, int(self.vae.config.latent_channels),
                            image.shape[-2] // image_ops.LATENT_FACTOR,
                            image.shape[-1] // image_ops.LATENT_FACTOR)  # [E,4,h,w]
            warm = self.sampler.warm(init_latents[index], latent_shape)
            key = index if self.output.one_member_per_call else (tuple(image.shape), warm)
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
                    depth_latent, {**own, **timings}, rgbs[i] if edge_refine else None)
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
        # 3.-4. Depth latents: the kind's sampler (DDIM from each image's own seeded noise or
        #    warm start, or E2E-FT's one step), in chunks of at most max_batch_latents latents
        #    (relative: a member at a time), so memory stays bounded.
        batch = 1 if self.output.one_member_per_call else min(
            count * members, self.max_batch_latents or count * members)
        with self._stage('unet', timings):
            depth_latent = self.sampler.run(self, rgb_latent, members, steps, seeds,
                                            init_latents, strength, batch)  # [N*E,4,h,w]
            # Returned in the networks' layout: decoding it again gives the same numbers.
            depth_latent = self.layout(depth_latent)
        # 5. Decode; the 3 output channels are one value replicated: average them.
        with self._stage('vae_decode', timings):
            x = torch.cat([self._decode(part)
                           for part in depth_latent.split(batch)])  # [N*E,1,PH,PW]
        return [(depth_latent[i * members:(i + 1) * members], x[i * members:(i + 1) * members],
                 rgb_latent[i:i + 1], timings) for i in range(count)]

    def _finish_prediction(self, x: torch.Tensor, padding: Tuple[int, int],
                           size: Tuple[int, int], ensemble_size: int, rgb_latent: torch.Tensor,
                           depth_latent: torch.Tensor, timings: Dict[str, float],
                           guide_rgb: Optional[np.ndarray]) -> DepthPrediction:
        """6. Ensemble one image's members ``[E,1,PH,PW]``, resize once, refine the edges
        along ``guide_rgb`` (the input image; None: not refined), map to depth."""
        timings = dict(timings)
        with self._stage('postprocess', timings):
            x = image_ops.unpad(x, padding)
            depth, uncertainty = self.output.finish(
                x, size, self.edge_refiner(guide_rgb, size, tuple(x.shape[-2:])))
            if self.sampler.single_step and ensemble_size > 1:
                uncertainty = np.zeros_like(depth)
        return DepthPrediction(depth, self.relative, uncertainty, rgb_latent, depth_latent,
                               timings)

    def edge_refiner(self, rgb: Optional[np.ndarray], size: Tuple[int, int],
                     processed: Tuple[int, int]
                     ) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        """The checkpoint's guided filter for one image of output ``size`` processed at
        ``processed`` (its radius follows the enlargement); None without one or ``rgb``."""
        radius = self.metadata.edge_refine_radius_px
        if rgb is None or not radius:
            return None
        radius = max(1, round(radius * max(size) / max(processed)))
        guide, eps = guided.grey_guide(rgb, size), self.metadata.edge_refine_eps  # [H,W]

        def refine(value: torch.Tensor) -> torch.Tensor:  # [1,1,H,W]
            filtered = guided.guided_filter(guide, value[0, 0].cpu().numpy(), radius, eps)
            return torch.from_numpy(filtered).to(value.device, value.dtype)[None, None]
        return refine

    def _decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Depth latents ``[n,4,h,w]`` -> values ``[n,1,PH,PW]`` in [-1, 1] (the light decoder
        when there is one: its latents are the UNet's divided by its own scaling factor)."""
        decoder, scale = (self.vae, self.latent_scale) if self.decoder is None else \
            (self.decoder, float(self.decoder.config.scaling_factor))
        decoded = decoder.decode(self.layout(latent / scale), return_dict=False)[0]
        return decoded.mean(dim=1, keepdim=True).clamp(-1.0, 1.0)

    def layout(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` in the activation layout the kind's networks get."""
        return self.output.layout(tensor, self.activation_format)

    def to_depth(self, value: torch.Tensor) -> torch.Tensor:
        """Network value in [-1, 1] -> metres (MetricGold) or [0, 1] (relative Marigold)."""
        return self.output.to_depth(value)

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


def _place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype,
           memory_format: torch.memory_format) -> torch.nn.Module:
    """Move ``module``; cast only when the dtype changes (diffusers warns on every cast)."""
    module = module.to(device)
    if next(module.parameters()).dtype != dtype:
        module = module.to(dtype)
    if memory_format == torch.channels_last:
        module = module.to(memory_format=memory_format)
    return module
