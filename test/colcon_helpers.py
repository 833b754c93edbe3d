"""A ``colcon build`` of the package in a throw-away workspace, and the real ``ros2`` tools.

Shared by test_colcon_build.py (the installed files and the installed depth_node) and the
tests that drive the installed package with ``ros2 launch/run/param/topic``. Importing this
module needs no ROS.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from ros_helpers import REPO_ROOT, ros_env

PACKAGE = 'metricgold_ros'
# What an ament_python package is made of; everything else in the checkout (.venv, .git,
# build outputs, training/, test/) stays out of the workspace.
PACKAGE_FILES = ('package.xml', 'setup.py', 'setup.cfg', 'resource', PACKAGE, 'launch', 'config',
                 'README.md', 'LICENSE')
IGNORE = shutil.ignore_patterns('__pycache__', '*.pyc', '*.egg-info', '.pytest_cache')
BUILD_TIMEOUT_S = 170


def build_workspace(root: Path) -> Path:
    """Copy the package into ``root/src`` and ``colcon build`` it; ``root``.

    Skips the test when colcon (colcon-core, colcon-ros) is not installed.
    """
    if importlib.util.find_spec('colcon_core') is None:
        pytest.skip('colcon-core is not installed (pip install colcon-core colcon-ros)')
    if importlib.util.find_spec('colcon_ros') is None:
        pytest.skip('colcon-ros is not installed: colcon cannot build ament_python packages')
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
        cwd=root, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root


def _venv_ament_prefix() -> Optional[str]:
    """This interpreter's prefix when it holds an ament index (the PyPI ROS 2 wheels)."""
    index = Path(sys.prefix) / 'share' / 'ament_index' / 'resource_index' / 'packages'
    return sys.prefix if index.is_dir() else None


def installed_env(root: Path, **extra: str) -> Dict[str, str]:
    """What ``source install/setup.sh`` would set for this package, for the ``ros2`` tools too.

    AMENT_PREFIX_PATH: the install prefix, then the sourced ROS 2's or, with the PyPI wheels,
    the venv (whose ament index holds rclpy's packages). Launched processes print without
    colours and log to ``root/ros_log``, never ``~/.ros/log``.
    """
    prefix = root / 'install' / PACKAGE
    site = prefix / 'lib' / f'python{sys.version_info[0]}.{sys.version_info[1]}' / 'site-packages'
    env = ros_env(PYTHONPATH=os.pathsep.join(filter(None, [str(site),
                                                           os.environ.get('PYTHONPATH')])))
    env['AMENT_PREFIX_PATH'] = os.pathsep.join(
        filter(None, [str(prefix), os.environ.get('AMENT_PREFIX_PATH') or _venv_ament_prefix()]))
    env['PATH'] = os.pathsep.join(filter(None, [str(Path(sys.executable).parent),
                                                os.environ.get('PATH')]))
    env['RCUTILS_COLORIZED_OUTPUT'] = '0'
    env['ROS_LOG_DIR'] = str(root / 'ros_log')
    env.update(extra)
    return env


def ros2_command() -> str:
    """The ``ros2`` executable (this venv's, else PATH's); skips the test when there is none."""
    found = shutil.which('ros2', path=os.pathsep.join(
        [str(Path(sys.executable).parent), os.environ.get('PATH', '')]))
    if found is None:
        pytest.skip('the ros2 command is not installed: `make venv` installs it from '
                    '../shared/ros2cli when that folder exists, or source a ROS 2 installation')
    return found


class OutputReader:
    """Collects a process's merged stdout/stderr lines in a thread (nothing blocks on a pipe)."""

    def __init__(self, process: 'subprocess.Popen[str]') -> None:
        self._process = process
        self._lock = threading.Lock()
        self._lines: List[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self._process.stdout:
            with self._lock:
                self._lines.append(line)

    def text(self) -> str:
        """Everything printed so far."""
        with self._lock:
            return ''.join(self._lines)

    def wait_for(self, needle: str, timeout_s: float) -> bool:
        """Whether ``needle`` was printed within ``timeout_s`` (False once the process ended)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if needle in self.text():
                return True
            if self._process.poll() is not None:
                self._thread.join(2.0)
                return needle in self.text()
            time.sleep(0.1)
        return False

    def join(self, timeout_s: float = 5.0) -> str:
        """Everything printed, once the process has closed its output."""
        self._thread.join(timeout_s)
        return self.text()


def start(cmd: List[str], env: Dict[str, str], cwd: Optional[Path] = None
          ) -> 'tuple[subprocess.Popen[str], OutputReader]':
    """Start ``cmd`` in its own process group with merged, line-read output."""
    process = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return process, OutputReader(process)


def stop(process: 'subprocess.Popen[str]', timeout_s: float = 20.0) -> Optional[int]:
    """SIGINT ``process``'s group (Ctrl-C), then SIGKILL the group if it hangs; its exit code.

    The group, as a terminal does: ``ros2 run`` leaves the signal to its child.
    """
    import signal

    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5.0)
            return None
    return process.returncode
