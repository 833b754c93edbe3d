"""`metricgold infer`: image files to depth .npy / mm PNG / colour PNG / PLY."""

import json
import sys

import cv2
import numpy as np
import pytest
from PIL import Image

from metricgold_ros.tools.cli import main
from metricgold_ros.tools.infer import load_rgb
from metricgold_ros.synthetic.scenes import render_sample

FAST = ['--processing-resolution', '64']


@pytest.fixture(scope='module')
def scene():
    """An odd-sized (97x61) rendered frame and its intrinsics."""
    return render_sample(1, 'indoor', 97, 61)


def write_images(folder, rgb):
    """The same frame as odd RGB, grayscale, 16-bit grayscale, RGBA and an EXIF-rotated JPEG."""
    folder.mkdir()
    Image.fromarray(rgb).save(folder / 'odd.png')
    Image.fromarray(rgb).convert('L').save(folder / 'gray.png')
    gray16 = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.uint16) * 257
    cv2.imwrite(str(folder / 'gray16.png'), gray16)
    Image.fromarray(rgb).convert('RGBA').save(folder / 'rgba.png')
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    Image.fromarray(rgb).save(folder / 'rotated.jpg', exif=exif, quality=95)


def run_infer(capsys, *argv):
    code = main(['infer', *map(str, argv), '--quiet'])
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    return code, (json.loads(lines[-1]) if lines else None), captured.err


def read_ply_count(path):
    header = path.read_bytes().split(b'end_header\n')[0].decode('ascii')
    return int(header.split('element vertex ')[1].split()[0])


def test_images_of_every_kind(tmp_path, capsys, fast_model, scene):
    write_images(tmp_path / 'in', scene.rgb)
    out = tmp_path / 'out'
    code, summary, _ = run_infer(capsys, tmp_path / 'in', '--out', out, '--fx',
                                 scene.fx_px, *FAST)
    assert code == 0 and summary['images'] == 5 and summary['failed'] == 0
    for stem in ('odd', 'gray', 'gray16', 'rgba', 'rotated'):
        depth = np.load(out / f'{stem}_depth.npy')
        shape = (97, 61) if stem == 'rotated' else (61, 97)  # EXIF applied: upright
        assert depth.dtype == np.float32 and depth.shape == shape, stem
        png = cv2.imread(str(out / f'{stem}_depth.png'), cv2.IMREAD_UNCHANGED)
        assert png.dtype == np.uint16 and png.shape == shape
        # The millimetre PNG round-trips to the .npy (within rounding, below 65.535 m).
        np.testing.assert_allclose(png / 1000.0, np.minimum(depth, 65.535), atol=0.0005)
        assert cv2.imread(str(out / f'{stem}_colored.png')).shape == (*shape, 3)
        assert read_ply_count(out / f'{stem}.ply') == np.isfinite(depth).sum()
    # The .npy is the model's own output for the image as loaded.
    want = fast_model(scene.rgb, processing_resolution=64).depth
    np.testing.assert_array_equal(np.load(out / 'odd_depth.npy'), want)
    gray = np.load(out / 'gray_depth.npy')
    np.testing.assert_array_equal(np.load(out / 'rgba_depth.npy'), want)
    np.testing.assert_allclose(np.load(out / 'gray16_depth.npy'), gray, rtol=0.02)
    assert not list(out.glob('.*'))  # no temporary files left


def test_exif_orientation_and_modes(tmp_path, scene):
    write_images(tmp_path / 'in', scene.rgb)
    upright = load_rgb(tmp_path / 'in' / 'rotated.jpg')
    assert upright.shape == (97, 61, 3)
    diff = np.abs(upright.astype(int) - np.rot90(scene.rgb, k=-1).astype(int)).mean()
    assert diff < 6  # only JPEG loss
    gray = load_rgb(tmp_path / 'in' / 'gray16.png')
    assert gray.dtype == np.uint8 and (gray[..., 0] == gray[..., 2]).all()
    np.testing.assert_allclose(gray[..., 0], load_rgb(tmp_path / 'in' / 'gray.png')[..., 0],
                               atol=1)
    np.testing.assert_array_equal(load_rgb(tmp_path / 'in' / 'rgba.png'), scene.rgb)


def test_camera_yaml_and_ensemble(tmp_path, capsys, fast_model, scene):
    (tmp_path / 'in').mkdir()
    Image.fromarray(scene.rgb).save(tmp_path / 'in' / 'a.png')
    # Calibrated at twice the size: scaled to the image (same aspect ratio).
    calib = tmp_path / 'cam.yaml'
    k = [2 * scene.fx_px, 0, 2 * scene.cx_px + 0.5, 0, 2 * scene.fy_px, 2 * scene.cy_px + 0.5,
         0, 0, 1]
    calib.write_text('image_width: 194\nimage_height: 122\ncamera_name: cam\n'
                     f'camera_matrix:\n  rows: 3\n  cols: 3\n  data: {k}\n'
                     'distortion_model: plumb_bob\n')
    out = tmp_path / 'out'
    code, summary, _ = run_infer(capsys, tmp_path / 'in' / 'a.png', '--out', out,
                                 '--camera-info', calib, '--ensemble-size', '2', *FAST)
    assert code == 0 and summary['files_written'] == 5
    uncertainty = np.load(out / 'a_uncertainty.npy')
    assert uncertainty.shape == (61, 97) and (uncertainty >= 0).all()
    assert read_ply_count(out / 'a.ply') == 61 * 97
    # Without intrinsics: no cloud.
    code, summary, _ = run_infer(capsys, tmp_path / 'in', '--out', tmp_path / 'out2', *FAST)
    assert code == 0 and not list((tmp_path / 'out2').glob('*.ply'))


def test_failures(tmp_path, capsys, fast_model, scene):
    (tmp_path / 'in').mkdir()
    Image.fromarray(scene.rgb).save(tmp_path / 'in' / 'good.png')
    (tmp_path / 'in' / 'broken.png').write_bytes(b'not a png')
    out = tmp_path / 'out'
    code, summary, err = run_infer(capsys, tmp_path / 'in', '--out', out, *FAST)
    assert code == 1 and 'broken.png is not a readable image' in err
    assert summary['images'] == 1 and summary['failed'] == 1
    assert (out / 'good_depth.npy').exists()  # the others are still written
    bad_yaml = tmp_path / 'bad.yaml'
    bad_yaml.write_text('image_width: 10\n')
    for argv, message in [([tmp_path / 'missing.png'], 'no such file'),
                          ([tmp_path / 'in' / 'good.png', '--camera-info', bad_yaml],
                           'camera_matrix'),
                          ([tmp_path / 'in' / 'good.png', tmp_path / 'good.png'],
                           'would both write')]:
        if argv[-1] == tmp_path / 'good.png':
            Image.fromarray(scene.rgb).save(argv[-1])
        code, _, err = run_infer(capsys, *argv, '--out', out)
        assert code == 1 and message in err, err


@pytest.mark.parametrize('argv', [['--fy', '5'], ['--fx', '5', '--camera-info', 'c.yaml'],
                                  ['--fx', '-1']])
def test_usage_errors_exit_2(tmp_path, argv):
    with pytest.raises(SystemExit) as info:
        main(['infer', str(tmp_path), '--out', str(tmp_path / 'o'), *argv])
    assert info.value.code == 2


def test_progress_bar_for_many_files(tmp_path, capsys, fast_model, scene, monkeypatch):
    (tmp_path / 'in').mkdir()
    for name in ('a', 'b', 'c'):
        Image.fromarray(scene.rgb).save(tmp_path / 'in' / f'{name}.png')
    monkeypatch.setattr(sys.stderr, 'isatty', lambda: True)
    assert main(['infer', str(tmp_path / 'in'), '--out', str(tmp_path / 'out'), *FAST]) == 0
    captured = capsys.readouterr()
    assert '3/3' in captured.err and 'image/s' in captured.err
    assert 'millimetres' in captured.out and '65.535 m' in captured.out


def test_mounting_flags_fit_each_image(tmp_path, capsys, fast_model, scene):
    (tmp_path / 'in').mkdir()
    Image.fromarray(scene.rgb).save(tmp_path / 'in' / 'a.png')
    code, summary, _ = run_infer(
        capsys, tmp_path / 'in', '--out', tmp_path / 'out', '--fx', scene.fx_px,
        '--camera-height-m', scene.camera_height_m, '--camera-pitch-deg',
        scene.camera_pitch_deg, '--camera-roll-deg', scene.camera_roll_deg, *FAST)
    assert code == 0 and sum(summary['ground_fit'].values()) == 1
    with pytest.raises(SystemExit) as exc:
        main(['infer', str(tmp_path / 'in'), '--out', str(tmp_path / 'out2'),
              '--camera-height-m', '-1'])
    assert exc.value.code == 2 and '--camera-height-m' in capsys.readouterr().err
