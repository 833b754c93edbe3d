"""``colcon build`` of the package in a throw-away workspace, then the installed depth_node."""

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ros_helpers import REPO_ROOT, ros_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

PACKAGE = 'metricgold_ros'
# What an ament_python package is made of; everything else in the checkout (.venv, .git,
# build outputs, training/, test/) stays out of the workspace.
PACKAGE_FILES = ('package.xml', 'setup.py', 'setup.cfg', 'resource', PACKAGE, 'launch', 'config',
                 'README.md', 'LICENSE')
IGNORE = shutil.ignore_patterns('__pycache__', '*.pyc', '*.egg-info', '.pytest_cache')


@pytest.fixture(scope='module')
def workspace(tmp_path_factory) -> Path:
    if importlib.util.find_spec('colcon_core') is None:
        pytest.skip('colcon-core is not installed (pip install colcon-core colcon-ros)')
    if importlib.util.find_spec('colcon_ros') is None:
        pytest.skip('colcon-ros is not installed: colcon cannot build ament_python packages')
    root = tmp_path_factory.mktemp('colcon_ws')
    src = root / 'src' / PACKAGE
    src.mkdir(parents=True)
    for name in PACKAGE_FILES:
        path = REPO_ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=IGNORE)
        elif path.is_file():
            shutil.copy2(path, src / name)
    bin_dir = str(Path(sys.executable).parent)
    env = ros_env(PATH=bin_dir + os.pathsep + os.environ.get('PATH', ''))
    done = subprocess.run(
        [sys.executable, '-m', 'colcon', '--log-base', str(root / 'log'), 'build',
         '--base-paths', 'src', '--build-base', 'build', '--install-base', 'install',
         '--event-handlers', 'console_direct-'],
        cwd=root, env=env, capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root


def _installed_env(root: Path) -> dict:
    """What ``source install/setup.bash`` would set for this package."""
    prefix = root / 'install' / PACKAGE
    site = prefix / 'lib' / f'python{sys.version_info[0]}.{sys.version_info[1]}' / 'site-packages'
    env = ros_env(PYTHONPATH=os.pathsep.join(filter(None, [str(site),
                                                           os.environ.get('PYTHONPATH')])))
    env['AMENT_PREFIX_PATH'] = os.pathsep.join(
        filter(None, [str(prefix), os.environ.get('AMENT_PREFIX_PATH')]))
    return env


def test_colcon_installs_node_launch_and_config(workspace):
    prefix = workspace / 'install' / PACKAGE
    assert (prefix / 'lib' / PACKAGE / 'depth_node').is_file()
    share = prefix / 'share' / PACKAGE
    for path in ('package.xml', 'launch/depth.launch.py', 'config/depth.yaml',
                 'config/depth.rviz'):
        assert (share / path).is_file(), path
    assert (prefix / 'share' / 'ament_index' / 'resource_index' / 'packages' / PACKAGE).is_file()


def test_installed_depth_node_starts_with_the_installed_bundled_model(workspace):
    prefix = workspace / 'install' / PACKAGE
    node = subprocess.Popen([str(prefix / 'lib' / PACKAGE / 'depth_node')],
                            env=_installed_env(workspace), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = node.stdout.readline()
            if not line:
                break
            lines.append(line)
            if 'listening on' in line:
                break
        log = ''.join(lines)
        # The installed copy ran and loaded the bundled model from inside the install space.
        assert f'loaded {prefix}' in log and 'metricgold-tiny' in log, log
        assert log.count('model_path not set: using the bundled model metricgold-tiny') == 1, log
        assert 'listening on' in log, log
    finally:
        node.send_signal(signal.SIGINT)
        rest = node.communicate(timeout=30)[0]
    assert node.returncode == 0, log + rest
    assert 'Traceback' not in log + rest


def test_installed_depth_node_explains_a_missing_model(workspace):
    prefix = workspace / 'install' / PACKAGE
    done = subprocess.run([str(prefix / 'lib' / PACKAGE / 'depth_node'), '--ros-args', '-p',
                           'model_path:=/no/such/model'], env=_installed_env(workspace),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    for word in ('/no/such/model', 'metricgold init-model', 'README'):
        assert word in done.stderr, done.stderr
    assert 'Traceback' not in done.stderr
