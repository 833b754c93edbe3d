"""Metric scale from the camera's mounting: fit the predicted depth to the floor it must see.

A camera mounted ``height_m`` above a level floor, tilted by a known pitch and roll, sees the
floor at a depth fixed by geometry: the ray of pixel (u, v), ``r = ((u-cx)/fx, (v-cy)/fy, 1)``
in the optical frame (x right, y down, z forward), meets the floor at planar depth
``z = height_m / (g . r)`` where ``g`` is the unit gravity ("down") vector in the optical frame
and ``g . r > 0``. Where the prediction agrees with that plane it sees the floor; a robust fit
over the pixels whose ray meets the floor within range gives:

* metric checkpoints: one scale ``s`` (``depth_m = s * depth``), fitted in log space (the
  mode of ``log z_floor - log depth`` over the candidates, refined by the inliers' median). The
  model's own scale is a second estimate, so the floor's moves it only as far as the fit's
  confidence ``c`` goes: ``s = s_floor ** c`` (log-space weights ``c`` and ``1 - c``). On the
  ground-fit bench's tuning split this beat applying ``s_floor`` whole for both a camera-aware
  and a camera-unaware model (BENCHMARKS.md, section 13);
* relative checkpoints: a scale and a shift (``depth_m = s * depth + shift_m``). Marigold v1 is
  affine-invariant **depth** (not inverse depth: diffusers' ``MarigoldDepthPipeline`` aligns
  ``scale * depth + shift``), so the affine applies to depth; RANSAC over pairs of pixels, then
  least squares of the relative error on the inliers.

Objects on the floor (nearer than the floor behind them), walls and furniture are outliers;
an inlier is a pixel whose fitted depth is within ``inlier_log_tol`` of the floor in log
depth. :class:`ScaleFilter` smooths the scale of a video stream in log space, rejects single
outliers and jumps, without an exponential lag, to a new scale that several frames confirm.

Conventions of the mounting (REP 103 angles of the camera body, applied in this order):
``pitch_deg`` turns the optical axis about the camera's x axis, positive **down** towards the
floor (0: level, 90: straight down); ``roll_deg`` then turns the camera about its optical axis,
positive when its right side (+x) dips. With both 0 the image rows are level and ``g = (0, 1,
0)``; in general ``g = (sin roll cos pitch, cos roll cos pitch, sin pitch)``.

Numpy only: used by the frame processor (node, bag tool, infer) and the ground-fit bench.
"""

import math
import numbers
from dataclasses import dataclass, replace
from typing import List, Optional, Tuple

import numpy as np

from metricgold_ros.camera import Intrinsics
from metricgold_ros.errors import InputError

# States of a fit (also the `state` reported on /diagnostics and depth/scale).
OFF = 'off'  # no mounting (camera_height_m = 0)
NO_CAMERA = 'no_camera_info'  # no intrinsics: the floor's depth is unknown
NO_FLOOR = 'no_floor'  # too few pixels whose ray meets the floor within range
POOR_FIT = 'poor_fit'  # the prediction does not contain the floor plane (share, scale)
OK = 'ok'
FIT_STATES = (OFF, NO_CAMERA, NO_FLOOR, POOR_FIT, OK)


@dataclass(frozen=True)
class Mounting:
    """Where the camera sits above a level floor (see the module docstring for the angles).

    Attributes:
        height_m: optical centre above the floor, metres; 0 turns the ground fit off.
        pitch_deg: optical axis below the horizon, degrees in [-90, 90] (positive: down).
        roll_deg: turn about the optical axis, degrees in [-180, 180] (positive: right side
            down).
    """

    height_m: float = 0.0
    pitch_deg: float = 0.0
    roll_deg: float = 0.0

    def __post_init__(self) -> None:
        """Refuse mountings that describe no camera (negative height, pitch past vertical)."""
        checks = (('camera_height_m', self.height_m, 0.0, 1000.0, 'metres above the floor, '
                   '0 = off'),
                  ('camera_pitch_deg', self.pitch_deg, -90.0, 90.0, 'degrees, positive looks '
                   'down'),
                  ('camera_roll_deg', self.roll_deg, -180.0, 180.0, 'degrees, positive: the '
                   'right side dips'))
        for name, value, low, high, meaning in checks:
            if not (isinstance(value, numbers.Real) and not isinstance(value, bool)
                    and math.isfinite(value) and low <= value <= high):
                raise InputError(f'{name}={value!r} must be a number in [{low:g}, {high:g}] '
                                 f'({meaning}); measure the mounting or set 0 to turn it off')

    @property
    def enabled(self) -> bool:
        """True when a height is set: the ground fit runs."""
        return self.height_m > 0.0

    def down_vector(self) -> np.ndarray:
        """``[3]`` unit vector of gravity in the camera's optical frame (x right, y down)."""
        pitch, roll = math.radians(self.pitch_deg), math.radians(self.roll_deg)
        return np.array([math.sin(roll) * math.cos(pitch), math.cos(roll) * math.cos(pitch),
                         math.sin(pitch)])


@dataclass(frozen=True)
class GroundFitSettings:
    """Tuning of :func:`fit_ground` (defaults chosen on the synthetic bench, ``BENCHMARKS.md``).

    Attributes:
        min_depression_deg: only rays at least this far below the horizon are used: on a
            grazing ray a pitch error of e degrees moves the floor's depth by about
            ``e / tan(depression)`` (at 10 degrees, 10 % per degree). The floor is then used
            up to ``height / tan(min_depression)`` (8.5 m for a camera 1.5 m up).
        max_range_m: floor pixels farther than this are not used either.
        inlier_log_tol: an inlier's fitted depth is within this of the floor in natural log
            depth (0.1: about 10 %).
        min_floor_fraction: share of the sampled pixels whose ray must meet the floor within
            range, else the state is ``no_floor``.
        min_inlier_share: share of those candidates that must agree with the fit, else
            ``poor_fit``.
        min_floor_span_log: the inliers' floor depths (5th to 95th percentile) must span at
            least this in natural log depth (0.3: a ratio of 1.35), else ``poor_fit``: a wall
            or an object facing the camera matches the floor only in a narrow band of
            distances, a floor matches across its depth.
        max_scale_correction: metric checkpoints: a fitted scale outside ``[1/x, x]`` is taken
            for a wrong fit (``poor_fit``), not a model that far off.
        max_pixels: pixels sampled (a regular grid) for the fit: bounds its cost per frame.
        ransac_iterations: pixel pairs tried for a relative checkpoint's scale and shift.
    """

    min_depression_deg: float = 12.0
    max_range_m: float = 30.0
    inlier_log_tol: float = 0.1
    min_floor_fraction: float = 0.03
    min_inlier_share: float = 0.25
    min_floor_span_log: float = 0.3
    max_scale_correction: float = 2.0
    max_pixels: int = 12000
    ransac_iterations: int = 200


@dataclass(frozen=True)
class GroundFit:
    """Result of one frame's fit: ``depth_m = scale * depth + shift_m`` when ``ok``.

    Attributes:
        state: one of ``FIT_STATES``; only ``ok`` carries a usable scale.
        scale: multiplies the prediction (1.0 unless ``ok``): for metric checkpoints
            ``floor_scale ** confidence``, for relative ones ``floor_scale``.
        shift_m: metres added after scaling (relative checkpoints; 0.0 for metric ones).
        inlier_share: inliers / candidate floor pixels, in [0, 1] (0 without candidates).
        confidence: ``inlier_share * min(1, inliers / (10 % of the sampled pixels))``, in
            [0, 1]: high when much of the image is floor and agrees with the plane.
        floor_pixels: candidate floor pixels (sampled grid) the fit used.
        reason: one line for logs and diagnostics, empty when ``ok``.
        floor_scale: the scale the floor alone gives (also when the fit was refused).
    """

    state: str
    scale: float = 1.0
    shift_m: float = 0.0
    inlier_share: float = 0.0
    confidence: float = 0.0
    floor_pixels: int = 0
    reason: str = ''
    floor_scale: float = 1.0

    @property
    def ok(self) -> bool:
        return self.state == OK

    def apply(self, depth: np.ndarray) -> np.ndarray:
        """``scale * depth + shift_m`` (see :func:`scale_depth`)."""
        return scale_depth(depth, self.scale, self.shift_m)


def scale_depth(depth: np.ndarray, scale: float, shift_m: float = 0.0) -> np.ndarray:
    """``scale * depth + shift_m`` as a new float32 array; with a shift, results <= 0 are NaN."""
    out = np.asarray(depth, np.float32) * np.float32(scale)
    if shift_m:
        out += np.float32(shift_m)
        out[~(out > 0)] = np.nan
    return out


def floor_depth_m(camera: Intrinsics, mounting: Mounting, max_range_m: float = math.inf,
                  stride: int = 1, min_depression_deg: float = 0.0) -> np.ndarray:
    """Planar depth (metres) at which each pixel's ray meets the floor; NaN where it does not.

    Args:
        camera: intrinsics of the image the depth belongs to.
        mounting: the camera's height and tilt; must be ``enabled``.
        max_range_m: farther floor points become NaN too.
        stride: every ``stride``-th pixel in both directions (``[::stride, ::stride]``).
        min_depression_deg: rays less than this below the horizon become NaN too.

    Returns:
        ``[ceil(H/stride), ceil(W/stride)]`` float64 planar depth z (not ray length).
    """
    if not mounting.enabled:
        raise InputError(f'camera_height_m={mounting.height_m}: the floor is only known for a '
                         'height > 0; set camera_height_m')
    down = mounting.down_vector()
    cols = (np.arange(0, camera.width, stride) - camera.cx_px) / camera.fx_px  # [W']
    rows = (np.arange(0, camera.height, stride) - camera.cy_px) / camera.fy_px  # [H']
    along = down[0] * cols[None, :] + down[1] * rows[:, None] + down[2]  # g . r, [H',W']
    length = np.sqrt(cols[None, :] ** 2 + rows[:, None] ** 2 + 1.0)  # |r|
    with np.errstate(divide='ignore', invalid='ignore'):
        depth = mounting.height_m / along
    steep = along > max(0.0, math.sin(math.radians(min_depression_deg))) * length
    depth[~(steep & (depth <= max_range_m))] = np.nan
    return depth


def fit_ground(depth: np.ndarray, camera: Optional[Intrinsics], mounting: Mounting, *,
               relative: bool, settings: GroundFitSettings = GroundFitSettings()) -> GroundFit:
    """Fit the prediction ``depth`` ``[H,W]`` to the floor that ``mounting`` predicts.

    Args:
        depth: metres (metric checkpoints) or affine-invariant depth in [0, 1] (relative);
            non-finite or non-positive (metric) values are ignored.
        camera: intrinsics of ``depth`` (same size), or ``None`` (state ``no_camera_info``).
        mounting: the camera's mounting; height 0 gives state ``off``.
        relative: fit scale and shift (relative checkpoints) instead of a scale alone.
        settings: thresholds, see :class:`GroundFitSettings`.

    Returns:
        A :class:`GroundFit`; never raises for a bad frame, only for a size mismatch.
    """
    if not mounting.enabled:
        return GroundFit(OFF, reason='camera_height_m is 0: no mounting, no ground fit')
    if camera is None:
        return GroundFit(NO_CAMERA, reason='no camera_info: the floor\'s depth needs the '
                         'intrinsics')
    depth = np.asarray(depth)
    if depth.shape != (camera.height, camera.width):
        raise InputError(f'depth is {depth.shape[1]}x{depth.shape[0]} but the intrinsics are '
                         f'for {camera.width}x{camera.height}; pass the depth image\'s camera')
    stride = max(1, math.ceil(math.sqrt(depth.size / settings.max_pixels)))
    floor = floor_depth_m(camera, mounting, settings.max_range_m, stride,
                          settings.min_depression_deg)
    pred = depth[::stride, ::stride].astype(np.float64)
    with np.errstate(invalid='ignore'):
        usable = np.isfinite(floor) & np.isfinite(pred) & ((pred > 0) | relative)
    sampled = pred.size
    z_floor, pred = floor[usable], pred[usable]
    if z_floor.size < max(8, settings.min_floor_fraction * sampled):
        return GroundFit(NO_FLOOR, floor_pixels=int(z_floor.size), reason=(
            f'the floor is not in view: {z_floor.size} of {sampled} sampled pixels look at '
            f'it from {settings.min_depression_deg:g} deg or more below the horizon (check '
            'camera_pitch_deg)'))
    if relative:
        scale, shift_m, inliers = _fit_scale_shift(pred, z_floor, settings)
    else:
        scale, shift_m = _fit_scale(pred, z_floor, settings), 0.0
        inliers = _inliers(scale * pred, z_floor, settings.inlier_log_tol)
    count = int(inliers.sum())
    share = count / z_floor.size
    confidence = share * min(1.0, count / (0.1 * sampled))
    fit = GroundFit(OK, scale, shift_m, share, confidence, int(z_floor.size), floor_scale=scale)
    if share < settings.min_inlier_share:
        return _failed(fit, f'the prediction does not hold the floor plane: {share:.0%} of '
                       f'{z_floor.size} floor pixels agree (< {settings.min_inlier_share:.0%}); '
                       'an object or wall hides the floor, or the mounting is wrong')
    span = float(np.diff(np.percentile(np.log(z_floor[inliers]), [5, 95]))[0]) if count else 0.0
    if span < settings.min_floor_span_log:
        return _failed(fit, f'the floor pixels that agree span only {math.exp(span):.2f}x in '
                       f'depth (< {math.exp(settings.min_floor_span_log):.2f}x): a wall or an '
                       'object, not the floor')
    if not relative and not (1 / settings.max_scale_correction <= scale
                             <= settings.max_scale_correction):
        return _failed(fit, f'fitted scale {scale:.3g} is outside '
                       f'[1/{settings.max_scale_correction:g}, '
                       f'{settings.max_scale_correction:g}]: taken for a wrong fit')
    if relative and not (scale > 0 and scale * float(np.min(pred)) + shift_m > 0):
        return _failed(fit, f'fitted scale {scale:.3g} / shift {shift_m:.3g} m would give '
                       'non-positive depth')
    return fit if relative else replace(fit, scale=float(scale ** confidence))


def _failed(fit: GroundFit, reason: str) -> GroundFit:
    """``fit``'s statistics with state ``poor_fit``, scale 1 and no shift."""
    return GroundFit(POOR_FIT, 1.0, 0.0, fit.inlier_share, fit.confidence, fit.floor_pixels,
                     reason, fit.floor_scale)


def _inliers(fitted: np.ndarray, z_floor: np.ndarray, tol: float) -> np.ndarray:
    """Where ``fitted`` is within ``exp(+-tol)`` of ``z_floor`` (no logs: a ratio test)."""
    ratio = fitted / z_floor
    return (ratio >= math.exp(-tol)) & (ratio <= math.exp(tol))


def _fit_scale(pred_m: np.ndarray, z_floor: np.ndarray, settings: GroundFitSettings) -> float:
    """Scale s with ``s * pred ~ z_floor`` on most pixels: the densest window of log ratios."""
    log_ratio = np.sort(np.log(z_floor) - np.log(pred_m))
    tol = settings.inlier_log_tol
    ends = np.searchsorted(log_ratio, log_ratio + 2 * tol, side='right')
    start = int(np.argmax(ends - np.arange(log_ratio.size)))  # window [r_i, r_i + 2 tol]
    centre = float(np.median(log_ratio[start:ends[start]]))
    for _ in range(2):  # re-centre the window on its inliers' median
        inliers = log_ratio[np.abs(log_ratio - centre) <= tol]
        centre = float(np.median(inliers))
    return math.exp(centre)


def _fit_scale_shift(pred: np.ndarray, z_floor: np.ndarray, settings: GroundFitSettings
                     ) -> Tuple[float, float, np.ndarray]:
    """(scale, shift_m, inlier mask) with ``scale * pred + shift ~ z_floor``: RANSAC + LSQ.

    Pairs of pixels give hypotheses (deterministic: a fixed seed); the one with the most
    inliers is refined by least squares of the relative error ``(s p + b) / z - 1`` on its
    inliers, twice.
    """
    rng = np.random.default_rng(0)
    n = pred.size
    first = rng.integers(0, n, settings.ransac_iterations)
    second = rng.integers(0, n, settings.ransac_iterations)
    dp = pred[first] - pred[second]
    keep = np.abs(dp) > 1e-6
    scale = (z_floor[first] - z_floor[second])[keep] / dp[keep]  # [K]
    shift = z_floor[first][keep] - scale * pred[first][keep]
    best_scale, best_shift = 1.0, 0.0
    best = np.zeros(n, bool)
    low, high = math.exp(-settings.inlier_log_tol), math.exp(settings.inlier_log_tol)
    for chunk in range(0, scale.size, 50):  # [50,N] at a time bounds the memory
        s, b = scale[chunk:chunk + 50, None], shift[chunk:chunk + 50, None]
        ratio = (s * pred[None, :] + b) / z_floor[None, :]
        counts = ((ratio >= low) & (ratio <= high) & (s > 0)).sum(axis=1)
        i = int(np.argmax(counts))
        if counts[i] > best.sum():
            best_scale, best_shift = float(s[i, 0]), float(b[i, 0])
            best = _inliers(best_scale * pred + best_shift, z_floor, settings.inlier_log_tol)
    for _ in range(2):
        if best.sum() < 2:
            break
        best_scale, best_shift = _least_abs_relative(pred[best], z_floor[best],
                                                     best_scale, best_shift)
        best = _inliers(best_scale * pred + best_shift, z_floor, settings.inlier_log_tol)
    return best_scale, best_shift, best


def _least_abs_relative(pred: np.ndarray, z_floor: np.ndarray, scale: float, shift: float,
                        iterations: int = 20) -> Tuple[float, float]:
    """(s, b) minimising ``sum |(s p + b) / z - 1|`` by IRLS from (scale, shift).

    The L1 counterpart of the metric fit's median: exact when most inliers are exact, and
    objects standing on the floor (just off the plane, still inliers) do not pull it.
    """
    design = np.stack([pred / z_floor, 1.0 / z_floor], axis=1)  # rows . (s, b) = 1
    for _ in range(iterations):
        residual = np.abs(design @ np.array([scale, shift]) - 1.0)
        weight = np.sqrt(1.0 / np.maximum(residual, 1e-7))
        (scale, shift), *_ = np.linalg.lstsq(design * weight[:, None], weight, rcond=None)
    return float(scale), float(shift)


@dataclass(frozen=True)
class FilterStep:
    """What :meth:`ScaleFilter.update` did: the scale to apply and why.

    ``event`` is ``start`` (first measurement), ``track`` (within the gate, smoothed),
    ``outlier`` (outside the gate, rejected: the previous estimate is applied), ``jump``
    (``confirm_frames`` consecutive agreeing measurements outside the gate: the estimate moves
    to them at once).
    """

    scale: float
    event: str


class ScaleFilter:
    """Temporal filter of a video stream's metric scale, in log space.

    A measurement within ``gate_log`` of the estimate moves it by ``smoothing`` of the
    difference (an exponential average: frame-to-frame jitter shrinks by about
    ``sqrt(smoothing / (2 - smoothing))``). One outside is rejected as an outlier; when
    ``confirm_frames`` consecutive measurements lie outside the gate and within ``gate_log``
    of their own median, the scene changed: the estimate jumps to that median (a delay of
    ``confirm_frames - 1`` frames, no exponential tail).
    """

    def __init__(self, smoothing: float = 0.3, gate_log: float = 0.25,
                 confirm_frames: int = 3) -> None:
        if not 0.0 < smoothing <= 1.0:
            raise InputError(f'smoothing={smoothing!r} must be in (0, 1] (1: no smoothing)')
        if not gate_log > 0.0:
            raise InputError(f'gate_log={gate_log!r} must be > 0 (natural log of the scale)')
        if not (isinstance(confirm_frames, int) and confirm_frames >= 1):
            raise InputError(f'confirm_frames={confirm_frames!r} must be an integer >= 1')
        self.smoothing = smoothing
        self.gate_log = gate_log
        self.confirm_frames = confirm_frames
        self._log_scale: Optional[float] = None
        self._pending: List[float] = []

    @property
    def scale(self) -> Optional[float]:
        """The current estimate, ``None`` before the first measurement."""
        return None if self._log_scale is None else math.exp(self._log_scale)

    def reset(self) -> None:
        """Forget the estimate (stream restarted, the camera was moved)."""
        self._log_scale = None
        self._pending = []

    def update(self, scale: float) -> FilterStep:
        """Take one frame's fitted scale (> 0); return the scale to apply to that frame."""
        value = math.log(scale)
        if self._log_scale is None:
            self._log_scale = value
            return FilterStep(scale, 'start')
        if abs(value - self._log_scale) <= self.gate_log:
            self._pending = []
            self._log_scale += self.smoothing * (value - self._log_scale)
            return FilterStep(math.exp(self._log_scale), 'track')
        self._pending.append(value)
        del self._pending[:-self.confirm_frames]  # only the last few count: bounded state
        if len(self._pending) >= self.confirm_frames:
            recent = self._pending[-self.confirm_frames:]
            centre = float(np.median(recent))
            if all(abs(v - centre) <= self.gate_log for v in recent):
                self._log_scale, self._pending = centre, []
                return FilterStep(math.exp(centre), 'jump')
        return FilterStep(math.exp(self._log_scale), 'outlier')
