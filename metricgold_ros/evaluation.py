"""Depth evaluation: the standard metrics, alignment, NYUv2/KITTI protocols, folder scoring,
depth-boundary precision / recall and the border (edge frame) AbsRel.

One implementation for ``metricgold eval``, ``training/evaluate.py`` and validation during
training, so that a number printed anywhere in the project means the same thing. Numpy (and
OpenCV to read PNGs) only; all arithmetic in float64.

Per image, in the order of the reference code of BTS / Marigold: the protocol's mask (GT inside
the caps and the crop) -> optional least-squares alignment on it -> the prediction clipped to
the caps -> metrics where the prediction is finite and > 0.
"""

import dataclasses
import math
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import cv2
import numpy as np

from metricgold_ros.depth_traits import png_encoding, valid_depth
from metricgold_ros.errors import InputError

METRIC_KEYS = ('abs_rel', 'sq_rel', 'rmse', 'rmse_log', 'log10',
               'delta1', 'delta2', 'delta3', 'silog')
ALIGN_MODES = ('none', 'scale', 'scale-shift')


class NoValidPixelsError(InputError):
    """No pixel has both a valid ground truth and a valid prediction (folders skip the image)."""


def _mask(pred: np.ndarray, gt_m: np.ndarray, valid: Optional[np.ndarray],
          positive_pred: bool) -> np.ndarray:
    """[H,W] bool: GT finite and > 0, prediction finite (and > 0 if asked), and ``valid``."""
    if pred.shape != gt_m.shape:
        raise InputError(f'prediction shape {pred.shape} != ground truth shape {gt_m.shape}; '
                         'resize the prediction to the ground truth first')
    if valid is not None and valid.shape != gt_m.shape:
        raise InputError(f'valid mask shape {valid.shape} != depth shape {gt_m.shape}')
    with np.errstate(invalid='ignore'):  # NaN compares False, which is what we want
        mask = valid_depth(gt_m) & np.isfinite(pred)
        if positive_pred:
            mask &= pred > 0
    return mask if valid is None else mask & valid.astype(bool)


def depth_metrics(pred_m: np.ndarray, gt_m: np.ndarray,
                  valid: Optional[np.ndarray] = None) -> Dict[str, float]:
    """The nine standard depth metrics over valid pixels (Eigen et al. 2014, NeurIPS).

    p = ``pred_m``, g = ``gt_m`` ([H,W] metres); a pixel counts where both are finite and > 0
    and the optional [H,W] bool ``valid`` is True. Means over counted pixels:
    abs_rel = mean(|p-g|/g), sq_rel = mean((p-g)^2/g) [m], rmse = sqrt(mean((p-g)^2)) [m],
    rmse_log = sqrt(mean((ln p - ln g)^2)), log10 = mean(|log10 p - log10 g|),
    delta_k = fraction with max(p/g, g/p) < 1.25^k (strict, as in the reference code).
    silog is the KITTI depth benchmark / BTS convention: with d = ln p - ln g,
    silog = 100 * sqrt(mean(d^2) - mean(d)^2) (lambda = 1, natural log, factor 100).
    Raises InputError if the shapes differ, NoValidPixelsError (an InputError) if none counts.
    """
    pred_m, gt_m = np.asarray(pred_m, np.float64), np.asarray(gt_m, np.float64)
    mask = _mask(pred_m, gt_m, valid, positive_pred=True)
    if not mask.any():
        raise NoValidPixelsError('no valid pixels: ground truth and prediction must both be '
                                 'finite and > 0 (and inside the mask) somewhere')
    p, g = pred_m[mask], gt_m[mask]
    ratio = np.maximum(p / g, g / p)
    d = np.log(p) - np.log(g)
    return {
        'abs_rel': float(np.mean(np.abs(p - g) / g)),
        'sq_rel': float(np.mean((p - g) ** 2 / g)),
        'rmse': float(np.sqrt(np.mean((p - g) ** 2))),
        'rmse_log': float(np.sqrt(np.mean(d ** 2))),
        'log10': float(np.mean(np.abs(np.log10(p) - np.log10(g)))),
        'delta1': float(np.mean(ratio < 1.25)),
        'delta2': float(np.mean(ratio < 1.25 ** 2)),
        'delta3': float(np.mean(ratio < 1.25 ** 3)),
        # max(0, .): rounding can make the variance of a constant d a hair negative
        'silog': float(100.0 * np.sqrt(max(0.0, np.mean(d ** 2) - np.mean(d) ** 2))),
    }


def fit_alignment(pred: np.ndarray, gt: np.ndarray, valid: Optional[np.ndarray],
                  mode: str) -> Tuple[float, float]:
    """Least-squares ``(scale, shift)`` with ``scale * pred + shift ~= gt``, closed form.

    Fitted in depth space as the Marigold evaluation does (MiDaS fits the same affine model in
    disparity space), on pixels where ``valid``, GT finite and > 0 and pred finite (of any sign:
    a relative prediction may be <= 0). 'scale' minimises sum (s p - g)^2: s = sum(pg)/sum(p^2).
    'scale-shift' is linear regression of g on p: s = cov(p, g)/var(p), t = mean(g) - s mean(p).
    'none' returns (1, 0).
    """
    if mode not in ALIGN_MODES:
        raise InputError(f'align mode {mode!r} is not one of {", ".join(ALIGN_MODES)}')
    if mode == 'none':
        return 1.0, 0.0
    pred, gt = np.asarray(pred, np.float64), np.asarray(gt, np.float64)
    mask = _mask(pred, gt, valid, positive_pred=False)
    p, g = pred[mask], gt[mask]
    if mode == 'scale':
        if not np.any(p):
            raise InputError('cannot fit a scale: no valid pixel with a non-zero prediction')
        return float(np.sum(p * g) / np.sum(p * p)), 0.0
    var_p = float(np.var(p)) if p.size else 0.0
    if var_p == 0.0:
        raise InputError(f'cannot fit scale and shift: the prediction is constant on the '
                         f'{p.size} valid pixel(s)')
    scale = float(np.mean((p - p.mean()) * (g - g.mean()))) / var_p
    return scale, float(g.mean() - scale * p.mean())


def align(pred: np.ndarray, gt: np.ndarray, valid: Optional[np.ndarray],
          mode: str) -> np.ndarray:
    """``pred`` (float64) mapped by the least-squares fit of :func:`fit_alignment`."""
    scale, shift = fit_alignment(pred, gt, valid, mode)
    return np.asarray(pred, np.float64) * scale + shift


@dataclasses.dataclass(frozen=True)
class Protocol:
    """An evaluation protocol: GT depth caps (exclusive) and an optional crop.

    ``crop`` is (top, bottom, left, right): pixel indices when ``crop_shape`` (H, W) is set (the
    crop then exists only at that size), else fractions of H and W truncated with int() as the
    reference code does. The prediction is clipped to [min_depth_m, max_depth_m].
    """

    name: str
    min_depth_m: float
    max_depth_m: float
    crop: Optional[Tuple[float, float, float, float]] = None
    crop_shape: Optional[Tuple[int, int]] = None

    def crop_slices(self, shape: Tuple[int, int]) -> Tuple[slice, slice]:
        """Row and column slices of the evaluated region on an image of ``shape`` (H, W)."""
        if self.crop is None:
            return slice(None), slice(None)
        if self.crop_shape is not None and tuple(shape) != self.crop_shape:
            raise InputError(f'the {self.name} crop is defined on {self.crop_shape} images, got '
                             f'ground truth of shape {tuple(shape)}; use --protocol generic')
        height, width = (1, 1) if self.crop_shape is not None else shape
        top, bottom, left, right = self.crop
        return (slice(int(top * height), int(bottom * height)),
                slice(int(left * width), int(right * width)))


PROTOCOLS: Dict[str, Protocol] = {
    # No crop, no upper cap unless given (get_protocol); GT <= 1 mm is sensor noise.
    'generic': Protocol('generic', 1e-3, math.inf),
    # NYUv2 test split: the crop of Eigen et al. 2014 ("Depth map prediction from a single image
    # using a multi-scale deep network") on 480x640 frames, rows 45:471, cols 41:601, caps
    # 1e-3..10 m, as in the BTS, AdaBins and Marigold evaluations.
    'nyu': Protocol('nyu', 1e-3, 10.0, crop=(45, 471, 41, 601), crop_shape=(480, 640)),
    # KITTI Eigen split: the crop of Garg et al. 2016 ("Unsupervised CNN for single view depth
    # estimation: geometry to the rescue"), as fractions of the frame, caps 1e-3..80 m.
    'kitti': Protocol('kitti', 1e-3, 80.0, crop=(0.40810811, 0.99189189, 0.03594771, 0.96405229)),
}


def get_protocol(name: str, min_depth_m: Optional[float] = None,
                 max_depth_m: Optional[float] = None) -> Protocol:
    """The protocol ``name``; only 'generic' takes other caps (the others are the standard)."""
    if name not in PROTOCOLS:
        raise InputError(f'protocol {name!r} is not one of {", ".join(PROTOCOLS)}')
    proto = PROTOCOLS[name]
    if name != 'generic' and (min_depth_m is not None or max_depth_m is not None):
        raise InputError(f'the {name} protocol fixes its depth caps ({proto.min_depth_m:g}..'
                         f'{proto.max_depth_m:g} m); --min-depth/--max-depth need --protocol '
                         'generic')
    low = proto.min_depth_m if min_depth_m is None else float(min_depth_m)
    high = proto.max_depth_m if max_depth_m is None else float(max_depth_m)
    if not 0.0 <= low < high:
        raise InputError(f'depth caps must satisfy 0 <= min < max, got {low:g}..{high:g} m')
    return dataclasses.replace(proto, min_depth_m=low, max_depth_m=high)


def _as_protocol(protocol: Union[str, Protocol]) -> Protocol:
    return get_protocol(protocol) if isinstance(protocol, str) else protocol


def protocol_mask(gt_m: np.ndarray, protocol: Union[str, Protocol]) -> np.ndarray:
    """[H,W] bool: GT finite, strictly inside the protocol's caps, and inside its crop."""
    gt_m = np.asarray(gt_m, np.float64)
    proto = _as_protocol(protocol)
    rows, cols = proto.crop_slices(gt_m.shape)
    crop = np.zeros(gt_m.shape, dtype=bool)
    crop[rows, cols] = True
    with np.errstate(invalid='ignore'):
        return crop & (gt_m > proto.min_depth_m) & (gt_m < proto.max_depth_m)


@dataclasses.dataclass
class ImageResult:
    """Metrics of one image, the alignment fitted to it and the pixels it was scored on."""

    name: str
    metrics: Dict[str, float]
    valid_px: int
    missing_pred_px: int  # valid GT without a finite prediction: excluded, but counted
    scale: float = 1.0
    shift_m: float = 0.0
    notes: List[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return {'name': self.name, **self.metrics, 'valid_px': self.valid_px,
                'missing_pred_px': self.missing_pred_px, 'scale': self.scale,
                'shift_m': self.shift_m, 'notes': list(self.notes)}


def evaluate_image(pred_m: np.ndarray, gt_m: np.ndarray, protocol: Union[str, Protocol],
                   align: str = 'none', name: str = '') -> ImageResult:
    """Score one [H,W] prediction against GT (both metres) under a protocol.

    As the reference code does, a prediction <= 0 or inf is clipped to the caps and scored;
    NaN (and inf without an upper cap) is not scored but counted in ``missing_pred_px``.
    """
    proto = _as_protocol(protocol)
    pred_m, gt_m = np.asarray(pred_m, np.float64), np.asarray(gt_m, np.float64)
    gt_ok = protocol_mask(gt_m, proto)
    scale, shift_m = fit_alignment(pred_m, gt_m, gt_ok, align)
    pred_m = np.clip(pred_m * scale + shift_m, proto.min_depth_m, proto.max_depth_m)
    mask = _mask(pred_m, gt_m, gt_ok, positive_pred=True)
    if not mask.any():
        raise NoValidPixelsError(f'{gt_ok.sum()} pixel(s) of valid ground truth under the '
                                 f'{proto.name} protocol, none with a usable prediction')
    return ImageResult(name, depth_metrics(pred_m, gt_m, mask), int(mask.sum()),
                       int(gt_ok.sum() - mask.sum()), scale, shift_m)


@dataclasses.dataclass
class EvalReport:
    """Per-image results; ``mean`` is the unweighted mean over images of each metric."""

    protocol: str
    align: str
    per_image: List[ImageResult]
    skipped: List[Tuple[str, str]] = dataclasses.field(default_factory=list)  # (name, why)

    @property
    def count(self) -> int:
        return len(self.per_image)

    @property
    def mean(self) -> Dict[str, float]:
        return {k: float(np.mean([r.metrics[k] for r in self.per_image])) for k in METRIC_KEYS}

    def to_json(self) -> dict:
        """A JSON-ready dict: mean, per_image, protocol, align, count, skipped."""
        return {'mean': self.mean, 'per_image': [r.to_dict() for r in self.per_image],
                'protocol': self.protocol, 'align': self.align, 'count': self.count,
                'skipped': [{'name': n, 'reason': why} for n, why in self.skipped]}


def read_depth_png(path: Path, units_per_m: float) -> np.ndarray:
    """[H,W] float64 metres from a 1-channel 16-bit PNG (value / units_per_m; 0 -> NaN)."""
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None or raw.dtype != np.uint16 or raw.ndim != 2:
        what = 'unreadable' if raw is None else f'{raw.dtype} with shape {raw.shape}'
        raise InputError(f'{path}: depth PNG must be 1-channel 16-bit, got {what}')
    return png_encoding(units_per_m).decode(raw, np.float64)


def read_pred(path: Path) -> np.ndarray:
    """[H,W] float64 metres from ``.npy`` (metres) or a 16-bit PNG (millimetres, 0 invalid)."""
    if path.suffix != '.npy':
        return read_depth_png(path, 1000.0)
    try:
        depth_m = np.squeeze(np.load(path, allow_pickle=False)).astype(np.float64)
    except (OSError, ValueError) as err:
        raise InputError(f'{path}: cannot read prediction: {err}') from err
    if depth_m.ndim != 2:
        raise InputError(f'{path}: prediction must be [H,W] metres, got shape {depth_m.shape}')
    return depth_m


def evaluate_folder(pred_dir: Union[str, Path], gt_dir: Union[str, Path], gt_scale: float,
                    protocol: Union[str, Protocol] = 'generic',
                    align: str = 'none') -> EvalReport:
    """Score every 16-bit GT PNG under ``gt_dir`` (recursively; metres = value / gt_scale).

    The prediction of ``gt_dir/a/b.png`` is ``pred_dir/a/b.npy`` (float metres, preferred) or
    ``pred_dir/a/b.png`` (16-bit millimetres). A prediction of another size is resized to the
    GT's with nearest-neighbour (it never blends depths across an edge), with a note. Images
    without a single valid pixel are skipped and listed in ``report.skipped``.
    """
    proto, pred_dir, gt_dir = _as_protocol(protocol), Path(pred_dir), Path(gt_dir)
    if not gt_scale > 0:
        raise InputError(f'gt_scale must be > 0 (GT PNG units per metre), got {gt_scale}')
    for label, folder in (('prediction', pred_dir), ('ground truth', gt_dir)):
        if not folder.is_dir():
            raise InputError(f'{label} folder {folder} does not exist')
    gt_paths = sorted(gt_dir.rglob('*.png'))
    if not gt_paths:
        raise InputError(f'no .png ground truth found under {gt_dir}')
    pairs, missing = [], []
    for gt_path in gt_paths:
        stem = gt_path.relative_to(gt_dir).with_suffix('')
        found = [pred_dir / stem.with_suffix(ext) for ext in ('.npy', '.png')
                 if (pred_dir / stem.with_suffix(ext)).is_file()]
        if found:
            pairs.append((stem.as_posix(), found[0], gt_path))
        else:
            missing.append(stem.as_posix())
    if missing:
        more = ', ...' if len(missing) > 5 else ''
        raise InputError(f'{len(missing)} of {len(gt_paths)} ground-truth images have no '
                         f'prediction (.npy or .png) under {pred_dir}: '
                         f'{", ".join(missing[:5])}{more}')
    report = EvalReport(proto.name, align, [])
    for name, pred_path, gt_path in pairs:
        gt_m, pred_m, notes = read_depth_png(gt_path, gt_scale), read_pred(pred_path), []
        if pred_m.shape != gt_m.shape:
            notes.append(f'prediction resized {pred_m.shape[0]}x{pred_m.shape[1]} -> '
                         f'{gt_m.shape[0]}x{gt_m.shape[1]} (nearest)')
            pred_m = cv2.resize(pred_m, gt_m.shape[::-1], interpolation=cv2.INTER_NEAREST)
        try:
            result = evaluate_image(pred_m, gt_m, proto, align, name)
        except NoValidPixelsError as err:
            report.skipped.append((name, str(err)))
            continue
        except InputError as err:
            raise InputError(f'{name}: {err}') from err
        result.notes.extend(notes)
        report.per_image.append(result)
    if not report.per_image:
        raise NoValidPixelsError(f'no image has a valid pixel; {report.skipped[0][0]}: '
                                 f'{report.skipped[0][1]}')
    return report


@dataclasses.dataclass
class BoundaryCounts:
    """Depth-boundary pixels of predictions and ground truth, and how many of each matched.

    Counts add up over images (``a + b``), so a split's precision and recall are pooled over
    its boundary pixels (images without boundaries weigh nothing). ``precision`` is the share
    of predicted boundary pixels within the tolerance of a true one, ``recall`` the share of
    true boundary pixels within the tolerance of a predicted one; each is 0 without pixels.
    """

    pred_px: int = 0
    pred_matched_px: int = 0
    gt_px: int = 0
    gt_matched_px: int = 0

    def __add__(self, other: 'BoundaryCounts') -> 'BoundaryCounts':
        return BoundaryCounts(*(a + b for a, b in zip(dataclasses.astuple(self),
                                                      dataclasses.astuple(other))))

    @property
    def precision(self) -> float:
        return self.pred_matched_px / self.pred_px if self.pred_px else 0.0

    @property
    def recall(self) -> float:
        return self.gt_matched_px / self.gt_px if self.gt_px else 0.0

    @property
    def f1(self) -> float:
        total = self.precision + self.recall
        return 2.0 * self.precision * self.recall / total if total else 0.0


def depth_boundaries(depth_m: np.ndarray, valid: np.ndarray, jump: float = 0.10,
                     baseline_px: int = 1, steps_only: bool = False) -> np.ndarray:
    """[H,W] bool: the near side of every depth discontinuity of more than ``jump``.

    Two pixels ``baseline_px`` apart in a row or a column, both ``valid``, whose depths differ
    by a ratio > 1 + ``jump`` make a boundary; the nearer of the two (the occluding side) is
    marked. With ``baseline_px`` 1 (exact depth) a box's outline is a one-pixel line on the
    box; a larger baseline also finds a jump that an upscaled prediction spreads over
    ``baseline_px`` pixels. ``steps_only``: the jump must also be more than twice the change
    (in log depth) over the ``baseline_px`` pixels before it and after it, so that a step
    counts and a steep but smooth slope (a floor, a wall seen at a grazing angle) does not.
    """
    depth_m = np.asarray(depth_m, np.float64)
    valid = np.asarray(valid, bool) & valid_depth(depth_m)
    if baseline_px < 1:
        raise InputError(f'baseline_px={baseline_px} must be >= 1')
    log_d = np.log(np.where(valid, depth_m, 1.0))
    edges = np.zeros(depth_m.shape, bool)
    k = baseline_px
    for transpose in (False, True):  # rows, then columns (on transposed views)
        g, v, e = (log_d.T, valid.T, edges.T) if transpose else (log_d, valid, edges)
        change = np.where(v[:-k] & v[k:], g[k:] - g[:-k], 0.0)  # pair (i, i+k)
        size = np.abs(change)
        step = size > math.log1p(jump)
        if steps_only:
            around = np.zeros(size.shape)
            around[k:] = size[:-k]  # the pair (i-k, i)
            around[:-k] = np.maximum(around[:-k], size[k:])  # the pair (i+k, i+2k)
            step &= size > 2.0 * around
        e[:-k] |= step & (change > 0)
        e[k:] |= step & (change < 0)
    return edges


def plane_jumps(depth_m: np.ndarray, valid: np.ndarray, jump: float = 0.10) -> np.ndarray:
    """[H,W] bool: neighbours that differ by more than ``jump`` on one plane of exact depth.

    A floor near the horizon grows by more than 10 % a row without any edge. A plane's
    inverse depth is linear in the pixel coordinates, so a pair of 4-neighbours whose
    inverse-depth step equals (to 1e-3) that of the next pair on either side lies on one
    plane; both of its pixels are marked. Only for exact piecewise-planar depth (the synthetic
    generator's).
    """
    depth_m = np.asarray(depth_m, np.float64)
    valid = np.asarray(valid, bool) & valid_depth(depth_m)
    inverse = 1.0 / np.where(valid, depth_m, 1.0)
    marked = np.zeros(depth_m.shape, bool)
    for transpose in (False, True):
        q, v, out = (inverse.T, valid.T, marked.T) if transpose else (inverse, valid, marked)
        both = v[:-1] & v[1:]  # pair (i, i+1), [H-1,W]
        step = q[1:] - q[:-1]
        big = both & (np.maximum(q[1:], q[:-1]) > (1.0 + jump) * np.minimum(q[1:], q[:-1]))
        close = (np.abs(step[1:] - step[:-1]) <= 1e-3 * np.abs(step[1:]) + 1e-9 * q[1:-1]) \
            & both[1:] & both[:-1]  # pairs k and k+1 continue one plane, [H-2,W]
        same = np.zeros(step.shape, bool)
        same[1:] |= close
        same[:-1] |= close
        pair = big & same
        out[:-1] |= pair
        out[1:] |= pair
    return marked


def boundary_counts(pred_m: np.ndarray, gt_m: np.ndarray, valid: Optional[np.ndarray] = None,
                    jump: float = 0.10, tolerance_px: int = 2, baseline_px: int = 1,
                    planar_gt: bool = False) -> BoundaryCounts:
    """Depth-boundary precision / recall counts of one [H,W] prediction against GT (metres).

    The GT's boundaries are :func:`depth_boundaries` of its exact depth (one-pixel lines),
    the prediction's its steps (``steps_only``) at ``baseline_px``, both with the same ``jump`` and
    only where the GT is valid (and ``valid``, if given): a sky edge, whose depth the GT
    does not have, counts neither way. A boundary pixel matches when one of the other map's
    lies within ``tolerance_px`` (chessboard distance), as in edge-detection benchmarks.
    ``planar_gt``: the GT is exact piecewise-planar depth (the synthetic generator's); the
    pixels of its :func:`plane_jumps`, and ``baseline_px`` around them, count neither way.
    With ``baseline_px`` 1 the GT scored against itself has precision and recall 1 (unless a
    jump sits beside a change of half its size).
    """
    pred_m, gt_m = np.asarray(pred_m, np.float64), np.asarray(gt_m, np.float64)
    mask = _mask(pred_m, gt_m, valid, positive_pred=True)
    if tolerance_px < 0:
        raise InputError(f'tolerance_px={tolerance_px} must be >= 0')
    if planar_gt:
        ignore = plane_jumps(gt_m, mask, jump).astype(np.uint8)
        mask &= ~cv2.dilate(ignore, np.ones((2 * baseline_px - 1,) * 2, np.uint8)).astype(bool)
    pred_edges = depth_boundaries(pred_m, mask, jump, baseline_px, steps_only=True)
    gt_edges = depth_boundaries(gt_m, mask, jump)
    kernel = np.ones((2 * tolerance_px + 1,) * 2, np.uint8)
    near_gt = cv2.dilate(gt_edges.astype(np.uint8), kernel).astype(bool)
    near_pred = cv2.dilate(pred_edges.astype(np.uint8), kernel).astype(bool)
    return BoundaryCounts(int(pred_edges.sum()), int((pred_edges & near_gt).sum()),
                          int(gt_edges.sum()), int((gt_edges & near_pred).sum()))


def border_abs_rel(pred_m: np.ndarray, gt_m: np.ndarray, valid: Optional[np.ndarray] = None,
                   band_px: int = 4, align_mode: str = 'none') -> Tuple[float, float]:
    """``(border, centre)`` AbsRel of one [H,W] prediction: the edge frame's size.

    ``border``: the pixels within ``band_px`` of the image's edge; ``centre``: the middle
    half of each side (rows H/4..3H/4, columns W/4..3W/4). On a scene of one depth (a wall
    seen square on) a model without a border artefact scores both alike. ``align_mode``
    ('scale'): the prediction is first fitted to the GT (:func:`fit_alignment`), so that an
    error of the whole image's scale, which both regions share, does not hide the band. NaN
    for a region without a valid pixel.
    """
    pred_m, gt_m = np.asarray(pred_m, np.float64), np.asarray(gt_m, np.float64)
    pred_m = align(pred_m, gt_m, valid, align_mode)
    mask = _mask(pred_m, gt_m, valid, positive_pred=True)
    height, width = gt_m.shape
    if not 0 < 2 * band_px < min(height, width):
        raise InputError(f'band_px={band_px} must be > 0 and under half of the image\'s '
                         f'shorter side ({min(height, width)} px)')
    border = np.ones(gt_m.shape, bool)
    border[band_px:height - band_px, band_px:width - band_px] = False
    centre = np.zeros(gt_m.shape, bool)
    centre[height // 4:height - height // 4, width // 4:width - width // 4] = True
    error = np.abs(pred_m - gt_m) / np.where(mask, gt_m, 1.0)
    return tuple(float(error[region & mask].mean()) if (region & mask).any() else math.nan
                 for region in (border, centre))


def format_table(report: EvalReport, per_image: bool = False) -> str:
    """A fixed-width text table: a header, per-image rows if asked, the mean, skips and notes."""
    rows = [(r.name, r.metrics) for r in report.per_image] if per_image else []
    width = max([len(name) for name, _ in rows] + [8])
    lines = [f'protocol={report.protocol} align={report.align} images={report.count} '
             '(mean = mean over images)',
             ' '.join([f'{"image":<{width}}'] + [f'{k:>9}' for k in METRIC_KEYS])]
    for label, metrics in rows + [('mean', report.mean)]:
        lines.append(' '.join([f'{label:<{width}}'] + [f'{metrics[k]:>9.4f}'
                                                       for k in METRIC_KEYS]))
    lines.extend(f'skipped {name}: {why}' for name, why in report.skipped)
    notes = [f'{r.name}: {note}' for r in report.per_image for note in r.notes]
    if notes:
        lines.append(f'{len(notes)} note(s), first: {notes[0]}')
    return '\n'.join(lines)
