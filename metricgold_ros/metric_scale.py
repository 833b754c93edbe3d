"""A stream's metric-scale corrections, applied by the frame processor after the pipeline.

Two corrections, in this order:

1. **Camera-aware checkpoints** (``canonical_focal_px`` in their metadata) predict depth for a
   canonical focal length: multiplied by ``f / f_c`` (:mod:`metricgold_ros.canonical_camera`).
2. **Ground fit** (``camera_height_m`` > 0): the floor the mounting predicts gives a scale
   (metric checkpoints, smoothed over the stream by :class:`~metricgold_ros.ground.
   ScaleFilter`) or a scale and shift (relative checkpoints, per frame: a relative model
   normalises each frame on its own, so no scale carries to the next) -
   :mod:`metricgold_ros.ground`. Without a fit, metric depth keeps the model's own scale and
   relative depth stays relative (no metric outputs).

:class:`MetricScale` says what happened to a frame, for logs, ``/diagnostics`` and the
``depth/scale`` topic. Numpy only.
"""

from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

import numpy as np

from metricgold_ros.camera import Intrinsics
from metricgold_ros.canonical_camera import (ASSUMED_HFOV_DEG, canonical_focal_px,
                                             canonical_scale, processing_focal_px)
from metricgold_ros.ground import (OFF, GroundFit, Mounting, ScaleFilter, fit_ground,
                                   scale_depth)


@dataclass(frozen=True)
class MetricScale:
    """How one frame's depth got its scale.

    Attributes:
        fit: this frame's ground fit (state ``off`` without a mounting).
        scale: the ground fit's multiplier actually applied (filtered for metric
            checkpoints; 1.0 when the fit failed).
        shift_m: metres added after scaling (relative checkpoints).
        filter_event: ``start``/``track``/``outlier``/``jump`` of the scale filter, '' when
            it did not run.
        canonical_factor: ``f / f_c`` applied for a camera-aware checkpoint, else 1.0.
        focal_px: ``f``, the focal length at the processing resolution (camera-aware only).
        focal_assumed: ``f`` came from the assumed field of view (no intrinsics).
        metric: the published depth is metres (False: a relative checkpoint without a fit).
        notes: lines to log once (e.g. the assumed field of view).
    """

    fit: GroundFit
    scale: float = 1.0
    shift_m: float = 0.0
    filter_event: str = ''
    canonical_factor: float = 1.0
    focal_px: Optional[float] = None
    focal_assumed: bool = False
    metric: bool = True
    notes: Tuple[str, ...] = field(default_factory=tuple)

    @property
    def active(self) -> bool:
        """A correction is configured (mounting set, or a camera-aware checkpoint)."""
        return self.fit.state != OFF or self.focal_px is not None

    @property
    def message(self) -> str:
        """One line: the applied scale and the ground fit's state (and why, when not ok)."""
        text = f'ground fit {self.fit.state}'
        if self.fit.ok:
            text += f': scale {self.scale:.3f}'
            if self.shift_m:
                text += f', shift {self.shift_m:+.3f} m'
        elif self.fit.reason:
            text += f': {self.fit.reason}'
        if not self.metric:
            text += '; relative depth without a metric scale: no points'
        return text

    def key_values(self) -> List[Tuple[str, str]]:
        """``(key, value)`` pairs for ``diagnostic_msgs/KeyValue``."""
        pairs = [('state', self.fit.state), ('scale', f'{self.scale:.6g}'),
                 ('shift_m', f'{self.shift_m:.6g}'),
                 ('fitted_scale', f'{self.fit.scale:.6g}'),
                 ('floor_scale', f'{self.fit.floor_scale:.6g}'),
                 ('inlier_share', f'{self.fit.inlier_share:.3f}'),
                 ('confidence', f'{self.fit.confidence:.3f}'),
                 ('floor_pixels', str(self.fit.floor_pixels)),
                 ('filter', self.filter_event or '-'), ('metric', str(self.metric).lower())]
        if self.focal_px is not None:
            pairs += [('canonical_factor', f'{self.canonical_factor:.6g}'),
                      ('focal_px', f'{self.focal_px:.2f}'),
                      ('focal_assumed', str(self.focal_assumed).lower())]
        if self.fit.reason:
            pairs.append(('reason', self.fit.reason))
        return pairs


class MetricScaler:
    """Applies the corrections to the frames of one stream (it owns the scale filter)."""

    def __init__(self) -> None:
        self._filter = ScaleFilter()
        self._mounting: Optional[Mounting] = None
        self._told_assumed_focal = False

    def reset(self) -> None:
        """Forget the stream's scale (restart, seek, another camera)."""
        self._filter.reset()

    def correct(self, depth: np.ndarray, uncertainty: Optional[np.ndarray], *, relative: bool,
                camera: Optional[Intrinsics], image_size: Tuple[int, int],
                processing_resolution: int, metadata: Any, mounting: Mounting,
                use_filter: bool = True
                ) -> Tuple[np.ndarray, Optional[np.ndarray], MetricScale]:
        """Corrected ``depth`` and ``uncertainty`` (``[H,W]``, of ``camera``'s size) and why.

        Args:
            depth: the pipeline's depth: metres, or [0, 1] when ``relative``.
            uncertainty: its spread in the same units, or ``None``.
            relative: the checkpoint predicts affine-invariant depth.
            camera: intrinsics of ``depth`` (None: unknown; no ground fit then).
            image_size: ``(width, height)`` of the frame fed to the pipeline.
            processing_resolution: the longer side the networks saw (0: the frame's size).
            metadata: the checkpoint's metadata (``canonical_focal_px`` read if present).
            mounting: the camera's mounting (height 0: no ground fit).
            use_filter: smooth a metric checkpoint's scale over the stream (video).
        """
        notes: List[str] = []
        factor, focal_px, assumed = 1.0, None, False
        canonical = canonical_focal_px(metadata)
        if canonical is not None and not relative:
            focal_px, assumed = processing_focal_px(camera, *image_size, processing_resolution)
            factor = canonical_scale(metadata, focal_px)
            if assumed and not self._told_assumed_focal:
                self._told_assumed_focal = True
                notes.append(
                    f'camera-aware checkpoint (canonical focal {canonical:g} px) without '
                    f'camera intrinsics: assuming a {ASSUMED_HFOV_DEG:g} deg horizontal field '
                    f'of view (f = {focal_px:.1f} px at the processing resolution); publish '
                    'camera_info (or pass --fx/--camera-info) for the right metric scale')
            depth = depth * np.float32(factor)
            if uncertainty is not None:
                uncertainty = uncertainty * np.float32(factor)
        if mounting != self._mounting:  # a new mounting: the old scale no longer holds
            self._filter.reset()
            self._mounting = mounting
        fit = fit_ground(depth, camera, mounting, relative=relative)
        scale, shift_m, event = 1.0, 0.0, ''
        if fit.ok:
            scale, shift_m = fit.scale, fit.shift_m
            if use_filter and not relative:
                step = self._filter.update(fit.scale)
                scale, event = step.scale, step.event
            depth = scale_depth(depth, scale, shift_m)
            if uncertainty is not None:
                uncertainty = uncertainty * np.float32(scale)
        report = MetricScale(fit, scale, shift_m, event, factor, focal_px, assumed,
                             metric=not relative or fit.ok, notes=tuple(notes))
        return depth, uncertainty, report
