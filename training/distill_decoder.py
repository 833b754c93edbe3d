"""Distil a model's VAE into a light AutoencoderTiny (TAESD's architecture) for fast decoding.

    python training/distill_decoder.py --config training/configs/distill_decoder_tiny.yaml \
        --output runs/taesd

The teacher is a MetricGold checkpoint's frozen VAE. Training pairs come from rendered synthetic
scenes (the training split's seeds): for each image, the latent of its ground-truth depth (the
depth codec's value, replicated to 3 channels, through the VAE encoder) and the latent the
model's UNet predicts for it (what the decoder sees at inference). The student's decoder learns
the teacher decoder's output on both (L1 on the channel mean, the value the pipeline keeps);
its encoder learns the teacher's latents of ground-truth depth. Latents are in the UNet's space
(VAE latent times the VAE's scaling factor), so the student's ``scaling_factor`` is 1.0, as
TAESD's. The output folder is an ``AutoencoderTiny`` in diffusers' layout (safetensors) for
``--decoder`` / the node's ``decoder`` parameter, plus ``distill.json`` (settings, losses).
"""

import argparse
import dataclasses
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import yaml

try:
    from metricgold_ros.model import MetricGoldPipeline, load_checkpoint
except ImportError:  # run from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from metricgold_ros.model import MetricGoldPipeline, load_checkpoint
from metricgold_ros.atomic import replace_path, write_json_atomic
from metricgold_ros.errors import InputError
from metricgold_ros.model.codec import encode_depth
from metricgold_ros.synthetic.scenes import KINDS, render_sample


@dataclasses.dataclass
class StudentConfig:
    """The AutoencoderTiny's size (TAESD: 64 channels, blocks (1, 3, 3, 3) / (3, 3, 3, 1))."""

    decoder_block_out_channels: List[int] = dataclasses.field(default_factory=lambda: [64] * 4)
    num_decoder_blocks: List[int] = dataclasses.field(default_factory=lambda: [3, 3, 3, 1])
    encoder_block_out_channels: List[int] = dataclasses.field(default_factory=lambda: [64] * 4)
    num_encoder_blocks: List[int] = dataclasses.field(default_factory=lambda: [1, 3, 3, 3])


@dataclasses.dataclass
class DataConfig:
    per_kind: int = 400
    seed: int = 0
    val_per_kind: int = 24
    val_seed: int = 500_000
    width: int = 128
    height: int = 96


@dataclasses.dataclass
class TrainConfig:
    steps: int = 3000
    batch_size: int = 16
    lr: float = 2e-3
    final_lr_ratio: float = 0.05
    log_every: int = 250
    crop_latent: int = 8  # training crops of 8x8 latent pixels (64x64 px)


@dataclasses.dataclass
class DistillConfig:
    teacher: str
    seed: int = 0
    cpu_threads: int = 1
    student: StudentConfig = dataclasses.field(default_factory=StudentConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)


def load_config(path: Path) -> DistillConfig:
    """The YAML file as a :class:`DistillConfig`; an unknown key is an error naming it."""
    try:
        raw = yaml.safe_load(path.read_text(encoding='utf-8')) or {}
    except (OSError, yaml.YAMLError) as err:
        raise InputError(f'--config {path}: cannot be read as YAML: {err}') from err
    return _build(DistillConfig, raw, str(path))


def _build(cls: type, raw: object, where: str):
    if not isinstance(raw, dict):
        raise InputError(f'{where}: expected a mapping, found {type(raw).__name__}')
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise InputError(f'{where}: unknown key {unknown[0]!r}; expected one of '
                         f'{", ".join(fields)}')
    values = {}
    for name, value in raw.items():
        nested = fields[name].type
        values[name] = _build(nested, value, f'{where}: {name}') \
            if dataclasses.is_dataclass(nested) else value
    try:
        return cls(**values)
    except TypeError as err:
        raise InputError(f'{where}: {err}') from err


def build_student(config: StudentConfig, latent_channels: int) -> torch.nn.Module:
    """A randomly initialised AutoencoderTiny of ``config``'s size, in the UNet's latent space."""
    from diffusers import AutoencoderTiny

    return AutoencoderTiny(
        latent_channels=latent_channels, scaling_factor=1.0,
        decoder_block_out_channels=tuple(config.decoder_block_out_channels),
        num_decoder_blocks=tuple(config.num_decoder_blocks),
        encoder_block_out_channels=tuple(config.encoder_block_out_channels),
        num_encoder_blocks=tuple(config.num_encoder_blocks))


@torch.no_grad()
def make_pairs(pipeline: MetricGoldPipeline, data: DataConfig, seed: int, per_kind: int
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training pairs from ``per_kind`` scenes per domain.

    Returns:
        ``(latents [2N,4,h,w], targets [2N,1,H,W], depth images [N,3,H,W], depth latents
        [N,4,h,w])``: latents of ground-truth depth then of the UNet's predictions, the
        teacher's decoded channel mean for each, and the encoder's input/target pairs.
    """
    vae, meta, scale = pipeline.vae, pipeline.metadata, pipeline.latent_scale
    images, gt_latents, predicted = [], [], []
    for kind in KINDS:
        for index in range(per_kind):
            sample = render_sample(seed + index, kind, data.width, data.height)
            x, valid = encode_depth(sample.depth_m.astype(np.float32), meta.d_min_m, meta.d_max_m)
            x = np.where(valid, x, 1.0)  # invalid (sky, too far) as the far end of the range
            image = torch.from_numpy(x)[None, None].expand(1, 3, -1, -1).contiguous()
            images.append(image)
            gt_latents.append(vae.encode(image).latent_dist.mode() * scale)
            predicted.append(pipeline(sample.rgb, processing_resolution=max(
                data.width, data.height)).depth_latent.contiguous())
    latents = torch.cat(gt_latents + predicted)
    targets = torch.cat([pipeline._decode(part).contiguous() for part in latents.split(32)])
    return latents, targets, torch.cat(images), torch.cat(gt_latents)


def _lr(step: int, train: TrainConfig) -> float:
    """Cosine from ``lr`` to ``lr * final_lr_ratio``."""
    progress = step / max(1, train.steps - 1)
    floor = train.final_lr_ratio
    return train.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def _losses(student: torch.nn.Module, latents: torch.Tensor, targets: torch.Tensor,
            images: torch.Tensor, image_latents: torch.Tensor, *, clamp: bool = False
            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Decoder and encoder L1. Training leaves the output unclamped (a clamp has no gradient
    outside [-1, 1]); validation clamps, as the pipeline does."""
    decoded = student.decode(latents, return_dict=False)[0].mean(dim=1, keepdim=True)
    if clamp:
        decoded = decoded.clamp(-1.0, 1.0)
    decode_loss = (decoded - targets).abs().mean()
    encoded = student.encode(images, return_dict=False)[0]
    return decode_loss, (encoded - image_latents).abs().mean()


def _batch(pairs: Tuple[torch.Tensor, ...], train: TrainConfig, generator: torch.Generator
           ) -> List[torch.Tensor]:
    """``batch_size`` random pairs, each cropped to ``crop_latent`` latent pixels (the image
    crops that match) and flipped left-right half of the time."""
    latents, targets, images, image_latents = pairs
    pick = torch.randint(len(latents), (train.batch_size,), generator=generator)
    encoder_pick = pick % len(images)
    h, w = latents.shape[-2:]
    size = min(train.crop_latent, h, w)
    top = int(torch.randint(h - size + 1, (), generator=generator))
    left = int(torch.randint(w - size + 1, (), generator=generator))
    factor = targets.shape[-1] // w

    def crop(tensor: torch.Tensor, scale: int) -> torch.Tensor:
        return tensor[..., top * scale:(top + size) * scale, left * scale:(left + size) * scale]

    batch = [crop(latents[pick], 1), crop(targets[pick], factor),
             crop(images[encoder_pick], factor), crop(image_latents[encoder_pick], 1)]
    if bool(torch.rand((), generator=generator) < 0.5):
        batch = [tensor.flip(-1) for tensor in batch]
    return batch


def distill(config: DistillConfig, output: Path, log=print) -> dict:
    """Train the student and save it in ``output``; returns the summary written there."""
    torch.set_num_threads(config.cpu_threads)
    torch.manual_seed(config.seed)
    start = time.perf_counter()
    pipeline = MetricGoldPipeline(load_checkpoint(config.teacher), device='cpu', dtype='float32')
    train = make_pairs(pipeline, config.data, config.data.seed, config.data.per_kind)
    val = make_pairs(pipeline, config.data, config.data.val_seed, config.data.val_per_kind)
    log(f'{len(train[0])} training / {len(val[0])} validation latents in '
        f'{time.perf_counter() - start:.0f} s')
    student = build_student(config.student, int(pipeline.vae.config.latent_channels))
    optimizer = torch.optim.Adam(student.parameters(), lr=config.train.lr)
    generator = torch.Generator().manual_seed(config.seed)
    history = []
    for step in range(config.train.steps):
        for group in optimizer.param_groups:
            group['lr'] = _lr(step, config.train)
        batch = _batch(train, config.train, generator)
        decode_loss, encode_loss = _losses(student, *batch)
        optimizer.zero_grad(set_to_none=True)
        (decode_loss + encode_loss).backward()
        optimizer.step()
        if step % config.train.log_every == 0 or step == config.train.steps - 1:
            with torch.no_grad():
                val_decode, val_encode = _losses(student.eval(), *val, clamp=True)
            student.train()
            decode_loss = float(decode_loss.detach())
            history.append({'step': step, 'decode_l1': round(decode_loss, 5),
                            'val_decode_l1': round(float(val_decode), 5),
                            'val_encode_l1': round(float(val_encode), 5)})
            log(f'step {step}: decode L1 {decode_loss:.4f}, validation decode L1 '
                f'{float(val_decode):.4f}, encode L1 {float(val_encode):.4f} '
                f'({time.perf_counter() - start:.0f} s)')
            summary = _save(student, output, config, history, start)
    return summary


def _save(student: torch.nn.Module, output: Path, config: DistillConfig, history: list,
          start: float) -> dict:
    """The student (and ``distill.json``) in ``output``, at each log step: a run stopped
    early leaves its last one, each file whole (written aside and renamed into place; other
    files in ``output``, a model card, stay)."""
    output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f'.{output.name}.', dir=output.parent) as temp:
        student.save_pretrained(temp, safe_serialization=True)
        for file in Path(temp).iterdir():
            replace_path(file, output / file.name)
    summary = {'teacher': config.teacher, 'config': dataclasses.asdict(config),
               'history': history, 'wall_s': round(time.perf_counter() - start, 1),
               'parameters': sum(p.numel() for p in student.parameters())}
    write_json_atomic(output / 'distill.json', summary)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--config', type=Path, required=True, help='distillation YAML')
    parser.add_argument('--output', type=Path, required=True, help='folder for the student')
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
        summary = distill(config, args.output)
    except InputError as err:
        print(f'ERROR: {err}', file=sys.stderr)
        return 1
    print(f'saved {args.output} ({summary["parameters"]} parameters, {summary["wall_s"]} s)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
