"""Depth values and their encodings: the one valid-depth rule and the 16-bit PNG encodings.

As image_pipeline's depth traits: a depth is valid when it is a finite, positive number of
metres (NaN, inf, 0 and negatives are "no depth"); 32FC1 images hold metres with NaN where
invalid (REP 118); 16-bit images and PNGs hold whole units (millimetres for 16UC1 and our
``infer`` PNGs, centimetres for Virtual KITTI 2) with reserved invalid codes.
"""

from dataclasses import dataclass
from typing import Tuple, TypeVar

import numpy as np

ArrayT = TypeVar('ArrayT')  # numpy arrays and torch tensors alike
FLOAT32_MAX = float(np.finfo(np.float32).max)
UINT16_MAX = 65535


def valid_depth(depth_m: ArrayT, max_m: float = FLOAT32_MAX) -> ArrayT:
    """Boolean mask of valid depth: finite and in ``(0, max_m]`` metres.

    Works on numpy arrays and torch tensors; NaN compares False, so one comparison pair
    rejects NaN, inf, zero, negatives and depth beyond ``max_m``.
    """
    return (depth_m > 0) & (depth_m <= min(float(max_m), FLOAT32_MAX))


@dataclass(frozen=True)
class DepthPngEncoding:
    """Metric depth in a uint16 image: ``value = round(depth_m * units_per_m)``.

    ``invalid`` are the raw codes that mean "no depth"; the first one is written for invalid
    pixels. Valid depth is clipped into the codes that remain (the encoding saturates).
    """

    name: str
    units_per_m: float
    invalid: Tuple[int, ...] = (0,)

    def encode(self, depth_m: np.ndarray) -> np.ndarray:
        """``[H,W]`` metres -> uint16 codes; invalid depth gets ``invalid[0]``."""
        depth = np.asarray(depth_m, dtype=np.float64)
        valid = valid_depth(depth)
        codes = np.clip(np.round(np.where(valid, depth, 0.0) * self.units_per_m),
                        *self._code_range)
        return np.where(valid, codes, self.invalid[0]).astype(np.uint16)

    def decode(self, raw: np.ndarray, dtype: type = np.float32) -> np.ndarray:
        """uint16 codes -> ``[H,W]`` metres in ``dtype``, NaN where the code is invalid."""
        raw = np.asarray(raw)
        depth = raw.astype(dtype) / dtype(self.units_per_m)
        return np.where(self.valid(raw), depth, dtype(np.nan))

    def valid(self, raw: np.ndarray) -> np.ndarray:
        """Boolean mask of the codes that hold depth."""
        return ~np.isin(np.asarray(raw), self.invalid)

    @property
    def max_m(self) -> float:
        """The largest depth the encoding holds (metres); deeper saturates."""
        return self._code_range[1] / self.units_per_m

    @property
    def _code_range(self) -> Tuple[int, int]:
        """The lowest and highest codes that hold depth (the invalid ones at the ends left out)."""
        return (1 if 0 in self.invalid else 0,
                UINT16_MAX - 1 if UINT16_MAX in self.invalid else UINT16_MAX)


# 16UC1 (REP 118) and our ``infer`` PNGs: millimetres, 0 = invalid, saturates at 65.535 m.
MILLIMETRES = DepthPngEncoding('mm', 1000.0, (0,))
# Virtual KITTI 2 depth PNGs: centimetres, 65535 = sky/invalid (0 never occurs; read invalid).
VKITTI2_CENTIMETRES = DepthPngEncoding('cm', 100.0, (UINT16_MAX, 0))


def png_encoding(units_per_m: float) -> DepthPngEncoding:
    """A ground-truth PNG convention with 0 = invalid (NYUv2 1000, KITTI 256, TUM 5000)."""
    return DepthPngEncoding(f'1/{units_per_m:g} m', float(units_per_m), (0,))
