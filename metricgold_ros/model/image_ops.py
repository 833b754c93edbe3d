"""Small pure tensor helpers for the pipeline: input normalisation, resize, pad and unpad."""

from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F

from metricgold_ros.errors import InputError

LATENT_FACTOR = 8  # the SD VAE downsamples by 8: processed sizes must be multiples of it


def rgb_to_tensor(rgb: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """RGB uint8 ``[H,W,3]`` (or grayscale ``[H,W]`` / RGBA ``[H,W,4]``) -> ``[1,3,H,W]`` in [-1, 1]."""
    if not isinstance(rgb, np.ndarray):
        raise InputError(f'image must be a numpy array, got {type(rgb).__name__}')
    if rgb.dtype != np.uint8:
        raise InputError(f'image dtype is {rgb.dtype}, expected uint8 RGB')
    if rgb.ndim == 2:
        rgb = rgb[:, :, None]
    if rgb.ndim != 3 or rgb.shape[2] not in (1, 3, 4) or rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise InputError(f'image shape is {rgb.shape}, expected [H,W,3] RGB, [H,W] or [H,W,4]')
    tensor = torch.from_numpy(np.ascontiguousarray(rgb)).to(device)
    tensor = tensor.permute(2, 0, 1)[None, :3]  # [1,C,H,W]
    if tensor.shape[1] == 1:
        tensor = tensor.expand(-1, 3, -1, -1)
    return tensor.to(dtype) * (2.0 / 255.0) - 1.0


def processing_size(height: int, width: int, resolution: int) -> Tuple[int, int]:
    """Size with the longer side equal to ``resolution`` (0 keeps the input size)."""
    if resolution <= 0:
        return height, width
    scale = resolution / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize(image: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``[N,C,H,W]``, antialiased when shrinking; a no-op at the same size."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    shrink = size[0] < image.shape[-2] or size[1] < image.shape[-1]
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
