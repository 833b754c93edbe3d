"""training/evaluate_synthetic.py: the split scorer behind the model card's numbers."""

import json

import numpy as np
import pytest

from metricgold_ros.model_paths import bundled_model_path
from training.evaluate_synthetic import main, scale_check


def test_scale_check_counts_scenes_off_by_more_than_1_5x_either_way():
    ratios = {10: 1.0, 11: 1.4, 12: 0.7, 13: 1.6, 14: 0.5, 15: 1.2}
    check = scale_check(ratios)
    assert check['off_share'] == pytest.approx(2 / 6, abs=1e-4)
    assert check['worst_seed'] == 14 and check['worst_ratio'] == 0.5
    assert check['p05'] < 0.7 < 1.4 < check['p95'] <= 1.6


def test_it_reports_accuracy_boundaries_scale_and_the_edge_frame(tmp_path, capsys):
    model = bundled_model_path()
    assert model is not None
    out = tmp_path / 'eval.json'
    assert main(['--model', str(model), '--per-kind', '3', '--seed', '600000', '--size',
                 '160x120', '--train-count', '3', '--walls', '2', '--json', str(out)]) == 0
    summary = json.loads(out.read_text())
    table = capsys.readouterr().out
    for kind in ('indoor', 'outdoor'):
        model_row = summary['results'][kind]['model']
        assert 0 < model_row['abs_rel'] < 1 and 0 <= model_row['boundary_f1'] <= 1
        scale = model_row['scale']
        assert 0 <= scale['off_share'] <= 1 and scale['worst_seed'] in range(600000, 600003)
        assert scale['p05'] <= scale['p95'] and f'{kind}: the model\'s scale' in table
        assert summary['results'][kind]['constant']['boundary_f1'] == 0.0
    wall = summary['wall_border']
    assert wall['count'] == 2 and wall['ratio'] == pytest.approx(
        wall['border_abs_rel'] / wall['centre_abs_rel'], abs=2e-3)
    assert 'edge frame, 2 flat walls' in table
