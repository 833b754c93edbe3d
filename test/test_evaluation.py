"""Evaluation: metrics against hand-computed numbers, alignment, crops, folders and the CLI."""

import importlib.util
import json
import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from metricgold_ros.tools import cli
from metricgold_ros.errors import InputError
from metricgold_ros.boundaries import (BoundaryCounts, border_abs_rel, boundary_counts,
                                       depth_boundaries, plane_jumps)
from metricgold_ros.evaluation import (METRIC_KEYS, align, depth_metrics, evaluate_folder,
                                       evaluate_image, fit_alignment, format_table, get_protocol,
                                       protocol_mask)

REPO_ROOT = Path(__file__).resolve().parents[1]
LN2 = math.log(2.0)


def test_metrics_hand_computed():
    gt = np.array([[1.0, 2.0, 4.0]])
    pred = np.array([[2.0, 2.0, 8.0]])
    m = depth_metrics(pred, gt)
    # |p-g|/g = 1/1, 0/2, 4/4 -> (1 + 0 + 1) / 3
    assert m['abs_rel'] == pytest.approx(2 / 3)
    # (p-g)^2/g = 1/1, 0, 16/4 -> (1 + 0 + 4) / 3
    assert m['sq_rel'] == pytest.approx(5 / 3)
    # (p-g)^2 = 1, 0, 16 -> sqrt(17 / 3)
    assert m['rmse'] == pytest.approx(math.sqrt(17 / 3))
    # ln p - ln g = ln2, 0, ln2 -> sqrt(2 ln2^2 / 3)
    assert m['rmse_log'] == pytest.approx(LN2 * math.sqrt(2 / 3))
    # |log10 p - log10 g| = log10 2, 0, log10 2
    assert m['log10'] == pytest.approx(2 * math.log10(2.0) / 3)
    # ratios 2, 1, 2: only the middle pixel is under 1.25, 1.5625 and 1.953125
    assert (m['delta1'], m['delta2'], m['delta3']) == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    # d = (ln2, 0, ln2): mean(d^2) = 2/3 ln2^2, mean(d)^2 = 4/9 ln2^2, var = 2/9 ln2^2
    assert m['silog'] == pytest.approx(100 * LN2 * math.sqrt(2) / 3)
    assert tuple(m) == METRIC_KEYS


def test_delta_thresholds_both_directions():
    gt = np.ones((2, 2))
    # ratios max(p/g, g/p) = 1, 1.4, 1.8 (from p = 1/1.8 < g), 2
    pred = np.array([[1.0, 1.4], [1 / 1.8, 2.0]])
    m = depth_metrics(pred, gt)
    # 1 < 1.25; 1.4 < 1.5625; 1.8 < 1.953125; 2 passes none
    assert (m['delta1'], m['delta2'], m['delta3']) == pytest.approx((0.25, 0.5, 0.75))


def test_gt_against_itself_and_scaled_by_1_1():
    gt = np.array([[1.0, 2.0], [3.0, 4.0]])
    same = depth_metrics(gt, gt)
    assert same['abs_rel'] == 0 and same['rmse'] == 0 and same['silog'] == 0
    assert same['delta1'] == 1
    m = depth_metrics(gt * 1.1, gt)
    assert m['abs_rel'] == pytest.approx(0.1)
    # (0.1 g)^2 / g = 0.01 g -> 0.01 * mean(1, 2, 3, 4) = 0.025
    assert m['sq_rel'] == pytest.approx(0.025)
    # sqrt(mean(0.01 g^2)) = 0.1 * sqrt((1 + 4 + 9 + 16) / 4) = 0.1 * sqrt(7.5)
    assert m['rmse'] == pytest.approx(0.1 * math.sqrt(7.5))
    assert m['rmse_log'] == pytest.approx(math.log(1.1))
    assert m['log10'] == pytest.approx(math.log10(1.1))
    assert m['delta1'] == 1 and m['silog'] == pytest.approx(0, abs=1e-9)  # a pure scale


def test_invalid_pixels_are_excluded():
    gt = np.array([[1.0, 0.0, np.nan, 2.0, 2.0, 2.0, 4.0]])
    pred = np.array([[1.5, 9.0, 9.0, np.nan, 0.0, -1.0, 4.0]])
    # only pixels 0 (|0.5|/1) and 6 (0/4) count
    m = depth_metrics(pred, gt)
    assert m['abs_rel'] == pytest.approx(0.25)
    m = depth_metrics(pred, gt, valid=np.array([[False] * 6 + [True]]))
    assert m['abs_rel'] == 0


def test_metric_errors_name_the_problem():
    with pytest.raises(InputError, match='no valid pixels'):
        depth_metrics(np.ones((2, 2)), np.zeros((2, 2)))
    with pytest.raises(InputError, match='shape'):
        depth_metrics(np.ones((2, 2)), np.ones((2, 3)))


def test_scale_alignment_recovers_scaled_prediction():
    gt = np.array([[1.0, 2.0, 5.0], [7.0, 0.0, 3.0]])
    pred = gt / 3.0
    pred[1, 1] = np.nan  # GT invalid there: must not disturb the fit
    assert fit_alignment(pred, gt, None, 'scale') == pytest.approx((3.0, 0.0))
    valid = gt > 0
    np.testing.assert_allclose(align(pred, gt, valid, 'scale')[valid], gt[valid], rtol=1e-12)


def test_scale_shift_alignment_recovers_affine():
    gt = np.array([[1.0, 2.0, 5.0], [7.0, 9.0, 3.0]])
    pred = (gt - 0.5) / 2.0  # gt = 2 * pred + 0.5
    scale, shift = fit_alignment(pred, gt, None, 'scale-shift')
    assert (scale, shift) == pytest.approx((2.0, 0.5))
    np.testing.assert_allclose(align(pred, gt, None, 'scale-shift'), gt, rtol=1e-12)
    with pytest.raises(InputError, match='constant'):
        fit_alignment(np.ones_like(gt), gt, None, 'scale-shift')
    with pytest.raises(InputError, match='align mode'):
        fit_alignment(pred, gt, None, 'affine')


def test_nyu_crop_selects_eigen_rows_and_cols():
    rows, cols = np.indices((480, 640))
    mask = protocol_mask(np.full((480, 640), 5.0), 'nyu')
    # Eigen crop: rows 45..470 and cols 41..600 inclusive
    assert np.array_equal(np.unique(rows[mask]), np.arange(45, 471))
    assert np.array_equal(np.unique(cols[mask]), np.arange(41, 601))
    assert mask.sum() == (471 - 45) * (601 - 41)
    with pytest.raises(InputError, match='480, 640'):
        protocol_mask(np.ones((240, 320)), 'nyu')


def test_kitti_crop_selects_garg_rows_and_cols():
    rows, cols = np.indices((375, 1242))
    mask = protocol_mask(np.full((375, 1242), 20.0), 'kitti')
    # 0.40810811*375 = 153.04 -> 153; 0.99189189*375 = 371.96 -> 371
    assert np.array_equal(np.unique(rows[mask]), np.arange(153, 371))
    # 0.03594771*1242 = 44.65 -> 44; 0.96405229*1242 = 1197.35 -> 1197
    assert np.array_equal(np.unique(cols[mask]), np.arange(44, 1197))


def test_protocol_caps_and_prediction_clipping():
    gt = np.array([[0.0005, 5.0, 10.0, 10.5, np.nan, 2.0]])
    assert list(protocol_mask(gt, get_protocol('generic', max_depth_m=10.0))[0]) == [
        False, True, False, False, False, True]  # caps are exclusive, NaN is invalid
    gt_nyu = np.full((480, 640), 5.0)
    pred = np.full((480, 640), 20.0)  # clipped to 10 m -> |10 - 5| / 5 = 1
    result = evaluate_image(pred, gt_nyu, 'nyu')
    assert result.metrics['abs_rel'] == pytest.approx(1.0)
    assert result.valid_px == (471 - 45) * (601 - 41)
    with pytest.raises(InputError, match='--protocol generic'):
        get_protocol('kitti', max_depth_m=50.0)


def test_evaluate_image_counts_missing_and_aligns():
    gt = np.array([[1.0, 2.0, 4.0, 8.0]])
    pred = np.array([[0.5, 1.0, 2.0, np.nan]])
    result = evaluate_image(pred, gt, 'generic', align='scale')
    assert result.scale == pytest.approx(2.0) and result.missing_pred_px == 1
    assert result.valid_px == 3 and result.metrics['abs_rel'] == pytest.approx(0.0, abs=1e-12)


def _write_png(path: Path, depth_units: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), depth_units.astype(np.uint16))


@pytest.fixture
def folders(tmp_path):
    """GT in millimetres: sub/a.png (pred .npy metres) and b.png (pred 16-bit mm, half size)."""
    gt_dir, pred_dir = tmp_path / 'gt', tmp_path / 'pred'
    gt_a = np.arange(1, 13, dtype=np.float64).reshape(3, 4) * 1000  # 1..12 m
    gt_a[0, 0] = 0  # invalid
    _write_png(gt_dir / 'sub' / 'a.png', gt_a)
    (pred_dir / 'sub').mkdir(parents=True)
    np.save(pred_dir / 'sub' / 'a.npy', (gt_a / 1000 * 1.1).astype(np.float32))
    _write_png(gt_dir / 'b.png', np.full((4, 6), 2000))
    _write_png(pred_dir / 'b.png', np.full((2, 3), 2200))
    return pred_dir, gt_dir


def test_cli_end_to_end(folders, tmp_path, capsys):
    pred_dir, gt_dir = folders
    out = tmp_path / 'report.json'
    code = cli.main(['eval', '--pred', str(pred_dir), '--gt', str(gt_dir), '--gt-scale', '1000',
                     '--json', str(out), '--per-image'])
    assert code == 0
    report = json.loads(out.read_text())
    assert set(report) == {'mean', 'per_image', 'protocol', 'align', 'count', 'skipped'}
    assert tuple(report['mean']) == METRIC_KEYS
    assert report['count'] == 2 and (report['protocol'], report['align']) == ('generic', 'none')
    assert [r['name'] for r in report['per_image']] == ['b', 'sub/a']
    assert report['mean']['abs_rel'] == pytest.approx(0.1, abs=1e-6)
    assert report['per_image'][1]['valid_px'] == 11
    assert 'resized 2x3 -> 4x6' in report['per_image'][0]['notes'][0]
    printed = capsys.readouterr().out
    assert 'abs_rel' in printed and 'sub/a' in printed
    assert [p.name for p in tmp_path.iterdir() if p.suffix == '.tmp'] == []


def test_cli_missing_prediction_and_scale(folders, capsys):
    pred_dir, gt_dir = folders
    (pred_dir / 'sub' / 'a.npy').unlink()
    argv = ['eval', '--pred', str(pred_dir), '--gt', str(gt_dir)]
    assert cli.main(argv + ['--gt-scale', '1000']) == 1
    err = capsys.readouterr().err
    assert err.startswith('ERROR: ') and 'no prediction' in err and 'sub/a' in err
    assert cli.main(argv) == 1
    assert '--gt-scale is required' in capsys.readouterr().err


def test_missing_prediction_message(folders):
    pred_dir, gt_dir = folders
    (pred_dir / 'sub' / 'a.npy').unlink()
    with pytest.raises(InputError, match=r'1 of 2 .* no prediction .*sub/a'):
        evaluate_folder(pred_dir, gt_dir, 1000.0)


def test_image_without_valid_pixels_is_skipped(folders):
    pred_dir, gt_dir = folders
    _write_png(gt_dir / 'c.png', np.zeros((2, 2)))
    np.save(pred_dir / 'c.npy', np.ones((2, 2), np.float32))
    report = evaluate_folder(pred_dir, gt_dir, 1000.0)
    assert report.count == 2 and [name for name, _ in report.skipped] == ['c']
    assert 'skipped c' in format_table(report)


def test_training_script_runs_the_same_command(folders, capsys):
    pred_dir, gt_dir = folders
    script = REPO_ROOT / 'training' / 'evaluate.py'
    spec = importlib.util.spec_from_file_location('training_evaluate', script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(['--pred', str(pred_dir), '--gt', str(gt_dir), '--gt-scale', '1000']) == 0
    assert 'mean' in capsys.readouterr().out


def _run_json(pred_dir: Path, gt_dir: Path, gt_scale: str, out: Path) -> dict:
    argv = ['eval', '--pred', str(pred_dir), '--gt', str(gt_dir), '--gt-scale', gt_scale,
            '--json', str(out)]
    assert cli.main(argv) == 0
    return json.loads(out.read_text())


def test_real_tum_depth_against_itself_times_1_05(shared_data, tmp_path):
    src = shared_data / 'rgbd' / 'tum' / 'TUM_depth.png'
    gt_dir, pred_dir = tmp_path / 'gt', tmp_path / 'pred'
    gt_dir.mkdir()
    pred_dir.mkdir()
    shutil.copy(src, gt_dir / 'TUM_depth.png')
    raw = cv2.imread(str(src), cv2.IMREAD_UNCHANGED)
    np.save(pred_dir / 'TUM_depth.npy', (raw / 5000.0 * 1.05).astype(np.float32))
    report = _run_json(pred_dir, gt_dir, '5000', tmp_path / 'tum.json')
    assert report['mean']['abs_rel'] == pytest.approx(0.05, abs=1e-6)
    assert report['per_image'][0]['valid_px'] == int((raw > 0).sum())


def test_real_dgp_sparse_depth_against_itself(shared_data, tmp_path):
    gt_dir = shared_data / 'rgbd' / 'dgp_front' / 'depth'
    for path in sorted(gt_dir.glob('*.png')):
        raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        np.save(tmp_path / f'{path.stem}.npy', (raw / 256.0).astype(np.float32))
    report = _run_json(tmp_path, gt_dir, '256', tmp_path / 'dgp.json')
    assert report['count'] == 6 and report['mean']['abs_rel'] == 0
    assert report['mean']['delta1'] == 1
    assert all(0 < r['valid_px'] < 10000 for r in report['per_image'])  # sparse lidar


def _box_scene(size: int = 40, top: int = 10, left: int = 10, side: int = 10,
               near_m: float = 2.0, far_m: float = 4.0) -> np.ndarray:
    """A ``side`` x ``side`` px box at ``near_m`` in front of a wall at ``far_m``."""
    depth = np.full((size, size), far_m)
    depth[top:top + side, left:left + side] = near_m
    return depth


def _outline(size: int = 40, top: int = 10, left: int = 10, side: int = 10) -> np.ndarray:
    ring = np.zeros((size, size), bool)
    ring[top:top + side, left:left + side] = True
    ring[top + 1:top + side - 1, left + 1:left + side - 1] = False
    return ring


def test_boundaries_are_the_near_side_outline_of_a_box():
    gt = _box_scene()
    valid = np.ones(gt.shape, bool)
    np.testing.assert_array_equal(depth_boundaries(gt, valid), _outline())
    counts = boundary_counts(gt, gt)
    assert counts == BoundaryCounts(36, 36, 36, 36)  # a 10 px square's outline: 4 * 9 px
    assert (counts.precision, counts.recall, counts.f1) == (1.0, 1.0, 1.0)


def test_boundary_jump_threshold_and_invalid_neighbours():
    valid = np.ones((4, 6), bool)
    for far_m, found in ((4.3, False), (4.5, True)):  # 7.5 % and 12.5 % over 4 m
        depth = np.full((4, 6), far_m)
        depth[:, :3] = 4.0
        edges = depth_boundaries(depth, valid)
        assert edges.any() == found
        assert not edges[:, 3:].any()  # only the near side is marked
    depth[:, 3] = np.nan  # the far side unknown (sky): no boundary
    assert not depth_boundaries(depth, valid).any()


def test_boundaries_within_the_tolerance_match_and_far_ones_do_not():
    gt = _box_scene()
    near = boundary_counts(_box_scene(top=12, left=11), gt, tolerance_px=2)
    assert (near.precision, near.recall) == (1.0, 1.0)
    assert boundary_counts(_box_scene(top=12, left=11), gt, tolerance_px=1).f1 < 1.0
    far = boundary_counts(_box_scene(top=25, left=25), gt, tolerance_px=2)
    assert (far.pred_px, far.gt_px, far.precision, far.recall, far.f1) == (36, 36, 0, 0, 0)


def test_flat_prediction_finds_no_boundary_and_scores_zero():
    counts = boundary_counts(np.full((40, 40), 3.0), _box_scene())
    assert counts == BoundaryCounts(0, 0, 36, 0)
    assert (counts.precision, counts.recall, counts.f1) == (0.0, 0.0, 0.0)
    total = counts + boundary_counts(_box_scene(), _box_scene())
    assert total == BoundaryCounts(36, 36, 72, 36) and total.recall == 0.5
    assert total.f1 == pytest.approx(2 * 1.0 * 0.5 / 1.5)


def test_a_blurred_edge_needs_the_wider_baseline_and_a_slope_is_no_edge():
    gt = np.full((8, 20), 2.5)
    gt[:, :10] = 2.0
    blurred = gt.copy()
    blurred[:, 9:12] = 2.0 * 1.25 ** (np.arange(3) / 3)  # 2 -> 2.5 m in 3 steps of 7.7 %
    assert boundary_counts(blurred, gt).recall == 0.0
    # Only the pair (9, 12) spans the whole step: its near side, column 9, is the true edge.
    wide = boundary_counts(blurred, gt, baseline_px=3)
    assert wide == BoundaryCounts(8, 8, 8, 8)
    # A smooth slope of 5 % a pixel (16 % over 3 px) is no edge; without steps_only it is.
    slope = np.repeat(1.05 ** np.arange(20.0)[None, :], 8, axis=0)
    assert not depth_boundaries(slope, np.ones(slope.shape, bool), 0.1, 3, steps_only=True).any()
    assert depth_boundaries(slope, np.ones(slope.shape, bool), 0.1, 3).all(axis=0)[:17].all()
    assert boundary_counts(slope, gt, baseline_px=3).pred_px == 0


def test_a_plane_near_the_horizon_is_not_a_boundary_of_exact_depth():
    rows = np.arange(30, dtype=float)[:, None]
    floor = np.repeat(1.0 / (0.02 + 0.01 * rows), 20, axis=1)  # inverse depth linear in v
    valid = np.ones(floor.shape, bool)
    # Rows i, i+1 differ by (i + 3) / (i + 2): 50 % .. 11 % for i < 8; the near row is marked.
    edges = depth_boundaries(floor, valid)
    assert edges[1:9].all() and not edges[0].any() and not edges[9:].any()
    jumps = plane_jumps(floor, valid)
    assert jumps[:9].all() and not jumps[9:].any()
    scene = floor.copy()
    scene[15:25, 5:15] = 2.0  # a box on the floor: its outline is the only boundary
    counts = boundary_counts(scene, scene, planar_gt=True)
    assert counts.gt_px == 36 and counts.f1 == 1.0
    assert boundary_counts(scene, scene).gt_px > 36


def test_border_abs_rel_measures_a_frame_and_ignores_a_global_scale():
    gt = np.full((16, 16), 2.0)
    pred = gt.copy()
    pred[:2, :] = pred[-2:, :] = pred[:, :2] = pred[:, -2:] = 3.0  # a 2 px frame, 50 % off
    assert border_abs_rel(pred, gt, band_px=2) == pytest.approx((0.5, 0.0))
    border, centre = border_abs_rel(pred, gt, band_px=4)  # 112 of 192 band px are off
    assert (border, centre) == pytest.approx((0.5 * 112 / 192, 0.0))
    assert border_abs_rel(gt * 2.0, gt, band_px=2, align_mode='scale') == pytest.approx(
        (0.0, 0.0))
    assert border_abs_rel(gt * 2.0, gt, band_px=2) == pytest.approx((1.0, 1.0))
    with pytest.raises(InputError, match='band_px'):
        border_abs_rel(pred, gt, band_px=8)
    with pytest.raises(InputError, match='tolerance_px'):
        boundary_counts(pred, gt, tolerance_px=-1)
    with pytest.raises(InputError, match='baseline_px'):
        depth_boundaries(gt, np.ones(gt.shape, bool), baseline_px=0)
