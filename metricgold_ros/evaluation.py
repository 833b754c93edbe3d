"""Depth evaluation: the standard metrics, alignment, NYUv2/KITTI protocols, folder scoring.
(Metrics of structure, depth boundaries and the border band: :mod:`metricgold_ros.boundaries`.)

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


def comparable_mask(pred: np.ndarray, gt_m: np.ndarray, valid: Optional[np.ndarray],
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
    mask = comparable_mask(pred_m, gt_m, valid, positive_pred=True)
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
    mask = comparable_mask(pred, gt, valid, positive_pred=False)
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
    mask = comparable_mask(pred_m, gt_m, gt_ok, positive_pred=True)
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
