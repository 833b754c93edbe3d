"""The VAE alone: how much of the true depth's edges survive its encode -> decode.

The model's best possible depth is what its VAE's decoder can draw. For each scene of a
synthetic split this renders the exact depth at the model's processing size (the same scene,
camera and pose, smaller), encodes it with the VAE as a depth image, decodes it, enlarges the
decoded value to the scored size the way the pipeline does (bilinear, in the log codec) and
scores it against the exact depth at that size: AbsRel and depth-boundary precision / recall
/ F1 (``training/evaluate_synthetic.py``'s settings). The named baseline, in the same run, is the
*ceiling*: the exact small depth enlarged without the VAE (a perfect model at the processing
size). Each ``--vae`` folder (an AutoencoderKL, e.g. a retrained decoder) is scored beside the
model's own. No UNet: an upper bound on any UNet behind that VAE. ``--best-latent STEPS``
adds, per VAE, the latent that decodes nearest each scene's depth (gradient descent from the
encoder's): what the decoder can draw whatever an encoder or a UNet hands it.

    python bench/vae_boundaries.py [--model DIR] [--vae DIR ...] [--resolution PX]
                                   [--best-latent STEPS] [--per-kind 20] [--seed 600000]
                                   [--size 320x240] [--threads 1] [--json FILE]
"""

import argparse
import functools
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metricgold_ros.atomic import write_json_atomic  # noqa: E402  (after the path fix)
from metricgold_ros.boundaries import BoundaryCounts, boundary_counts  # noqa: E402
from metricgold_ros.errors import CheckpointError  # noqa: E402
from metricgold_ros.evaluation import depth_metrics  # noqa: E402
from metricgold_ros.model import ModelMetadata, image_ops  # noqa: E402
from metricgold_ros.model.checkpoint import load_checkpoint  # noqa: E402
from metricgold_ros.model.codec import decode_depth  # noqa: E402
from metricgold_ros.model.weights import load_module  # noqa: E402
from metricgold_ros.model_paths import bundled_model_path  # noqa: E402
from metricgold_ros.synthetic.scenes import KINDS, render_sample  # noqa: E402
from training.evaluate_synthetic import (BOUNDARY_BASELINE_PX, BOUNDARY_JUMP,  # noqa: E402
                                         BOUNDARY_TOLERANCE_PX)
from training.vae_stage import depth_as_image, depth_round_trip  # noqa: E402

SELECTION_SEED = 600000  # the model card's selection split (held-out: 900000)
CEILING = 'ceiling (exact depth at processing size)'
Source = Callable[[np.ndarray, np.ndarray], torch.Tensor]  # (depth_m, valid) -> codec value


def codec_value(depth_m: np.ndarray, valid: np.ndarray,
                meta: ModelMetadata) -> Tuple[torch.Tensor, torch.Tensor]:
    """The exact depth as the codec value ``[1,1,h,w]`` and its in-range mask (the ceiling)."""
    x, in_range = depth_as_image(torch.from_numpy(depth_m)[None, None],
                                 torch.from_numpy(valid)[None, None], meta.d_min_m, meta.d_max_m)
    return x[:, :1].float(), in_range


def best_latent(vae: torch.nn.Module, depth_m: np.ndarray, valid: np.ndarray,
                meta: ModelMetadata, steps: int, lr: float = 0.05) -> torch.Tensor:
    """What the decoder alone can draw: the latent that best decodes to ``depth_m`` (L1 on the
    valid pixels), found by ``steps`` of Adam from the encoder's; its decoded value."""
    target, mask = codec_value(depth_m, valid, meta)
    image, padding = image_ops.pad_to_multiple(target.expand(-1, 3, -1, -1))
    with torch.no_grad():
        latent = vae.encode(image).latent_dist.mode()
    latent.requires_grad_(True)
    optimizer = torch.optim.Adam([latent], lr=lr)
    for _ in range(steps):
        value = image_ops.unpad(vae.decode(latent).sample.mean(dim=1, keepdim=True), padding)
        loss = (value - target).abs()[mask].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return image_ops.unpad(vae.decode(latent).sample.mean(dim=1, keepdim=True), padding)


def depth_sources(model: Path, vaes: Sequence[Path], best_latent_steps: int
                  ) -> Tuple[ModelMetadata, Dict[str, Source]]:
    """The rows: the ceiling, then the model's VAE and each ``--vae`` (and, with
    ``best_latent_steps``, each one's best latent)."""
    from diffusers import AutoencoderKL

    checkpoint = load_checkpoint(model)
    meta = checkpoint.metadata
    folders = {str(model / 'vae'): checkpoint.vae}
    folders.update({str(folder): load_module(AutoencoderKL, folder, allow_pickle=False)
                    for folder in vaes})
    sources: Dict[str, Source] = {CEILING: lambda d, v: codec_value(d, v, meta)[0]}
    for name, vae in folders.items():
        vae.eval().requires_grad_(False)
        sources[name] = functools.partial(_round_trip, vae, meta)
        if best_latent_steps:
            sources[f'{name}, best latent ({best_latent_steps} steps)'] = functools.partial(
                best_latent, vae, meta=meta, steps=best_latent_steps)
    return meta, sources


def _round_trip(vae: torch.nn.Module, meta: ModelMetadata, depth_m: np.ndarray,
                valid: np.ndarray) -> torch.Tensor:
    return depth_round_trip(vae, depth_m, valid, meta.d_min_m, meta.d_max_m,
                            torch.device('cpu'))[0]


def run(model: Path, vaes: Sequence[Path], per_kind: int, seed: int, width: int,
        height: int, resolution: Optional[int] = None,
        best_latent_steps: int = 0) -> Dict[str, Dict[str, dict]]:
    """``{row: {kind: {abs_rel, precision, recall, f1}}}`` (rows: :func:`depth_sources`);
    ``resolution``: the processing resolution (longer side; default the model's)."""
    meta, sources = depth_sources(model, vaes, best_latent_steps)
    if resolution is None:
        resolution = meta.default_processing_resolution or 0
    small_h, small_w = image_ops.processing_size(height, width, resolution)
    results: Dict[str, Dict[str, dict]] = {name: {} for name in sources}
    for kind in KINDS:
        counts = {name: BoundaryCounts() for name in sources}
        abs_rel: Dict[str, List[float]] = {name: [] for name in sources}
        for index in range(per_kind):
            scored = render_sample(seed + index, kind, width, height)
            small = render_sample(seed + index, kind, small_w, small_h)
            for name, source in sources.items():
                value = image_ops.resize(source(small.depth_m, small.valid), (height, width))
                depth = decode_depth(value[0, 0], meta.d_min_m, meta.d_max_m).numpy()
                counts[name] += boundary_counts(depth, scored.depth_m, scored.valid,
                                                BOUNDARY_JUMP, BOUNDARY_TOLERANCE_PX,
                                                BOUNDARY_BASELINE_PX, planar_gt=True)
                abs_rel[name].append(depth_metrics(depth, scored.depth_m,
                                                   scored.valid)['abs_rel'])
        for name in sources:
            c = counts[name]
            results[name][kind] = {'abs_rel': round(float(np.mean(abs_rel[name])), 4),
                                   'precision': round(c.precision, 3),
                                   'recall': round(c.recall, 3), 'f1': round(c.f1, 3)}
    return results


def table(results: Dict[str, Dict[str, dict]]) -> str:
    lines = ['| depth | ' + ' | '.join(f'{kind} AbsRel | {kind} P / R / F1' for kind in KINDS)
             + ' |', '| --- |' + ' --- | --- |' * len(KINDS)]
    for name, kinds in results.items():
        cells = [f"{m['abs_rel']:.4f} | {m['precision']:.3f} / {m['recall']:.3f} / "
                 f"{m['f1']:.3f}" for m in (kinds[kind] for kind in KINDS)]
        lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', type=Path, default=None,
                        help='model folder (default: the bundled model)')
    parser.add_argument('--vae', type=Path, action='append', default=[],
                        help='another AutoencoderKL folder to score (repeatable)')
    parser.add_argument('--per-kind', type=int, default=20, help='scenes per domain')
    parser.add_argument('--seed', type=int, default=SELECTION_SEED, help='first scene seed')
    parser.add_argument('--size', default='320x240', help='scored WIDTHxHEIGHT')
    parser.add_argument('--resolution', type=int, default=None,
                        help='processing resolution, longer side (default: the model\'s)')
    parser.add_argument('--best-latent', type=int, default=0, metavar='STEPS',
                        help='also score each VAE\'s best latent, found by STEPS Adam steps per '
                             'scene (what the decoder alone can draw; ~1 s per 100 steps)')
    parser.add_argument('--threads', type=int, default=1, help='torch CPU threads')
    parser.add_argument('--json', type=Path, default=None, help='write the results here')
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    width, height = (int(v) for v in args.size.lower().split('x'))
    model = args.model or bundled_model_path()
    try:
        results = run(model, args.vae, args.per_kind, args.seed, width, height,
                      args.resolution, args.best_latent)
    except CheckpointError as err:  # names the folder or file and what it lacks
        parser.error(str(err))
    print(table(results))
    if args.json is not None:
        write_json_atomic(args.json, {'model': str(model), 'per_kind': args.per_kind,
                                      'seed': args.seed, 'size': [width, height],
                                      'resolution': args.resolution,
                                      'best_latent_steps': args.best_latent,
                                      'results': results})
    return 0


if __name__ == '__main__':
    sys.exit(main())
