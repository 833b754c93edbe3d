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


def test_inference_flags_are_the_node_parameters(capsys):
    """One definition: every shared flag is generated from the node's parameter table, with
    its limits (the node's message on a value out of range), default and help."""
    import argparse

    from metricgold_ros.node.parameters import SPECS
    from metricgold_ros.tools.options import (INFERENCE_FLAGS, MODEL_FLAGS, MOUNTING_FLAGS,
                                              OUTPUT_FLAGS, add_inference_arguments,
                                              add_mounting_arguments, add_output_arguments,
                                              options_from_args)

    parser = argparse.ArgumentParser()
    add_inference_arguments(parser)
    add_output_arguments(parser, points_help='x')
    add_mounting_arguments(parser)
    defaults = parser.parse_args([])
    for flag in MODEL_FLAGS + INFERENCE_FLAGS + OUTPUT_FLAGS + MOUNTING_FLAGS:
        assert getattr(defaults, flag.dest or flag.param) == SPECS[flag.param].default
    for argv, words in ((['--denoising-steps', '51'], 'denoising_steps: 51 is outside [0, 50]'),
                        (['--ensemble-size', '33'], 'ensemble_size: 33 is outside [1, 32]'),
                        (['--camera-pitch-deg', '91'], 'camera_pitch_deg: 91.0 is outside'),
                        (['--points-stride', 'x'], "'x' is not an integer")):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
        assert words in capsys.readouterr().err
    # The node's meaning of 0 / -1, through the node's own mapping.
    options = options_from_args(parser.parse_args(['--seed', '-1', '--max-depth', '0',
                                                   '--no-colored']))
    assert options.seed is None and options.max_depth_m == float('inf')
    assert options.denoising_steps is None and options.processing_resolution is None
    assert options.colored is False
