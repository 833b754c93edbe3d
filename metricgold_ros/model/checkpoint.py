"""Checkpoint I/O: the diffusers folder layout plus MetricGold's own metadata.

A checkpoint folder holds ``model_index.json``, ``unet/``, ``vae/``, ``scheduler/`` (optionally
``text_encoder/`` + ``tokenizer/``), and for MetricGold models ``metricgold.json`` (depth range,
defaults) with ``empty_text_embedding.safetensors`` (the prompt-free conditioning, so inference
needs no text encoder). Released Marigold checkpoints, which have no ``metricgold.json``, load in
*relative* mode with the scheduler their folder names, configured as diffusers configures it.

E2E-FT checkpoints (single-step models fine-tuned end to end: zero latent in at t = T, the
predicted x0 out) are recognised by ``"e2e_ft": true`` in ``metricgold.json`` or
``model_index.json``, or by what the E2E-FT training script writes: a ``StableDiffusionPipeline``
``model_index.json`` or a ``DDPMScheduler`` around an 8-channel UNet.

Weights load from safetensors only; pickled ``.bin``/``.ckpt`` files can execute code when
loaded, so they are refused unless the caller passes ``allow_pickle=True`` (and even then are
read with ``torch.load(weights_only=True)``). ``variant`` (e.g. ``'fp16'``) reads
``*.{variant}.safetensors`` as diffusers names them. Nothing is downloaded: ``path`` is a local
folder (:mod:`.hub` turns repository ids into one). A light decoder (``AutoencoderTiny`` or a
second ``AutoencoderKL``) loads from its own folder with :func:`load_decoder`.
"""

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional, Union

import torch
from safetensors.torch import save_file

from metricgold_ros.atomic import atomic_path
from metricgold_ros.errors import CheckpointError
from metricgold_ros.model.weights import (
    ALLOW_PICKLE_HINT, PICKLE_SUFFIXES, load_module, load_safetensors, read_json)

LOGGER = logging.getLogger(__name__)

METADATA_FILE = 'metricgold.json'
EMBEDDING_FILE = 'empty_text_embedding.safetensors'
FORMAT_VERSION = 1
DECODER_CLASSES = ('AutoencoderTiny', 'AutoencoderKL')


@dataclass(frozen=True)
class ModelMetadata:
    """What a MetricGold checkpoint needs beyond the diffusers layout.

    Attributes:
        d_min_m, d_max_m: metric range of the log-depth codec (metres), fixed at training time.
        default_denoising_steps: DDIM steps used when a caller does not choose; ``None`` when
            a Marigold checkpoint states none (a caller must then choose, as in diffusers).
        default_processing_resolution: longer image side (px) fed to the networks; ``None``
            as above.
        relative: True for affine-invariant Marigold checkpoints (output in [0, 1], not metres).
        canonical_focal_px: camera-aware checkpoints: the canonical focal length (px) that
            training scaled depth targets to (``depth * f_c / f``, f = mean of fx and fy at the
            training resolution); inference multiplies by ``f / f_c``. None: not camera-aware.
        e2e_ft: True for single-step E2E-FT checkpoints (zero depth latent at t = T, the
            predicted x0 out, deterministic).
        edge_refine_radius_px, edge_refine_eps: the guided filter that moves the depth's
            edges onto the image's (:mod:`.guided`): window radius in pixels of the processed
            image and the contrast (grey levels in [0, 1], squared) below which an image edge
            is smoothed over; radius 0: none (metric checkpoints only).
    """

    d_min_m: float
    d_max_m: float
    default_denoising_steps: Optional[int] = 1
    default_processing_resolution: Optional[int] = 768
    relative: bool = False
    canonical_focal_px: Optional[float] = None
    e2e_ft: bool = False
    edge_refine_radius_px: int = 0
    edge_refine_eps: float = 1e-3

    def validate(self, source: str) -> 'ModelMetadata':
        if not (math.isfinite(self.d_min_m) and math.isfinite(self.d_max_m)
                and 0.0 < self.d_min_m < self.d_max_m):
            raise CheckpointError(
                f'{source}: d_min={self.d_min_m!r}, d_max={self.d_max_m!r} is not a valid depth '
                'range; expected finite metres with 0 < d_min < d_max')
        if self.default_denoising_steps is not None and int(self.default_denoising_steps) < 1:
            raise CheckpointError(
                f'{source}: default_denoising_steps={self.default_denoising_steps!r}, '
                'expected an integer >= 1')
        if self.e2e_ft and self.default_denoising_steps not in (None, 1):
            raise CheckpointError(
                f'{source}: e2e_ft=true with default_denoising_steps='
                f'{self.default_denoising_steps!r}; an E2E-FT model runs exactly 1 step: set 1')
        if self.default_processing_resolution is not None and \
                int(self.default_processing_resolution) < 8:
            raise CheckpointError(
                f'{source}: default_processing_resolution='
                f'{self.default_processing_resolution!r}, expected an integer >= 8 (pixels)')
        if self.canonical_focal_px is not None and not (
                math.isfinite(self.canonical_focal_px) and self.canonical_focal_px > 0):
            raise CheckpointError(
                f'{source}: canonical_focal_px={self.canonical_focal_px!r}, expected a focal '
                'length in pixels > 0, or null for a checkpoint that is not camera-aware')
        if not (isinstance(self.edge_refine_radius_px, int)
                and 0 <= self.edge_refine_radius_px <= 64) or \
                (self.relative and self.edge_refine_radius_px):
            raise CheckpointError(
                f'{source}: edge_refine_radius_px={self.edge_refine_radius_px!r}, expected an '
                'integer 0..64 (pixels of the processed image; 0: no edge refinement; metric '
                'checkpoints only)')
        if not (math.isfinite(self.edge_refine_eps) and self.edge_refine_eps > 0):
            raise CheckpointError(
                f'{source}: edge_refine_eps={self.edge_refine_eps!r}, expected a number > 0 '
                '(squared grey-level contrast, e.g. 0.001)')
        return self


@dataclass
class Checkpoint:
    """The loaded networks, scheduler, conditioning and metadata of one model folder."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler: object
    empty_text_embedding: torch.Tensor  # [1,T,C]
    metadata: ModelMetadata
    path: Optional[Path] = None


def _optional_int(data: dict, key: str) -> Optional[int]:
    value = data.get(key)
    return None if value is None else int(value)


def _is_e2e_ft(model_index: dict, scheduler_config: dict) -> bool:
    """E2E-FT checkpoints as published: the flag, or the layout their training script saves.

    That script stores the fine-tuned 8-channel UNet as a ``StableDiffusionPipeline`` with a
    ``DDPMScheduler``; Marigold's own releases are ``MarigoldDepthPipeline`` folders with a DDIM
    or LCM scheduler, and a ``DDPMScheduler`` cannot sample in few steps anyway.
    """
    if 'e2e_ft' in model_index:
        return bool(model_index['e2e_ft'])
    return model_index.get('_class_name') == 'StableDiffusionPipeline' or \
        scheduler_config.get('_class_name') == 'DDPMScheduler'


def _load_metadata(path: Path, model_index: dict, scheduler_config: dict) -> ModelMetadata:
    meta_path = path / METADATA_FILE
    if not meta_path.exists():
        # A released Marigold checkpoint: affine-invariant depth, defaults in model_index.json.
        # A default it does not state stays None: the caller must choose, as diffusers asks.
        if model_index.get('scale_invariant') is False and \
                model_index.get('shift_invariant') is False:
            raise CheckpointError(
                f'{path} has no {METADATA_FILE} but model_index.json says the model is metric: '
                f'its depth range is unknown; add {METADATA_FILE} with d_min and d_max')
        e2e_ft = _is_e2e_ft(model_index, scheduler_config)
        try:
            steps = _optional_int(model_index, 'default_denoising_steps')
            resolution = _optional_int(model_index, 'default_processing_resolution')
        except (TypeError, ValueError) as err:
            raise CheckpointError(
                f'{path / "model_index.json"}: default_denoising_steps and '
                f'default_processing_resolution must be integers or null: {err}') from err
        return ModelMetadata(
            d_min_m=1.0, d_max_m=2.0, relative=True, e2e_ft=e2e_ft,
            default_denoising_steps=1 if e2e_ft else steps,
            default_processing_resolution=resolution,
        ).validate(str(path / 'model_index.json'))
    data = read_json(meta_path)
    try:
        meta = ModelMetadata(
            d_min_m=float(data['d_min']), d_max_m=float(data['d_max']),
            default_denoising_steps=int(data.get('default_denoising_steps', 1)),
            default_processing_resolution=int(data.get('default_processing_resolution', 768)),
            canonical_focal_px=(None if data.get('canonical_focal_px') is None
                                else float(data['canonical_focal_px'])),
            e2e_ft=_json_bool(data.get('e2e_ft', False), 'e2e_ft'),
            edge_refine_radius_px=_json_int(data.get('edge_refine_radius_px', 0),
                                            'edge_refine_radius_px'),
            edge_refine_eps=float(data.get('edge_refine_eps', 1e-3)))
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(
            f'{meta_path}: bad or missing field {err}; expected numbers d_min, d_max (metres) '
            'and integers default_denoising_steps, default_processing_resolution (optional: '
            'canonical_focal_px, a number or null; e2e_ft, true or false; '
            'edge_refine_radius_px, an integer, and edge_refine_eps, a number)') from err
    return meta.validate(str(meta_path))


def _json_int(value: object, key: str) -> int:
    """A JSON integer (3.5, "3" or true would be read as something else)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f'{key}={value!r} is not an integer')
    return value


def _json_bool(value: object, key: str) -> bool:
    """A JSON true/false (a string such as "false" would be truthy)."""
    if not isinstance(value, bool):
        raise ValueError(f'{key}={value!r} is not true or false')
    return value


def _load_embedding(path: Path, unet: torch.nn.Module, cache_embedding: bool,
                    allow_pickle: bool, variant: Optional[str] = None) -> torch.Tensor:
    emb_path = path / EMBEDDING_FILE
    if emb_path.is_file():
        tensors = load_safetensors(emb_path)
        if 'embedding' not in tensors:
            raise CheckpointError(f'{emb_path} lacks the tensor "embedding"')
        embedding = tensors['embedding'].float()
    elif (path / 'text_encoder').is_dir() and (path / 'tokenizer').is_dir():
        embedding = compute_empty_text_embedding(path, allow_pickle=allow_pickle,
                                                 variant=variant)
        if cache_embedding:
            _atomic_save_tensors({'embedding': embedding}, emb_path)
            LOGGER.info('stored the empty-text embedding in %s', emb_path)
        else:
            LOGGER.info('computed the empty-text embedding from %s/text_encoder; store it with '
                        'cache_embedding=True (or `metricgold init-model --help`) to skip the '
                        'text encoder next time', path)
    else:
        raise CheckpointError(
            f'{emb_path} is missing and there is no text_encoder/ + tokenizer/ to compute it from')
    cross_dim = unet.config.cross_attention_dim
    if embedding.dim() != 3 or embedding.shape[0] != 1 or embedding.shape[-1] != cross_dim:
        raise CheckpointError(
            f'{emb_path}: empty-text embedding has shape {tuple(embedding.shape)}, expected '
            f'[1, T, {cross_dim}] to match unet cross_attention_dim')
    return embedding


def compute_empty_text_embedding(path: Union[str, Path], *, allow_pickle: bool = False,
                                 variant: Optional[str] = None) -> torch.Tensor:
    """Encode the empty prompt with the checkpoint's own CLIP text encoder: ``[1, T, C]``.

    ``variant`` reads ``text_encoder/model.{variant}.safetensors``, as transformers does.
    """
    try:
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError as err:
        raise CheckpointError(f'{path}: computing the empty-text embedding needs '
                              '`pip install transformers`') from err
    path = Path(path)
    encoder_dir = path / 'text_encoder'
    pickled = sorted(p.name for p in encoder_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not allow_pickle and pickled and not any(encoder_dir.glob('*.safetensors')):
        raise CheckpointError(f'{encoder_dir} has only pickled weights ({", ".join(pickled)}): '
                              f'{ALLOW_PICKLE_HINT}')
    if variant and not allow_pickle and \
            not any(encoder_dir.glob(f'*.{variant}.safetensors')) and \
            not any(encoder_dir.glob(f'*.safetensors.index.{variant}.json')):
        raise CheckpointError(f'{encoder_dir / f"model.{variant}.safetensors"} is missing: '
                              f'variant={variant!r} asks for it; leave variant empty for the '
                              'plain weights')
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(path / 'tokenizer'), local_files_only=True)
        prefer_safetensors = None if allow_pickle else True  # None: safetensors, else pickle
        encoder = CLIPTextModel.from_pretrained(str(encoder_dir), local_files_only=True,
                                                use_safetensors=prefer_safetensors,
                                                variant=variant or None, **_float32())
    except (OSError, ValueError) as err:
        raise CheckpointError(f'{encoder_dir} or its tokenizer cannot be loaded: {err}') from err
    ids = tokenizer('', padding='do_not_pad', truncation=True, return_tensors='pt').input_ids
    with torch.no_grad():
        return encoder.float()(ids)[0].float()


def _float32() -> Dict[str, torch.dtype]:
    """transformers' keyword for float32 weights (5.x loads in the config's dtype unless told;
    ``torch_dtype`` is 4.x's spelling)."""
    import transformers

    major = int(transformers.__version__.split('.')[0])
    return {'dtype' if major >= 5 else 'torch_dtype': torch.float32}


def load_checkpoint(path: Union[str, Path], *, allow_pickle: bool = False,
                    cache_embedding: bool = False, variant: Optional[str] = None) -> Checkpoint:
    """Load a MetricGold (metric) or Marigold (relative) checkpoint from a local folder.

    Args:
        variant: read the ``*.{variant}.safetensors`` weights (e.g. ``'fp16'``, as published
            beside the plain ones); the networks are float32 as loaded either way (the
            pipeline's ``dtype`` chooses the precision they run in).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    path = Path(path).expanduser()
    if not path.is_dir():
        raise CheckpointError(
            f'model folder {path} does not exist; give a local checkpoint folder '
            '(`metricgold init-model DIR --tiny` writes one)')
    model_index = read_json(path / 'model_index.json')
    scheduler_config = read_json(path / 'scheduler' / 'scheduler_config.json')
    metadata = _load_metadata(path, model_index, scheduler_config)
    unet_config_path = path / 'unet' / 'config.json'
    if not unet_config_path.parent.is_dir():
        raise CheckpointError(f'{unet_config_path.parent} is missing: expected a '
                              'UNet2DConditionModel sub-folder')
    in_channels = read_json(unet_config_path).get('in_channels', 4)
    if in_channels != 8:
        raise CheckpointError(
            f'{unet_config_path}: conv_in has {in_channels} input channels, expected 8 '
            '([rgb_latent, depth_latent]); this is not a Marigold-style UNet (a plain Stable '
            'Diffusion UNet must be converted by training/train.py first)')
    unet = load_module(UNet2DConditionModel, path / 'unet', allow_pickle, variant)
    vae = load_module(AutoencoderKL, path / 'vae', allow_pickle, variant)
    if vae.config.latent_channels * 2 != unet.config.in_channels or \
            unet.config.out_channels != vae.config.latent_channels:
        raise CheckpointError(
            f'{path}: vae latent_channels={vae.config.latent_channels} does not fit unet '
            f'in_channels={unet.config.in_channels}/out_channels={unet.config.out_channels}')
    scheduler = _make_scheduler(path, scheduler_config, metadata)
    embedding = _load_embedding(path, unet, cache_embedding, allow_pickle, variant)
    return Checkpoint(unet, vae, scheduler, embedding, metadata, path)


def load_decoder(path: Union[str, Path], *, latent_channels: int, allow_pickle: bool = False,
                 variant: Optional[str] = None) -> torch.nn.Module:
    """A light decoder: an ``AutoencoderTiny`` (TAESD) or ``AutoencoderKL`` folder, for decoding.

    ``path`` is the autoencoder's own folder (``config.json`` + weights, as
    ``AutoencoderTiny.save_pretrained`` writes it), or a whole checkpoint, whose ``vae/`` is
    then used. Its latents must be the model's (``latent_channels``, the UNet's latent space:
    the model's VAE latents times their scaling factor, divided by the decoder's own).
    """
    import diffusers

    path = Path(path).expanduser()
    if (path / 'model_index.json').is_file() and (path / 'vae').is_dir():
        path = path / 'vae'
    config_path = path / 'config.json'
    if not path.is_dir():
        raise CheckpointError(f'decoder folder {path} does not exist; give an AutoencoderTiny '
                              '(TAESD) or AutoencoderKL folder, or a hub id')
    name = read_json(config_path).get('_class_name')
    if name not in DECODER_CLASSES:
        raise CheckpointError(f'decoder {config_path}: _class_name={name!r}; a decoder is one '
                              f'of {", ".join(DECODER_CLASSES)}')
    decoder = load_module(getattr(diffusers, name), path, allow_pickle, variant)
    if int(decoder.config.latent_channels) != latent_channels:
        raise CheckpointError(
            f'decoder {config_path}: latent_channels={decoder.config.latent_channels}, but the '
            f"model's latents have {latent_channels} channels; use a decoder made for its VAE")
    return decoder


def _make_scheduler(path: Path, config: dict, metadata: ModelMetadata) -> object:
    """The sampler of a checkpoint.

    MetricGold checkpoints sample with DDIM and trailing spacing (few-step DDIM with "leading"
    spacing never visits the last timestep). Relative (Marigold) checkpoints get the class and
    the configuration their folder names, untouched, as diffusers' ``from_pretrained`` builds
    them: ``prs-eth/marigold-depth-v1-1`` brings DDIM with trailing spacing, the LCM releases
    an ``LCMScheduler``. E2E-FT checkpoints only read the noise schedule (alphas) from it.
    """
    import diffusers

    if not metadata.relative:
        return diffusers.DDIMScheduler.from_config(config, timestep_spacing='trailing')
    name = config.get('_class_name', 'DDIMScheduler')
    if name not in _SCHEDULERS:
        raise CheckpointError(
            f'{path / "scheduler" / "scheduler_config.json"}: scheduler {name!r} is not '
            f'supported; expected one of {", ".join(_SCHEDULERS)} (edit _class_name to '
            'DDIMScheduler to sample with DDIM)')
    return getattr(diffusers, name).from_config(config)


_SCHEDULERS = ('DDIMScheduler', 'LCMScheduler', 'DDPMScheduler')


def _atomic_save_tensors(tensors: Dict[str, torch.Tensor], path: Path) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))


def save_checkpoint(path: Union[str, Path], checkpoint: Checkpoint, *,
                    overwrite: bool = False) -> Path:
    """Write ``checkpoint`` in the layout :func:`load_checkpoint` reads, atomically.

    Everything is written to a temporary sibling folder and renamed into place at the end, so
    an interrupted save never leaves a half-written model under ``path``.
    """
    path = Path(path).expanduser()
    if path.exists() and not overwrite:
        raise CheckpointError(f'{path} already exists; choose another folder or overwrite=True')
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, directory=True) as tmp:
        checkpoint.unet.save_pretrained(tmp / 'unet', safe_serialization=True)
        checkpoint.vae.save_pretrained(tmp / 'vae', safe_serialization=True)
        checkpoint.scheduler.save_pretrained(tmp / 'scheduler')
        meta = checkpoint.metadata
        index = {
            '_class_name': 'MarigoldDepthPipeline', '_diffusers_version': _diffusers_version(),
            'prediction_type': 'depth', 'scale_invariant': meta.relative,
            'shift_invariant': meta.relative,
            'default_denoising_steps': meta.default_denoising_steps,
            'default_processing_resolution': meta.default_processing_resolution,
            **({'e2e_ft': True} if meta.e2e_ft and meta.relative else {}),
            'unet': ['diffusers', 'UNet2DConditionModel'],
            'vae': ['diffusers', 'AutoencoderKL'],
            'scheduler': ['diffusers', type(checkpoint.scheduler).__name__],
        }
        (tmp / 'model_index.json').write_text(json.dumps(index, indent=2) + '\n')
        if not meta.relative:
            fields = asdict(meta)
            fields.pop('relative')
            fields['d_min'] = fields.pop('d_min_m')
            fields['d_max'] = fields.pop('d_max_m')
            for key, default in (('canonical_focal_px', None), ('e2e_ft', False),
                                 ('edge_refine_radius_px', 0)):
                if fields[key] == default:  # older readers never see keys they do not know
                    fields.pop(key)
            if 'edge_refine_radius_px' not in fields:
                fields.pop('edge_refine_eps')
            fields['format_version'] = FORMAT_VERSION
            fields['depth_codec'] = 'log: x = 2*log(d/d_min)/log(d_max/d_min) - 1'
            (tmp / METADATA_FILE).write_text(json.dumps(fields, indent=2) + '\n')
        _atomic_save_tensors({'embedding': checkpoint.empty_text_embedding}, tmp / EMBEDDING_FILE)
        _make_readable(tmp)
    return path


def _make_readable(folder: Path) -> None:
    """mkdtemp and safetensors create owner-only entries; a model folder is shared data."""
    folder.chmod(0o755)
    for entry in folder.rglob('*'):
        entry.chmod(0o755 if entry.is_dir() else 0o644)


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__
