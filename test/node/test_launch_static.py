"""launch/depth.launch.py, config/depth.yaml and config/depth.rviz against the node's parameter
table and setup.py: statically (``ast``/YAML, no ROS needed), and by launching when
``launch_ros`` is importable."""

import ast
import math
from pathlib import Path
from typing import Dict, List

import pytest
import yaml

from metricgold_ros.node.parameters import SPECS, check_parameter

PARAMETER_NAMES = tuple(SPECS)


def default_values():
    return {name: spec.default for name, spec in SPECS.items()}

REPO = Path(__file__).resolve().parents[2]
LAUNCH_FILE = REPO / 'launch' / 'depth.launch.py'
PARAMS_FILE = REPO / 'config' / 'depth.yaml'
RVIZ_FILE = REPO / 'config' / 'depth.rviz'
PACKAGE = 'metricgold_ros'


def _constants(tree: ast.Module) -> Dict[str, object]:
    """Module-level ``NAME = 'literal'`` assignments."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    out[target.id] = node.value.value
    return out


def _value(node: ast.AST, constants: Dict[str, object]) -> object:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name) and node.id in constants:
        return constants[node.id]
    return None


def _calls(tree: ast.AST, name: str) -> List[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call) and (
        getattr(node.func, 'id', None) == name or getattr(node.func, 'attr', None) == name)]


def _keywords(call: ast.Call) -> Dict[str, ast.AST]:
    return {kw.arg: kw.value for kw in call.keywords}


@pytest.fixture(scope='module')
def launch_tree() -> ast.Module:
    return ast.parse(LAUNCH_FILE.read_text(), str(LAUNCH_FILE))


def _our_nodes(tree: ast.Module) -> List[Dict[str, ast.AST]]:
    constants = _constants(tree)
    nodes = [_keywords(call) for call in _calls(tree, 'Node')]
    return [kw for kw in nodes if _value(kw['package'], constants) == PACKAGE]


def _console_scripts() -> Dict[str, str]:
    tree = ast.parse((REPO / 'setup.py').read_text())
    setup = next(call for call in _calls(tree, 'setup'))
    entry_points = ast.literal_eval(_keywords(setup)['entry_points'])
    return dict(tuple(part.strip() for part in spec.split('=', 1))
                for spec in entry_points['console_scripts'])


def test_launch_parameters_are_declared_by_the_node(launch_tree):
    nodes = _our_nodes(launch_tree)
    assert len(nodes) == 1, 'one metricgold_ros node expected in the launch file'
    params = nodes[0]['parameters']
    assert isinstance(params, ast.List)
    dict_keys = [key.value for item in params.elts if isinstance(item, ast.Dict)
                 for key in item.keys]
    assert dict_keys, 'the launch file should set model_path/device'
    assert set(dict_keys) <= set(PARAMETER_NAMES), set(dict_keys) - set(PARAMETER_NAMES)


def test_launch_executable_is_a_console_script(launch_tree):
    scripts = _console_scripts()
    constants = _constants(launch_tree)
    for node in _our_nodes(launch_tree):
        executable = _value(node['executable'], constants)
        assert executable in scripts, f'{executable!r} is not a console script of setup.py'
        module, func = scripts[executable].split(':')
        source = REPO / (module.replace('.', '/') + '.py')
        tree = ast.parse(source.read_text())
        assert any(isinstance(n, ast.FunctionDef) and n.name == func for n in tree.body)


def test_launch_arguments_are_declared_and_remappings_are_node_topics(launch_tree):
    constants = _constants(launch_tree)
    declared = {_value(call.args[0], constants)
                for call in _calls(launch_tree, 'DeclareLaunchArgument')}
    used = {_value(call.args[0], constants)
            for call in _calls(launch_tree, 'LaunchConfiguration')}
    assert used <= declared, used - declared
    assert {'model_path', 'params_file', 'namespace', 'image', 'camera_info',
            'device'} <= declared
    # A stream's input topics (the unnamed stream's are the node's 'image' and 'camera_info';
    # the compressed transport's topic is derived from 'image' at run time).
    stream_source = ast.parse((REPO / PACKAGE / 'node' / 'stream.py').read_text())
    inputs = next(node.value for node in ast.walk(stream_source) if isinstance(node, ast.Assign)
                  and getattr(node.targets[0], 'id', '') == 'INPUT_TOPICS')
    subscribed = {_value(element, {}) for element in inputs.elts}
    remaps = _our_nodes(launch_tree)[0]['remappings']
    sources = {_value(pair.elts[0], constants) for pair in remaps.elts}
    assert sources == subscribed == {'image', 'camera_info'}


def test_params_file_documents_every_parameter_with_valid_values():
    text = PARAMS_FILE.read_text()
    data = yaml.safe_load(text)
    assert list(data) == ['/**'], 'parameters for any node name/namespace'
    params = data['/**']['ros__parameters']
    assert set(params) == set(PARAMETER_NAMES), set(params) ^ set(PARAMETER_NAMES)
    defaults = default_values()
    for name, value in params.items():
        assert type(value) is type(defaults[name]), \
            f'{name}: {value!r} must be a {type(defaults[name]).__name__} (ROS refuses others)'
        assert check_parameter(name, value, params) is None
        assert value == defaults[name], f'{name}: the file should show the default'
    for name in PARAMETER_NAMES:  # every line has a comment explaining it
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(f'{name}:'))
        prior = text.splitlines()[text.splitlines().index(line) - 1].strip()
        assert '#' in line or prior.startswith('#'), f'{name} is not documented'


def test_parameter_table_is_consistent():
    for spec in SPECS.values():
        assert spec.description
        assert check_parameter(spec.name, spec.default, default_values()) is None
        if spec.float_range:
            assert isinstance(spec.default, float) and not math.isnan(spec.default)
    runtime = {s.name for s in SPECS.values() if s.runtime}
    assert {'denoising_steps', 'ensemble_size', 'points_stride', 'publish_colored',
            'publish_points', 'publish_uncertainty'} <= runtime
    assert {'model_path', 'device', 'dtype', 'qos'}.isdisjoint(runtime)


def test_rviz_config_shows_colored_depth_and_cloud_as_a_sensor_data_subscriber():
    """REP 2003: rviz subscribes best effort, which the node's reliable outputs serve too."""
    assert SPECS['output_qos'].default == 'reliable' and SPECS['qos'].default == 'sensor_data'
    data = yaml.safe_load(RVIZ_FILE.read_text())
    manager = data['Visualization Manager']
    clouds = [d for d in manager['Displays'] if d['Class'] == 'rviz_default_plugins/PointCloud2']
    images = [d for d in manager['Displays'] if d['Class'] == 'rviz_default_plugins/Image']
    # The single camera (on), then the two-camera example (front and rear, off).
    assert [d['Topic']['Value'] for d in clouds] == [
        '/camera/points', '/camera/front/points', '/camera/rear/points']
    assert [d['Topic']['Value'] for d in images] == [
        '/camera/depth/colored', '/camera/front/depth/colored', '/camera/rear/depth/colored']
    assert [d['Enabled'] for d in clouds + images] == [True, False, False] * 2
    for display in clouds + images:
        assert display['Topic']['Reliability Policy'] == 'Best Effort'
    assert manager['Global Options']['Fixed Frame']


def test_setup_installs_launch_and_config():
    tree = ast.parse((REPO / 'setup.py').read_text())
    source = ast.unparse(_keywords(next(iter(_calls(tree, 'setup'))))['data_files'])
    assert "glob('launch/*.launch.py')" in source
    assert "glob('config/*.yaml')" in source and "glob('config/*.rviz')" in source
    assert "glob('config/*.xml')" in source  # the Fast DDS profile the launch file applies


def test_launch_file_runs(tmp_path):
    """With launch_ros: launch with a missing model; depth_node must exit 1 and say why."""
    reason = ('launch/launch_ros are not installable from PyPI here; the static tests above '
              'cover the launch file')
    pytest.importorskip('launch_ros', reason=reason)
    launch = pytest.importorskip('launch', reason=reason)
    if not hasattr(launch, 'LaunchService'):  # the repo's launch/ folder as a namespace package
        pytest.skip(reason)
    from ament_index_python.packages import PackageNotFoundError, get_package_prefix
    try:
        get_package_prefix(PACKAGE)
    except (PackageNotFoundError, OSError):  # OSError: no AMENT_PREFIX_PATH at all
        pytest.skip('metricgold_ros is not in the ament index (colcon build and source it)')
    from launch.actions import IncludeLaunchDescription, RegisterEventHandler
    from launch.event_handlers import OnProcessExit
    from launch.launch_description_sources import PythonLaunchDescriptionSource

    codes = []
    description = launch.LaunchDescription([
        IncludeLaunchDescription(PythonLaunchDescriptionSource(str(LAUNCH_FILE)),
                                 launch_arguments={'model_path': str(tmp_path / 'none'),
                                                   'params_file': str(PARAMS_FILE)}.items()),
        RegisterEventHandler(OnProcessExit(on_exit=lambda event, _: (
            codes.append(event.returncode), launch.actions.Shutdown())[1])),
    ])
    service = launch.LaunchService()
    service.include_launch_description(description)
    service.run()
    assert codes == [1]
