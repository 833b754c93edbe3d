"""Training data plumbing: synthetic generation, dataset building, augmentation, batches.

Batch ``k`` of a run is a pure function of (seed, k): the datasets and frames come from
``MixedBatchSampler.batch_at(k)`` (each batch from one dataset, by probability, as Marigold
mixes Hypersim and Virtual KITTI), and the crop / flip of its i-th frame from a generator
seeded with (seed, k, i). The data position of a run is therefore one integer, and resuming
at batch ``k`` reproduces the uninterrupted sequence exactly, with or without DataLoader workers.
"""

import bisect
import dataclasses
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Dict, Iterator, List, Sequence, Tuple

import cv2
import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, Sampler

from metricgold_ros.canonical_camera import mean_focal_px
from metricgold_ros.synthetic.vkitti import write_vkitti2
from training.config import DataConfig, DatasetConfig
from training.datasets import (
    HypersimDataset, MixedBatchSampler, TartanAirDataset, VirtualKitti2Dataset, item_camera)

LOGGER = logging.getLogger(__name__)
_COMPLETE = '.complete.json'


def generate_synthetic(data: DataConfig, output: Path) -> None:
    """Render ``data.generate`` sets into ``output/data/<name>`` (skipped when already there)."""
    for name, spec in data.generate.items():
        root = output / 'data' / name
        marker = root / _COMPLETE
        wanted = json.dumps(dataclasses.asdict(spec), sort_keys=True)
        if marker.is_file() and marker.read_text() == wanted:
            continue
        if root.exists():
            shutil.rmtree(root)
        count = write_vkitti2(root, spec.count, spec.seed, spec.width, spec.height,
                              kinds=spec.kinds, variety=spec.variety,
                              wall_share=spec.wall_share)
        marker.write_text(wanted)
        LOGGER.info('rendered %d synthetic frames into %s', count, root)


def build_dataset(spec: DatasetConfig) -> Dataset:
    """The loader of ``training/datasets.py`` for one configured dataset."""
    if spec.type == 'vkitti2':
        kwargs = {'domain': spec.domain} if spec.domain else {}
        if spec.cameras is not None:
            kwargs['cameras'] = spec.cameras
        return VirtualKitti2Dataset(spec.root, variations=spec.variations, scenes=spec.scenes,
                                    **kwargs)
    if spec.type == 'hypersim':
        if spec.split_file is None:
            LOGGER.warning('%s: Hypersim without split_file reads every frame; Marigold trains '
                           'on its filtered list (filename_list_train_filtered.txt)', spec.root)
        return HypersimDataset(spec.root, split_file=spec.split_file)
    return TartanAirDataset(spec.root, domain=spec.domain)


def load_validation_items(specs: Sequence[DatasetConfig]) -> List[dict]:
    """Frames of the validation datasets (``max_images`` of each, evenly spread), in memory."""
    items = []
    for spec in specs:
        dataset = build_dataset(spec)
        count = len(dataset) if spec.max_images is None else min(spec.max_images, len(dataset))
        for index in np.linspace(0, len(dataset) - 1, count).round().astype(int):
            items.append(dataset[int(index)])
    return items


def augment(item: dict, resolution: Tuple[int, int], scale_range: Tuple[float, float],
            hflip_p: float, rng: np.random.Generator) -> Dict[str, torch.Tensor]:
    """Resize to cover ``resolution`` (times a random zoom), random crop, random h-flip.

    RGB is resized with area (shrinking) or bilinear interpolation; depth and its mask with
    centre-aligned nearest neighbour (:func:`nearest_resize`), so no depth value is invented
    between a foreground and a background surface (as Marigold resizes depth) and depth stays
    aligned with the RGB pixel grid. Zoom beyond the covering scale changes the apparent field
    of view and so the metric scale cue: keep ``scale_range`` at (1, 1) for metric training
    unless the data needs it.

    Returns:
        ``rgb`` [3,H,W] float32 in [-1, 1], ``depth_m`` [1,H,W] float32 (0 invalid) and
        ``valid`` [1,H,W] bool, with (H, W) = ``resolution``; ``focal_px``, the mean of fx and
        fy (px) at the resized scale (crop and flip keep it; None when the item has no
        ``intrinsics``); ``view`` (resized H, W, top, left, flipped) names the window, so
        equal views give equal tensors.
    """
    out_h, out_w = resolution
    rgb, depth_m, valid = item['rgb'], item['depth_m'], item['valid']
    height, width = depth_m.shape
    scale = max(out_h / height, out_w / width) * float(rng.uniform(*scale_range))
    new_h, new_w = max(out_h, math.ceil(height * scale)), max(out_w, math.ceil(width * scale))
    if (new_h, new_w) != (height, width):
        shrink = new_h * new_w < height * width
        rgb = cv2.resize(rgb, (new_w, new_h),
                         interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        depth_m = nearest_resize(depth_m, (new_h, new_w))
        valid = nearest_resize(valid, (new_h, new_w))
    top = int(rng.integers(0, new_h - out_h + 1))
    left = int(rng.integers(0, new_w - out_w + 1))
    window = np.s_[top:top + out_h, left:left + out_w]
    rgb, depth_m, valid = rgb[window], depth_m[window], valid[window]
    flipped = bool(rng.random() < hflip_p)
    if flipped:
        rgb, depth_m, valid = rgb[:, ::-1], depth_m[:, ::-1], valid[:, ::-1]
    rgb_t = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float() / 127.5 - 1.0
    camera = item_camera(item)
    focal_px = None if camera is None else mean_focal_px(camera, new_w, new_h)
    return {'rgb': rgb_t,
            'depth_m': torch.from_numpy(np.ascontiguousarray(depth_m, np.float32))[None],
            'valid': torch.from_numpy(np.ascontiguousarray(valid))[None],
            'focal_px': focal_px, 'view': (new_h, new_w, top, left, flipped)}


def nearest_resize(image: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of ``image`` [H,W,...] to ``size`` (height, width), any dtype.

    Output pixel ``i`` takes input pixel ``floor((i + 0.5) * H / out_h)``: the input pixel
    under the output pixel's centre, so the result stays aligned with an area- or
    bilinear-resized RGB image. (OpenCV's ``INTER_NEAREST`` takes ``floor(i * H / out_h)``,
    the top-left neighbour, which shifts depth by up to half an output pixel.)
    """
    height, width = image.shape[:2]
    out_h, out_w = size
    rows = np.minimum(((np.arange(out_h) + 0.5) * (height / out_h)).astype(np.int64),
                      height - 1)
    cols = np.minimum(((np.arange(out_w) + 0.5) * (width / out_w)).astype(np.int64), width - 1)
    return image[rows[:, None], cols[None, :]]


class TrainBatches(Dataset):
    """Map-style dataset whose item ``k`` is the whole augmented micro-batch ``k``.

    Use with ``DataLoader(batches, batch_size=None, sampler=BatchNumbers(...))``.
    """

    def __init__(self, datasets: Sequence[Dataset], probabilities: Sequence[float],
                 batch_size: int, resolutions: Sequence[Tuple[int, int]],
                 scale_range: Tuple[float, float] = (1.0, 1.0), hflip_p: float = 0.5,
                 seed: int = 0, cache: bool = False) -> None:
        self.frames = ConcatDataset(list(datasets))
        self.sampler = MixedBatchSampler([len(d) for d in datasets], probabilities, batch_size,
                                         seed=seed)
        self.resolutions = list(resolutions)  # [H, W] per dataset (a batch has one dataset)
        self.scale_range, self.hflip_p = scale_range, hflip_p
        self.seed = seed
        self.cache: Dict[int, dict] = {} if cache else None

    def __len__(self) -> int:
        return 2 ** 62  # endless: batch k exists for every k

    def frame(self, index: int) -> dict:
        if self.cache is None:
            return self.frames[index]
        if index not in self.cache:
            self.cache[index] = self.frames[index]
        return self.cache[index]

    def __getitem__(self, k: int) -> Dict[str, object]:
        samples = []
        indices = self.sampler.batch_at(k)
        resolution = self.resolutions[bisect.bisect_right(self.frames.cumulative_sizes,
                                                          indices[0])]
        for i, index in enumerate(indices):
            rng = np.random.default_rng([self.seed, k, i])
            item = self.frame(index)
            sample = augment(item, resolution, self.scale_range, self.hflip_p, rng)
            sample['domain'] = item['domain']
            sample['view'] = (int(index), *sample['view'])
            samples.append(sample)
        return {'rgb': torch.stack([s['rgb'] for s in samples]),  # [B,3,H,W]
                'depth_m': torch.stack([s['depth_m'] for s in samples]),  # [B,1,H,W]
                'valid': torch.stack([s['valid'] for s in samples]),  # [B,1,H,W]
                'domain': [s['domain'] for s in samples], 'k': k,
                'focal_px': [s['focal_px'] for s in samples],  # px at the training scale
                'views': [s['view'] for s in samples]}  # frame index + augment view


class BatchNumbers(Sampler):
    """Batch numbers this process consumes, from optimizer step ``start_step`` to ``steps``.

    Micro-batch ``m`` of step ``s`` on process ``rank`` of ``world`` is batch
    ``(s * accumulation + m) * world + rank``: processes never share a batch, and the sequence
    does not depend on where a run was interrupted.
    """

    def __init__(self, start_step: int, steps: int, accumulation: int = 1, rank: int = 0,
                 world: int = 1) -> None:
        self.start_step, self.steps = start_step, steps
        self.accumulation, self.rank, self.world = accumulation, rank, world

    def __iter__(self) -> Iterator[int]:
        for step in range(self.start_step, self.steps):
            for micro in range(self.accumulation):
                yield (step * self.accumulation + micro) * self.world + self.rank

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step) * self.accumulation


def make_train_batches(data: DataConfig, batch_size: int, seed: int) -> TrainBatches:
    """:class:`TrainBatches` over the configured training datasets."""
    datasets = [build_dataset(spec) for spec in data.train]
    resolutions = [tuple(spec.resolution or data.resolution) for spec in data.train]
    for spec, dataset, size in zip(data.train, datasets, resolutions):
        LOGGER.info('training data: %s %s, %d frames, probability %g, %dx%d px', spec.type,
                    spec.root, len(dataset), spec.probability, size[1], size[0])
    return TrainBatches(datasets, [spec.probability for spec in data.train], batch_size,
                        resolutions, data.scale_range, data.hflip_p, seed, data.cache)
