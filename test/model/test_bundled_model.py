"""The bundled model still scores what its model card reports (catches a broken model)."""

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest

from conftest import REPO_ROOT
from metricgold_ros.model_paths import bundled_model_path

CHECK_PER_KIND = 12  # the first images of the held-out split behind the card's numbers
TOLERANCE = 0.20


@pytest.mark.slow
def test_bundled_model_matches_its_reported_accuracy(tmp_path):
    model = bundled_model_path()
    assert model is not None, 'the bundled model metricgold_ros/models/metricgold-tiny is missing'
    # The same first images, scored when the model card was written.
    reported = json.loads((model / 'evaluation.json').read_text())['check_subset']
    out = tmp_path / 'check.json'
    subprocess.run([sys.executable, str(REPO_ROOT / 'training' / 'evaluate_synthetic.py'),
                    '--model', str(model), '--per-kind', str(CHECK_PER_KIND), '--seed',
                    str(reported['seed']), '--size', 'x'.join(map(str, reported['size'])),
                    '--train-count', '20', '--json', str(out)], check=True, timeout=600,
                   capture_output=True)
    measured = json.loads(out.read_text())['results']
    for kind, methods in reported['results'].items():
        expected = methods['model']['abs_rel']
        got = measured[kind]['model']['abs_rel']
        assert got == pytest.approx(expected, rel=TOLERANCE), (kind, got, expected)


def test_bundled_model_is_the_default(capsys):
    from metricgold_ros.model import MetricGoldPipeline

    model = bundled_model_path()
    assert model is not None
    pipeline = MetricGoldPipeline.from_pretrained(model, device='cpu')
    assert not pipeline.relative
    assert (model / 'MODEL_CARD.md').is_file()
    size_mb = sum(p.stat().st_size for p in model.rglob('*') if p.is_file()) / 1e6
    assert size_mb < 25, f'bundled model is {size_mb:.1f} MB, the budget is 25 MB'


def test_infer_and_bag_default_to_it_and_say_so_once(tmp_path, capsys):
    from bag_helpers import read_bag, run_bag, write_camera_bag

    from metricgold_ros.tools import cli
    from metricgold_ros.synthetic.scenes import render_sample

    notice = '--model not set: using the bundled model metricgold-tiny'
    image = tmp_path / 'room.png'
    cv2.imwrite(str(image), render_sample(7, 'indoor', 160, 120).rgb[..., ::-1])
    code = cli.main(['infer', str(image), str(image), '--out', str(tmp_path / 'infer')])
    err = capsys.readouterr().err
    assert code == 0 and err.count(notice) == 1, err
    assert np.load(tmp_path / 'infer' / 'room_depth.npy').shape == (120, 160)

    bag = write_camera_bag(tmp_path / 'in', count=2)
    code, summary, err = run_bag(capsys, bag.path, tmp_path / 'out')
    assert code == 0 and summary['frames'] == 2 and err.count(notice) == 1, err
    assert len(read_bag(tmp_path / 'out')['/camera/depth/image']) == 2
