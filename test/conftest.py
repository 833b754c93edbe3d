"""Shared pytest fixtures: loopback-only DDS, real data folder, tiny real models."""

import os
import socket
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / 'shared' / 'data'


def _free_domain_id() -> int:
    """A ROS_DOMAIN_ID whose discovery ports nobody on this machine holds.

    Fast DDS's well-known ports for domain d start at 7400 + 250 * d; a bound port means another
    test run (or a leftover process) uses that domain, so parallel runs never cross-talk.
    """
    start = os.getpid() % 100
    for offset in range(100):
        domain = (start + offset) % 100 + 1
        port = 7400 + 250 * domain
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.bind(('127.0.0.1', port))
            except OSError:
                continue
        return domain
    return 0


# Set before any test imports rclpy: discovery never leaves loopback, runs never mix.
os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
if os.environ.get('ROS_DISTRO') in ('humble', 'iron'):
    os.environ['ROS_LOCALHOST_ONLY'] = '1'  # the same setting's name before Jazzy
os.environ.setdefault('ROS_DOMAIN_ID', str(_free_domain_id()))
os.environ.setdefault('OMP_NUM_THREADS', '2')


@pytest.fixture(scope='session')
def shared_data() -> Path:
    """``../shared/data`` beside the checkout; tests using it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f'real test data not found at {SHARED_DATA} (only present in the dev tree)')
    return SHARED_DATA


@pytest.fixture(scope='session')
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny MetricGold checkpoint (random weights, real architecture) saved in the real layout."""
    from metricgold_ros.model import build_tiny_checkpoint, save_checkpoint

    path = tmp_path_factory.mktemp('models') / 'tiny'
    save_checkpoint(path, build_tiny_checkpoint(seed=0, processing_resolution=128))
    return path


@pytest.fixture(scope='session')
def tiny_pipeline(tiny_model_dir):
    """The tiny model loaded on the CPU through the public loader."""
    from metricgold_ros.model import MetricGoldPipeline

    return MetricGoldPipeline.from_pretrained(tiny_model_dir, device='cpu', dtype='float32')
