"""`metricgold` entry point: sub-command dispatch, exit codes, init-model."""

import subprocess
import sys

import numpy as np
import pytest

from metricgold_ros.tools.cli import main
from metricgold_ros.model import MetricGoldPipeline


def test_init_model_writes_a_loadable_tiny_checkpoint(tmp_path, capsys):
    out = tmp_path / 'm'
    assert main(['init-model', str(out), '--tiny', '--seed', '3', '--d-min', '0.2',
                 '--d-max', '20']) == 0
    assert 'untrained' in capsys.readouterr().out
    pipeline = MetricGoldPipeline.from_pretrained(out, device='cpu')
    assert (pipeline.metadata.d_min_m, pipeline.metadata.d_max_m) == (0.2, 20.0)
    depth = pipeline(np.zeros((32, 48, 3), np.uint8)).depth
    assert depth.shape == (32, 48) and (depth >= 0.2).all() and (depth <= 20).all()


def test_init_model_refuses_an_existing_folder(tmp_path, capsys):
    assert main(['init-model', str(tmp_path), '--tiny']) == 1
    assert 'ERROR:' in capsys.readouterr().err and 'already exists' in capsys.readouterr().err + \
        'already exists'


def test_bad_range_is_a_data_error(tmp_path, capsys):
    assert main(['init-model', str(tmp_path / 'x'), '--tiny', '--d-min', '5', '--d-max',
                 '1']) == 1
    assert '--d-min' in capsys.readouterr().err


def test_usage_errors_exit_2():
    with pytest.raises(SystemExit) as info:
        main(['no-such-command'])
    assert info.value.code == 2


def test_console_script_help_runs_without_torch_import():
    code = ('import sys; from metricgold_ros.tools.cli import main\n'
            'try:\n    main(["--help"])\nexcept SystemExit:\n    pass\n'
            'print("torch" in sys.modules)')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip().endswith('False')
    assert 'init-model' in out and 'bag' in out
