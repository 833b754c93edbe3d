"""Training configuration: a YAML file read into typed dataclasses, checked up front.

Every key is optional except the model's starting point and the training data; an unknown key
is an error naming its place (``train.stesp``), so a typo never silently trains with a default.
In paths, ``{output}`` stands for the run's ``--output`` folder. The keys, with defaults, are
the dataclass fields below; ``training/configs/*.yaml`` are commented examples.
"""

import dataclasses
import math
import typing
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import yaml

from metricgold_ros.errors import InputError

DATASET_TYPES = ('vkitti2', 'hypersim', 'tartanair')
MIXED_PRECISION = ('no', 'fp16', 'bf16')
OBJECTIVES = ('diffusion', 'e2e_ft')


class ConfigError(InputError):
    """A training configuration file is unreadable, has an unknown key or a bad value."""


@dataclasses.dataclass
class ModelConfig:
    """Starting point and the depth codec of the model that training writes."""

    tiny: bool = False  # from scratch: tiny VAE (trained first, see vae_stage) + tiny UNet
    pretrained: Optional[str] = None  # a local SD2 diffusers folder or a MetricGold checkpoint
    allow_pickle: bool = False  # accept pickled .bin weights in `pretrained` (trusted files only)
    d_min_m: Optional[float] = None  # codec range; None: the pretrained MetricGold checkpoint's
    d_max_m: Optional[float] = None
    denoising_steps: int = 1  # the written checkpoint's default DDIM steps
    processing_resolution: int = 768  # the written checkpoint's default longer side (px)
    gradient_checkpointing: bool = False  # trade compute for memory (large UNets)
    # Rescale the noise schedule so that t = T is pure noise (Lin et al. 2024). None: the
    # starting point decides - a Stable Diffusion 2 folder true (Marigold v1.1's trainer does
    # so), a MetricGold checkpoint its own scheduler's setting, tiny false.
    zero_terminal_snr: Optional[bool] = None
    # Camera-aware training (Metric3D's canonical camera, label-scale form): each depth target
    # is multiplied by canonical_focal_px / f, f = the sample's focal length (px, mean of fx
    # and fy) at the training resolution; stored in metricgold.json for inference to undo.
    # None: off, depth targets are the camera's metric depth.
    canonical_focal_px: Optional[float] = None


@dataclasses.dataclass
class VaeStageConfig:
    """Stage 1 of ``model.tiny``: the AutoencoderKL learns to reconstruct RGB and log-depth."""

    steps: int = 0
    batch_size: int = 8  # images per step; each contributes its RGB and its depth crop
    crop_px: int = 64  # square random crops (multiple of 8)
    lr: float = 1.0e-3
    final_lr_ratio: float = 0.1  # exponential decay of the learning rate over the stage
    kl_weight: float = 1.0e-4  # times the KL divergence averaged per latent element
    scale_batches: int = 4  # batches whose latent std sets vae scaling_factor (1 / std)
    val_images: int = 8  # held-out images for the depth reconstruction AbsRel


@dataclasses.dataclass
class GenerateConfig:
    """Synthetic frames rendered by ``metricgold_ros.synthetic.scenes`` into ``{output}/data/<name>``."""

    count: int  # frames per kind
    kinds: List[str] = dataclasses.field(default_factory=lambda: ['indoor', 'outdoor'])
    seed: int = 0  # frame i of a kind is scene seed + i: keep train and val seeds apart
    width: int = 640
    height: int = 480
    # True: metricgold_ros.synthetic.variety's widened training distribution (unusual colours,
    # poses, clutter, walls) instead of the generator's own, which the evaluation splits use.
    variety: bool = False
    wall_share: float = 0.15  # variety only: the share of indoor frames that are walls


@dataclasses.dataclass
class DatasetConfig:
    """One dataset in its published layout (see ``training/datasets.py``)."""

    type: str
    root: str
    probability: float = 1.0  # relative chance that a training batch comes from it
    # Hypersim: a "<rgb> <depth>" list relative to root, e.g. Marigold's filtered training
    # list (data_split/hypersim_depth/filename_list_train_filtered.txt, 53,884 frames); None:
    # every frame under root (unfiltered: training then sees frames Marigold leaves out).
    split_file: Optional[str] = None
    # Virtual KITTI 2: variations, cameras and scenes to read; None: all found. Marigold's
    # split (data_split/vkitti_depth/vkitti_{train,val}.txt): variations VKITTI2_VARIATIONS,
    # both cameras, scenes VKITTI2_TRAIN_SCENES for training and VKITTI2_VAL_SCENES for
    # validation (training/datasets.py); a scene in both train and val of one root is an error.
    variations: Optional[List[str]] = None
    cameras: Optional[List[str]] = None
    scenes: Optional[List[str]] = None
    domain: Optional[str] = None  # label for frames without one (VKITTI2, TartanAir)
    max_images: Optional[int] = None  # validation: N frames, evenly spread
    resolution: Optional[Tuple[int, int]] = None  # training crop [H, W]; None: data.resolution


@dataclasses.dataclass
class DataConfig:
    train: List[DatasetConfig]
    val: List[DatasetConfig] = dataclasses.field(default_factory=list)
    generate: Dict[str, GenerateConfig] = dataclasses.field(default_factory=dict)
    resolution: Tuple[int, int] = (480, 640)  # training crop [H, W], multiples of 8
    scale_range: Tuple[float, float] = (1.0, 1.0)  # random zoom over the covering scale
    hflip_p: float = 0.5
    cache: bool = False  # keep decoded frames in memory (small datasets)
    cache_latents: bool = False  # keep VAE latents per frame view (small data, no zoom/crop)
    num_workers: int = 0  # DataLoader processes


@dataclasses.dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps
    # The training objective: 'diffusion' (Marigold: v-prediction of the noised depth latent at
    # a random timestep, MSE in latent space) or 'e2e_ft' (Garcia et al. 2024, "Fine-Tuning
    # Image-Conditional Diffusion Models is Easier than You Think": one step at t = T from a
    # zero depth latent, the predicted x0 decoded by the frozen VAE, masked MSE on the decoded
    # log depth in [-1, 1]; checkpoints are marked e2e_ft and run single-step, zero noise).
    objective: str = 'diffusion'
    batch_size: int = 2  # per process and micro-batch
    # Samples per optimizer step over all processes: batch_size x gradient_accumulation_steps
    # x processes. Give it and leave gradient_accumulation_steps out to have the accumulation
    # derived from the number of processes at start (an error when it does not divide); give
    # both and they are checked. Neither: accumulation 1.
    effective_batch_size: Optional[int] = None
    gradient_accumulation_steps: Optional[int] = None
    lr: float = 3.0e-5
    adam_betas: Tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1.0e-8
    weight_decay: float = 0.0
    warmup_steps: int = 100
    decay_steps: Optional[int] = None  # decay reaches final_lr_ratio here (None: steps)
    final_lr_ratio: float = 0.01
    # Gradient clipping (not in Marigold): once per optimizer step, on the accumulated and
    # all-reduced gradient, the total L2 norm over all UNet parameters is scaled down to at
    # most max_grad_norm (fp16 gradients are unscaled first). None or 0: no clipping.
    max_grad_norm: Optional[float] = 1.0
    mixed_precision: str = 'no'  # no | fp16 | bf16
    # Longest wait (s) of one process for the others at a collective (validation and saving
    # run on the main process while the rest wait): above the default 10 min (NCCL) so that a
    # long validation or a slow disk never times the other ranks out.
    distributed_timeout_s: float = 7200.0
    ema: bool = False
    ema_decay: float = 0.999
    multi_res_noise: float = 0.9  # pyramid-noise strength; 0 = plain Gaussian noise
    annealed_noise: bool = True  # strength * t / T (Marigold)
    sampling_timestep_p: float = 0.0  # share of samples at the checkpoint's DDIM timesteps
    # e2e_ft only: weight of recipe.masked_gradient_loss (steps of log depth) beside the MSE
    gradient_loss_weight: float = 0.0
    gradient_loss_scales: int = 4
    # e2e_ft only: fine-tune the VAE decoder with the UNet (the pipeline decodes nothing but
    # depth with it; the encoder, which reads the images, stays frozen). One process only.
    train_decoder: bool = False
    # e2e_ft only: the MSE weight of the pixels within border_px of the image's edge (1: none)
    border_weight: float = 1.0
    border_px: int = 8
    # Resumable checkpoints (UNet, Adam's moments, a loadable model: ~13 GB at SD2 size), every
    # N steps and at the end; None: none, only final/ (the run cannot be resumed).
    checkpoint_every: Optional[int] = 500
    keep_checkpoints: int = 2
    log_every: int = 10


@dataclasses.dataclass
class ValidationConfig:
    every: int = 500  # also at the start and the end
    denoising_steps: Optional[int] = None  # None: model.denoising_steps
    ensemble_size: int = 1
    processing_resolution: Optional[int] = None  # None: model.processing_resolution
    log_images: int = 2  # depth images written to TensorBoard per validation


@dataclasses.dataclass
class Config:
    model: ModelConfig
    data: DataConfig
    seed: int = 0
    vae_stage: VaeStageConfig = dataclasses.field(default_factory=VaeStageConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    validation: ValidationConfig = dataclasses.field(default_factory=ValidationConfig)
    tensorboard: bool = True
    cpu_threads: Optional[int] = None  # torch threads when training on the CPU (None: default)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_config(path: Union[str, Path], output: Union[str, Path]) -> Config:
    """Read ``path`` (YAML), substitute ``{output}`` in dataset roots, validate everything."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding='utf-8'))
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f'cannot read config {path}: {err}') from err
    if not isinstance(raw, dict):
        raise ConfigError(f'{path} must hold a mapping of sections (model:, data:, train: ...)')
    config = _build(Config, raw, str(path))
    for spec in config.data.train + config.data.val:
        spec.root = spec.root.replace('{output}', str(output))
        if spec.split_file:
            spec.split_file = spec.split_file.replace('{output}', str(output))
    validate(config, str(path))
    return config


def validate(config: Config, source: str = 'config') -> None:
    """Cross-field rules; each failure names the key, the value and the fix."""
    model, train, data = config.model, config.train, config.data

    def fail(key: str, message: str) -> None:
        raise ConfigError(f'{source}: {key}: {message}')

    if model.tiny == bool(model.pretrained):
        fail('model', 'give exactly one starting point: `tiny: true` or `pretrained: PATH`')
    if model.tiny and (model.d_min_m is None or model.d_max_m is None):
        fail('model.d_min_m/d_max_m', 'a model trained from scratch needs its depth range')
    if (model.d_min_m is None) != (model.d_max_m is None):
        fail('model.d_min_m/d_max_m', 'give both or neither')
    if model.d_min_m is not None and not (
            math.isfinite(model.d_min_m) and math.isfinite(model.d_max_m)
            and 0 < model.d_min_m < model.d_max_m):
        fail('model.d_min_m/d_max_m', f'{model.d_min_m}..{model.d_max_m} must be 0 < min < max')
    if model.tiny and config.vae_stage.steps < 1:
        fail('vae_stage.steps', 'model.tiny trains its VAE first: give steps >= 1')
    if config.vae_stage.crop_px % 8 or config.vae_stage.crop_px < 8:
        fail('vae_stage.crop_px', f'{config.vae_stage.crop_px} must be a multiple of 8')
    for key, size in [('data.resolution', data.resolution)] + [
            (f'data.train[{i}].resolution', s.resolution) for i, s in enumerate(data.train)]:
        if size is not None and any(v % 8 or v < 8 for v in size):
            fail(key, f'{list(size)} must be [H, W], multiples of 8')
    if not 0 < data.scale_range[0] <= data.scale_range[1]:
        fail('data.scale_range', f'{list(data.scale_range)} must be [lo, hi] with 0 < lo <= hi')
    if not data.train:
        fail('data.train', 'list at least one dataset')
    for where, specs in (('data.train', data.train), ('data.val', data.val)):
        for i, spec in enumerate(specs):
            if spec.type not in DATASET_TYPES:
                fail(f'{where}[{i}].type', f'{spec.type!r} is not one of {DATASET_TYPES}')
            if spec.probability < 0:
                fail(f'{where}[{i}].probability', f'{spec.probability} must be >= 0')
    if not sum(spec.probability for spec in data.train) > 0:
        fail('data.train', 'the probabilities must not all be 0')
    if train.mixed_precision not in MIXED_PRECISION:
        fail('train.mixed_precision', f'{train.mixed_precision!r} is not one of '
             f'{MIXED_PRECISION}')
    for key in ('steps', 'batch_size', 'gradient_accumulation_steps', 'effective_batch_size',
                'checkpoint_every', 'keep_checkpoints', 'log_every'):
        if getattr(train, key) is not None and getattr(train, key) < 1:
            fail(f'train.{key}', f'{getattr(train, key)} must be >= 1')
    if train.objective not in OBJECTIVES:
        fail('train.objective', f'{train.objective!r} is not one of {OBJECTIVES}')
    if train.objective == 'e2e_ft' and model.denoising_steps != 1:
        fail('model.denoising_steps', f'{model.denoising_steps}: an e2e_ft model runs one step '
             'from a zero latent; set denoising_steps: 1')
    if model.canonical_focal_px is not None and not (
            math.isfinite(model.canonical_focal_px) and model.canonical_focal_px > 0):
        fail('model.canonical_focal_px', f'{model.canonical_focal_px} must be a focal length '
             'in pixels > 0, or null for no camera-aware training')
    if not train.distributed_timeout_s > 0:
        fail('train.distributed_timeout_s', f'{train.distributed_timeout_s} must be > 0 s')
    _check_vkitti2_split(data, fail)
    if not (math.isfinite(train.gradient_loss_weight) and train.gradient_loss_weight >= 0):
        fail('train.gradient_loss_weight', f'{train.gradient_loss_weight} must be >= 0')
    if train.gradient_loss_weight and train.objective != 'e2e_ft':
        fail('train.gradient_loss_weight', 'the gradient loss compares decoded depth: it needs '
             'objective: e2e_ft (the diffusion objective compares latents)')
    for name, spec in data.generate.items():
        if not 0 <= spec.wall_share <= 1:
            fail(f'data.generate.{name}.wall_share', f'{spec.wall_share} must be within 0..1')
    if not (math.isfinite(train.border_weight) and train.border_weight > 0
            and train.border_px >= 0):
        fail('train.border_weight/border_px', f'{train.border_weight}/{train.border_px}: '
             'need a weight > 0 and border_px >= 0')
    if train.border_weight != 1.0 and train.objective != 'e2e_ft':
        fail('train.border_weight', 'weights decoded depth pixels: it needs objective: e2e_ft')
    if train.train_decoder and train.objective != 'e2e_ft':
        fail('train.train_decoder', 'only the e2e_ft objective decodes depth while training; '
             'set objective: e2e_ft or train_decoder: false')
    if train.gradient_loss_scales < 1:
        fail('train.gradient_loss_scales', f'{train.gradient_loss_scales} must be >= 1')
    if not 0 <= train.sampling_timestep_p <= 1:
        fail('train.sampling_timestep_p', f'{train.sampling_timestep_p} must be in [0, 1]')
    if train.lr <= 0 or not 0 < train.final_lr_ratio <= 1:
        fail('train.lr/final_lr_ratio', 'need lr > 0 and 0 < final_lr_ratio <= 1')
    if config.validation.every < 1 or config.validation.ensemble_size < 1:
        fail('validation.every/ensemble_size', 'must be >= 1')


def _check_vkitti2_split(data: DataConfig, fail) -> None:
    """A Virtual KITTI 2 scene used for training must not also be validated on (same root)."""
    for i, val in enumerate(data.val):
        for train_spec in data.train:
            if val.type != 'vkitti2' or train_spec.type != 'vkitti2' or \
                    Path(val.root) != Path(train_spec.root):
                continue
            if val.scenes is None or train_spec.scenes is None:
                fail(f'data.val[{i}].scenes', f'validation reads {val.root}, which training '
                     'also reads; give both a `scenes:` list without common scenes (Marigold: '
                     'train Scene02/06/18/20, val Scene01)')
            common = sorted(set(val.scenes) & set(train_spec.scenes))
            if common:
                fail(f'data.val[{i}].scenes', f'{common} are also training scenes of '
                     f'{val.root}; validate on scenes training does not see')


def resolve_accumulation(train: TrainConfig, num_processes: int) -> int:
    """Gradient accumulation steps for ``num_processes`` processes, checked against the target.

    Returns ``train.gradient_accumulation_steps`` when given (after checking that
    ``batch_size x accumulation x num_processes`` equals ``effective_batch_size``, when that is
    given too), else ``effective_batch_size / (batch_size x num_processes)``, else 1.

    Raises:
        ConfigError: the effective batch is not reachable with these processes.
    """
    per_step = train.batch_size * num_processes
    if train.effective_batch_size is None:
        return train.gradient_accumulation_steps or 1
    if train.gradient_accumulation_steps is not None:
        got = per_step * train.gradient_accumulation_steps
        if got != train.effective_batch_size:
            raise ConfigError(
                f'train.effective_batch_size: {train.effective_batch_size}, but batch_size '
                f'{train.batch_size} x gradient_accumulation_steps '
                f'{train.gradient_accumulation_steps} x {num_processes} process(es) = {got}; '
                'remove gradient_accumulation_steps to have it derived, or fix one of them')
        return train.gradient_accumulation_steps
    if train.effective_batch_size % per_step:
        raise ConfigError(
            f'train.effective_batch_size: {train.effective_batch_size} is not a multiple of '
            f'batch_size {train.batch_size} x {num_processes} process(es) = {per_step}; change '
            'batch_size, the number of processes or effective_batch_size')
    return train.effective_batch_size // per_step


def _build(cls: type, raw: Any, where: str) -> Any:
    """``cls(**raw)`` recursively, with unknown and missing keys reported by their place."""
    if not isinstance(raw, dict):
        raise ConfigError(f'{where}: expected a mapping of keys for {cls.__name__}, got '
                          f'{type(raw).__name__}')
    hints = typing.get_type_hints(cls)
    fields = {field.name: field for field in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f'{where}: unknown key(s) {unknown}; known: {sorted(fields)}')
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _convert(hints[name], value, f'{where}.{name}')
    missing = [name for name, field in fields.items() if name not in kwargs and
               field.default is dataclasses.MISSING and
               field.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f'{where}: missing key(s) {missing}')
    return cls(**kwargs)


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:  # Optional[X]
        if value is None:
            return None
        return _convert(next(a for a in args if a is not type(None)), value, where)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin in (list, List):
        if not isinstance(value, list):
            raise ConfigError(f'{where}: expected a list, got {value!r}')
        return [_convert(args[0], v, f'{where}[{i}]') for i, v in enumerate(value)]
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f'{where}: expected a list of {len(args)} values, got {value!r}')
        return tuple(_convert(a, v, f'{where}[{i}]') for i, (a, v) in enumerate(zip(args, value)))
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f'{where}: expected a mapping, got {value!r}')
        return {str(k): _convert(args[1], v, f'{where}.{k}') for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f'{where}: expected true or false, got {value!r}')
        return value
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 3e-5 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if hint in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                hint is int and not float(value).is_integer()):
            raise ConfigError(f'{where}: expected {"an integer" if hint is int else "a number"}, '
                              f'got {value!r}')
        return hint(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f'{where}: expected a string, got {value!r}')
        return str(value)
    return value
