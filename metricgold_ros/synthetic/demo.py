"""The README's main command: the real node, a synthetic camera and a recorder, over DDS.

``make demo`` (``python -m metricgold_ros.synthetic.demo --frames N --out demo_out``) starts three
processes on loopback DDS with a domain of their own: ``depth_node`` (the console script users
run), ``synthetic_camera`` (a room, then a street, with CameraInfo, at a fixed rate) and this
process, which records the node's outputs. It ends by itself and writes to ``--out``:
side-by-side RGB | coloured-depth PNGs, a ``.ply`` cloud of one frame, and ``summary.json``
(frames sent/received/dropped, stamp->receive latency, AbsRel/delta1 against the generator's
exact depth). Receiving nothing is a non-zero exit that says why.

The camera is mounted as :data:`~metricgold_ros.synthetic.camera.DEMO_MOUNTING` says and the
node is told so (``camera_height_m``, ``camera_pitch_deg``): its ground fit scales the depth by
the floor. The recorder also reads ``depth/scale`` and reports AbsRel with the fit and without
it (the published depth divided by the applied scale); ``--no-ground-fit`` runs the node
without a mounting.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from metricgold_ros.atomic import write_json_atomic
from metricgold_ros.model_paths import model_or_untrained
from metricgold_ros.ros_env import loopback_env, with_large_data_profile

CAMERA_NS = '/camera'


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='metricgold-demo', description=__doc__.splitlines()[0])
    parser.add_argument('--frames', type=int, default=40, help='frames the camera sends')
    parser.add_argument('--rate', type=float, default=2.0, help='camera rate (Hz)')
    parser.add_argument('--size', default='640x480', help='camera WIDTHxHEIGHT')
    parser.add_argument('--out', type=Path, default=Path('demo_out'), help='output folder')
    parser.add_argument('--model', type=Path, help='model folder (default: the bundled model)')
    parser.add_argument('--no-ground-fit', dest='ground_fit', action='store_false',
                        help='do not tell the node the camera\'s mounting (no ground fit)')
    parser.add_argument('--timeout', type=float, default=150.0,
                        help='give up after this many seconds (default 150)')
    return parser.parse_args(argv)


class Recorder:
    """Subscribes to the node's outputs and keeps what the summary and the pictures need."""

    def __init__(self, node) -> None:
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import Image, PointCloud2

        # Reliable: the recorder wants every frame the node publishes (REP 2003 publishers are
        # reliable; the package's Fast DDS profile carries megabyte frames in shared memory).
        qos = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)

        self.lock = threading.Lock()
        self.depth: Dict[int, np.ndarray] = {}  # stamp_ns -> depth [H,W] metres
        self.latency_ms: List[float] = []
        self.colored: Dict[int, np.ndarray] = {}
        self.scale: Dict[int, Dict[str, str]] = {}  # stamp_ns -> depth/scale key-values
        self.cloud = None
        self.subs = [
            node.create_subscription(Image, 'depth/image', self._on_depth, qos),
            node.create_subscription(Image, 'depth/colored', self._on_colored, qos),
            node.create_subscription(DiagnosticArray, 'depth/scale', self._on_scale, qos),
        ]
        self._cloud_sub = node.create_subscription(PointCloud2, 'points', self._on_cloud, qos)

    def release_cloud(self, node) -> None:
        """Unsubscribe from ``points`` once a cloud is kept (only one is saved): a 5 MB reliable
        cloud per frame held the depth images behind it by 0.5-1.6 s on this 2-core machine."""
        if self._cloud_sub is not None and self.cloud is not None:
            node.destroy_subscription(self._cloud_sub)
            self._cloud_sub = None

    @staticmethod
    def _stamp_ns(msg) -> int:
        return msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec

    def _on_depth(self, msg) -> None:
        now_ns = time.time_ns()
        depth = np.frombuffer(msg.data, '<f4').reshape(msg.height, msg.step // 4)[:, :msg.width]
        with self.lock:
            self.depth[self._stamp_ns(msg)] = depth.copy()
            self.latency_ms.append((now_ns - self._stamp_ns(msg)) / 1e6)

    def _on_colored(self, msg) -> None:
        with self.lock:
            if len(self.colored) < 200:
                bgr = np.frombuffer(msg.data, np.uint8).reshape(msg.height, msg.step)
                self.colored[self._stamp_ns(msg)] = bgr[:, :msg.width * 3].reshape(
                    msg.height, msg.width, 3).copy()

    def _on_scale(self, msg) -> None:
        with self.lock:
            self.scale[self._stamp_ns(msg)] = {kv.key: kv.value for kv in msg.status[0].values}

    def unscaled(self, stamp: int) -> Optional[np.ndarray]:
        """The frame's depth as the model gave it (the ground fit's scale and shift undone)."""
        values = self.scale.get(stamp)
        if values is None:
            return None
        return (self.depth[stamp] - float(values['shift_m'])) / float(values['scale'])

    def _on_cloud(self, msg) -> None:
        with self.lock:
            self.cloud = msg


def _cloud_from_msg(msg):
    from metricgold_ros.pointcloud import Cloud

    names = [f.name for f in msg.fields]
    dtype = np.dtype({'names': names, 'formats': ['<f4'] * len(names),
                      'offsets': [f.offset for f in msg.fields], 'itemsize': msg.point_step})
    points = np.frombuffer(bytes(msg.data), dtype).reshape(msg.height, msg.width)
    fields = tuple((f.name, f.offset, f.datatype, f.count) for f in msg.fields)
    return Cloud(points, fields, msg.point_step, msg.row_step)


def _write_outputs(args, recorder: Recorder, stamps: Dict[str, int], frames, elapsed_s: float
                   ) -> dict:
    import cv2

    from metricgold_ros.colorize import colorize_depth
    from metricgold_ros.evaluation import depth_metrics
    from metricgold_ros.pointcloud import write_ply

    received = sorted(s for s in recorder.depth if str(s) in stamps)
    per_kind: Dict[str, List[dict]] = {}
    without_fit: Dict[str, List[dict]] = {}
    states: Dict[str, int] = {}
    for stamp in received:
        sample = frames[stamps[str(stamp)]]
        metrics = depth_metrics(recorder.depth[stamp], sample.depth_m, sample.valid)
        per_kind.setdefault(sample.kind, []).append(metrics)
        unscaled = recorder.unscaled(stamp)
        if unscaled is not None:
            without_fit.setdefault(sample.kind, []).append(
                depth_metrics(unscaled, sample.depth_m, sample.valid))
            state = recorder.scale[stamp]['state']
            states[state] = states.get(state, 0) + 1
    all_metrics = [m for ms in per_kind.values() for m in ms]
    all_without = [m for ms in without_fit.values() for m in ms]

    def mean(key, items):
        return round(float(np.mean([m[key] for m in items])), 4) if items else None

    chosen = received[::max(1, len(received) // 4)][:4]
    for stamp in chosen:
        sample = frames[stamps[str(stamp)]]
        colored = recorder.colored.get(stamp)
        if colored is None:
            colored = colorize_depth(recorder.depth[stamp])
        truth = colorize_depth(np.where(sample.valid, sample.depth_m, np.nan))
        side = np.hstack([cv2.cvtColor(sample.rgb, cv2.COLOR_RGB2BGR), colored, truth])
        cv2.imwrite(str(args.out / f'frame_{stamps[str(stamp)]:04d}_rgb_depth_truth.png'), side)
    if recorder.cloud is not None:
        write_ply(args.out / 'cloud.ply', _cloud_from_msg(recorder.cloud))
    latency = np.array(recorder.latency_ms) if recorder.latency_ms else np.array([np.nan])
    summary = {
        'frames_sent': len(stamps), 'frames_received': len(received),
        'frames_dropped': len(stamps) - len(received),
        'latency_ms_p50': round(float(np.percentile(latency, 50)), 1),
        'latency_ms_p95': round(float(np.percentile(latency, 95)), 1),
        'abs_rel': mean('abs_rel', all_metrics), 'delta1': mean('delta1', all_metrics),
        'abs_rel_indoor': mean('abs_rel', per_kind.get('indoor', [])),
        'abs_rel_outdoor': mean('abs_rel', per_kind.get('outdoor', [])),
        'ground_fit': args.ground_fit, 'ground_fit_states': states,
        'abs_rel_without_fit': mean('abs_rel', all_without),
        'abs_rel_without_fit_indoor': mean('abs_rel', without_fit.get('indoor', [])),
        'abs_rel_without_fit_outdoor': mean('abs_rel', without_fit.get('outdoor', [])),
        'camera_rate_hz': args.rate, 'image_size': args.size, 'wall_s': round(elapsed_s, 1),
    }
    write_json_atomic(args.out / 'summary.json', summary)
    return summary


def _stop(process: subprocess.Popen, timeout_s: float = 5.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    model = model_or_untrained(args.model, args.out, lambda line: print(f'demo: {line}',
                                                                       flush=True))
    env = with_large_data_profile(loopback_env())
    os.environ.update(env)  # this process (the recorder) too, before rclpy.init
    bin_dir = Path(sys.executable).parent
    node_cmd = [str(bin_dir / 'depth_node'), '--ros-args', '-p', f'model_path:={model}',
                '-r', f'image:={CAMERA_NS}/image_raw', '-r', f'camera_info:={CAMERA_NS}/camera_info',
                '-p', 'stats_period:=5.0', '-p', 'qos:=reliable', '-p', 'output_qos:=reliable']
    from metricgold_ros.synthetic.camera import DEMO_MOUNTING, demo_frames
    if args.ground_fit:
        node_cmd += ['-p', f'camera_height_m:={float(DEMO_MOUNTING[0])}',
                     '-p', f'camera_pitch_deg:={float(DEMO_MOUNTING[1])}']
    stamps_file = args.out / '.stamps.json'
    camera_cmd = [sys.executable, '-m', 'metricgold_ros.synthetic.camera', '--frames',
                  str(args.frames), '--rate', str(args.rate), '--size', args.size,
                  '--image-topic', f'{CAMERA_NS}/image_raw', '--info-topic',
                  f'{CAMERA_NS}/camera_info', '--qos', 'reliable', '--stamps-out',
                  str(stamps_file)]
    print(f'demo: ROS_DOMAIN_ID={env["ROS_DOMAIN_ID"]}, discovery on loopback; model {model}',
          flush=True)
    width, height = (int(v) for v in args.size.lower().split('x'))
    frames = demo_frames(args.frames, width, height, args.rate)

    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    node_proc = subprocess.Popen(node_cmd, env=env)
    camera_proc = None
    rclpy.init()
    executor = SingleThreadedExecutor()
    try:
        node = rclpy.create_node('demo_recorder')
        recorder = Recorder(node)
        executor.add_node(node)
        deadline = start + args.timeout
        camera_proc = subprocess.Popen(camera_cmd, env=env)
        last_count, quiet_since = -1, time.monotonic()
        while time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.1)
            recorder.release_cloud(node)
            if node_proc.poll() is not None:
                print(f'demo: depth_node exited with code {node_proc.returncode}',
                      file=sys.stderr)
                break
            count = len(recorder.depth)
            if count != last_count:
                last_count, quiet_since = count, time.monotonic()
            if camera_proc.poll() is not None and time.monotonic() - quiet_since > 5.0:
                break  # the camera is done and the node has had time to finish
        elapsed = time.monotonic() - start
    finally:
        if camera_proc is not None:
            _stop(camera_proc)
        _stop(node_proc)
        executor.shutdown(timeout_sec=0)  # before the context: see metricgold_ros.node.main._run
        rclpy.try_shutdown()
    stamps = json.loads(stamps_file.read_text()) if stamps_file.exists() else {}
    if not recorder.depth:
        reason = ('the camera sent nothing' if not stamps else
                  'the node published no depth (see its log above)')
        print(f'demo: FAILED - received no depth image: {reason}', file=sys.stderr)
        return 1
    summary = _write_outputs(args, recorder, stamps, frames, elapsed)
    print('demo summary: ' + json.dumps(summary, indent=2), flush=True)
    print(f'demo: wrote {args.out}/ (side-by-side PNGs: RGB | predicted | true depth, '
          'cloud.ply, summary.json)', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
