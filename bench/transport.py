"""Delivery of large messages between processes on one host: camera -> depth_node -> subscribers.

Four processes on loopback DDS in a domain of their own, with the package's defaults (what
``depth.launch.py`` sets up: config/depth.yaml, and the Fast DDS profile
config/fastdds_large_data.xml in every process), or without the profile (``--profile none``):

- a camera publishing Image (bgr8) + CameraInfo at ``--rate`` Hz (reliable, as REP 2003 asks
  of publishers) for ``--seconds``;
- ``depth_node`` with a tiny random model (``metricgold init-model --tiny``) at
  ``processing_resolution`` 64, so that the model costs little and the node publishes as
  often as the transport lets it: what is measured is transport, not depth;
- two subscriber processes on ``depth/image`` and ``points``, one reliable, one sensor-data
  (best effort), each counting distinct stamps; the reliable one also keeps the node's last
  ``/diagnostics`` (frames received / published / dropped).

Counted: frames sent by the camera; received by the node (its subscription); published by the
node (one depth image and one cloud each); dropped by the node's newest-frame mailbox (the
model was busy: by design, counted); received by each subscriber. Drops anywhere else are
transport losses.

Usage::

    python bench/transport.py                               # 640x480 and 1280x720, both ways
    python bench/transport.py --sizes 640x480 --profile package --seconds 10
    python bench/transport.py --json bench/results/transport.json --markdown

Results: BENCHMARKS.md, section "Transport".
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from metricgold_ros.atomic import write_json_atomic  # noqa: E402
from metricgold_ros.ros_env import (PROFILE_ENV, depth_node_command,  # noqa: E402
                                    free_domain_id, loopback_env, with_large_data_profile)

NAMESPACE = '/bench'
START_TIMEOUT_S = 120.0
DRAIN_S = 4.0  # after the last camera frame: the node's last frame and diagnostics go out


# -- the camera and subscriber processes ------------------------------------------------------

def camera_main(args: argparse.Namespace) -> int:
    """Publish one rendered frame with fresh stamps at ``--rate`` Hz; print the count as JSON."""
    import rclpy
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CameraInfo, Image

    from metricgold_ros import messages
    from metricgold_ros.synthetic.scenes import render_sample

    width, height = _size(args.size)
    sample = render_sample(0, 'indoor', width, height)
    intr = sample.intrinsics
    types = messages.rclpy_types()
    rclpy.init()
    sent = 0
    try:
        node = rclpy.create_node('bench_camera')
        qos = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
        image_pub = node.create_publisher(Image, f'{NAMESPACE}/camera/image_raw', qos)
        info_pub = node.create_publisher(CameraInfo, f'{NAMESPACE}/camera/camera_info', qos)
        deadline = time.monotonic() + START_TIMEOUT_S
        while image_pub.get_subscription_count() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # the node's camera_info subscription matches too
        period_s = 1.0 / args.rate
        start = next_s = time.monotonic()
        while time.monotonic() - start < args.seconds:
            stamp_ns = time.time_ns()
            header = messages.header_msg(types, stamp_ns, 'camera_optical_frame')
            info_pub.publish(messages.camera_info_msg(types, header, intr))
            image_pub.publish(messages.rgb_image_msg(types, header, sample.rgb, 'bgr8'))
            sent += 1
            next_s += period_s
            time.sleep(max(0.0, next_s - time.monotonic()))
        elapsed_s = time.monotonic() - start
    finally:
        rclpy.try_shutdown()
    print(json.dumps({'sent': sent, 'rate_hz': sent / elapsed_s}), flush=True)
    return 0


def subscriber_main(args: argparse.Namespace) -> int:
    """Count distinct stamps of depth/image and points until SIGINT; print them as JSON."""
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
    from sensor_msgs.msg import Image, PointCloud2

    qos = qos_profile_sensor_data if args.qos == 'sensor_data' else QoSProfile(
        depth=5, reliability=ReliabilityPolicy.RELIABLE)
    stamps: Dict[str, set] = {'depth/image': set(), 'points': set()}
    diagnostics: Dict[str, str] = {}

    def on_output(name: str, msg: Any) -> None:
        stamps[name].add((msg.header.stamp.sec, msg.header.stamp.nanosec))

    def on_diagnostics(msg: Any) -> None:
        for status in msg.status:
            if 'depth_node' in status.name:
                diagnostics.clear()
                diagnostics.update({kv.key: kv.value for kv in status.values})

    rclpy.init()
    executor = SingleThreadedExecutor()
    try:
        node = rclpy.create_node(f'bench_subscriber_{args.qos}')
        executor.add_node(node)
        subs = [node.create_subscription(Image, f'{NAMESPACE}/depth/image',
                                         lambda msg: on_output('depth/image', msg), qos),
                node.create_subscription(PointCloud2, f'{NAMESPACE}/points',
                                         lambda msg: on_output('points', msg), qos)]
        if args.diagnostics:
            node.create_subscription(DiagnosticArray, '/diagnostics', on_diagnostics, 10)
        ready = False
        while rclpy.ok():
            executor.spin_once(timeout_sec=0.1)
            if not ready and all(sub.get_publisher_count() > 0 for sub in subs):
                print('ready', flush=True)
                ready = True
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        executor.shutdown(timeout_sec=0)
        rclpy.try_shutdown()
    print(json.dumps({'depth': len(stamps['depth/image']), 'points': len(stamps['points']),
                      'diagnostics': diagnostics}), flush=True)
    return 0


# -- one run -----------------------------------------------------------------------------------

def _size(text: str) -> Tuple[int, int]:
    """(width, height) of 'WxH'."""
    width, height = (int(value) for value in text.lower().split('x'))
    return width, height


class _Process:
    """A child process with its output collected line by line in a thread."""

    def __init__(self, cmd: List[str], env: Dict[str, str]) -> None:
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines: List[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, needle: str, timeout_s: float) -> bool:
        """Whether a line containing ``needle`` was printed within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            if any(needle in line for line in self.lines):
                return True
            time.sleep(0.1)
        return any(needle in line for line in self.lines)

    def finish(self, sig: Optional[int] = signal.SIGINT, timeout_s: float = 30.0) -> str:
        """Signal (unless None) and wait; the whole output."""
        if sig is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5.0)
        self._thread.join(5.0)
        return ''.join(self.lines)

    def last_json(self) -> Dict[str, Any]:
        """The last JSON object the process printed (its result)."""
        for line in reversed(self.lines):
            if line.startswith('{'):
                return json.loads(line)
        raise RuntimeError('no result printed:\n' + ''.join(self.lines[-20:]))


def run_once(size: str, profile: str, args: argparse.Namespace, model: Path) -> Dict[str, Any]:
    """One camera -> node -> two subscribers run in a fresh domain; the counts.

    Args:
        size: camera image size, 'WxH'.
        profile: 'package' (the package's Fast DDS profile in every process) or 'none'.
        args: the command line (rate, seconds, extra node parameters).
        model: the checkpoint folder for depth_node.

    Returns:
        A row: sent, node_received, published, dropped_newest_frame, and per subscriber QoS
        the distinct depth images and clouds received.
    """
    env = loopback_env(domain_id=free_domain_id())
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(REPO), env.get('PYTHONPATH')]))
    env['PYTHONUNBUFFERED'] = '1'
    env.setdefault('OMP_NUM_THREADS', '2')
    env.pop(PROFILE_ENV, None)
    if profile == 'package':
        with_large_data_profile(env)
    me = [sys.executable, str(Path(__file__).resolve())]
    node = _Process([*depth_node_command(), '--ros-args',
                     '--params-file', str(REPO / 'config' / 'depth.yaml'),
                     '-p', f'model_path:={model}', '-p', 'processing_resolution:=64',
                     '-p', 'stats_period:=1.0', '-r', f'__ns:={NAMESPACE}',
                     '-r', 'image:=camera/image_raw', '-r', 'camera_info:=camera/camera_info']
                    + [arg for param in args.param for arg in ('-p', param)], env)
    subs = {qos: _Process(me + ['subscriber', '--qos', qos]
                          + (['--diagnostics'] if qos == 'reliable' else []), env)
            for qos in ('reliable', 'sensor_data')}
    camera = None
    try:
        if not node.wait_for('listening on', START_TIMEOUT_S):
            raise RuntimeError('depth_node did not start:\n' + node.finish())
        for qos, sub in subs.items():
            if not sub.wait_for('ready', 60):
                raise RuntimeError(f'{qos} subscriber did not match:\n' + sub.finish())
        camera = _Process(me + ['camera', '--size', size, '--rate', str(args.rate),
                                '--seconds', str(args.seconds)], env)
        camera.finish(sig=None, timeout_s=args.seconds + START_TIMEOUT_S)
        time.sleep(DRAIN_S)
        results = {}
        for qos, sub in subs.items():
            sub.finish()
            results[qos] = sub.last_json()
    finally:
        node_log = node.finish()
        for sub in subs.values():
            sub.finish()
    diag = results['reliable']['diagnostics']
    if not diag:
        raise RuntimeError('no /diagnostics from depth_node:\n' + node_log[-3000:])
    return {'size': size, 'profile': profile, 'rate_hz': args.rate,
            'sent': camera.last_json()['sent'],
            'camera_rate_hz': round(camera.last_json()['rate_hz'], 2),
            'node_received': int(diag['frames received']),
            'published': int(diag['frames published']),
            'dropped_newest_frame': int(diag['frames dropped']),
            'idle': int(diag['frames skipped (no subscribers)']),
            'reliable_depth': results['reliable']['depth'],
            'reliable_points': results['reliable']['points'],
            'sensor_data_depth': results['sensor_data']['depth'],
            'sensor_data_points': results['sensor_data']['points']}


def _pct(part: int, whole: int) -> str:
    return f'{part} ({100.0 * part / whole:.0f} %)' if whole else f'{part}'


def markdown(rows: List[Dict[str, Any]]) -> str:
    """The results as a Markdown table."""
    lines = ['| size | Fast DDS profile | sent | received by node | published (dropped by '
             'newest-frame policy) | reliable sub: depth / points | sensor-data sub: depth '
             '/ points |', '| --- | --- | ---: | ---: | ---: | ---: | ---: |']
    for row in rows:
        pub = row['published']
        lines.append(
            f"| {row['size']} | {row['profile']} | {row['sent']} | "
            f"{_pct(row['node_received'], row['sent'])} | {pub} ({row['dropped_newest_frame']}) "
            f"| {_pct(row['reliable_depth'], pub)} / {_pct(row['reliable_points'], pub)} | "
            f"{_pct(row['sensor_data_depth'], pub)} / {_pct(row['sensor_data_points'], pub)} |")
    return '\n'.join(lines)


def bench_main(args: argparse.Namespace) -> int:
    """Every size x profile run with one tiny random model; rows printed as JSON lines."""
    from metricgold_ros.model.checkpoint import save_checkpoint
    from metricgold_ros.model.tiny import build_tiny_checkpoint

    rows = []
    with tempfile.TemporaryDirectory(prefix='transport_bench_') as scratch:
        model = save_checkpoint(Path(scratch) / 'tiny', build_tiny_checkpoint(seed=0))
        for size in args.sizes.split(','):
            for profile in args.profile.split(','):
                row = run_once(size, profile, args, model)
                print(json.dumps(row), flush=True)
                rows.append(row)
    if args.json is not None:
        write_json_atomic(args.json, {'seconds': args.seconds, 'rows': rows})
    if args.markdown:
        print(markdown(rows))
    return 0


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest='role')
    camera = sub.add_parser('camera', help='(internal) the camera process')
    camera.add_argument('--size', default='640x480')
    camera.add_argument('--rate', type=float, default=30.0)
    camera.add_argument('--seconds', type=float, default=20.0)
    subscriber = sub.add_parser('subscriber', help='(internal) a subscriber process')
    subscriber.add_argument('--qos', choices=('reliable', 'sensor_data'), required=True)
    subscriber.add_argument('--diagnostics', action='store_true')
    parser.add_argument('--sizes', default='640x480,1280x720', help='WxH,WxH,...')
    parser.add_argument('--profile', default='none,package',
                        help='none (Fast DDS defaults) and/or package (the package profile)')
    parser.add_argument('--rate', type=float, default=30.0, help='camera rate (Hz)')
    parser.add_argument('--seconds', type=float, default=20.0, help='camera run time per run')
    parser.add_argument('--param', action='append', default=[], metavar='NAME:=VALUE',
                        help='a node parameter besides the defaults (repeatable), e.g. '
                        'output_qos:=sensor_data')
    parser.add_argument('--json', type=Path, help='write the rows here')
    parser.add_argument('--markdown', action='store_true', help='print a Markdown table')
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The benchmark, or one of its camera / subscriber processes; the exit code."""
    args = _parse_args(argv)
    if args.role == 'camera':
        return camera_main(args)
    if args.role == 'subscriber':
        return subscriber_main(args)
    return bench_main(args)


if __name__ == '__main__':
    sys.exit(main())
