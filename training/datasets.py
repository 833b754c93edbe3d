"""Training data in the published on-disk layouts, and a mixed-dataset batch sampler.

Every dataset item is a dict, left raw for the training code to normalise, resize and augment:

    rgb         [H,W,3] uint8 RGB
    depth_m     [H,W] float32 planar depth z in metres (distance along the optical axis), 0 where
                invalid
    valid       [H,W] bool
    intrinsics  (fx, fy, cx, cy) in pixels of this image, pixel centres at integer coordinates
    name        str, unique within the dataset
    domain      'indoor' | 'outdoor'

Layouts (each loader's error message repeats its own):
    * Hypersim as Marigold's ``script/depth/dataset_preprocess/hypersim`` writes it: one split
      folder ``<split>/<scene>/rgb_cam_00_fr0000.png`` + ``depth_plane_cam_00_fr0000.png``
      (uint16 millimetres of planar depth, 0 = invalid) and ``filename_list_<split>.txt`` lines
      ``<scene>/rgb_... <scene>/depth_plane_...``. A list may instead name raw Hypersim
      ``depth_meters`` files (.npy, or .hdf5 with h5py installed): Euclidean distance from the
      camera centre, converted with ``hypersim_distance_to_planar``.
    * Virtual KITTI 2: ``SceneXX/<variation>/frames/rgb/Camera_N/rgb_NNNNN.jpg``,
      ``frames/depth/Camera_N/depth_NNNNN.png`` (uint16 centimetres, 65535 = sky) and
      ``SceneXX/<variation>/intrinsic.txt`` (per frame and camera). The archives may be
      extracted into one root or side by side as ``rgb/``, ``depth/``, ``textgt/`` (or
      ``vkitti_2.0.3_rgb/`` ...). An optional ``SceneXX/domain.txt`` holding 'indoor' or
      'outdoor' overrides the domain; ``metricgold_ros.synthetic.vkitti.write_vkitti2`` writes one.
    * TartanAir: ``<env>/<Easy|Hard>/<Pxxx>/image_left/NNNNNN_left.png`` and
      ``depth_left/NNNNNN_left_depth.npy`` (float32 metres, planar), fx = fy = 320, cx = 320,
      cy = 240 at 640x480.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Mapping, NamedTuple, Sequence

import cv2
import numpy as np
from torch.utils.data import ConcatDataset, Dataset, Sampler

from metricgold_ros.camera import Intrinsics
from metricgold_ros.depth_traits import VKITTI2_CENTIMETRES
from metricgold_ros.errors import InputError

HYPERSIM_SIZE_PX = (1024, 768)
HYPERSIM_FOCAL_PX = 886.81  # 60 deg horizontal field of view at 1024 px
TARTANAIR_SIZE_PX = (640, 480)
TARTANAIR_INTRINSICS_PX = (320.0, 320.0, 320.0, 240.0)
TARTANAIR_INDOOR_ENVS = frozenset({'carwelding', 'hospital', 'office', 'office2'})
DOMAINS = ('indoor', 'outdoor')
# Marigold's Virtual KITTI 2 split (prs-eth/Marigold, data_split/vkitti_depth/vkitti_train.txt
# and vkitti_val.txt): six of the ten variations, both stereo cameras, four training scenes
# (20,148 frames) and Scene01 held out for validation (5,364 frames).
VKITTI2_VARIATIONS = ('15-deg-left', '15-deg-right', 'clone', 'morning', 'overcast', 'sunset')
VKITTI2_CAMERAS = ('Camera_0', 'Camera_1')
VKITTI2_TRAIN_SCENES = ('Scene02', 'Scene06', 'Scene18', 'Scene20')
VKITTI2_VAL_SCENES = ('Scene01',)
_VKITTI2_TREES = ('rgb', 'depth', 'textgt', 'vkitti_2.0.3_rgb', 'vkitti_2.0.3_depth',
                  'vkitti_2.0.3_textgt')


class DatasetError(InputError):
    """A dataset folder is missing, empty, incomplete or not in the expected layout."""


class _Item(NamedTuple):
    rgb_path: Path
    depth_path: Path
    name: str
    domain: str
    intrinsics: tuple[float, float, float, float] | None  # None: derive from the image size


def item_camera(item: Mapping) -> Intrinsics | None:
    """A dataset item's pinhole camera at its image's size; None when it has no intrinsics."""
    if item.get('intrinsics') is None:
        return None
    height, width = item['depth_m'].shape
    return Intrinsics(*item['intrinsics'][:4], width, height)


def hypersim_distance_to_planar(distance_m: np.ndarray, width: int = 1024, height: int = 768,
                                focal_px: float = HYPERSIM_FOCAL_PX) -> np.ndarray:
    """Planar depth z [H,W] float32 m from Hypersim's ``depth_meters`` (distance to the centre).

    ``z = distance * f / sqrt((u - cx)^2 + (v - cy)^2 + f^2)`` with pixel centres u = 0..W-1,
    cx = (W - 1) / 2 (511.5 at 1024 px), likewise v, cy. Non-finite input stays non-finite.
    """
    distance_m = np.asarray(distance_m)
    if distance_m.shape != (height, width):
        raise InputError(f'distance_m has shape {distance_m.shape}, expected (height, width) = '
                         f'({height}, {width}); pass the image size')
    u = np.arange(width, dtype=np.float64) - (width - 1) / 2
    v = np.arange(height, dtype=np.float64) - (height - 1) / 2
    norm = np.sqrt(u[None, :] ** 2 + v[:, None] ** 2 + focal_px ** 2)
    return (distance_m * (focal_px / norm)).astype(np.float32)


class _DepthDataset(Dataset):
    """Shared item loading; subclasses fill ``self.items`` and implement ``_read_depth``."""

    layout = ''

    def __init__(self, items: list[_Item], root: Path) -> None:
        if not items:
            raise DatasetError(f'no frames found under {root}; expected {self.layout}')
        self.items, self.root = items, root

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        rgb = _read_rgb(item.rgb_path)
        depth_m, valid = self._read_depth(item.depth_path, rgb.shape[1], rgb.shape[0])
        if depth_m.shape != rgb.shape[:2]:
            raise DatasetError(f'{item.depth_path} is {depth_m.shape[1]}x{depth_m.shape[0]} px '
                               f'but {item.rgb_path} is {rgb.shape[1]}x{rgb.shape[0]} px')
        intrinsics = item.intrinsics or self._intrinsics(rgb.shape[1], rgb.shape[0])
        return {'rgb': rgb, 'depth_m': np.where(valid, depth_m, np.float32(0)), 'valid': valid,
                'intrinsics': intrinsics, 'name': item.name, 'domain': item.domain}

    def _read_depth(self, path: Path, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _intrinsics(self, width: int, height: int) -> tuple[float, float, float, float]:
        raise NotImplementedError


class HypersimDataset(_DepthDataset):
    """Hypersim, preprocessed by Marigold's script; ``root`` is one split folder (e.g. train).

    Without ``split_file``, every ``<root>/*/rgb_*.png`` pairs with its ``depth_plane_*.png``.
    A ``split_file`` (e.g. Marigold's ``filename_list_train_filtered.txt``) lists
    ``<rgb> <depth>`` per line, relative to ``root``. Domain: indoor.
    """

    layout = ('<split>/<scene>/rgb_cam_XX_frXXXX.png + depth_plane_cam_XX_frXXXX.png (uint16 '
              'mm), optionally listed in filename_list_<split>.txt as "<rgb> <depth>" lines')

    def __init__(self, root: str | Path, split_file: str | Path | None = None) -> None:
        root = _existing_dir(Path(root), self.layout)
        if split_file is None:
            pairs = [(p, p.with_name('depth_plane_' + p.name[len('rgb_'):]))
                     for p in sorted(root.glob('*/rgb_*.png'))]
        else:
            if not Path(split_file).is_file():
                raise DatasetError(f'split file {split_file} does not exist')
            pairs = []
            for number, line in enumerate(Path(split_file).read_text().splitlines(), 1):
                if line.strip():
                    fields = line.split()
                    if len(fields) < 2:
                        raise DatasetError(f'{split_file} line {number}: {line!r} is not '
                                           f'"<rgb path> <depth path>"')
                    pairs.append((root / fields[0], root / fields[1]))
        _require_files(pairs, root, self.layout)
        super().__init__([_Item(rgb, depth, str(rgb.relative_to(root).with_suffix('')),
                                'indoor', None) for rgb, depth in pairs], root)

    def _read_depth(self, path: Path, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        if path.suffix == '.png':  # Marigold's preprocessed planar depth, millimetres
            raw = _read_png16(path)
            return raw.astype(np.float32) / np.float32(1000), raw > 0
        if path.suffix == '.npy':
            distance_m = np.load(path)
        elif path.suffix in ('.hdf5', '.h5'):
            try:
                import h5py
            except ImportError as err:
                raise DatasetError(f'reading {path} needs h5py (pip install h5py), or convert '
                                   'depth_meters to .npy') from err
            with h5py.File(path, 'r') as file:
                distance_m = np.asarray(file['dataset'])
        else:
            raise DatasetError(f'{path}: unknown depth format; expected .png (uint16 mm planar) '
                               'or raw depth_meters as .npy / .hdf5')
        fx, fy, _, _ = self._intrinsics(width, height)
        depth_m = hypersim_distance_to_planar(distance_m.astype(np.float64), width, height, fx)
        return depth_m, np.isfinite(depth_m) & (depth_m > 0)

    def _intrinsics(self, width: int, height: int) -> tuple[float, float, float, float]:
        """Hypersim's 1024x768 camera (fx = fy = 886.81, cx = 511.5, cy = 383.5), scaled."""
        sx, sy = width / HYPERSIM_SIZE_PX[0], height / HYPERSIM_SIZE_PX[1]
        return (HYPERSIM_FOCAL_PX * sx, HYPERSIM_FOCAL_PX * sy, (width - 1) / 2,
                (height - 1) / 2)


class VirtualKitti2Dataset(_DepthDataset):
    """Virtual KITTI 2 with per-frame intrinsics.

    ``cameras`` (default both, as Marigold trains), ``variations`` and ``scenes`` (None: all)
    select frames; Marigold's split is ``VKITTI2_VARIATIONS`` with ``VKITTI2_TRAIN_SCENES`` or
    ``VKITTI2_VAL_SCENES``. ``domain`` labels scenes without a ``SceneXX/domain.txt`` (real
    VKITTI2 has none).
    """

    layout = ('SceneXX/<variation>/frames/rgb/Camera_N/rgb_NNNNN.jpg, frames/depth/Camera_N/'
              'depth_NNNNN.png (uint16 cm, 65535 = sky) and SceneXX/<variation>/intrinsic.txt, '
              'in one root or in rgb/, depth/, textgt/ (or vkitti_2.0.3_*) beside each other')

    def __init__(self, root: str | Path, cameras: Sequence[str] = VKITTI2_CAMERAS,
                 variations: Sequence[str] | None = None, domain: str = 'outdoor',
                 scenes: Sequence[str] | None = None) -> None:
        root = _existing_dir(Path(root), self.layout)
        _check_domain(domain)
        trees = [root] + [root / name for name in _VKITTI2_TREES if (root / name).is_dir()]
        tables: dict[tuple[str, str], dict] = {}
        items = []
        for tree in trees:
            for rgb in sorted(tree.glob('Scene*/*/frames/rgb/Camera_*/rgb_*.jpg')):
                scene, variation, _, _, camera, _ = rgb.relative_to(tree).parts
                if camera not in cameras or (variations is not None and
                                             variation not in variations) or (
                        scenes is not None and scene not in scenes):
                    continue
                frame = rgb.stem[len('rgb_'):]
                depth = _find(trees, Path(scene, variation, 'frames', 'depth', camera,
                                          f'depth_{frame}.png'), self.layout)
                if (scene, variation) not in tables:
                    tables[scene, variation] = _read_vkitti2_intrinsics(_find(
                        trees, Path(scene, variation, 'intrinsic.txt'), self.layout))
                key = (int(frame), int(camera[len('Camera_'):]))
                if key not in tables[scene, variation]:
                    raise DatasetError(f'{scene}/{variation}/intrinsic.txt has no row for frame '
                                       f'{key[0]} camera {key[1]}')
                domain_file = next((t / scene / 'domain.txt' for t in trees
                                    if (t / scene / 'domain.txt').is_file()), None)
                scene_domain = domain_file.read_text().strip() if domain_file else domain
                _check_domain(scene_domain, domain_file)
                items.append(_Item(rgb, depth, f'{scene}/{variation}/{camera}/{frame}',
                                   scene_domain, tables[scene, variation][key]))
        super().__init__(items, root)

    def _read_depth(self, path: Path, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        raw = _read_png16(path)
        return raw.astype(np.float32) / np.float32(100), VKITTI2_CENTIMETRES.valid(raw)


class TartanAirDataset(_DepthDataset):
    """TartanAir left camera; ``root`` holds environments (or is one environment's folder).

    ``domain``: one label for all, a mapping env -> label, or None for the built-in table
    (``TARTANAIR_INDOOR_ENVS`` indoor, the rest outdoor). Depth of ``max_depth_m`` or more
    (the sky) is invalid.
    """

    layout = ('<env>/<Easy|Hard>/<Pxxx>/image_left/NNNNNN_left.png + depth_left/'
              'NNNNNN_left_depth.npy (float32 m)')

    def __init__(self, root: str | Path, domain: str | Mapping[str, str] | None = None,
                 max_depth_m: float = 1000.0) -> None:
        root = _existing_dir(Path(root), self.layout)
        base, rgbs = root.parent, sorted(root.glob('*/P*/image_left/*_left.png'))
        if not rgbs:  # root holds several environments
            base, rgbs = root, sorted(root.glob('*/*/P*/image_left/*_left.png'))
        pairs = [(p, p.parent.parent / 'depth_left' / f'{p.stem}_depth.npy') for p in rgbs]
        _require_files(pairs, root, self.layout)
        items = []
        for rgb, depth in pairs:
            env = rgb.relative_to(base).parts[0]
            label = domain if isinstance(domain, str) else (domain or {}).get(
                env, 'indoor' if env.lower() in TARTANAIR_INDOOR_ENVS else 'outdoor')
            _check_domain(label)
            items.append(_Item(rgb, depth, str(rgb.relative_to(base).with_suffix('')), label,
                               None))
        self.max_depth_m = max_depth_m
        super().__init__(items, root)

    def _read_depth(self, path: Path, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        depth_m = np.load(path).astype(np.float32)
        if depth_m.ndim == 3:  # some tools save [H,W,1]
            depth_m = depth_m[..., 0]
        return depth_m, np.isfinite(depth_m) & (depth_m > 0) & (depth_m < self.max_depth_m)

    def _intrinsics(self, width: int, height: int) -> tuple[float, float, float, float]:
        sx, sy = width / TARTANAIR_SIZE_PX[0], height / TARTANAIR_SIZE_PX[1]
        fx, fy, cx, cy = TARTANAIR_INTRINSICS_PX
        return (fx * sx, fy * sy, (cx + 0.5) * sx - 0.5, (cy + 0.5) * sy - 0.5)


class MixedBatchSampler(Sampler):
    """Batches of indices into ``ConcatDataset(datasets)``, each batch from one dataset.

    Batch k picks a dataset with ``probabilities`` (normalised), then ``batch_size`` distinct
    items of it uniformly (with repeats only when it has fewer items). Batch k depends only on
    (seed, k), so the whole state is (seed, position): iteration yields batches ``position``,
    ``position + 1``, ... (up to ``num_batches``; None = endless) and advances ``position``.
    A DataLoader fetches ahead, so to resume, pass the number of batches your loop consumed.
    """

    def __init__(self, dataset_sizes: Sequence[int], probabilities: Sequence[float],
                 batch_size: int, *, seed: int = 0, position: int = 0,
                 num_batches: int | None = None) -> None:
        probs = np.asarray(probabilities, dtype=np.float64)
        if len(probs) != len(dataset_sizes) or not len(probs):
            raise DatasetError(f'{len(probs)} probabilities for {len(dataset_sizes)} datasets')
        if (probs < 0).any() or not probs.sum() > 0 or not np.isfinite(probs).all():
            raise DatasetError(f'probabilities={list(probabilities)} must be >= 0, sum > 0')
        empty = [i for i, (n, p) in enumerate(zip(dataset_sizes, probs)) if p > 0 and n < 1]
        if empty or batch_size < 1:
            raise DatasetError(f'datasets {empty} are empty but have probability > 0, or '
                               f'batch_size={batch_size} < 1')
        self.sizes = [int(n) for n in dataset_sizes]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(int).tolist()
        self.probabilities = probs / probs.sum()
        self.batch_size, self.seed, self.position = batch_size, seed, position
        self.num_batches = num_batches

    def batch_at(self, k: int) -> list[int]:
        """Batch number ``k``: indices into the ConcatDataset, all from one dataset."""
        rng = np.random.default_rng([self.seed, k])
        which = int(rng.choice(len(self.sizes), p=self.probabilities))
        size = self.sizes[which]
        picks = rng.choice(size, self.batch_size, replace=size < self.batch_size)
        return (self.offsets[which] + picks).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        while self.num_batches is None or self.position < self.num_batches:
            batch = self.batch_at(self.position)
            self.position += 1
            yield batch

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError('an endless MixedBatchSampler (num_batches=None) has no length')
        return max(self.num_batches - self.position, 0)

    def state_dict(self) -> dict:
        """{'seed', 'position'}: enough to continue the exact batch sequence."""
        return {'seed': self.seed, 'position': self.position}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.seed, self.position = int(state['seed']), int(state['position'])


def build_mixed_dataset(datasets: Sequence[Dataset], probabilities: Sequence[float],
                        batch_size: int, *, seed: int = 0, position: int = 0,
                        num_batches: int | None = None) -> tuple[ConcatDataset,
                                                                 MixedBatchSampler]:
    """``ConcatDataset`` of ``datasets`` and its ``MixedBatchSampler``, for
    ``DataLoader(dataset, batch_sampler=sampler)``."""
    sampler = MixedBatchSampler([len(d) for d in datasets], probabilities, batch_size,
                                seed=seed, position=position, num_batches=num_batches)
    return ConcatDataset(datasets), sampler


def _existing_dir(root: Path, layout: str) -> Path:
    if not root.is_dir():
        raise DatasetError(f'dataset folder {root} does not exist; expected {layout}')
    return root


def _check_domain(domain: str, source: Path | None = None) -> None:
    if domain not in DOMAINS:
        where = f' in {source}' if source else ''
        raise DatasetError(f'domain {domain!r}{where} is not one of {DOMAINS}')


def _require_files(pairs: list[tuple[Path, Path]], root: Path, layout: str) -> None:
    missing = [path for pair in pairs for path in pair if not path.is_file()]
    if missing:
        raise DatasetError(f'{len(missing)} file(s) missing under {root}, first {missing[0]}; '
                           f'expected {layout}')


def _find(trees: list[Path], relative: Path, layout: str) -> Path:
    for tree in trees:
        if (tree / relative).is_file():
            return tree / relative
    raise DatasetError(f'{relative} is missing under {trees[0]}; expected {layout}')


def _read_vkitti2_intrinsics(path: Path) -> dict[tuple[int, int], tuple[float, ...]]:
    """{(frame, camera id): (fx, fy, cx, cy)} from 'frame cameraID K[0,0] K[1,1] K[0,2] K[1,2]'."""
    table = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields or fields[0] == 'frame':
            continue
        try:
            table[int(fields[0]), int(fields[1])] = tuple(float(v) for v in fields[2:6])
        except (ValueError, IndexError) as err:
            raise DatasetError(f'{path} line {number}: {line!r} is not "frame cameraID fx fy '
                               'cx cy"') from err
    return table


def _read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise DatasetError(f'cannot read image {path} (missing or not an image)')
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _read_png16(path: Path) -> np.ndarray:
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None or raw.dtype != np.uint16 or raw.ndim != 2:
        raise DatasetError(f'{path} is not a single-channel 16-bit PNG depth map')
    return raw
