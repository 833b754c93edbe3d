"""``metricgold infer IMAGES... --out DIR``: metric depth for image files.

Per image ``STEM``: ``STEM_depth.npy`` (float32 metres), ``STEM_depth.png`` (uint16
millimetres, 0 = invalid, saturating at 65535 = 65.535 m), ``STEM_colored.png`` (false
colour), ``STEM_uncertainty.npy`` (metres, with ``--ensemble-size`` > 1) and ``STEM.ply`` when
intrinsics are given (``--fx`` [``--fy --cx --cy``] or ``--camera-info FILE.yaml``). Images are
read upright (EXIF orientation applied); grayscale, 16-bit and RGBA are accepted. Each file is
written atomically; the per-frame work is the node's (:class:`DepthFrameProcessor`).

With ``--camera-height-m`` (and the intrinsics) each image is scaled by its own ground fit
(images are taken to be independent: no smoothing between them); a relative model then gives
metres, the PNG and the cloud where the floor is found. A camera-aware checkpoint's depth is
rescaled with the focal length from ``--fx``/``--camera-info``, else from an assumed field of
view (said once).
"""

import argparse
import dataclasses
import io
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from metricgold_ros.atomic import write_atomic
from metricgold_ros.camera import Calibration, Intrinsics
from metricgold_ros.tools.options import (
    add_inference_arguments, add_max_pixels_argument, add_mounting_arguments,
    add_output_arguments, load_pipeline, options_from_args, positive_float)
from metricgold_ros.depth_frame import DepthFrameProcessor, FrameResult
from metricgold_ros.depth_traits import MILLIMETRES
from metricgold_ros.errors import InputError
from metricgold_ros.faults import GuardedProcessor

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp', '.ppm', '.pgm',
                  '.pnm')
OUTPUT_SUFFIXES = ('_depth.png', '_colored.png')  # our own outputs, skipped in folders


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``infer`` sub-command's flags."""
    parser.add_argument('images', nargs='+', metavar='IMAGE',
                        help='image files, or folders of them (not recursive)')
    parser.add_argument('--out', required=True, metavar='DIR',
                        help='folder for the results (created when missing)')
    camera = parser.add_argument_group('camera (for the .ply point cloud)')
    camera.add_argument('--fx', type=positive_float, metavar='PX',
                        help='focal length x in pixels of the input image')
    camera.add_argument('--fy', type=positive_float, metavar='PX', help='default: --fx')
    camera.add_argument('--cx', type=float, metavar='PX', help='default: (width - 1) / 2')
    camera.add_argument('--cy', type=float, metavar='PX', help='default: (height - 1) / 2')
    camera.add_argument('--camera-info', metavar='FILE.yaml',
                        help='camera_calibration YAML (image_width, image_height, '
                             'camera_matrix); scaled to each image of the same aspect')
    add_output_arguments(parser, points_help='write STEM.ply when intrinsics are given '
                                             '(default on)')
    add_max_pixels_argument(parser.add_argument_group('selection'))
    add_mounting_arguments(parser)
    add_inference_arguments(parser)
    parser.add_argument('--quiet', '-q', action='store_true',
                        help='no progress bar; print only a final JSON summary line')
    parser.set_defaults(_parser=parser)


def run(args: argparse.Namespace) -> int:
    """Predict depth for every image; InputError (exit 1) when any image failed."""
    parser = args._parser
    if args.fx is None and any(v is not None for v in (args.fy, args.cx, args.cy)):
        parser.error('--fy/--cx/--cy need --fx')
    if args.fx is not None and args.camera_info:
        parser.error('give either --fx/--fy/--cx/--cy or --camera-info, not both')
    files = collect_images(args.images)
    _check_stems(files)
    calibration = load_camera_yaml(Path(args.camera_info)) if args.camera_info else None
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f'--out {out_dir} is a file; give a folder')
    out_dir.mkdir(parents=True, exist_ok=True)
    options = dataclasses.replace(options_from_args(args), scale_filter=False)
    processor = GuardedProcessor(DepthFrameProcessor(load_pipeline(args)),
                                 args.fallback_processing_resolution)

    start = time.perf_counter()
    stages: Dict[str, float] = {}
    fit_states: Dict[str, int] = {}
    failures: List[Tuple[Path, str]] = []
    warnings: List[str] = []
    written = 0
    bar = _progress_bar(files, args.quiet)
    for path in files if bar is None else bar:
        try:
            rgb = load_rgb(path, pixel_budget=args.max_pixels)
            outcome = processor.process(
                rgb, _calibration(args, calibration, rgb.shape[1], rgb.shape[0]), options)
        except InputError as err:
            text = str(err) if str(path) in str(err) else f'{path}: {err}'
            failures.append((path, text))
            _say(f'WARNING: {text}', args.quiet, bar)
            continue
        if outcome.failure is not None:
            _say(f'ERROR: {path}: {outcome.report()}', args.quiet, bar)
            if outcome.result is None:
                failures.append((path, f'{path}: {outcome.report()}'))
                continue
        result = outcome.result
        if result.camera_problem is not None:
            note = f'{path}: {result.camera_problem}; depth written without a point cloud'
            warnings.append(note)
            _say(f'WARNING: {note}', args.quiet, bar)
        if result.scale is not None:
            for note in result.scale.notes:
                warnings.append(note)
                _say(f'WARNING: {note}', args.quiet, bar)
            if result.scale.fit.state != 'off':
                state = result.scale.fit.state
                fit_states[state] = fit_states.get(state, 0) + 1
                if not result.scale.fit.ok:
                    _say(f'{path}: {result.scale.message}', args.quiet, bar)
        written += save_outputs(out_dir, path.stem, result, warnings)
        for stage, seconds in result.timings_s.items():
            stages[stage] = stages.get(stage, 0.0) + seconds
    seconds = time.perf_counter() - start
    done = len(files) - len(failures)
    summary = {'output': str(out_dir), 'images': done, 'failed': len(failures),
               'files_written': written, 'seconds': round(seconds, 3),
               'fps': round(done / seconds, 3) if seconds > 0 else None,
               'stages_s': {k: round(v, 3) for k, v in stages.items()},
               'ground_fit': fit_states, 'warnings': warnings,
               'failures': [{'image': str(p), 'error': e} for p, e in failures]}
    if args.quiet:
        print(json.dumps(summary))
    else:
        for text in warnings:
            print(f'WARNING: {text}', file=sys.stderr)
        print(f'wrote {written} files for {done} images to {out_dir} in {seconds:.1f} s '
              '(depth PNG: uint16 millimetres, 0 = invalid, saturates at 65.535 m)')
    if failures:
        raise InputError(f'{len(failures)} of {len(files)} images failed (the others were '
                         f'written); first: {failures[0][1]}')
    return 0


def collect_images(inputs: List[str]) -> List[Path]:
    """Files as given, and the image files of each folder (sorted, our outputs skipped)."""
    files: List[Path] = []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file()
                           and p.suffix.lower() in IMAGE_SUFFIXES
                           and not p.name.endswith(OUTPUT_SUFFIXES))
            if not found:
                raise InputError(f'{path}: no image files ({", ".join(IMAGE_SUFFIXES)}) in this '
                                 'folder')
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise InputError(f'{path}: no such file or folder')
    return files


def _check_stems(files: List[Path]) -> None:
    """Two inputs with one stem would write the same outputs: refuse before any work."""
    seen: Dict[str, Path] = {}
    for path in files:
        other = seen.setdefault(path.stem, path)
        if other != path:
            raise InputError(f'{other} and {path} would both write {path.stem}_depth.*; rename '
                             'one or run them separately')


def load_rgb(path: Path, *, pixel_budget: Optional[int] = None) -> np.ndarray:
    """An image file as upright RGB uint8 ``[H,W,3]`` (EXIF orientation applied).

    Grayscale is replicated to 3 channels (16-bit scaled to 8 bits); alpha is dropped. An
    image with more than ``pixel_budget`` pixels is refused from its header, before decoding
    (a decompression bomb costs nothing); any file that cannot be decoded is an InputError.
    """
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            width, height = image.size
            if pixel_budget is not None and width * height > pixel_budget:
                raise InputError(f'{path}: {width}x{height} = {width * height} pixels, more than '
                                 f'--max-pixels {pixel_budget}; downscale it or raise '
                                 '--max-pixels')
            image = ImageOps.exif_transpose(image)
            return pil_to_rgb(image)
    except InputError:
        raise
    except Image.DecompressionBombError as err:  # refused by PIL from the header, too
        raise InputError(f'{path}: a decompression bomb ({err}); images are limited to '
                         f'--max-pixels {pixel_budget}') from err
    except MemoryError as err:
        raise InputError(f'{path}: not enough memory to decode it; lower --max-pixels or '
                         'downscale it') from err
    except Exception as err:  # noqa: B902 - PIL's decoders raise many kinds on a broken file
        raise InputError(f'{path} is not a readable image ({type(err).__name__}: {err})') \
            from err


def pil_to_rgb(image: Any) -> np.ndarray:
    """A PIL image of any common mode as RGB uint8 ``[H,W,3]``."""
    if image.mode in ('I', 'I;16', 'I;16B', 'I;16L', 'I;16N', 'F'):
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 / 65535.0 if image.mode.startswith('I;16') or values.max() > 255 else 1.0
        gray = np.clip(np.round(values * scale), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode in ('RGBA', 'LA', 'PA') or 'transparency' in image.info:
        image = image.convert('RGBA')
    return np.asarray(image.convert('RGB'), dtype=np.uint8).copy()


def load_camera_yaml(path: Path) -> Calibration:
    """The camera of a camera_calibration YAML (``image_width``, ``camera_matrix.data``, D)."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding='utf-8'))
        width, height = int(data['image_width']), int(data['image_height'])
        k = data['camera_matrix']['data']
    except OSError as err:
        raise InputError(f'--camera-info {path}: cannot be read ({err})') from err
    except (yaml.YAMLError, TypeError, KeyError, ValueError) as err:
        raise InputError(f'--camera-info {path}: not a camera_calibration YAML (needs '
                         'image_width, image_height and camera_matrix: {rows, cols, data}); '
                         f'{type(err).__name__}: {err}') from err
    return Calibration.from_fields(k, (data.get('distortion_coefficients') or {}).get('data', ()),
                                   str(data.get('distortion_model', 'plumb_bob')), width, height)


def _calibration(args: argparse.Namespace, calibration: Optional[Calibration], width: int,
                 height: int) -> Optional[Calibration]:
    """The camera of one image: from the flags (for its size) or the YAML, else None."""
    if args.fx is not None:
        return Calibration.of(Intrinsics(
            args.fx, args.fy or args.fx, (width - 1) / 2 if args.cx is None else args.cx,
            (height - 1) / 2 if args.cy is None else args.cy, width, height))
    return calibration


def save_outputs(out_dir: Path, stem: str, result: FrameResult, warnings: List[str]) -> int:
    """Write one image's files (each atomically); return how many were written."""
    from metricgold_ros.pointcloud import write_ply

    files = {f'{stem}_depth.npy': _npy_bytes(result.depth.astype(np.float32))}
    if result.relative:
        note = ('the model predicts relative depth (values in [0, 1], not metres): no '
                'millimetre PNG or point cloud without a ground fit (--camera-height-m and '
                'intrinsics, the floor in view)')
        if note not in warnings:
            warnings.append(note)
    else:
        files[f'{stem}_depth.png'] = _png_bytes(MILLIMETRES.encode(result.depth))
    if result.colored_bgr is not None:
        files[f'{stem}_colored.png'] = _png_bytes(result.colored_bgr)
    if result.uncertainty is not None:
        files[f'{stem}_uncertainty.npy'] = _npy_bytes(result.uncertainty.astype(np.float32))
    for name, data in files.items():
        write_atomic(out_dir / name, data)
    if result.cloud is not None:
        write_ply(out_dir / f'{stem}.ply', result.cloud)
        return len(files) + 1
    return len(files)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _png_bytes(image: np.ndarray) -> bytes:
    import cv2

    ok, encoded = cv2.imencode('.png', image)
    if not ok:
        raise InputError(f'PNG encoding of a {image.dtype} {image.shape} array failed')
    return encoded.tobytes()


def _progress_bar(files: List[Path], quiet: bool) -> Any:
    """A tqdm bar over the files when there are several and stderr is a terminal."""
    if quiet or len(files) < 2 or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(files, unit='image', desc='depth', dynamic_ncols=True)


def _say(line: str, quiet: bool, bar: Any) -> None:
    if quiet:
        return
    if bar is not None:
        bar.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr)
