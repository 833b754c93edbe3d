"""Inference faults offline behave as in the node: ``metricgold infer`` and ``metricgold bag``
retry an out-of-memory frame at --fallback-processing-resolution or skip it with an ``ERROR:``
line and exit code 1, never a traceback; the other frames are written."""

import numpy as np
import pytest
from PIL import Image

from bag_helpers import run_bag, write_camera_bag
from metricgold_ros.faults import FaultInjector
from metricgold_ros.tools.cli import main

FAST = ['--processing-resolution', '64']


@pytest.fixture
def faulty(fast_model):
    """The session's tiny pipeline with a real out-of-memory before every 2nd VAE decode."""
    fast_model.stage_hook = FaultInjector('vae_decode:oom:every=2')
    yield fast_model
    fast_model.stage_hook = None


def _images(folder, count):
    folder.mkdir()
    for i in range(count):
        Image.fromarray(np.full((48, 64, 3), 40 * i, np.uint8)).save(folder / f'{i}.png')
    return folder


def test_infer_skips_the_failed_image_and_exits_1(tmp_path, capsys, faulty):
    code = main(['infer', str(_images(tmp_path / 'in', 2)), '--out', str(tmp_path / 'out'),
                 *FAST])
    err = capsys.readouterr().err
    assert code == 1 and 'Traceback' not in err
    assert 'ERROR:' in err and 'OutOfMemoryError in vae_decode' in err and 'frame skipped' in err
    assert 'fallback_processing_resolution' in err
    assert sorted(p.name for p in (tmp_path / 'out').glob('*_depth.npy')) == ['0_depth.npy']


def test_infer_retries_at_the_fallback_resolution(tmp_path, capsys, faulty):
    code = main(['infer', str(_images(tmp_path / 'in', 2)), '--out', str(tmp_path / 'out'),
                 '--fallback-processing-resolution', '32', *FAST])
    err = capsys.readouterr().err
    assert code == 0 and 'retried once' in err and 'Traceback' not in err
    assert len(list((tmp_path / 'out').glob('*_depth.npy'))) == 2


def test_bag_skips_the_failed_frame_writes_the_others_and_exits_1(tmp_path, capsys, faulty):
    bag = write_camera_bag(tmp_path / 'in', count=3)
    code, _, err = run_bag(capsys, bag.path, tmp_path / 'out', *FAST)
    assert code == 1 and 'Traceback' not in err
    assert 'inference failed on 1 image(s)' in err and 'OutOfMemoryError' in err
    assert (tmp_path / 'out').is_dir()  # the other frames are committed
    code, summary, err = run_bag(capsys, bag.path, tmp_path / 'out2', *FAST,
                                 '--fallback-processing-resolution', '32')
    assert code == 0 and summary['messages']['/camera/depth/image'] == 3
