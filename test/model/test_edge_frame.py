"""The bundled model's edge frame, measured on walls seen square on (issue 24, item 1).

A flat wall has one depth everywhere, so whatever band of error runs along the image's edges
belongs to the model. Scored as ``training/evaluate_synthetic.py --walls`` scores it
(:func:`metricgold_ros.boundaries.border_abs_rel`, the prediction scale-fitted per image so
that a wrong scale of the whole wall, which border and centre share, does not hide the band),
on frames of the model's own processing size (no resize).
"""

from pathlib import Path

import numpy as np
import pytest

from metricgold_ros.boundaries import border_abs_rel
from metricgold_ros.model_paths import bundled_model_path
from metricgold_ros.synthetic.scenes import flat_wall

WALLS = 8
DISTANCES_M = (1.0, 2.0, 3.5, 6.0)
WIDTH, HEIGHT = 128, 96  # the bundled model's processing size: the networks see these pixels
BAND_PX = 4  # half a latent pixel
CONFIGS = Path(__file__).resolve().parents[2] / 'training' / 'configs'


@pytest.fixture(scope='module')
def wall_scores() -> np.ndarray:
    """``[WALLS, 2]``: border and centre AbsRel of the bundled model on each wall."""
    from metricgold_ros.model import MetricGoldPipeline

    model = bundled_model_path()
    assert model is not None, 'the bundled model metricgold_ros/models/metricgold-tiny is missing'
    pipeline = MetricGoldPipeline.from_pretrained(model, device='cpu', dtype='float32')
    scores = []
    for seed in range(WALLS):
        wall = flat_wall(seed, DISTANCES_M[seed % len(DISTANCES_M)], WIDTH, HEIGHT)
        depth = pipeline(wall.rgb).depth_m
        scores.append(border_abs_rel(depth, wall.depth_m, wall.valid, BAND_PX, 'scale'))
    return np.array(scores)


def test_the_edge_frame_is_no_wider_than_recorded(wall_scores):
    # Today's model: border 0.192, centre 0.121 (1.58x) with its edge refinement, 0.215 /
    # 0.121 (1.78x) without (BENCHMARKS.md 16). A change in preprocessing or decoding that
    # widened the frame would show here first.
    border, centre = wall_scores.mean(axis=0)
    assert np.isfinite(wall_scores).all() and 0 < centre < 0.2
    assert border <= 2.0 * centre, (border, centre)


@pytest.mark.xfail(strict=True, reason='issue 24: the edge frame is learned from whole-frame '
                   'training (the training rooms are nearer at the border); it needs a '
                   'retrained model, see BENCHMARKS.md 16')
def test_no_border_band_on_a_flat_wall(wall_scores):
    border, centre = wall_scores.mean(axis=0)
    assert border <= 1.10 * centre, (border, centre, wall_scores.tolist())


@pytest.mark.parametrize('name, render, zoom', [('tiny_bundled_e2e_crops', (160, 120), 1.25),
                                                ('tiny_bundled_e2e_crops_wide', (256, 192), 2.0)])
def test_window_fine_tune_configs_train_on_windows_of_larger_renders(tmp_path, name, render,
                                                                     zoom):
    """The issue-24 experiments: the bundled model fine-tuned on 128x96 windows at random
    offsets of larger renders, camera-aware, same seeds and objective as the bundled run."""
    from training.config import load_config

    config = load_config(CONFIGS / f'{name}.yaml', tmp_path)
    train = config.data.generate['train']
    assert (train.width, train.height, train.seed, train.count) == (*render, 0, 2000)
    assert config.data.resolution == (96, 128) and config.data.scale_range == (1.0, zoom)
    # Zoom 1 shrinks the render to 128 px wide, zoom z to 128 z px: never enlarged (blurred).
    assert 128 * zoom <= render[0] and render[0] * 3 == render[1] * 4
    assert config.model.pretrained == 'metricgold_ros/models/metricgold-tiny'
    assert config.model.canonical_focal_px == 100.0 and config.train.objective == 'e2e_ft'


@pytest.mark.parametrize('name, start, walls', [
    ('tiny_bundled_edges', 'metricgold-tiny', 0.15),
    ('tiny_bundled_edges_walls', 'metricgold-tiny', 0.5),
    ('tiny_bundled_edges_border', 'runs/edges/final', 0.5),
    ('tiny_bundled_edges_scratch', None, 0.15)])
def test_edge_configs_mix_the_widened_data_with_the_generator_own(tmp_path, name, start,
                                                                 walls):
    """The issue-24 runs: half the frames from synthetic/variety.py (walls, close-ups, unusual
    colours and poses), windows of 0.8-1.0 of 160x120 renders, the gradient loss."""
    from training.config import load_config

    config = load_config(CONFIGS / f'{name}.yaml', tmp_path)
    generate = config.data.generate
    assert not generate['train'].variety and generate['varied'].variety
    assert generate['varied'].wall_share == walls
    for split in ('train', 'varied'):
        assert (generate[split].width, generate[split].height, generate[split].seed) == (
            160, 120, 0)
    assert [s.probability for s in config.data.train] == [0.5, 0.5]
    assert config.data.scale_range == (1.0, 1.25) and config.data.resolution == (96, 128)
    assert config.train.objective == 'e2e_ft' and config.train.gradient_loss_weight > 0
    assert config.model.canonical_focal_px == 100.0
    assert (config.train.border_weight > 1) == name.endswith('border')
    if start:
        assert config.model.pretrained.endswith(start) and config.train.train_decoder
    else:
        assert config.model.tiny and config.vae_stage.steps > 0
