"""The README's main command, `make demo`, in its short mode: real node, camera, recorder."""

import json
import os
import shutil
import subprocess

import pytest

from conftest import REPO_ROOT


@pytest.mark.slow
def test_make_demo_short_mode(tmp_path):
    if shutil.which('make') is None:
        pytest.skip('make is not installed')
    out = tmp_path / 'demo_out'
    env = dict(os.environ)
    result = subprocess.run(['make', '-s', 'demo', 'FRAMES=6', f'OUT={out}'], cwd=REPO_ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / 'summary.json').read_text())
    assert {'frames_sent', 'frames_received', 'frames_dropped', 'latency_ms_p50',
            'latency_ms_p95', 'abs_rel', 'delta1'} <= set(summary)
    assert summary['frames_sent'] == 6
    assert 1 <= summary['frames_received'] <= 6
    assert summary['frames_dropped'] == 6 - summary['frames_received']
    assert 0 < summary['latency_ms_p50'] <= summary['latency_ms_p95'] < 60_000
    assert summary['abs_rel'] >= 0 and 0 <= summary['delta1'] <= 1
    # The ground fit is on by default: every received frame has its depth/scale.
    assert summary['ground_fit'] is True
    assert sum(summary['ground_fit_states'].values()) == summary['frames_received']
    assert summary['abs_rel_without_fit'] >= 0
    assert list(out.glob('frame_*_rgb_depth_truth.png'))
    assert (out / 'cloud.ply').read_bytes().startswith(b'ply\n')
    assert 'demo summary' in result.stdout
