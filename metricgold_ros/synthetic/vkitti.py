"""Synthetic scenes written in the Virtual KITTI 2 layout, for training and tests.

``python -m metricgold_ros.synthetic --out DIR --n 100 --seed 0 --size 320x240`` (or this
module) writes them from the command line.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from metricgold_ros.depth_traits import VKITTI2_CENTIMETRES
from metricgold_ros.errors import InputError
from metricgold_ros.synthetic.scenes import KINDS, check_scene_args, render_sample
from metricgold_ros.synthetic.variety import WALL_SHARE, render_varied

VKITTI2_SCENES = {'indoor': 'Scene01', 'outdoor': 'Scene02'}
VKITTI2_VARIATION = 'clone'


def write_vkitti2(root: str | Path, n_per_kind: int, seed: int = 0, width: int = 640,
                  height: int = 480, *, kinds: Sequence[str] = KINDS,
                  overwrite: bool = False, variety: bool = False,
                  wall_share: float = WALL_SHARE) -> int:
    """Write ``n_per_kind`` frames per kind in the Virtual KITTI 2 layout; return the count.

    Indoor goes to Scene01, outdoor to Scene02; frame i is ``render_sample(seed + i, kind)``
    (with ``variety``: ``variety.render_varied``, the widened training distribution, with
    ``wall_share`` of the indoor frames walls)::

        root/SceneXX/domain.txt                 'indoor' | 'outdoor' (our extension)
        root/SceneXX/clone/intrinsic.txt        'frame cameraID K[0,0] K[1,1] K[0,2] K[1,2]'
        root/SceneXX/clone/frames/rgb/Camera_0/rgb_00000.jpg      JPEG, quality 95, 4:4:4
        root/SceneXX/clone/frames/depth/Camera_0/depth_00000.png  uint16 cm, 65535 = invalid
    """
    import cv2  # only the writer needs it: the renderer stays numpy-only

    root = Path(root)
    if not 0 <= n_per_kind <= 99999:
        raise InputError(f'n_per_kind={n_per_kind} must be in 0..99999 (5-digit frame ids)')
    for kind in kinds:
        check_scene_args(kind, width, height)
        if (root / VKITTI2_SCENES[kind]).exists() and not overwrite:
            raise InputError(f'{root / VKITTI2_SCENES[kind]} exists; choose another folder or '
                             'overwrite (--overwrite)')
    jpeg = [cv2.IMWRITE_JPEG_QUALITY, 95, cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
            cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]  # full-resolution colour: textures are fine
    render = functools.partial(render_varied, wall_share=wall_share) if variety \
        else render_sample
    for kind in kinds:
        frames = root / VKITTI2_SCENES[kind] / VKITTI2_VARIATION / 'frames'
        for name in ('rgb', 'depth'):
            (frames / name / 'Camera_0').mkdir(parents=True, exist_ok=True)
        (root / VKITTI2_SCENES[kind] / 'domain.txt').write_text(kind + '\n')
        rows = ['frame cameraID K[0,0] K[1,1] K[0,2] K[1,2]']
        for i in range(n_per_kind):
            smp = render(seed + i, kind, width, height)
            rgb_path = frames / 'rgb' / 'Camera_0' / f'rgb_{i:05d}.jpg'
            depth_path = frames / 'depth' / 'Camera_0' / f'depth_{i:05d}.png'
            if not (cv2.imwrite(str(rgb_path), smp.rgb[..., ::-1], jpeg) and
                    cv2.imwrite(str(depth_path), VKITTI2_CENTIMETRES.encode(
                        np.where(smp.valid, smp.depth_m, 0.0)))):
                raise InputError(f'could not write {rgb_path} or {depth_path}; is the disk full?')
            rows.append(f'{i} 0 {smp.fx_px!r} {smp.fy_px!r} {smp.cx_px!r} {smp.cy_px!r}')
        (frames.parent / 'intrinsic.txt').write_text('\n'.join(rows) + '\n')
    return n_per_kind * len(kinds)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m metricgold_ros.synthetic --out DIR --n 100 --seed 0 --size 320x240``."""
    parser = argparse.ArgumentParser(description='Write synthetic RGB-D in the VKITTI2 layout.')
    parser.add_argument('--out', required=True, help='output folder (Scene01, Scene02 inside)')
    parser.add_argument('--n', type=int, default=100, help='frames per kind (default 100)')
    parser.add_argument('--seed', type=int, default=0, help='seed of the first frame')
    parser.add_argument('--size', default='640x480', help='WIDTHxHEIGHT in pixels')
    parser.add_argument('--kinds', default='indoor,outdoor', help='comma-separated kinds')
    parser.add_argument('--overwrite', action='store_true', help='write into existing scenes')
    parser.add_argument('--variety', action='store_true',
                        help='the widened training distribution (synthetic/variety.py)')
    args = parser.parse_args(argv)
    try:
        width, height = (int(v) for v in args.size.lower().split('x'))
        count = write_vkitti2(args.out, args.n, args.seed, width, height,
                              kinds=args.kinds.split(','), overwrite=args.overwrite,
                              variety=args.variety)
    except ValueError:
        print(f'ERROR: --size {args.size!r} is not WIDTHxHEIGHT, e.g. 320x240', file=sys.stderr)
        return 2
    except (InputError, OSError) as err:
        print(f'ERROR: {err}', file=sys.stderr)
        return 1
    print(f'wrote {count} frames to {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
