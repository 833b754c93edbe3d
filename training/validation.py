"""Validation during training: the real pipeline on held-out frames, the project's metrics.

Inference goes through :class:`MetricGoldPipeline` (the one implementation the node and
``metricgold infer`` use) on a checkpoint assembled in memory from the networks being trained,
and scoring through :func:`metricgold_ros.evaluation.depth_metrics` on the ground truth's valid
pixels, so a validation AbsRel means what ``metricgold eval`` would print.
"""

from typing import Dict, List, Tuple

import numpy as np
import torch

from metricgold_ros.canonical_camera import for_camera
from metricgold_ros.colorize import colorize_depth
from metricgold_ros.evaluation import depth_metrics
from metricgold_ros.model.checkpoint import Checkpoint, ModelMetadata
from metricgold_ros.model.pipeline import MetricGoldPipeline
from training.datasets import item_camera

SUMMARY_KEYS = ('abs_rel', 'sq_rel', 'rmse', 'rmse_log', 'delta1')


def make_checkpoint(unet: torch.nn.Module, vae: torch.nn.Module, scheduler_config: dict,
                    embedding: torch.Tensor, metadata: ModelMetadata) -> Checkpoint:
    """A :class:`Checkpoint` around live modules (no copy), with a fresh DDIM scheduler."""
    from diffusers import DDIMScheduler

    return Checkpoint(unet, vae, DDIMScheduler.from_config(scheduler_config), embedding,
                      metadata)


@torch.no_grad()
def validate(checkpoint: Checkpoint, items: List[dict], device: torch.device, *,
             denoising_steps: int, ensemble_size: int, processing_resolution: int,
             image_count: int = 0) -> Tuple[Dict[str, float], List[np.ndarray]]:
    """Mean metrics over ``items`` (and per domain: ``indoor/abs_rel`` ...), plus images.

    A camera-aware model's prediction (depth for its canonical camera) is multiplied by
    ``f / canonical_focal_px``, f = the item's mean focal length at the processing resolution
    (:func:`~metricgold_ros.canonical_camera.for_camera`). The networks are put in eval mode
    for the call and back into their previous mode after.
    Returns the metrics and up to ``image_count`` previews ``[H, 3W, 3]`` uint8 RGB:
    input | prediction | ground truth, coloured on the ground truth's range.
    """
    modules = (checkpoint.unet, checkpoint.vae)
    modes = [module.training for module in modules]
    for module in modules:
        module.eval()
    try:
        pipeline = MetricGoldPipeline(checkpoint, device=device, dtype=torch.float32)
        per_image, images = [], []
        for index, item in enumerate(items):
            prediction = pipeline(item['rgb'], denoising_steps=denoising_steps,
                                  ensemble_size=ensemble_size,
                                  processing_resolution=processing_resolution, seed=index)
            depth_m = for_camera(prediction.depth, checkpoint.metadata, item_camera(item),
                                 processing_resolution)
            metrics = depth_metrics(depth_m, item['depth_m'], item['valid'])
            per_image.append((item['domain'], metrics))
            if len(images) < image_count:
                images.append(_preview(item, depth_m))
    finally:
        for module, mode in zip(modules, modes):
            module.train(mode)
    summary = {key: float(np.mean([m[key] for _, m in per_image])) for key in SUMMARY_KEYS}
    for domain in sorted({d for d, _ in per_image}):
        for key in ('abs_rel', 'delta1'):
            summary[f'{domain}/{key}'] = float(np.mean([m[key] for d, m in per_image
                                                        if d == domain]))
    return summary, images


def constant_baseline(frames, items: List[dict], count: int = 64) -> Dict[str, float]:
    """The best constant depth: the median valid depth of up to ``count`` training frames
    (evenly spread over ``frames``), scored on ``items`` like a prediction."""
    picks = np.linspace(0, len(frames) - 1, min(count, len(frames))).round().astype(int)
    samples = [frames[int(i)] for i in picks]
    depth_m = float(np.median(np.concatenate([s['depth_m'][s['valid']] for s in samples])))
    scores = [depth_metrics(np.full(item['depth_m'].shape, depth_m, np.float32),
                            item['depth_m'], item['valid']) for item in items]
    return {'depth_m': depth_m, 'abs_rel': float(np.mean([m['abs_rel'] for m in scores])),
            'delta1': float(np.mean([m['delta1'] for m in scores]))}


def _preview(item: dict, pred_m: np.ndarray) -> np.ndarray:
    gt_m = np.where(item['valid'], item['depth_m'], np.nan).astype(np.float32)
    valid = gt_m[np.isfinite(gt_m)]
    low, high = (float(np.percentile(valid, 2)), float(np.percentile(valid, 98))) \
        if valid.size else (None, None)
    if low is not None and not high > low:
        high = low * 1.01
    colored = [colorize_depth(d.astype(np.float32), low, high)[:, :, ::-1]
               for d in (pred_m, gt_m)]  # BGR -> RGB
    return np.concatenate([item['rgb'], *colored], axis=1)
