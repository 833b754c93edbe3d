"""``ros2 launch metricgold_ros depth.launch.py`` of a colcon build, as users run it.

The launch arguments take effect (namespace, image, camera_info, params_file, model_path,
image_transport), outputs arrive at a subscriber in this process, the Fast DDS large-data
profile reaches depth_node, Ctrl-C ends everything cleanly, and ``rviz:=true`` without rviz2
stops before anything starts. ros2 launch exits 0 when its node fails: the printed text and
the received messages are what is checked.
"""

import array
import os
import re
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest
import yaml

pytest.importorskip('rclpy')

from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2  # noqa: E402

from colcon_helpers import PACKAGE, installed_env, start, stop  # noqa: E402
from ros_helpers import (REPO_ROOT, PairPublisher, RosHarness, camera_info_msg,  # noqa: E402
                         header, image_msg, reliable_qos, sensor_qos, stamp_of,
                         synthetic_frame, wait_for_subscribers)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

PROFILE_ENV = 'FASTDDS_DEFAULT_PROFILES_FILE'
START_TIMEOUT_S = 120


def _params_file(path: Path, **changes: Any) -> Path:
    """config/depth.yaml with ``changes`` (the package's defaults for everything else)."""
    data = yaml.safe_load((REPO_ROOT / 'config' / 'depth.yaml').read_text())
    params = data['/**']['ros__parameters']
    assert set(changes) <= set(params), set(changes) - set(params)
    params.update(changes)
    path.write_text(yaml.safe_dump(data))
    return path


def _launch(ros2: str, workspace: Path, args: Dict[str, str], env: Optional[dict] = None):
    """Start ``ros2 launch`` with ``args``, without the caller's own Fast DDS profile."""
    env = env or installed_env(workspace)
    env.pop(PROFILE_ENV, None)  # the launch file's default is what is tested
    argv = [f'{key}:={value}' for key, value in args.items()]
    return start([ros2, 'launch', PACKAGE, 'depth.launch.py', *argv], env)


def _child_env(text: str) -> Dict[str, str]:
    """depth_node's environment, from the pid ``ros2 launch`` printed (Linux /proc)."""
    found = re.search(r'\[depth_node-1\]: process started with pid \[(\d+)\]', text)
    assert found, text
    environ = Path('/proc') / found.group(1) / 'environ'
    if not environ.is_file():
        pytest.skip('no /proc/PID/environ here (Linux only)')
    entries = environ.read_bytes().split(b'\0')
    return dict(entry.decode(errors='replace').split('=', 1) for entry in entries if b'=' in entry)


def _finish(process: Any, output: Any) -> str:
    """Ctrl-C the launch; its whole output, after checking the node ended cleanly."""
    code = stop(process)
    text = output.join()
    assert code == 0, text
    assert re.search(r'\[INFO\] \[depth_node-1\]: process has finished cleanly', text), text
    assert 'Traceback' not in text, text
    return text


@pytest.fixture
def harness() -> Iterator[RosHarness]:
    with RosHarness('launch_test') as ros:
        yield ros


def test_launch_starts_the_node_with_its_arguments_and_shuts_down_cleanly(
        workspace, ros2, harness, tmp_path):
    """The bundled model (no model_path), namespace, topics and params_file."""
    started = time.monotonic()
    width, height = 160, 120
    params = _params_file(tmp_path / 'params.yaml', output_scale=0.5, processing_resolution=64,
                          stats_period=0.0)
    process, output = _launch(ros2, workspace, {
        'namespace': 'lt', 'image': 'cam/image', 'camera_info': 'cam/info',
        'params_file': str(params)})
    publisher = None
    try:
        assert output.wait_for('listening on', START_TIMEOUT_S), output.text()
        text = output.text()
        installed = workspace / 'install' / PACKAGE
        assert 'using the bundled model metricgold-tiny' in text, text
        assert f'({installed}' in text, text  # the installed copy of the bundled model
        assert 'listening on /lt/cam/image + /lt/cam/info' in text, text  # namespace, topics
        env = _child_env(text)
        share = installed / 'share' / PACKAGE
        assert env.get(PROFILE_ENV) == str(share / 'config' / 'fastdds_large_data.xml'), env
        # Reliable subscribers: what the outputs' default QoS (REP 2003) must serve.
        depth = harness.collector(Image, '/lt/depth/image', reliable_qos(),
                                  keep=lambda msg: (stamp_of(msg), msg.width, msg.height))
        info = harness.collector(CameraInfo, '/lt/depth/camera_info', reliable_qos(),
                                 keep=lambda msg: (msg.width, msg.height))
        points = harness.collector(PointCloud2, '/lt/points', reliable_qos(),
                                   keep=lambda msg: (msg.width, msg.height))
        rgb, k = synthetic_frame(0, width, height)
        publisher = PairPublisher(
            harness.publisher(Image, '/lt/cam/image', reliable_qos(5)),
            harness.publisher(CameraInfo, '/lt/cam/info', reliable_qos(5)),
            lambda stamp: (image_msg(rgb, stamp), camera_info_msg(stamp, width, height, k)),
            rate_hz=5.0)
        assert wait_for_subscribers(publisher.image_pub, 1, 30)
        assert points.wait_for(lambda item: True, 60), output.text()
        assert depth.wait_for(lambda item: True, 10) is not None
        # params_file: output_scale 0.5 halves depth, its camera_info and the cloud.
        half = (width // 2, height // 2)
        assert {item[1:] for item in depth.messages()} == {half}
        assert set(info.messages()) == {half} and set(points.messages()) == {half}
    finally:
        if publisher is not None:
            publisher.close()
        text = _finish(process, output)
    print(f'launch test: {time.monotonic() - started:.1f} s')


def test_launch_with_compressed_transport_takes_the_real_jpeg(
        workspace, ros2, tiny_model_dir, harness, tmp_path, raspicam):
    camera = raspicam
    width, height = camera['size']
    params = _params_file(tmp_path / 'params.yaml', output_scale=0.25, processing_resolution=64,
                          stats_period=0.0)
    process, output = _launch(ros2, workspace, {
        'namespace': 'lc', 'image': 'raspicam/image', 'camera_info': 'raspicam/camera_info',
        'image_transport': 'compressed', 'params_file': str(params),
        'model_path': str(tiny_model_dir)})
    publisher = None
    try:
        assert output.wait_for('listening on', START_TIMEOUT_S), output.text()
        assert f'loaded {tiny_model_dir}' in output.text(), output.text()  # model_path
        assert 'listening on /lc/raspicam/image/compressed' in output.text(), output.text()
        depth = harness.collector(Image, '/lc/depth/image', sensor_qos(),
                                  keep=lambda msg: (msg.width, msg.height))

        def make(stamp: int) -> tuple:
            image = CompressedImage(header=header(stamp), format=camera['format'])
            image.data = array.array('B', camera['data'])
            return image, camera_info_msg(stamp, width, height, camera['k'])

        publisher = PairPublisher(
            harness.publisher(CompressedImage, '/lc/raspicam/image/compressed', sensor_qos()),
            harness.publisher(CameraInfo, '/lc/raspicam/camera_info', sensor_qos()),
            make, rate_hz=2.0)
        assert wait_for_subscribers(publisher.image_pub, 1, 30)
        first = depth.wait_for(lambda item: True, 60)
        assert first == (width // 4, height // 4), (first, output.text())
    finally:
        if publisher is not None:
            publisher.close()
        _finish(process, output)


def test_rviz_without_rviz2_stops_before_anything_starts(workspace, ros2):
    env = installed_env(workspace)
    prefixes: List[str] = env['AMENT_PREFIX_PATH'].split(os.pathsep)
    if any((Path(prefix) / 'lib' / 'rviz2' / 'rviz2').exists() for prefix in prefixes):
        pytest.skip('rviz2 is installed here')
    started = time.monotonic()
    process, output = _launch(ros2, workspace, {'rviz': 'true', 'model_path': '/no/such/model'},
                              env)
    process.wait(60)
    text = output.join()
    assert 'rviz:=true but rviz2 is not installed' in text, text
    assert 'apt install ros-$ROS_DISTRO-rviz2' in text, text
    assert 'process started' not in text and 'depth_node' not in text, text
    assert time.monotonic() - started < 30
