"""Many cameras: ONE depth_node serving N streams with one model vs N depth_node processes.

For each N in ``--cameras`` (default 1 2 4) and each mode, on loopback DDS in a domain of its
own with the package's Fast DDS large-data profile in every process:

- ``one node``: ``depth_node`` with ``cameras:=[cam0, ..., camN-1]`` (one model, batched);
- ``N processes``: N ``depth_node`` processes, each in namespace ``camK`` with one stream;

and this process as the N cameras (``--width`` x ``--height`` bgr8 + CameraInfo at ``--rate``
Hz each, reliable) and as the recorder of every ``depth/image`` (reliable). Measured over
``--seconds`` after a warm-up: depth frames/s received in total and per stream, stamp ->
receive p50/p95 per stream, and the peak RSS (VmHWM) of the node processes summed.
The bundled model runs at its default processing resolution on the CPU.

Usage::

    python bench/multicam.py --json bench/results/multicam.json

Results: BENCHMARKS.md, section "Many cameras".
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
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from metricgold_ros.atomic import write_json_atomic  # noqa: E402
from metricgold_ros.ros_env import (depth_node_command, free_domain_id,  # noqa: E402
                                    loopback_env, with_large_data_profile)


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f'/proc/{pid}/status').read_text().splitlines():
        if line.startswith('VmHWM:'):
            return int(line.split()[1]) / 1024.0
    return float('nan')


def _start_nodes(mode: str, cameras: List[str], env: Dict[str, str], log_dir: Path
                 ) -> List[subprocess.Popen]:
    common = ['--ros-args', '-p', 'device:=cpu', '-p', 'stats_period:=0.0']
    if mode == 'one node':
        runs = [[*common, '-r', '__ns:=/bench', '-p',
                 'cameras:=[' + ', '.join(cameras) + ']']]
    else:
        runs = [[*common, '-r', f'__ns:=/bench/{camera}'] for camera in cameras]
    procs = []
    for i, args in enumerate(runs):
        log = open(log_dir / f'{mode.replace(" ", "_")}_{i}.log', 'w')
        procs.append(subprocess.Popen([*depth_node_command(), *args], env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
    return procs


def _wait_logs(log_dir: Path, mode: str, count: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    prefix = mode.replace(' ', '_')
    while time.monotonic() < deadline:
        texts = [p.read_text() for p in log_dir.glob(f'{prefix}_*.log')]
        if len(texts) == count and all('listening on' in t for t in texts):
            return True
        time.sleep(0.5)
    return False


class _CamerasAndRecorder:
    """This process's side: N cameras publishing at ``rate`` Hz and the recorder of every
    ``depth/image`` (stamp -> receive latency in ms per stream, while ``measuring``)."""

    def __init__(self, cameras: List[str], args: argparse.Namespace) -> None:
        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import CameraInfo, Image

        sys.path.insert(0, str(REPO / 'test'))
        from ros_helpers import synthetic_frame

        self._args = args
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node('multicam_bench', context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        reliable = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
        rgb, self._k = synthetic_frame(3, args.width, args.height)
        self._bgr = np.ascontiguousarray(rgb[..., ::-1])
        self.received: Dict[str, List[float]] = {c: [] for c in cameras}
        self.measuring = threading.Event()
        self._stop = threading.Event()
        self._pubs = []
        for camera in cameras:
            self.node.create_subscription(Image, f'/bench/{camera}/depth/image',
                                          lambda msg, c=camera: self._on_depth(c, msg),
                                          reliable)
            self._pubs.append((
                self.node.create_publisher(Image, f'/bench/{camera}/image', reliable),
                self.node.create_publisher(CameraInfo, f'/bench/{camera}/camera_info',
                                           reliable)))
        threading.Thread(target=self.executor.spin, daemon=True).start()

    def _on_depth(self, camera: str, msg: Any) -> None:
        if self.measuring.is_set():
            stamp = msg.header.stamp.sec * 10 ** 9 + msg.header.stamp.nanosec
            self.received[camera].append((time.time_ns() - stamp) * 1e-6)

    def start_cameras(self) -> None:
        """Publish every camera's frame and CameraInfo at the rate, stamped now."""
        threading.Thread(target=self._camera_loop, daemon=True).start()

    def _camera_loop(self) -> None:
        from ros_helpers import camera_info_msg, image_msg

        args = self._args
        period, next_s = 1.0 / args.rate, time.monotonic()
        while not self._stop.is_set():
            stamp = time.time_ns()
            for image_pub, info_pub in self._pubs:
                info_pub.publish(camera_info_msg(stamp, args.width, args.height, self._k))
                image_pub.publish(image_msg(self._bgr, stamp, 'bgr8'))
            next_s += period
            time.sleep(max(0.0, next_s - time.monotonic()))

    def close(self) -> None:
        import rclpy

        self._stop.set()
        self.executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)


def _stop_nodes(procs: List[subprocess.Popen]) -> None:
    for proc in procs:
        proc.send_signal(signal.SIGINT)
    for proc in procs:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_once(mode: str, count: int, args: argparse.Namespace) -> Dict[str, Any]:
    """One configuration: its per-stream rates and latencies and the nodes' peak RSS."""
    cameras = [f'cam{i}' for i in range(count)]
    env = with_large_data_profile(loopback_env(dict(os.environ), free_domain_id()))
    os.environ.update({k: v for k, v in env.items() if k.startswith(('ROS_', 'FASTDDS'))})
    log_dir = Path(tempfile.mkdtemp(prefix='multicam_'))
    procs = _start_nodes(mode, cameras, env, log_dir)
    rig = _CamerasAndRecorder(cameras, args)
    try:
        if not _wait_logs(log_dir, mode, len(procs), 180.0):
            raise RuntimeError(f'{mode} x{count}: nodes did not start; logs in {log_dir}')
        rig.start_cameras()
        time.sleep(args.warmup)
        rig.measuring.set()
        start = time.monotonic()
        time.sleep(args.seconds)
        rig.measuring.clear()
        elapsed = time.monotonic() - start
        rss_mb = sum(_peak_rss_mb(p.pid) for p in procs)
    finally:
        rig.close()
        _stop_nodes(procs)
    received = rig.received
    rates = {c: len(v) / elapsed for c, v in received.items()}
    return {
        'mode': mode, 'cameras': count, 'seconds': round(elapsed, 1),
        'total_hz': round(sum(rates.values()), 2),
        'per_stream_hz': {c: round(r, 2) for c, r in rates.items()},
        'p50_ms': {c: round(float(np.percentile(v, 50)), 0) if v else None
                   for c, v in received.items()},
        'p95_ms': {c: round(float(np.percentile(v, 95)), 0) if v else None
                   for c, v in received.items()},
        'peak_rss_mb': round(rss_mb, 0),
    }


def markdown(rows: List[Dict[str, Any]]) -> str:
    """The BENCHMARKS table."""
    lines = ['| cameras | mode | depth frames/s (total) | per stream (Hz) | p50 ms | p95 ms | '
             'peak RSS (MB) |', '| --- | --- | --- | --- | --- | --- | --- |']
    for row in rows:
        per = ' / '.join(f'{v:.2f}' for v in row['per_stream_hz'].values())
        p50 = ' / '.join(str(int(v)) if v is not None else '-' for v in row['p50_ms'].values())
        p95 = ' / '.join(str(int(v)) if v is not None else '-' for v in row['p95_ms'].values())
        lines.append(f"| {row['cameras']} | {row['mode']} | {row['total_hz']:.2f} | {per} | "
                     f"{p50} | {p95} | {row['peak_rss_mb']:.0f} |")
    return '\n'.join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--cameras', type=int, nargs='+', default=[1, 2, 4])
    parser.add_argument('--width', type=int, default=640)
    parser.add_argument('--height', type=int, default=480)
    parser.add_argument('--rate', type=float, default=30.0, help='Hz per camera')
    parser.add_argument('--seconds', type=float, default=20.0)
    parser.add_argument('--warmup', type=float, default=5.0)
    parser.add_argument('--json', type=Path, help='write the results here')
    args = parser.parse_args(argv)
    rows = []
    for count in args.cameras:
        for mode in ('one node', 'N processes'):
            rows.append(run_once(mode, count, args))
            print(json.dumps(rows[-1]), flush=True)
    print(markdown(rows))
    if args.json:
        write_json_atomic(args.json, {'args': {k: v for k, v in vars(args).items()
                                               if k != 'json'}, 'rows': rows})
    return 0


if __name__ == '__main__':
    sys.exit(main())
