"""Edge-aware upsampling: depth edges moved onto the camera image's edges (the guided filter).

A small model's depth is a low-resolution map: enlarged to the camera's size, a box's outline
or a pole is a ramp several pixels wide, not a step (the bundled 128-px model's boundary F1 is
near 0, BENCHMARKS.md 16). The guided filter of He, Sun and Tang (ECCV 2010; TPAMI 35(6),
2013) fits the depth in every ``(2r+1)^2`` window as ``a * I + b`` of the guide ``I`` (the
image's grey level) and averages the fits: where the image has an edge the depth steps with
it, where the image is flat the depth is smoothed, and a constant depth stays constant.
``eps`` is the image contrast (squared, grey levels in [0, 1]) below which an edge is taken
for texture and smoothed over. OpenCV's box filter keeps the cost O(1) per pixel whatever
``r`` (about 10 ms at 640x480 on one CPU core); the image border is mirrored.

A checkpoint states its own ``r`` (in pixels of the processed image, so that it follows the
model's blur, not the camera's size) and ``eps`` in ``metricgold.json``
(``edge_refine_radius_px``, ``edge_refine_eps``), chosen on a selection split; the pipeline
applies it to the log-depth value (a step is a ratio) after the resize to the output size.
"""

from typing import Tuple

import cv2
import numpy as np

from metricgold_ros.model import image_ops


def guided_filter(guide: np.ndarray, source: np.ndarray, radius: int,
                  eps: float) -> np.ndarray:
    """``source`` ``[H,W]`` filtered by ``guide`` ``[H,W]`` (He et al., Algorithm 1), float32.

    Radii above the image's half size are clipped to it.
    """
    guide, source = np.asarray(guide, np.float32), np.asarray(source, np.float32)
    if guide.shape != source.shape:
        raise ValueError(f'guide shape {guide.shape} != source shape {source.shape}')
    radius = max(0, min(int(radius), (max(source.shape) - 1) // 2))
    if radius == 0:
        return source
    size = (2 * radius + 1, 2 * radius + 1)

    def mean(x: np.ndarray) -> np.ndarray:
        return cv2.boxFilter(x, -1, size)

    mean_i, mean_p = mean(guide), mean(source)
    a = (mean(guide * source) - mean_i * mean_p) / (mean(guide * guide) - mean_i * mean_i + eps)
    b = mean_p - a * mean_i
    return mean(a) * guide + mean(b)


def grey_guide(rgb: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """The camera image as a guide: ``[H,W]`` float32 grey level in [0, 1] at ``size``
    ``(H, W)`` (ITU-R BT.601 luma; grayscale and RGBA images accepted)."""
    rgb = image_ops.check_rgb(rgb)
    grey = rgb[..., 0] if rgb.shape[2] == 1 else cv2.cvtColor(
        np.ascontiguousarray(rgb[..., :3]), cv2.COLOR_RGB2GRAY)
    if grey.shape != tuple(size):
        grey = cv2.resize(grey, (size[1], size[0]), interpolation=cv2.INTER_AREA)
    return grey.astype(np.float32) / 255.0
