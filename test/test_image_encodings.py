"""Raw/compressed image buffers to RGB: each encoding built independently here, then decoded."""

import array

import cv2
import numpy as np
import pytest

from metricgold_ros.errors import InputError
from metricgold_ros.image_encodings import (decode_compressed, image_to_rgb, rgb_to_buffer,
                                            SUPPORTED_ENCODINGS, WRITABLE_ENCODINGS)

HEIGHT, WIDTH = 6, 8


@pytest.fixture
def rgb() -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)


def _yuv422(rgb: np.ndarray, order: str) -> np.ndarray:
    """BT.601 limited-range 4:2:2, chroma of each pixel pair averaged; bytes in ``order``."""
    rgb_f = rgb.astype(np.float64)
    r, g, b = rgb_f[..., 0], rgb_f[..., 1], rgb_f[..., 2]
    y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    u = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
    v = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255
    u2 = (u[:, 0::2] + u[:, 1::2]) / 2
    v2 = (v[:, 0::2] + v[:, 1::2]) / 2
    planes = {'Y0': y[:, 0::2], 'Y1': y[:, 1::2], 'U': u2, 'V': v2}
    keys = ['U', 'Y0', 'V', 'Y1'] if order == 'uyvy' else ['Y0', 'U', 'Y1', 'V']
    quad = np.stack([planes[k] for k in keys], axis=-1)  # [H, W/2, 4]
    return np.clip(np.round(quad), 0, 255).astype(np.uint8).reshape(rgb.shape[0], -1)


def _bayer(rgb: np.ndarray, pattern: str) -> np.ndarray:
    """Keep, per pixel, the one channel the 2x2 ``pattern`` (e.g. 'rggb') names."""
    channel = {'r': 0, 'g': 1, 'b': 2}
    out = np.empty(rgb.shape[:2], np.uint8)
    for dy in range(2):
        for dx in range(2):
            out[dy::2, dx::2] = rgb[dy::2, dx::2, channel[pattern[2 * dy + dx]]]
    return out


def _pair_constant(rgb: np.ndarray) -> np.ndarray:
    """Horizontal pixel pairs share a colour, so 4:2:2 subsampling loses nothing."""
    return np.repeat(rgb[:, 0::2], 2, axis=1)


def _encode(rgb: np.ndarray, encoding: str):
    """(rows [H, row_bytes] uint8, expected RGB) for one encoding, written without our code."""
    grey = rgb[..., 1]
    grey_rgb = np.repeat(grey[..., None], 3, axis=2)
    alpha = np.full(rgb.shape[:2] + (1,), 77, np.uint8)
    if encoding == 'rgb8':
        return rgb.reshape(HEIGHT, -1), rgb
    if encoding == 'bgr8':
        return rgb[..., ::-1].reshape(HEIGHT, -1), rgb
    if encoding == 'rgba8':
        return np.concatenate([rgb, alpha], axis=2).reshape(HEIGHT, -1), rgb
    if encoding == 'bgra8':
        return np.concatenate([rgb[..., ::-1], alpha], axis=2).reshape(HEIGHT, -1), rgb
    if encoding == 'mono8':
        return grey, grey_rgb
    if encoding == 'mono16':  # low byte is noise: only the high byte may reach 8 bits
        value = grey.astype(np.uint16) * 256 + rgb[..., 0]
        return value.astype('<u2').view(np.uint8).reshape(HEIGHT, -1), grey_rgb
    if encoding in ('yuv422', 'uyvy'):
        return _yuv422(_pair_constant(rgb), 'uyvy'), _pair_constant(rgb)
    if encoding in ('yuv422_yuy2', 'yuyv'):
        return _yuv422(_pair_constant(rgb), 'yuyv'), _pair_constant(rgb)
    if encoding.startswith('bayer_'):
        flat = np.empty_like(rgb)
        flat[...] = (200, 90, 30)  # uniform colour: demosaicing is exact inside the image
        return _bayer(flat, encoding[6:10]), flat
    raise AssertionError(encoding)


def _tolerance(encoding: str) -> int:
    return 3 if 'yuv' in encoding or encoding in ('uyvy', 'yuyv') else 0


@pytest.mark.parametrize('encoding', SUPPORTED_ENCODINGS)
def test_every_encoding_decodes_to_the_original_rgb(rgb, encoding):
    rows, expected = _encode(rgb, encoding)
    out = image_to_rgb(encoding, HEIGHT, WIDTH, rows.shape[1], 0, rows.tobytes())
    assert out.shape == (HEIGHT, WIDTH, 3) and out.dtype == np.uint8
    assert out.flags.c_contiguous and out.flags.writeable
    if encoding.startswith('bayer_'):
        out, expected = out[2:-2, 2:-2], expected[2:-2, 2:-2]  # borders are interpolated
    diff = np.abs(out.astype(int) - expected.astype(int)).max()
    assert diff <= _tolerance(encoding), f'{encoding}: max error {diff}'


@pytest.mark.parametrize('encoding', SUPPORTED_ENCODINGS)
def test_padded_rows_decode_like_unpadded(rgb, encoding):
    rows, _ = _encode(rgb, encoding)
    padded = np.full((HEIGHT, rows.shape[1] + 6), 0xEE, np.uint8)  # 6: keeps 16-bit aligned
    padded[:, :rows.shape[1]] = rows
    plain = image_to_rgb(encoding, HEIGHT, WIDTH, rows.shape[1], 0, rows.tobytes())
    out = image_to_rgb(encoding, HEIGHT, WIDTH, padded.shape[1], 0, padded.tobytes())
    np.testing.assert_array_equal(out, plain)


def test_mono16_honours_big_endian(rgb):
    grey = rgb[..., 1]
    value = grey.astype(np.uint16) * 256 + 255
    big = value.astype('>u2').tobytes()
    out = image_to_rgb('mono16', HEIGHT, WIDTH, 2 * WIDTH, 1, big)
    np.testing.assert_array_equal(out[..., 0], grey)
    wrong = image_to_rgb('mono16', HEIGHT, WIDTH, 2 * WIDTH, 0, big)
    assert np.all(wrong[..., 0] == 255)  # read as little-endian, the high byte is the noise


def test_uyvy_and_yuyv_are_not_interchangeable(rgb):
    rows, expected = _encode(rgb, 'uyvy')
    swapped = image_to_rgb('yuyv', HEIGHT, WIDTH, rows.shape[1], 0, rows.tobytes())
    assert np.abs(swapped.astype(int) - expected.astype(int)).max() > 20


def test_bayer_patterns_on_a_smooth_image():
    # a smooth colour ramp, not only a flat colour: the demosaic must also follow gradients
    v, u = np.mgrid[0:32, 0:32]
    ramp = np.stack([4 * u + 40, 4 * v + 40, 200 - 2 * u - 2 * v], axis=-1).astype(np.uint8)
    for encoding in ('bayer_rggb8', 'bayer_bggr8', 'bayer_gbrg8', 'bayer_grbg8'):
        mosaic = _bayer(ramp, encoding[6:10])
        out = image_to_rgb(encoding, 32, 32, 32, 0, mosaic.tobytes())
        diff = np.abs(out[2:-2, 2:-2].astype(int) - ramp[2:-2, 2:-2].astype(int)).max()
        assert diff <= 4, f'{encoding}: max error {diff}'


@pytest.mark.parametrize('wrap', [bytes, bytearray, memoryview,
                                  lambda b: array.array('B', b),
                                  lambda b: np.frombuffer(b, np.uint8).copy()])
def test_every_buffer_type_gives_the_same_image(rgb, wrap):
    out = image_to_rgb('rgb8', HEIGHT, WIDTH, 3 * WIDTH, 0, wrap(rgb.tobytes()))
    np.testing.assert_array_equal(out, rgb)


def test_result_does_not_alias_the_message_buffer(rgb):
    data = rgb.reshape(-1).copy()
    out = image_to_rgb('rgb8', HEIGHT, WIDTH, 3 * WIDTH, 0, data)
    data[:] = 0
    np.testing.assert_array_equal(out, rgb)


@pytest.mark.parametrize('encoding', WRITABLE_ENCODINGS)
def test_rgb_to_buffer_round_trips(rgb, encoding):
    data, step = rgb_to_buffer(rgb, encoding)
    assert len(data) == HEIGHT * step
    out = image_to_rgb(encoding, HEIGHT, WIDTH, step, 0, data)
    expected = rgb if encoding[:4] in ('rgb8', 'bgr8', 'rgba', 'bgra') else None
    if expected is None:  # mono: the OpenCV luma of the image
        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        expected = np.repeat(grey[..., None], 3, axis=2)
    np.testing.assert_array_equal(out, expected)


def test_rgb_to_buffer_mono16_spreads_to_full_range():
    data, step = rgb_to_buffer(np.full((1, 2, 3), 255, np.uint8), 'mono16')
    assert step == 4 and np.frombuffer(data, '<u2').tolist() == [65535, 65535]


@pytest.mark.parametrize('args, match', [
    (('16UC1', 2, 2, 4, b'\0' * 8), r"encoding: '16UC1' is not supported.*rgb8.*bayer_grbg8"),
    (('rgb8', 0, 2, 6, b''), r'height: 0'),
    (('rgb8', 2, 0, 6, b'\0' * 12), r'width: 0'),
    (('rgb8', 2, 4, 11, b'\0' * 24), r'step: 11 bytes < width 4 x 3'),
    (('rgb8', 2, 4, 12, b'\0' * 23), r'data: 23 bytes < height 2 x step 12 = 24.*truncated'),
    (('mono16', 2, 2, 4, b'\0' * 9), r'data: length 9 is odd for 16-bit'),
    (('mono16', 2, 2, 5, b'\0' * 10), r'step: 5 is odd for 16-bit'),
    (('yuyv', 2, 3, 6, b'\0' * 12), r'width: 3 is odd; 4:2:2'),
    (('rgb8', 2, 2, 6, np.zeros(12, np.float32)), r'data: numpy array of dtype float32'),
    (('rgb8', 2, 2, 6, 12345), r'data: a int is not a byte buffer'),
])
def test_invalid_fields_raise_naming_the_field(args, match):
    encoding, height, width, step, data = args
    with pytest.raises(InputError, match=match):
        image_to_rgb(encoding, height, width, step, 0, data)


def test_pixel_budget_is_checked_before_anything_else():
    # 10^10 pixels and no data: the budget error must come first, with no allocation
    with pytest.raises(InputError, match=r'exceeds the pixel budget 1000000'):
        image_to_rgb('rgb8', 100000, 100000, 300000, 0, b'', pixel_budget=1_000_000)
    out = image_to_rgb('rgb8', 2, 2, 6, 0, bytes(12), pixel_budget=4)
    assert out.shape == (2, 2, 3)


@pytest.mark.parametrize('fmt, ext', [
    ('png', '.png'), ('jpeg', '.jpg'), ('jpg', '.jpg'), ('rgb8; jpeg compressed bgr8', '.jpg'),
    ('bgr8; png compressed bgr8', '.png'), ('', '.png'), ('', '.jpg')])
def test_decode_compressed(fmt, ext):
    v, u = np.mgrid[0:24, 0:32]
    smooth = np.stack([8 * u, 10 * v, 255 - 5 * u], axis=-1).astype(np.uint8)
    ok, encoded = cv2.imencode(ext, cv2.cvtColor(smooth, cv2.COLOR_RGB2BGR))
    assert ok
    out = decode_compressed(fmt, encoded.tobytes())
    assert out.shape == smooth.shape
    error = np.abs(out.astype(int) - smooth.astype(int))
    if ext == '.png':
        assert error.max() == 0
    else:
        assert error.mean() < 4


def test_decode_compressed_errors():
    ok, png = cv2.imencode('.png', np.zeros((40, 50, 3), np.uint8))
    assert ok
    with pytest.raises(InputError, match=r"format: 'png; compressedDepth'.*compressedDepth"):
        decode_compressed('png; compressedDepth', png)
    with pytest.raises(InputError, match=r"format: 'tiff' is not supported.*'jpeg' or 'png'"):
        decode_compressed('tiff', png)
    with pytest.raises(InputError, match=r'not a valid PNG'):
        decode_compressed('png', b'not an image at all, really')
    with pytest.raises(InputError, match=r'not a valid JPEG'):
        decode_compressed('jpeg', b'\xff\xd8\xff\xe0\x00')
    with pytest.raises(InputError, match=r'40x50 = 2000 pixels exceeds the pixel budget 1999'):
        decode_compressed('png', png, pixel_budget=1999)
    assert decode_compressed('png', png, pixel_budget=2000).shape == (40, 50, 3)
    ok, jpeg = cv2.imencode('.jpg', np.zeros((30, 20, 3), np.uint8))
    with pytest.raises(InputError, match=r'30x20 = 600 pixels exceeds'):
        decode_compressed('jpeg', jpeg, pixel_budget=599)
    with pytest.raises(InputError, match=r'could not be decoded as PNG'):
        decode_compressed('png', png.tobytes()[:60])
