"""``colcon build`` of the package in a throw-away workspace, then the installed depth_node."""

import signal
import subprocess
import time

import pytest

from colcon_helpers import PACKAGE, installed_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def test_colcon_installs_node_launch_and_config(workspace):
    prefix = workspace / 'install' / PACKAGE
    assert (prefix / 'lib' / PACKAGE / 'depth_node').is_file()
    share = prefix / 'share' / PACKAGE
    for path in ('package.xml', 'launch/depth.launch.py', 'config/depth.yaml',
                 'config/depth.rviz', 'config/fastdds_large_data.xml'):
        assert (share / path).is_file(), path
    assert (prefix / 'share' / 'ament_index' / 'resource_index' / 'packages' / PACKAGE).is_file()


def test_installed_depth_node_starts_with_the_installed_bundled_model(workspace):
    prefix = workspace / 'install' / PACKAGE
    node = subprocess.Popen([str(prefix / 'lib' / PACKAGE / 'depth_node')],
                            env=installed_env(workspace), stdout=subprocess.PIPE,
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
        assert f'metricgold-tiny ({prefix}' in log and 'loaded the bundled model' in log, log
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
                           'model_path:=/no/such/model'], env=installed_env(workspace),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    for word in ('/no/such/model', 'metricgold init-model', 'README'):
        assert word in done.stderr, done.stderr
    assert 'Traceback' not in done.stderr
