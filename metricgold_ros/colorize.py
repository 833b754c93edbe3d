"""Depth to a false-colour BGR image for humans (rviz, previews, the demo)."""

import math
from functools import lru_cache
from typing import Dict, Optional, Tuple

import cv2
import numpy as np

from metricgold_ros.depth_traits import valid_depth
from metricgold_ros.errors import InputError

COLORMAPS: Dict[str, int] = {
    name[len('COLORMAP_'):].lower(): getattr(cv2, name)
    for name in dir(cv2) if name.startswith('COLORMAP_')
}
_SAMPLE_PIXELS = 4096  # the auto range looks at about this many pixels, on a regular grid


@lru_cache(maxsize=None)
def _lut(colormap: int) -> np.ndarray:
    """256-entry BGR table: index 0 is black (invalid), 1..255 span the colormap."""
    levels = np.round(np.linspace(0, 255, 255)).astype(np.uint8).reshape(255, 1)
    lut = np.zeros((256, 1, 3), np.uint8)
    lut[1:] = cv2.applyColorMap(levels, colormap)
    return lut


def auto_range(depth_m: np.ndarray) -> Tuple[float, float]:
    """2nd and 98th percentile of the valid depth (metres), from a ~4096-pixel grid sample.

    Returns ``(1.0, 10.0)`` when no pixel is valid, and widens a constant depth by 1 %.
    """
    step = max(1, int(math.sqrt(depth_m.size / _SAMPLE_PIXELS)))
    sample = depth_m[::step, ::step]
    sample = sample[valid_depth(sample)]
    if sample.size == 0:
        sample = depth_m[valid_depth(depth_m)]  # tiny or sparse images: use every pixel
    if sample.size == 0:
        return 1.0, 10.0
    # nearest-rank percentiles by partial sort: 4x cheaper than np.percentile here
    ranks = [round(0.02 * (sample.size - 1)), round(0.98 * (sample.size - 1))]
    low, high = (float(v) for v in np.partition(sample, ranks)[ranks])
    if not high > low:
        low, high = low * 0.99, low * 1.01
    return low, high


def colorize_depth(depth_m: np.ndarray, d_min: Optional[float] = None,
                   d_max: Optional[float] = None, colormap: str = 'turbo') -> np.ndarray:
    """False-colour depth [H,W] metres as BGR uint8 [H,W,3]; invalid (NaN, inf, <= 0) black.

    Colour follows log depth between ``d_min`` and ``d_max`` (metres; each ``None`` falls back
    to the 2nd/98th percentile), so near and far detail both stay visible; near is warm (red in
    turbo), far is cold. Depth outside the range takes the end colour.
    """
    if colormap not in COLORMAPS:
        raise InputError(f"colormap: '{colormap}' is unknown; use one of "
                         f"{', '.join(sorted(COLORMAPS))}")
    depth_m = np.asarray(depth_m)
    if depth_m.ndim != 2 or depth_m.dtype.kind != 'f':
        raise InputError(f'depth_m: {depth_m.dtype} array of shape {depth_m.shape}; pass a '
                         'float [H,W] depth image in metres')
    for name, value in (('d_min', d_min), ('d_max', d_max)):
        if value is not None and not (0 < value < math.inf):
            raise InputError(f'{name}: {value} must be a finite depth > 0 metres (or None for '
                             'automatic)')
    if d_min is None or d_max is None:
        auto_min, auto_max = auto_range(depth_m)
        d_min = auto_min if d_min is None else d_min
        d_max = auto_max if d_max is None else d_max
    if not d_max > d_min:
        raise InputError(f'd_min/d_max: {d_min} >= {d_max}; d_min must be below d_max')
    # index = 255 at d_min (warm) down to 1 at d_max; 0 is kept for invalid pixels.
    # cv2.log is ~3x faster than np.log; clipping first keeps its input positive and finite.
    scale = -254.0 / math.log(d_max / d_min)
    offset = 255.0 - scale * math.log(d_min)
    clipped = np.clip(depth_m.astype(np.float32, copy=False), d_min, d_max)  # NaN stays NaN
    index = cv2.convertScaleAbs(cv2.log(clipped), alpha=scale, beta=offset)  # rounds, saturates
    np.multiply(index, valid_depth(depth_m), out=index)
    return cv2.applyColorMap(index, _lut(COLORMAPS[colormap]))
