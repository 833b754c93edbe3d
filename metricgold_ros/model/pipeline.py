"""MetricGoldPipeline: one RGB image in, metric depth (and its spread) out.

Few-step DDIM with trailing timestep spacing over a Marigold-style UNet that denoises a depth
latent conditioned on the image latent. Members of an ensemble are one batch; they share one
RGB encoding and the cached empty-text embedding, and are combined by their median in log
space (no scale/shift alignment: the output is metric).
"""

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Tuple, Union

import numpy as np
import torch

from metricgold_ros.errors import InputError
from metricgold_ros.model import image_ops
from metricgold_ros.model.checkpoint import Checkpoint, load_checkpoint
from metricgold_ros.model.codec import decode_depth

LOGGER = logging.getLogger(__name__)

DTYPES = {'float32': torch.float32, 'float16': torch.float16, 'bfloat16': torch.bfloat16}


@dataclass
class DepthPrediction:
    """Result of one pipeline call.

    Attributes:
        depth: ``[H,W]`` float32 at the requested output size. Metres for a MetricGold model;
            affine-invariant values in [0, 1] when ``relative`` (use :attr:`depth_m` for metres).
        relative: True when the checkpoint is a relative-depth (Marigold) model.
        uncertainty: ``[H,W]`` float32 spread of the ensemble in the units of ``depth`` (metres:
            ``depth * std(log depth)`` over members), ``None`` when ``ensemble_size == 1``.
        rgb_latent: ``[1,4,h,w]`` image latent, reusable while the image is unchanged.
        depth_latent: ``[E,4,h,w]`` final depth latents, the warm start of the next video frame.
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


def resolve_dtype(dtype: Union[str, torch.dtype], device: torch.device) -> torch.dtype:
    """'auto' -> float16 on CUDA, float32 elsewhere; or one of float32/float16/bfloat16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == 'auto':
        return torch.float16 if device.type == 'cuda' else torch.float32
    if dtype not in DTYPES:
        raise InputError(f'dtype={dtype!r} is not supported; use auto or one of {list(DTYPES)}')
    return DTYPES[dtype]


class MetricGoldPipeline:
    """Metric depth from RGB with a MetricGold (or, in relative mode, Marigold) checkpoint."""

    def __init__(self, checkpoint: Checkpoint, device: Union[str, torch.device] = 'cpu',
                 dtype: Union[str, torch.dtype] = 'float32', channels_last: bool = False,
                 compile_unet: bool = False) -> None:
        """Place the checkpoint's networks on ``device`` in ``dtype``.

        Args:
            channels_last: NHWC weights (and activations), the layout tensor-core
                convolutions use natively. Opt-in because it converts the checkpoint's modules
                in place (training validates with its live networks); on the CPU activations
                are channels-last either way.
            compile_unet: ``torch.compile`` the UNet (opt-in: the first frame of each input
                size then takes seconds to minutes to compile).
        """
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.metadata = checkpoint.metadata
        self.scheduler = checkpoint.scheduler
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.vae = _place(checkpoint.vae, self.device, self.dtype, self.memory_format)
        self.unet = _place(checkpoint.unet, self.device, self.dtype, self.memory_format)
        # Layout of the activations fed to the networks. On the CPU always channels-last:
        # oneDNN then runs NHWC convolutions whatever the weights' layout, 12-14 % faster for
        # the tiny VAE and neutral for SD2-size networks (BENCHMARKS.md), with no change to
        # the (shared) modules.
        self.activation_format = torch.channels_last if channels_last or \
            self.device.type == 'cpu' else torch.contiguous_format
        if compile_unet:
            self.unet = torch.compile(self.unet)
        self.empty_text_embedding = checkpoint.empty_text_embedding.to(self.device, self.dtype)
        self.latent_scale = float(self.vae.config.scaling_factor)
        # Debug hook (tests, fault drills): called with the stage name before each stage.
        self.stage_hook: Optional[Callable[[str], None]] = None

    @classmethod
    def from_pretrained(cls, path: Union[str, Path], *, device: str = 'auto',
                        dtype: str = 'auto', allow_pickle: bool = False,
                        **kwargs) -> 'MetricGoldPipeline':
        """Load a local checkpoint folder (nothing is downloaded) onto ``device``."""
        return cls(load_checkpoint(path, allow_pickle=allow_pickle), device=device, dtype=dtype,
                   **kwargs)

    @property
    def relative(self) -> bool:
        return self.metadata.relative

    def check_inputs(self, denoising_steps: int, ensemble_size: int,
                     processing_resolution: int, warm_start_strength: float) -> None:
        """Validate arguments up front, each with its own message."""
        if not isinstance(denoising_steps, int) or denoising_steps < 1:
            raise InputError(f'denoising_steps={denoising_steps!r}, expected an integer >= 1')
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
            denoising_steps: DDIM steps; ``None`` uses the checkpoint's default.
            ensemble_size: independent predictions combined by their log-space median.
            processing_resolution: longer side fed to the networks; ``None`` uses the
                checkpoint's default, 0 the native size.
            seed: seeds the initial noise (same seed, same output); ``None`` draws a fresh one.
            init_latent: ``[E,4,h,w]`` depth latent of the previous frame (warm start): it is
                re-noised to ``warm_start_strength`` of the schedule instead of starting from
                pure noise; ignored (cold start) when its shape does not match this frame.
            output_size: ``(H, W)`` of the returned maps; default the input size.
        """
        steps = self.metadata.default_denoising_steps if denoising_steps is None \
            else denoising_steps
        resolution = self.metadata.default_processing_resolution \
            if processing_resolution is None else processing_resolution
        self.check_inputs(steps, ensemble_size, resolution, warm_start_strength)
        timings: Dict[str, float] = {}

        # 1. Image -> [1,3,PH,PW] in [-1, 1], padded to multiples of 8.
        with self._stage('preprocess', timings):
            image, padding, input_size = image_ops.prepare_image(
                rgb, resolution, self.device, self.dtype)
            image = image.contiguous(memory_format=self.activation_format)
        # 2. One RGB latent for all ensemble members and all steps.
        with self._stage('vae_encode', timings):
            rgb_latent = self.vae.encode(image).latent_dist.mode() * self.latent_scale  # [1,4,h,w]
        # 3. Initial depth latents: noise, or the previous frame's latent partly re-noised.
        timesteps, depth_latent = self._prepare_latents(
            rgb_latent, ensemble_size, steps, seed, init_latent, warm_start_strength)
        # 4. Denoise all members as one batch.
        with self._stage('unet', timings):
            rgb_batch = rgb_latent.expand(ensemble_size, -1, -1, -1)
            text = self.empty_text_embedding.expand(ensemble_size, -1, -1)  # [E,T,C]
            for t in timesteps:
                model_input = torch.cat([rgb_batch, depth_latent], dim=1).contiguous(
                    memory_format=self.activation_format)  # [E,8,h,w]
                model_output = self.unet(model_input, t, encoder_hidden_states=text,
                                         return_dict=False)[0]  # [E,4,h,w]
                depth_latent = self.scheduler.step(model_output, t, depth_latent).prev_sample
            # Returned in the networks' layout: decoding it again gives the same numbers.
            depth_latent = depth_latent.contiguous(memory_format=self.activation_format)
        # 5. Decode; the 3 output channels are one value replicated: average them.
        with self._stage('vae_decode', timings):
            x = self._decode(depth_latent)  # [E,1,PH,PW]
        # 6. Ensemble in log space, resize once (still in log space), map to metres.
        with self._stage('postprocess', timings):
            depth, uncertainty = self._finish(
                image_ops.unpad(x, padding).float(), output_size or input_size)
        return DepthPrediction(depth, self.relative, uncertainty, rgb_latent, depth_latent,
                               timings)

    def _decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Depth latents ``[n,4,h,w]`` -> values ``[n,1,PH,PW]`` in [-1, 1]."""
        latent = (latent / self.latent_scale).contiguous(memory_format=self.activation_format)
        decoded = self.vae.decode(latent, return_dict=False)[0]
        return decoded.mean(dim=1, keepdim=True).clamp(-1.0, 1.0)

    def _prepare_latents(self, rgb_latent: torch.Tensor, ensemble_size: int, steps: int,
                         seed: Optional[int], init_latent: Optional[torch.Tensor],
                         strength: float) -> Tuple[torch.Tensor, torch.Tensor]:
        """Timesteps to run and the starting latent ``[E,4,h,w]``."""
        shape = (ensemble_size, *rgb_latent.shape[1:])
        generator = torch.Generator(device='cpu')
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(int(seed))
        noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(
            self.device, self.dtype)
        self.scheduler.set_timesteps(steps, device=self.device)
        timesteps = self.scheduler.timesteps
        if init_latent is None or tuple(init_latent.shape) != shape:
            return timesteps, noise
        # img2img-style warm start: skip the noisiest part of the schedule, keep >= 1 step.
        keep = max(1, min(steps, round(steps * strength)))
        timesteps = timesteps[steps - keep:]
        start = self.scheduler.add_noise(init_latent.to(self.device, self.dtype), noise,
                                         timesteps[:1])
        return timesteps, start

    def _finish(self, x: torch.Tensor, output_size: Tuple[int, int]
                ) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """Members ``[E,1,h,w]`` in [-1, 1] -> depth and uncertainty at ``output_size``."""
        median, spread = ensemble_members(x)  # [1,1,h,w] each (spread None for one member)
        depth = self.to_depth(image_ops.resize(median, output_size)[0, 0])
        uncertainty = None
        if spread is not None:
            spread = image_ops.resize(spread, output_size)[0, 0]
            uncertainty = _to_numpy(self.to_uncertainty(depth, spread))
        return _to_numpy(depth), uncertainty

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
        if self.stage_hook is not None:
            self.stage_hook(name)
        start = time.perf_counter()
        yield
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
        timings[name] = time.perf_counter() - start


def ensemble_members(x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Members ``[E,1,h,w]`` (log-depth values) -> their median and std ``[1,1,h,w]``.

    The median of log depth is the log of the median depth: ensembling in log space needs no
    scale/shift alignment, so metric output stays metric. Std is ``None`` for one member.
    """
    if x.shape[0] == 1:
        return x, None
    return x.median(dim=0, keepdim=True).values, x.std(dim=0, keepdim=True)


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
