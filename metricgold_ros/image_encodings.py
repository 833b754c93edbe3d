"""Raw and compressed ROS image buffers to RGB, and RGB back to raw buffers.

Works on the plain fields of ``sensor_msgs/Image`` / ``CompressedImage`` so the node (rclpy
messages) and the bag tool (rosbags messages) share one converter. Every problem is an
:class:`~metricgold_ros.errors.InputError` raised before any large allocation.
"""

from typing import Any, Dict, Optional, Tuple

import cv2
import numpy as np

from metricgold_ros.errors import InputError

# encoding -> (bytes per pixel, cv2 code to RGB or None for a plain copy / special path)
_ENCODINGS: Dict[str, Tuple[int, Optional[int]]] = {
    'rgb8': (3, None),
    'bgr8': (3, cv2.COLOR_BGR2RGB),
    'rgba8': (4, cv2.COLOR_RGBA2RGB),
    'bgra8': (4, cv2.COLOR_BGRA2RGB),
    'mono8': (1, cv2.COLOR_GRAY2RGB),
    'mono16': (2, None),
    # ROS 'yuv422' is UYVY and 'yuv422_yuy2' is YUYV (sensor_msgs/image_encodings.hpp).
    'uyvy': (2, cv2.COLOR_YUV2RGB_UYVY),
    'yuv422': (2, cv2.COLOR_YUV2RGB_UYVY),
    'yuyv': (2, cv2.COLOR_YUV2RGB_YUYV),
    'yuv422_yuy2': (2, cv2.COLOR_YUV2RGB_YUYV),
    # OpenCV names a Bayer pattern by row 2, columns 2-3, so ROS rggb is OpenCV's BG.
    'bayer_rggb8': (1, cv2.COLOR_BayerBG2RGB),
    'bayer_bggr8': (1, cv2.COLOR_BayerRG2RGB),
    'bayer_gbrg8': (1, cv2.COLOR_BayerGR2RGB),
    'bayer_grbg8': (1, cv2.COLOR_BayerGB2RGB),
}
SUPPORTED_ENCODINGS: Tuple[str, ...] = tuple(_ENCODINGS)
WRITABLE_ENCODINGS: Tuple[str, ...] = ('rgb8', 'bgr8', 'rgba8', 'bgra8', 'mono8', 'mono16')
_ELEMENT_BYTES = {'mono16': 2}  # encodings whose channels are wider than one byte


def _as_bytes_array(data: Any, field: str = 'data') -> np.ndarray:
    """A zero-copy flat uint8 view of any buffer (bytes, array.array, memoryview, ndarray)."""
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8:
            raise InputError(f'{field}: numpy array of dtype {data.dtype}; pass uint8 bytes')
        return data.reshape(-1)
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except (TypeError, ValueError, BufferError) as err:
        raise InputError(
            f'{field}: a {type(data).__name__} is not a byte buffer; pass bytes, bytearray, '
            "array.array('B'), memoryview or a uint8 numpy array") from err


DEFAULT_PIXEL_BUDGET = 4096 * 4096  # node parameter max_pixels, bag --max-pixels


def check_image(encoding: str, height: int, width: int, step: int, data_len: int, *,
                pixel_budget: Optional[int] = None) -> int:
    """Validate the Image fields (no pixel touched); return the bytes per pixel."""
    if encoding not in _ENCODINGS:
        raise InputError(f"encoding: '{encoding}' is not supported; publish one of "
                         f"{', '.join(SUPPORTED_ENCODINGS)} (e.g. with image_proc)")
    bpp = _ENCODINGS[encoding][0]
    for name, value in (('height', height), ('width', width)):
        if int(value) <= 0:
            raise InputError(f'{name}: {value}; an image needs at least one pixel')
    if pixel_budget is not None and height * width > pixel_budget:
        raise InputError(f'height x width: {height}x{width} = {height * width} pixels exceeds '
                         f'the pixel budget {pixel_budget}; resize upstream or raise the budget')
    if step < width * bpp:
        raise InputError(f'step: {step} bytes < width {width} x {bpp} bytes per pixel of '
                         f"'{encoding}'; fix the publisher's step")
    element = _ELEMENT_BYTES.get(encoding, 1)
    if step % element:
        raise InputError(f"step: {step} is odd for 16-bit '{encoding}'; rows must hold whole "
                         'pixels')
    if data_len % element:
        raise InputError(f"data: length {data_len} is odd for 16-bit '{encoding}'; the buffer "
                         'is corrupt')
    if data_len < height * step:
        raise InputError(f'data: {data_len} bytes < height {height} x step {step} = '
                         f'{height * step}; the image is truncated')
    if bpp == 2 and encoding != 'mono16' and width % 2:
        raise InputError(f"width: {width} is odd; 4:2:2 '{encoding}' needs an even width")
    return bpp


def image_to_rgb(encoding: str, height: int, width: int, step: int, is_bigendian: int,
                 data: Any, *, pixel_budget: Optional[int] = None) -> np.ndarray:
    """Convert raw ``sensor_msgs/Image`` fields to a fresh RGB uint8 [H,W,3] array.

    The result never aliases ``data``, so the message can be released. ``mono16`` keeps the high
    byte (value / 256, the full-range 16-to-8-bit mapping); ``is_bigendian`` matters only there.
    """
    height, width, step = int(height), int(width), int(step)
    buf = _as_bytes_array(data)
    bpp = check_image(encoding, height, width, step, buf.size, pixel_budget=pixel_budget)
    rows = buf[:height * step].reshape(height, step)[:, :width * bpp]  # [H, W*bpp] view
    code = _ENCODINGS[encoding][1]
    if encoding == 'rgb8':
        return rows.reshape(height, width, 3).copy()
    if encoding == 'mono16':
        high = rows.reshape(height, width, 2)[:, :, 0 if is_bigendian else 1]
        return cv2.cvtColor(np.ascontiguousarray(high), cv2.COLOR_GRAY2RGB)
    if bpp in (3, 4):
        src = rows.reshape(height, width, bpp)
    elif bpp == 2:
        src = rows.reshape(height, width, 2)
    else:
        src = rows
    if not src.flags.c_contiguous:
        src = np.ascontiguousarray(src)
    return cv2.cvtColor(src, code)


def rgb_to_buffer(rgb: np.ndarray, encoding: str = 'rgb8') -> Tuple[bytes, int]:
    """Pack RGB uint8 [H,W,3] as ``(data, step)`` of an unpadded little-endian Image.

    For writing test, demo and bag images; ``mono16`` spreads 8 bits over 16 (v * 257).
    """
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise InputError(f'rgb: {rgb.dtype} array of shape {rgb.shape}; pass uint8 [H,W,3]')
    if encoding not in WRITABLE_ENCODINGS:
        raise InputError(f"encoding: '{encoding}' cannot be written; use one of "
                         f"{', '.join(WRITABLE_ENCODINGS)}")
    rgb = np.ascontiguousarray(rgb)
    if encoding == 'rgb8':
        out = rgb
    elif encoding == 'bgr8':
        out = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    elif encoding == 'rgba8':
        out = cv2.cvtColor(rgb, cv2.COLOR_RGB2RGBA)
    elif encoding == 'bgra8':
        out = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGRA)
    else:
        out = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        if encoding == 'mono16':
            out = out.astype('<u2') * np.uint16(257)
    step = out.shape[1] * out.itemsize * (out.shape[2] if out.ndim == 3 else 1)
    return out.tobytes(), step


_PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _codec(fmt: str, head: bytes) -> str:
    """'jpeg' or 'png' from a CompressedImage format ('jpeg', 'rgb8; png compressed bgr8')."""
    text = fmt.lower()
    if 'compresseddepth' in text:
        raise InputError(f"format: '{fmt}' is a compressedDepth image, not a camera image; "
                         'subscribe to the colour image topic')
    codec_part = text.split(';')[-1]
    if 'png' in codec_part:
        return 'png'
    if 'jpeg' in codec_part or 'jpg' in codec_part:
        return 'jpeg'
    if not text.strip():  # some drivers leave format empty: trust the magic bytes
        if head.startswith(_PNG_MAGIC):
            return 'png'
        if head.startswith(b'\xff\xd8'):
            return 'jpeg'
    raise InputError(f"format: '{fmt}' is not supported; publish 'jpeg' or 'png' "
                     '(image_transport compressed)')


def _compressed_size(codec: str, buf: np.ndarray) -> Tuple[int, int]:
    """(height, width) from the PNG IHDR or JPEG SOF header, without decoding pixels."""
    if codec == 'png':
        if buf.size >= 24 and buf[:8].tobytes() == _PNG_MAGIC:
            return (int.from_bytes(buf[20:24].tobytes(), 'big'),
                    int.from_bytes(buf[16:20].tobytes(), 'big'))
    elif buf.size >= 4 and buf[0] == 0xFF and buf[1] == 0xD8:
        pos = 2
        while pos + 9 <= buf.size:
            if buf[pos] != 0xFF:
                break
            marker = int(buf[pos + 1])
            if marker == 0xFF:  # fill byte
                pos += 1
                continue
            if marker in _JPEG_SOF:
                return (int(buf[pos + 5]) << 8 | int(buf[pos + 6]),
                        int(buf[pos + 7]) << 8 | int(buf[pos + 8]))
            pos += 2 + (int(buf[pos + 2]) << 8 | int(buf[pos + 3]))
    raise InputError(f'data: {buf.size} bytes are not a valid {codec.upper()} stream '
                     '(bad or truncated header)')


def decode_compressed(fmt: str, data: Any, *,
                      pixel_budget: Optional[int] = None) -> np.ndarray:
    """Decode ``sensor_msgs/CompressedImage`` (JPEG or PNG) to RGB uint8 [H,W,3]."""
    buf = _as_bytes_array(data)
    codec = _codec(fmt, buf[:8].tobytes())
    height, width = _compressed_size(codec, buf)
    if height <= 0 or width <= 0:
        raise InputError(f'data: {codec.upper()} header says {height}x{width}; the image is '
                         'empty')
    if pixel_budget is not None and height * width > pixel_budget:
        raise InputError(f'data: {height}x{width} = {height * width} pixels exceeds the pixel '
                         f'budget {pixel_budget}; resize upstream or raise the budget')
    bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if bgr is None:
        raise InputError(f'data: {buf.size} bytes could not be decoded as {codec.upper()}; '
                         'the stream is corrupt or truncated')
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
