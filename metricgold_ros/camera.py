"""Pinhole intrinsics and the CameraInfo policy: the one place that validates, rescales and
pairs K with an image, for the node, the bag tool and ``infer`` alike.

The policy: a CameraInfo that cannot be used (no/zero/NaN K, NaN/inf D, another aspect ratio
than the image) never stops depth; the frame gets depth without ``depth/camera_info`` and
points, and the adapter reports :attr:`Calibration.problem` (rate-limited in the node, as a
warning offline).
"""

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

from metricgold_ros.errors import InputError

# Relative difference of aspect ratios below which CameraInfo of another size is taken to be
# the same camera resized (e.g. info for 1280x720, image downscaled to 640x360).
ASPECT_TOLERANCE = 0.01
# Coefficients of each distortion model: an empty D becomes this many zeros.
DISTORTION_SIZES = {'plumb_bob': 5, 'rational_polynomial': 8, 'equidistant': 4}
# The most coefficients any distortion model has (OpenCV's k1-k6, p1, p2, s1-s4, tx, ty): a
# longer D is refused before it is read, so a hostile CameraInfo cannot make us keep it.
MAX_DISTORTION_COEFFICIENTS = 14


def _pixel_count(name: str, value: object) -> int:
    """``value`` as a positive int, or an InputError naming ``name``."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0:
        return int(value)
    raise InputError(f'{name}: {value!r} must be a positive whole number of pixels; check '
                     'camera_info width/height')


@dataclass(frozen=True)
class Intrinsics:
    """Pinhole camera intrinsics of an image of ``width`` x ``height`` pixels.

    Pixel coordinates follow OpenCV / REP 104: integer (u, v) is the centre of a pixel, (0, 0)
    the centre of the top-left one. Frozen and hashable so it can key caches.
    """

    fx_px: float
    fy_px: float
    cx_px: float
    cy_px: float
    width: int
    height: int

    def __post_init__(self) -> None:
        """Refuse values that would make a projection meaningless (zero focal, no pixels)."""
        for name in ('fx_px', 'fy_px', 'cx_px', 'cy_px'):
            value = getattr(self, name)
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = math.nan
            if not math.isfinite(number):
                raise InputError(f'{name}: {value!r} is not a finite number; check camera_info')
            object.__setattr__(self, name, number)
        for name in ('fx_px', 'fy_px'):
            if getattr(self, name) <= 0:
                raise InputError(f'{name}: {getattr(self, name)} must be > 0; the camera is '
                                 'uncalibrated (K all zeros?) - calibrate it or set K')
        for name in ('width', 'height'):
            object.__setattr__(self, name, _pixel_count(name, getattr(self, name)))

    @classmethod
    def from_k(cls, k: Sequence[float], width: int, height: int) -> 'Intrinsics':
        """Build from a row-major 3x3 K (9 numbers, as in ``CameraInfo.k``)."""
        try:
            k_arr = np.asarray(k, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError) as err:
            raise InputError(f'K: {k!r} is not 9 numbers; pass CameraInfo.k') from err
        if k_arr.size != 9:
            raise InputError(f'K: {k_arr.size} values; a row-major 3x3 K has 9')
        if not np.all(np.isfinite(k_arr)):
            raise InputError(f'K: {k_arr.tolist()} holds NaN/inf; fix the camera calibration')
        if k_arr[0] <= 0 or k_arr[4] <= 0:
            raise InputError(f'K: fx={k_arr[0]}, fy={k_arr[4]}; both must be > 0 (an all-zero '
                             'K means the camera is uncalibrated - calibrate it or set K)')
        return cls(fx_px=float(k_arr[0]), fy_px=float(k_arr[4]), cx_px=float(k_arr[2]),
                   cy_px=float(k_arr[5]), width=width, height=height)

    def scaled_to(self, width: int, height: int) -> 'Intrinsics':
        """Intrinsics of the same camera after resizing the image to ``width`` x ``height``.

        Convention (pixel centres stay aligned, as ``cv2.resize`` samples): with
        ``sx = width / self.width``, ``fx' = fx * sx`` and ``cx' = (cx + 0.5) * sx - 0.5``;
        likewise for y. The same rule scales up or down, so ``a.scaled_to(w, h).scaled_to(
        a.width, a.height) == a`` up to rounding. Note image_proc's resize node uses
        ``cx' = cx * sx``, which differs by ``(sx - 1) / 2`` pixels.
        """
        width = _pixel_count('width', width)
        height = _pixel_count('height', height)
        sx = width / self.width
        sy = height / self.height
        return Intrinsics(fx_px=self.fx_px * sx, fy_px=self.fy_px * sy,
                          cx_px=(self.cx_px + 0.5) * sx - 0.5,
                          cy_px=(self.cy_px + 0.5) * sy - 0.5,
                          width=width, height=height)

    @property
    def k(self) -> np.ndarray:
        """3x3 camera matrix K, float64."""
        return np.array([[self.fx_px, 0.0, self.cx_px],
                         [0.0, self.fy_px, self.cy_px],
                         [0.0, 0.0, 1.0]])

    @property
    def p(self) -> np.ndarray:
        """3x4 projection matrix P = [K | 0] (a monocular, rectified camera), float64."""
        return np.hstack([self.k, np.zeros((3, 1))])

    def for_image(self, width: int, height: int) -> 'Intrinsics':
        """Intrinsics of an image of ``width`` x ``height`` taken by this camera (maybe resized).

        Raises ``InputError`` when the aspect ratios differ: that is another camera or a crop,
        and scaling K would silently bend the cloud.
        """
        if (self.width, self.height) == (width, height):
            return self
        if abs((self.width / self.height) / (width / height) - 1.0) > ASPECT_TOLERANCE:
            raise InputError(
                f'camera_info is for {self.width}x{self.height} but the image is '
                f'{width}x{height} (another aspect ratio): check that camera_info belongs to '
                'this image topic, or publish the rectified/cropped camera_info')
        return self.scaled_to(width, height)


@dataclass(frozen=True)
class Calibration:
    """One camera calibration, read once: usable intrinsics, or why there are none.

    ``d`` always has the distortion model's length when the model is known (an empty D is
    zeros); ``problem`` names what is wrong and the fix when ``camera`` is None.
    """

    camera: Optional[Intrinsics]
    problem: Optional[str] = None
    distortion_model: str = 'plumb_bob'
    d: Tuple[float, ...] = ()

    @classmethod
    def from_fields(cls, k: Sequence[float], d: Sequence[float], distortion_model: str,
                    width: int, height: int) -> 'Calibration':
        """The calibration of CameraInfo fields (K row-major 3x3, D, model, image size)."""
        model = str(distortion_model) or 'plumb_bob'
        try:
            count = len(d)
        except TypeError:
            count = 0
        if count > MAX_DISTORTION_COEFFICIENTS:
            return cls(None, f'D: {count} distortion coefficients, more than any model has '
                       f'({MAX_DISTORTION_COEFFICIENTS}); fix the camera calibration', model, ())
        try:
            coefficients = tuple(float(v) for v in d)
        except (TypeError, ValueError):
            coefficients = (math.nan,)
        if not coefficients:
            coefficients = (0.0,) * DISTORTION_SIZES.get(model, 0)
        try:
            if not all(math.isfinite(v) for v in coefficients):
                raise InputError(f'D: {list(coefficients)[:8]} holds NaN/inf; fix the camera '
                                 'calibration (distortion coefficients)')
            camera = Intrinsics.from_k(k, width=int(width), height=int(height))
        except InputError as err:
            return cls(None, str(err), model, coefficients)
        return cls(camera, None, model, coefficients)

    @classmethod
    def of(cls, camera: Intrinsics) -> 'Calibration':
        """A rectified camera known by its intrinsics alone (``infer --fx``, a YAML)."""
        return cls(camera, None, 'plumb_bob', (0.0,) * DISTORTION_SIZES['plumb_bob'])

    def for_image(self, width: int, height: int) -> Tuple[Optional[Intrinsics], Optional[str]]:
        """``(intrinsics of a width x height image, None)`` or ``(None, the problem)``."""
        if self.camera is None:
            return None, self.problem
        try:
            return self.camera.for_image(width, height), None
        except InputError as err:
            return None, str(err)
