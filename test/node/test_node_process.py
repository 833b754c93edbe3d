"""depth_node as users start it: the console script with ``--ros-args --params-file``, a camera
in another process, outputs received here; missing model; clean exit on SIGINT/SIGTERM."""

import shutil
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip('rclpy')

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image, PointCloud2  # noqa: E402

from ros_helpers import (REPO_ROOT, RosHarness, console_script, reliable_qos,  # noqa: E402
                         ros_env, stamp_of, wait_for_publishers, wait_until)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

PARAMS_FILE = REPO_ROOT / 'config' / 'depth.yaml'
EXIT_TIMEOUT_S = 2.0


def _node_cmd(*ros_args: str) -> list:
    script = console_script('depth_node')
    assert script.is_file(), f'{script}: console script not installed (pip install -e .)'
    return [str(script), '--ros-args', '--params-file', str(PARAMS_FILE), *ros_args]


def test_no_model_at_all_exits_with_a_clear_message(tmp_path):
    """model_path unset and no bundled model: the package copied without its models/ folder."""
    shutil.copytree(REPO_ROOT / 'metricgold_ros', tmp_path / 'metricgold_ros',
                    ignore=shutil.ignore_patterns('models', '__pycache__'))
    env = ros_env(PYTHONPATH=str(tmp_path))
    done = subprocess.run([sys.executable, '-m', 'metricgold_ros.node.main', '--ros-args',
                           '--params-file', str(PARAMS_FILE)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    for word in ('model_path is not set', str(tmp_path), 'metricgold init-model', 'README'):
        assert word in done.stderr, done.stderr
    assert 'Traceback' not in done.stderr


def test_missing_model_folder_exits_with_a_clear_message():
    done = subprocess.run(_node_cmd('-p', 'model_path:=/no/such/model'), env=ros_env(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    for word in ('/no/such/model', 'metricgold init-model', 'README'):
        assert word in done.stderr, done.stderr
    assert 'Traceback' not in done.stderr


def test_bad_parameter_value_exits_naming_it(tiny_model_dir):
    done = subprocess.run(_node_cmd('-p', f'model_path:={tiny_model_dir}', '-p',
                                    'colormap:=sparkly'),
                          env=ros_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and 'colormap' in done.stderr, done.stderr
    assert 'Traceback' not in done.stderr


@pytest.mark.parametrize('sig, qos, size', [
    (signal.SIGINT, 'sensor_data', (160, 120)),
    (signal.SIGTERM, 'reliable', (320, 240)),
], ids=['SIGINT-sensor_data', 'SIGTERM-reliable'])
def test_console_script_with_camera_process(tiny_model_dir, sig, qos, size):
    ns = f'/xp{int(sig)}'
    node = subprocess.Popen(
        _node_cmd('-p', f'model_path:={tiny_model_dir}', '-p', 'device:=cpu', '-p',
                  'processing_resolution:=64', '-p', 'stats_period:=1.0', '-p', f'qos:={qos}',
                  '-p', f'output_qos:={qos}', '-r', f'__ns:={ns}',
                  '-r', 'image:=camera/image_raw', '-r', 'camera_info:=camera/camera_info'),
        env=ros_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    camera = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / 'test' / 'ros_helpers.py'), 'camera', '--rate', '10',
         '--width', str(size[0]), '--height', str(size[1]),
         '--image-topic', f'{ns}/camera/image_raw', '--info-topic', f'{ns}/camera/camera_info',
         '--frame-id', 'cam_optical'], env=ros_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    out_qos = reliable_qos(5) if qos == 'reliable' else None  # None: best effort
    try:
        with RosHarness('process_test') as ros:
            out = {'depth/image': ros.collector(Image, f'{ns}/depth/image', out_qos),
                   'depth/camera_info': ros.collector(CameraInfo, f'{ns}/depth/camera_info',
                                                      out_qos),
                   'depth/colored': ros.collector(Image, f'{ns}/depth/colored', out_qos),
                   'points': ros.collector(PointCloud2, f'{ns}/points', out_qos)}
            diagnostics = ros.collector(DiagnosticArray, '/diagnostics', reliable_qos())
            assert all(wait_for_publishers(c.subscription, 1, 60.0) for c in out.values()), \
                'the node did not come up'
            assert wait_until(lambda: all(len(c.messages()) >= 2 for c in out.values()), 60.0), \
                {k: len(c.messages()) for k, c in out.items()}
            depth = out['depth/image'].messages()[-1]
            assert (depth.encoding, depth.width, depth.height) == ('32FC1', *size)
            assert depth.header.frame_id == 'cam_optical'
            for name in ('depth/camera_info', 'depth/colored', 'points'):
                same = out[name].wait_for(lambda m: stamp_of(m) == stamp_of(depth), 5.0)
                assert same is not None and same.header.frame_id == 'cam_optical', name
            assert diagnostics.wait_for(
                lambda m: any(s.name.startswith(f'{ns}/depth_node') for s in m.status), 10.0)
            # Frames keep flowing: the signal arrives while the node is busy.
            sent_at = time.monotonic()
            node.send_signal(sig)
            node.wait(timeout=10)
            exit_s = time.monotonic() - sent_at
    finally:
        for proc in (camera, node):
            if proc.poll() is None:
                proc.kill()
        camera.wait(5)
    _, stderr = node.communicate(timeout=5)
    assert exit_s <= EXIT_TIMEOUT_S, f'{sig.name}: took {exit_s:.2f} s to exit'
    assert node.returncode == 0, stderr
    assert 'Traceback' not in stderr and 'Exception' not in stderr, stderr
    assert 'frames in' in stderr  # the periodic info summary


# Signal moments, in seconds after 'listening on' (None: during the start-up).
STOP_MOMENTS = [None, 0.0, 0.0, 0.02, 0.05, 0.1, 0.2, 0.3] * 2


def test_signal_at_any_moment_of_start_up_exits_cleanly(tiny_model_dir, tmp_path):
    """SIGINT/SIGTERM right after start (where rclpy's own handler thread once raced the
    executor's shutdown into a segfault, about 1 run in 30), each time a clean exit 0."""
    from node_zygote import start_node, wait_for_text

    failures = []
    for i, moment in enumerate(STOP_MOMENTS):
        sig = (signal.SIGINT, signal.SIGTERM)[i % 2]
        node = start_node(['--ros-args', '-p', f'model_path:={tiny_model_dir}', '-p',
                           'device:=cpu', '-r', f'__ns:=/stop{i}'], ros_env(), tmp_path, f'n{i}')
        try:
            if moment is None:
                time.sleep(0.3)  # rclpy.init, parameters or the model load
            else:
                assert wait_for_text(node, lambda text: 'listening on' in text, 60.0), \
                    node.stderr()
                time.sleep(moment)
            node.send_signal(sig)
            code = node.wait(EXIT_TIMEOUT_S + 3.0)
        finally:
            node.kill()
        log = node.stderr()
        if code != 0 or 'Traceback' in log or 'Fatal' in log:
            failures.append(f'run {i} ({sig.name} at {moment}): exit {code}\n{log[-1500:]}')
    print(f'[start/stop] {len(STOP_MOMENTS)} runs, {len(failures)} unclean')
    assert not failures, '\n'.join(failures)
