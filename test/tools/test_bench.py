"""``metricgold bench`` on a tiny real model: the JSON it writes, and the fast image paths.

No timing is asserted here (speed claims live in BENCHMARKS.md); the tests check that every
number is produced and sane, and that our pipeline computes what diffusers' Marigold does.
"""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metricgold_ros.tools.cli import main
from metricgold_ros.model import image_ops

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_bench_writes_the_headline_numbers(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / 'bench.json'
    assert main(['bench', '--quick', '--model', str(tiny_model_dir), '--json', str(out),
                 '--repeats', '2', '--warmup', '1']) == 0
    report = json.loads(out.read_text())
    assert 0.2 < report['reference_ratio'] < 5.0
    assert 0.0 < report['overhead_ms_640x480'] < 1000.0
    assert report['overhead_cpu_ms_640x480'] > 0.0
    stages = report['sizes']['640x480']['stages_ms']
    for name in ('resize + normalise + pad', 'VAE encode', 'VAE decode', 'cloud stride 1 xyz',
                 'cloud stride 4 xyz+rgb', 'colorize (auto range)', '  resize back'):
        assert math.isfinite(stages[name]) and stages[name] >= 0.0, name
    assert any(name.startswith('messages:') and 'rosbags' in name for name in stages)
    assert any(name.startswith('UNet x') for name in stages)
    reference = report['reference']['640x480']['E1']
    # Same networks, noise and schedule: only the uint8 input resize differs (< 1 grey level).
    assert reference['max_abs_log_depth_diff'] < 0.05
    assert reference['mean_abs_log_depth_diff'] < 0.005
    assert report['machine']['torch'] == torch.__version__
    assert 'reference_ratio' in capsys.readouterr().out


def test_sweep_reports_rows_and_the_knee(tiny_model_dir, tmp_path):
    out = tmp_path / 'sweep.json'
    assert main(['bench', '--sweep', '--model', str(tiny_model_dir), '--json', str(out),
                 '--sweep-steps', '1,2', '--sweep-ensembles', '1', '--sweep-frames', '2',
                 '--sweep-size', '64x48']) == 0
    sweep = json.loads(out.read_text())['sweep']
    assert [(row['steps'], row['ensemble']) for row in sweep['rows']] == [(1, 1), (2, 1)]
    assert all(row['abs_rel'] > 0 and row['ms_per_frame'] > 0 for row in sweep['rows'])
    assert {'steps', 'ensemble'} == set(sweep['knee']) and 'default_on_knee' in sweep


def test_sweep_of_an_e2e_ft_model_measures_its_one_step(tmp_path, capsys):
    """The bundled model is E2E-FT (one deterministic step): the sweep does not ask for more."""
    from metricgold_ros.model_paths import bundled_model_path

    model = bundled_model_path()
    assert json.loads((model / 'metricgold.json').read_text())['e2e_ft'] is True
    out = tmp_path / 'sweep.json'
    assert main(['bench', '--sweep', '--model', str(model), '--json', str(out),
                 '--sweep-steps', '1,2', '--sweep-ensembles', '1', '--sweep-frames', '2',
                 '--sweep-size', '64x48']) == 0
    sweep = json.loads(out.read_text())['sweep']
    assert [(row['steps'], row['ensemble']) for row in sweep['rows']] == [(1, 1)]
    assert 'E2E-FT model: one step only' in capsys.readouterr().out


def test_bench_refuses_bad_numbers(tiny_model_dir, capsys):
    assert main(['bench', '--model', str(tiny_model_dir), '--sweep',
                 '--sweep-steps', '0']) == 1
    assert '--sweep-steps' in capsys.readouterr().err


@pytest.mark.slow
def test_warm_start_study_runs(tiny_model_dir, tmp_path):
    spec = importlib.util.spec_from_file_location('warm_start', REPO_ROOT / 'bench' /
                                                  'warm_start.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / 'warm.json'
    assert module.main(['--model', str(tiny_model_dir), '--frames', '2', '--size', '64x48',
                        '--kinds', 'indoor', '--json', str(out)]) == 0
    report = json.loads(out.read_text())
    assert len(report['rows']) == len(module.SETTINGS)
    assert all(math.isfinite(row['abs_rel']) for row in report['rows'])
    assert module.unet_evaluations(4, 0.5) == 2 and module.unet_evaluations(1, None) == 1


def _float_reference(rgb, size):
    """The straightforward path: float [-1, 1] first, then an antialiased float resize."""
    image = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() * (2 / 255) - 1
    if image.shape[1] == 1:
        image = image.expand(-1, 3, -1, -1)
    shrink = size[0] < image.shape[-2] or size[1] < image.shape[-1]
    return F.interpolate(image[:, :3], size=size, mode='bilinear', align_corners=False,
                         antialias=shrink)


@pytest.mark.parametrize('shape,resolution', [
    ((480, 640, 3), 320), ((480, 640, 3), 768), ((37, 23, 3), 64), ((64, 48, 1), 32),
    ((50, 70, 4), 40), ((48, 64, 3), 64)])
def test_uint8_resize_matches_the_float_path(shape, resolution):
    rgb = (np.random.default_rng(1).random(shape) * 255).astype(np.uint8)
    image, padding, size = image_ops.prepare_image(
        rgb, resolution, torch.device('cpu'), torch.float32)
    expected = _float_reference(rgb, image_ops.processing_size(*shape[:2], resolution))
    got = image_ops.unpad(image, padding)
    assert size == shape[:2] and got.shape == expected.shape
    assert (got - expected).abs().max() <= 2.0 / 255.0 + 1e-6  # one grey level


@pytest.mark.parametrize('size', [(480, 640), (481, 643), (720, 1280), (30, 40), (15, 20)])
def test_float_resize_matches_torch(size):
    x = torch.rand(2, 1, 30, 40, generator=torch.Generator().manual_seed(0))
    expected = F.interpolate(x, size=size, mode='bilinear', align_corners=False,
                             antialias=size[0] < 30)
    np.testing.assert_allclose(image_ops.resize(x, size), expected, atol=1e-4)
