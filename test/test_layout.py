"""The layout keeps its promise: the core and the tools import without ROS installed."""

import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / 'metricgold_ros'
ADAPTERS = ('node', 'synthetic')  # the only subpackages allowed to need rclpy (when started)


def _modules():
    for path in sorted(PACKAGE.rglob('*.py')):
        relative = path.relative_to(PACKAGE.parent).with_suffix('')
        parts = relative.parts
        if parts[-1] in ('__main__',) or (len(parts) > 2 and parts[1] in ADAPTERS):
            continue
        yield '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


# A finder that refuses every ROS package, as on a machine with only pip-installed torch.
BLOCK_ROS = '''
import importlib.abc, sys
class NoRos(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('rclpy', 'sensor_msgs', 'std_msgs', 'builtin_interfaces',
                                  'diagnostic_msgs', 'rcl_interfaces', 'ament_index_python'):
            raise ImportError(f'{name} is blocked: the core must not need ROS')
sys.meta_path.insert(0, NoRos())
'''


def test_every_core_and_tool_module_imports_without_ros():
    modules = list(_modules())
    assert 'metricgold_ros.depth_frame' in modules and 'metricgold_ros.tools.bag' in modules
    assert not any(m.startswith('metricgold_ros.node') for m in modules)
    code = BLOCK_ROS + ''.join(f'import {m}\n' for m in modules) + 'print("ok")'
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          timeout=120, cwd=PACKAGE.parent)
    assert done.returncode == 0 and done.stdout.strip() == 'ok', done.stderr[-2000:]


def test_the_node_needs_ros_and_says_so():
    """The blocker works: importing the node without rclpy fails (so the test above can)."""
    code = BLOCK_ROS + 'import metricgold_ros.node.depth_node'
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          timeout=120, cwd=PACKAGE.parent)
    assert done.returncode != 0 and 'blocked' in done.stderr


@pytest.mark.parametrize('limit', [450])
def test_no_module_is_a_grab_bag(limit):
    sizes = {str(p.relative_to(PACKAGE.parent)): len(p.read_text().splitlines())
             for p in PACKAGE.rglob('*.py')}
    assert {p: n for p, n in sizes.items() if n > limit} == {}
