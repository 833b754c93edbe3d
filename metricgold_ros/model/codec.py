"""Log-scaled metric depth codec of MetricGold (paper, eq. 3).

``x = clip(2 * log(d / d_min) / log(d_max / d_min) - 1, -1, 1)`` maps the checkpoint's metric
range ``[d_min, d_max]`` onto the VAE's value range ``[-1, 1]`` so that relative depth
resolution is the same at every distance; the inverse is
``d = d_min * exp((x + 1) / 2 * log(d_max / d_min))``.

Invalid depth (0, negative, NaN, inf, outside ``[d_min, d_max]``) is never encoded as a number
that looks real: it is reported in a mask and set to 0 (the middle of the range) in the output.
Both functions accept numpy arrays and torch tensors and return the same kind.
"""

import math
from typing import Tuple, TypeVar

import numpy as np
import torch

from metricgold_ros.errors import InputError

Array = TypeVar('Array', np.ndarray, torch.Tensor)


def check_depth_range(d_min_m: float, d_max_m: float) -> None:
    """Raise ``InputError`` unless ``0 < d_min_m < d_max_m`` and both are finite."""
    if not (math.isfinite(d_min_m) and math.isfinite(d_max_m) and 0.0 < d_min_m < d_max_m):
        raise InputError(
            f'depth range d_min={d_min_m!r}, d_max={d_max_m!r} is invalid: '
            'need finite 0 < d_min < d_max (metres)')


def valid_depth_mask(depth_m: Array, d_min_m: float, d_max_m: float) -> Array:
    """True where ``depth_m`` is finite and inside ``[d_min_m, d_max_m]``."""
    if isinstance(depth_m, torch.Tensor):
        return torch.isfinite(depth_m) & (depth_m >= d_min_m) & (depth_m <= d_max_m)
    depth_m = np.asarray(depth_m)
    with np.errstate(invalid='ignore'):
        return np.isfinite(depth_m) & (depth_m >= d_min_m) & (depth_m <= d_max_m)


def encode_depth(depth_m: Array, d_min_m: float, d_max_m: float) -> Tuple[Array, Array]:
    """Metric depth (metres) -> log-normalised value in ``[-1, 1]`` and its validity mask.

    Returns:
        ``(x, valid)``: ``x`` has the input's shape and float dtype, 0 where ``valid`` is False.
    """
    check_depth_range(d_min_m, d_max_m)
    valid = valid_depth_mask(depth_m, d_min_m, d_max_m)
    log_range = math.log(d_max_m / d_min_m)
    if isinstance(depth_m, torch.Tensor):
        safe = torch.where(valid, depth_m, torch.full_like(depth_m, d_min_m))
        x = (2.0 * torch.log(safe / d_min_m) / log_range - 1.0).clamp(-1.0, 1.0)
        return torch.where(valid, x, torch.zeros_like(x)), valid
    depth_m = np.asarray(depth_m)
    dtype = depth_m.dtype if np.issubdtype(depth_m.dtype, np.floating) else np.float32
    safe = np.where(valid, depth_m, d_min_m).astype(dtype, copy=False)
    x = np.clip(2.0 * np.log(safe / d_min_m) / log_range - 1.0, -1.0, 1.0).astype(dtype)
    x[~valid] = 0.0
    return x, valid


def decode_depth(x: Array, d_min_m: float, d_max_m: float) -> Array:
    """Log-normalised value (clipped to ``[-1, 1]``) -> metric depth in metres."""
    check_depth_range(d_min_m, d_max_m)
    log_range = math.log(d_max_m / d_min_m)
    if isinstance(x, torch.Tensor):
        return d_min_m * torch.exp((x.clamp(-1.0, 1.0) + 1.0) * (0.5 * log_range))
    x = np.asarray(x)
    return (d_min_m * np.exp((np.clip(x, -1.0, 1.0) + 1.0) * (0.5 * log_range))).astype(
        x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32)


