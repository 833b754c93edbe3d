"""Shared pytest fixtures: loopback-only DDS, real data folder, tiny real models."""

import os
from pathlib import Path

import pytest

from metricgold_ros.ros_env import free_domain_id, use_loopback

REPO_ROOT = Path(__file__).resolve().parents[1]
# ../shared/data beside the checkout; METRICGOLD_SHARED_DATA names it for a checkout elsewhere
# (a git worktree).
SHARED_DATA = Path(os.environ.get('METRICGOLD_SHARED_DATA')
                   or REPO_ROOT.parent / 'shared' / 'data')


# Set before any test imports rclpy: discovery never leaves loopback, runs never mix.
use_loopback(domain_id=free_domain_id())
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


@pytest.fixture
def fast_model(monkeypatch, tiny_pipeline):
    """The session's tiny pipeline for `metricgold bag` and `infer` instead of loading --model
    for every run."""
    import torch

    for tool in ('bag', 'infer'):
        monkeypatch.setattr(f'metricgold_ros.tools.{tool}.load_pipeline',
                            lambda args: tiny_pipeline)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny inputs; one thread stays fast on a busy shared machine
    yield tiny_pipeline
    torch.set_num_threads(threads)
