"""Small pure tensor helpers for the pipeline: input normalisation, resize, pad and unpad.

On the CPU the two resizes of a frame are the costliest work outside the networks, so they take
the cheap road there: the input is resized while still uint8 (a quarter of the bytes of float32,
and torch's antialiased uint8 kernel is vectorised) and only the processed image becomes float;
enlarging float maps goes through OpenCV. Both agree with the float torch path: to one grey
level at most (input, rounding) and to 1e-4 of the value range (output); ``test_bench`` checks
both and ``metricgold bench`` compares the depth with diffusers' Marigold pipeline.

Relative (Marigold) checkpoints take the exact road instead (:func:`prepare_image_exact`,
:func:`resize_exact`): the order and kernels of diffusers' ``MarigoldDepthPipeline`` (sizes
floored, the image normalised in float before an antialiased resize, outputs enlarged or shrunk
without antialiasing), so that the same weights give the same numbers.
"""

from typing import Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from metricgold_ros.constants import LATENT_FACTOR
from metricgold_ros.errors import InputError


def check_rgb(rgb: np.ndarray) -> np.ndarray:
    """Validate an RGB uint8 ``[H,W,3]``, grayscale ``[H,W]`` or RGBA image -> ``[H,W,C]``."""
    if not isinstance(rgb, np.ndarray):
        raise InputError(f'image must be a numpy array, got {type(rgb).__name__}')
    if rgb.dtype != np.uint8:
        raise InputError(f'image dtype is {rgb.dtype}, expected uint8 RGB')
    if rgb.ndim == 2:
        rgb = rgb[:, :, None]
    if rgb.ndim != 3 or rgb.shape[2] not in (1, 3, 4) or rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise InputError(f'image shape is {rgb.shape}, expected [H,W,3] RGB, [H,W] or [H,W,4]')
    return rgb


def rgb_to_tensor(rgb: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """RGB uint8 ``[H,W,3]`` (grayscale ``[H,W]``, RGBA ``[H,W,4]``) -> ``[1,3,H,W]``, [-1, 1]."""
    rgb = check_rgb(rgb)
    tensor = torch.from_numpy(np.ascontiguousarray(rgb)).to(device)  # uint8: 1 byte/px to copy
    return _normalise(tensor.permute(2, 0, 1)[None, :3], dtype)  # [1,C,H,W]


def prepare_image(rgb: np.ndarray, resolution: int, device: torch.device, dtype: torch.dtype
                  ) -> Tuple[torch.Tensor, Tuple[int, int], Tuple[int, int]]:
    """An RGB uint8 image -> the network input, its padding and the input size.

    Returns:
        ``(image, padding, (H, W))``: ``image`` is ``[1,3,PH,PW]`` in [-1, 1] with the longer
        side resized to ``resolution`` (0: native size) and padded to multiples of 8, in
        whichever layout (NCHW or channels-last) came cheapest - a convolution takes either;
        ``padding`` is what :func:`unpad` takes back.
    """
    rgb = check_rgb(rgb)
    input_size = rgb.shape[:2]
    size = processing_size(*input_size, resolution)
    if device.type == 'cpu':
        image = _normalise(_resize_uint8(rgb, size), dtype)
    else:  # on the GPU a float resize is cheap; move the frame while it is small (uint8)
        image = resize(rgb_to_tensor(rgb, device, dtype), size)
    image, padding = pad_to_multiple(image)
    return image, padding, input_size


def prepare_image_exact(rgb: np.ndarray, resolution: int, device: torch.device,
                        dtype: torch.dtype
                        ) -> Tuple[torch.Tensor, Tuple[int, int], Tuple[int, int]]:
    """:func:`prepare_image` as diffusers' Marigold does it, step for step.

    The uint8 image becomes ``dtype`` on ``device``, is scaled to [0, 1] and then [-1, 1], and
    is resized (bilinear, antialiased) to :func:`marigold_processing_size` before padding.
    Returns the same ``(image, padding, (H, W))`` as :func:`prepare_image`, NCHW.
    """
    rgb = check_rgb(rgb)
    input_size = rgb.shape[:2]
    # A float32 [1,H,W,C] array viewed as [1,C,H,W]: diffusers' layout (channels-last strides),
    # which decides how the convolutions sum.
    array = rgb[None, :, :, :3].astype(np.float32)
    tensor = torch.from_numpy(array.transpose(0, 3, 1, 2))
    if tensor.shape[1] == 1:
        tensor = tensor.repeat(1, 3, 1, 1)
    image = tensor.to(device=device, dtype=dtype) / 255
    image = image * 2.0 - 1.0
    if resolution > 0:
        size = marigold_processing_size(*input_size, resolution)
        image = F.interpolate(image, size, mode='bilinear', antialias=True)
    image, padding = pad_to_multiple(image)
    return image, padding, input_size


def marigold_processing_size(height: int, width: int, resolution: int) -> Tuple[int, int]:
    """diffusers' Marigold size: the longer side ``resolution``, the other floored (0: native).

    Raises:
        InputError: the shorter side would become 0 px (an extreme aspect ratio).
    """
    if resolution <= 0:
        return height, width
    longest = max(height, width)
    size = (height * resolution // longest, width * resolution // longest)
    if min(size) < 1:
        raise InputError(f'image of {width}x{height} px at processing_resolution={resolution} '
                         'has a side of 0 px; use a larger processing_resolution or crop it')
    return size


def resize_exact(image: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Plain bilinear resize of ``[N,C,H,W]`` (no antialiasing), as diffusers' Marigold outputs."""
    return F.interpolate(image, size, mode='bilinear', antialias=False)


def _resize_uint8(rgb: np.ndarray, size: Tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of uint8 ``[H,W,C]`` (antialiased when shrinking) -> ``[1,C',h,w]``."""
    height, width = rgb.shape[:2]
    if rgb.shape[2] == 4:
        rgb = np.ascontiguousarray(rgb[:, :, :3])
    if (height, width) == tuple(size):
        out = rgb
    elif size[0] >= height and size[1] >= width:  # OpenCV's uint8 bilinear: ~3x torch's
        out = cv2.resize(np.ascontiguousarray(rgb), (size[1], size[0]),
                         interpolation=cv2.INTER_LINEAR).reshape(size[0], size[1], -1)
    else:
        tensor = torch.from_numpy(rgb).permute(2, 0, 1)[None]  # channels-last view, no copy
        return F.interpolate(tensor, size=size, mode='bilinear', align_corners=False,
                             antialias=True)
    return torch.from_numpy(out).permute(2, 0, 1)[None]


def _normalise(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 ``[1,C,H,W]`` (C = 1 or 3) -> float ``[1,3,H,W]`` in [-1, 1], same layout.

    Converting while changing the layout is slow for uint8 (4x a float transpose), so callers
    change the layout, if needed, afterwards.
    """
    image = tensor.to(torch.float32)
    image = image.mul_(2.0 / 255.0).sub_(1.0)
    if image.shape[1] == 1:
        image = image.expand(-1, 3, -1, -1)
    return image.to(dtype)


def processing_size(height: int, width: int, resolution: int) -> Tuple[int, int]:
    """Size with the longer side equal to ``resolution`` (0 keeps the input size)."""
    if resolution <= 0:
        return height, width
    scale = resolution / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize(image: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``[N,C,H,W]``, antialiased when shrinking; a no-op at the same size.

    Enlarging a float32 CPU tensor uses OpenCV (the same half-pixel bilinear, ~4x faster).
    """
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    shrink = size[0] < image.shape[-2] or size[1] < image.shape[-1]
    if not shrink and image.device.type == 'cpu' and image.dtype == torch.float32:
        planes = image.detach().reshape(-1, *image.shape[-2:]).numpy()  # [N*C,H,W]
        out = np.stack([cv2.resize(np.ascontiguousarray(plane), (size[1], size[0]),
                                   interpolation=cv2.INTER_LINEAR) for plane in planes])
        return torch.from_numpy(out).reshape(*image.shape[:2], *size)
    return F.interpolate(image, size=size, mode='bilinear', align_corners=False,
                         antialias=shrink)


def pad_to_multiple(image: torch.Tensor, multiple: int = LATENT_FACTOR
                    ) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Replicate-pad bottom/right to multiples of ``multiple``; returns the padding for unpad."""
    pad_h = -image.shape[-2] % multiple
    pad_w = -image.shape[-1] % multiple
    if pad_h or pad_w:
        image = F.pad(image, (0, pad_w, 0, pad_h), mode='replicate')
    return image, (pad_h, pad_w)


def unpad(image: torch.Tensor, padding: Tuple[int, int]) -> torch.Tensor:
    pad_h, pad_w = padding
    return image[..., :image.shape[-2] - pad_h, :image.shape[-1] - pad_w]
