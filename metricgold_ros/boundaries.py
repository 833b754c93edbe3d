"""Metrics of structure: depth-boundary precision / recall / F1 against exact depth
discontinuities, and the border (edge frame) AbsRel.

Numpy and OpenCV only; the comparable pixels and the alignment are
:mod:`metricgold_ros.evaluation`'s, so these numbers mean what AbsRel there means.
"""

import dataclasses
import math
from typing import Optional, Tuple

import cv2
import numpy as np

from metricgold_ros.depth_traits import valid_depth
from metricgold_ros.errors import InputError
from metricgold_ros.evaluation import align, comparable_mask


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
    mask = comparable_mask(pred_m, gt_m, valid, positive_pred=True)
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
    mask = comparable_mask(pred_m, gt_m, valid, positive_pred=True)
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
