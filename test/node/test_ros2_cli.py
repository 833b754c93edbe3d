"""The installed depth_node driven with the real ``ros2`` tools, as a user would.

``ros2 run metricgold_ros depth_node`` from a colcon build; ``ros2 param describe`` shows the
descriptions and ranges; ``ros2 param set`` changes a live parameter for the next frame and is
refused for a read-only or out-of-range value; ``ros2 topic hz`` in its own process sees
depth/image. ros2 exits 0 on most failures, so the printed text is what is checked.
"""

import re
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator, List, Tuple

import pytest

pytest.importorskip('rclpy')

from sensor_msgs.msg import CameraInfo, Image  # noqa: E402

from colcon_helpers import PACKAGE, installed_env, start, stop  # noqa: E402
from ros_helpers import (PairPublisher, RosHarness, camera_info_msg, image_msg,  # noqa: E402
                         reliable_qos, sensor_qos, stamp_of, synthetic_frame,
                         wait_for_subscribers)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

NAMESPACE = '/cli'
NODE = f'{NAMESPACE}/depth_node'
WIDTH, HEIGHT = 160, 120
CLI_TIMEOUT_S = 60
DISCOVERY = ('--no-daemon', '--spin-time', '3')  # no daemon left behind; 0.5 s is too short


@pytest.fixture(scope='module')
def running(workspace, ros2) -> Iterator[Tuple[RosHarness, object, object]]:
    """``ros2 run`` depth_node (bundled model), a camera here and a depth/image collector."""
    env = installed_env(workspace)
    node, output = start([ros2, 'run', PACKAGE, 'depth_node', '--ros-args',
                          '-r', f'__ns:={NAMESPACE}', '-r', 'image:=cam/image',
                          '-r', 'camera_info:=cam/info', '-p', 'processing_resolution:=64',
                          '-p', 'stats_period:=0.0'], env)
    try:
        assert output.wait_for('listening on', 120), output.text()
        with RosHarness('cli_test') as ros:
            depth = ros.collector(Image, f'{NAMESPACE}/depth/image', sensor_qos(),
                                  keep=lambda msg: (stamp_of(msg), msg.width, msg.height))
            rgb, k = synthetic_frame(0, WIDTH, HEIGHT)
            camera = PairPublisher(
                ros.publisher(Image, f'{NAMESPACE}/cam/image', reliable_qos(5)),
                ros.publisher(CameraInfo, f'{NAMESPACE}/cam/info', reliable_qos(5)),
                lambda stamp: (image_msg(rgb, stamp), camera_info_msg(stamp, WIDTH, HEIGHT, k)),
                rate_hz=5.0)
            try:
                assert wait_for_subscribers(camera.image_pub, 1, 30)
                assert depth.wait_for(lambda item: True, 60), output.text()
                yield ros, depth, output
            finally:
                camera.close()
    finally:
        code = stop(node)
        text = output.join()
    assert 'Traceback' not in text, text
    assert code == 0, text


def _ros2(ros2: str, workspace: Path, *args: str) -> str:
    """Run one ``ros2`` command to its end; stdout and stderr together (checked, not the code)."""
    done = subprocess.run([ros2, *args], env=installed_env(workspace), capture_output=True,
                          text=True, timeout=CLI_TIMEOUT_S)
    return done.stdout + done.stderr


def _describe(text: str) -> dict:
    """``ros2 param describe`` output split by parameter name."""
    blocks = re.split(r'^Parameter name: ', text, flags=re.M)[1:]
    return {block.split('\n', 1)[0].strip(): block for block in blocks}


def test_param_describe_shows_descriptions_ranges_and_read_only(running, ros2, workspace):
    text = _ros2(ros2, workspace, 'param', 'describe', *DISCOVERY, NODE,
                 'processing_resolution', 'model_path', 'colormap', 'warm_start_strength')
    blocks = _describe(text)
    assert set(blocks) == {'processing_resolution', 'model_path', 'colormap',
                           'warm_start_strength'}, text
    resolution = blocks['processing_resolution']
    assert 'Type: integer' in resolution and 'Description: Longer side (px)' in resolution
    assert 'Min value: -1' in resolution and 'Max value: 4096' in resolution, resolution
    assert 'Read only: true' not in resolution
    assert 'Read only: true' in blocks['model_path'], blocks['model_path']
    assert 'Description: The checkpoint: a local folder, or a Hugging Face' in blocks['model_path']
    assert 'Additional constraints: one of: ' in blocks['colormap'] and 'turbo' in \
        blocks['colormap']
    assert 'Min value: 0.05' in blocks['warm_start_strength'], blocks['warm_start_strength']


def test_param_set_live_parameter_changes_the_next_frame(running, ros2, workspace):
    _, depth, _ = running
    assert all(item[1:] == (WIDTH, HEIGHT) for item in depth.messages())
    text = _ros2(ros2, workspace, 'param', 'set', *DISCOVERY, NODE, 'output_scale', '0.5')
    assert 'Set parameter successful' in text, text
    done_ns = time.time_ns()
    try:
        # A frame stamped after the set returned was received, so processed, after it.
        later = depth.wait_for(lambda item: item[0] > done_ns, 30)
        assert later is not None, 'no depth/image after the parameter change'
        after: List[tuple] = [item for item in depth.messages() if item[0] > done_ns]
        assert {item[1:] for item in after} == {(WIDTH // 2, HEIGHT // 2)}, after
    finally:
        _ros2(ros2, workspace, 'param', 'set', *DISCOVERY, NODE, 'output_scale', '1.0')


def test_param_set_refuses_read_only_and_out_of_range(running, ros2, workspace):
    text = _ros2(ros2, workspace, 'param', 'set', *DISCOVERY, NODE, 'model_path', '/tmp')
    assert 'Setting parameter failed' in text and 'read-only' in text, text
    text = _ros2(ros2, workspace, 'param', 'set', *DISCOVERY, NODE, 'ensemble_size', '0')
    assert 'Setting parameter failed' in text, text
    text = _ros2(ros2, workspace, 'param', 'get', *DISCOVERY, NODE, 'ensemble_size')
    assert 'Integer value is: 1' in text, text


def test_topic_hz_measures_depth_image_from_its_own_process(running, ros2, workspace):
    hz, output = start([ros2, 'topic', 'hz', '--window', '5', f'{NAMESPACE}/depth/image'],
                       installed_env(workspace))
    try:
        assert output.wait_for('average rate:', 60), output.text()
    finally:
        stop(hz, 10)
    rates = [float(value) for value in re.findall(r'average rate: ([0-9.]+)', output.join())]
    assert rates and all(0.2 < rate < 50 for rate in rates), output.text()


def _ros2_until(ros2: str, workspace: Path, seen: Callable[[str], bool], *args: str) -> str:
    """``ros2 ARGS`` without a daemon, asked again (3 tries) while its discovery window has not
    yet seen what ``seen`` looks for (a node or topic missed in 3 s on a loaded machine)."""
    for _ in range(3):
        text = _ros2(ros2, workspace, *args, *DISCOVERY)
        if seen(text):
            break
    return text


def _lifecycle(ros2: str, workspace: Path, *args: str) -> str:
    """``ros2 lifecycle ARGS``, asked again while the node is not found."""
    return _ros2_until(ros2, workspace, lambda text: 'Node not found' not in text,
                       'lifecycle', *args)


def test_ros2_lifecycle_drives_an_unstarted_node(workspace, ros2):
    """``autostart:=false`` leaves depth_node unconfigured; ``ros2 lifecycle set`` configures
    (loads the model), activates (subscribes), deactivates and cleans it up, and ``ros2
    lifecycle get`` says where it is, as a lifecycle manager would drive it."""
    env = installed_env(workspace)
    ns, node_name = '/lcycle', '/lcycle/depth_node'
    node, output = start([ros2, 'run', PACKAGE, 'depth_node', '--ros-args', '-r',
                          f'__ns:={ns}', '-p', 'autostart:=false', '-p',
                          'processing_resolution:=64', '-p', 'cameras:=[front, rear]', '-p',
                          'stats_period:=0.0'], env)
    try:
        assert output.wait_for('waiting for a lifecycle manager', 120), output.text()
        assert 'unconfigured' in _lifecycle(ros2, workspace, 'get', node_name)
        assert 'listening on' not in output.text()
        for transition, state in (('configure', 'inactive'), ('activate', 'active')):
            text = _lifecycle(ros2, workspace, 'set', node_name, transition)
            assert 'Transitioning successful' in text, text
            assert state in _lifecycle(ros2, workspace, 'get', node_name)
        assert output.wait_for('listening on', 30), output.text()
        assert f'{ns}/front/image' in output.text() and f'{ns}/rear/image' in output.text()
        wanted = (f'{ns}/rear/depth/image', f'{ns}/front/points')
        topics = _ros2_until(ros2, workspace, lambda text: all(name in text for name in wanted),
                             'topic', 'list')
        assert all(name in topics for name in wanted), topics
        for transition, state in (('deactivate', 'inactive'), ('cleanup', 'unconfigured')):
            text = _lifecycle(ros2, workspace, 'set', node_name, transition)
            assert 'Transitioning successful' in text, text
            assert state in _lifecycle(ros2, workspace, 'get', node_name)
        assert 'model freed' in output.text()
    finally:
        code = stop(node)
        text = output.join()
    assert code == 0 and 'Traceback' not in text, text
