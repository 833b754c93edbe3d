"""Soak test of ``depth_node``: a 30 Hz camera for a long time; memory, threads and latency.

Starts the ``depth_node`` console script and the synthetic camera
(``python -m metricgold_ros.synthetic.camera --rate 30 --frames 0 --qos reliable``) as
processes on loopback DDS in a domain of their own, subscribes here to every output of the
node and to ``/diagnostics``, and after ``--duration`` seconds of camera frames reports (JSON):

- frames in (sent by the camera, received by the node), out (published by the node, received
  here) and dropped (replaced in the node's one-slot mailbox while the model ran);
- per window (default 60 s, after a warm-up): frames out, latency p50/p99 in ms (camera stamp
  -> ``depth/image`` received here), the node's RSS and thread count;
- the node process's RSS (``VmRSS``) and thread count (``/proc/PID/status``) at the start
  (right after the warm-up) and at the end, and the verdict on the bounds: RSS growth below
  ``--max-rss-growth`` (5 %), the same thread count, and latency p99 flat (last window <=
  ``--max-p99-ratio`` x the first one + ``--p99-slack-ms``, default 1.5 x + 50 ms).

Model: ``--model DIR``, else the bundled model (metricgold_ros/models/metricgold-tiny), else a
tiny random model written with ``metricgold init-model --tiny`` into a temporary folder (same
architecture and cost; its depth is noise, which does not matter here). Transport is reliable
end to end: with loopback-only discovery Fast DDS uses UDP, where large best-effort frames
are lost under load.

Usage::

    python bench/soak.py --duration 620 --warmup 20 --json soak.json   # the 10-minute run
    python bench/soak.py --duration 30 --warmup 6 --window 8 \
        --processing-resolution 128 --p99-slack-ms 300     # CI (test/bench/test_soak.py)

Exit code 0; with ``--check``, 1 when a bound is missed. Results: bench/SOAK.md.
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

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from metricgold_ros.model_paths import model_or_untrained  # noqa: E402
from metricgold_ros.ros_env import depth_node_command, loopback_env, use_loopback  # noqa: E402

NS = '/soak'
OUTPUTS = ('depth/image', 'depth/camera_info', 'depth/colored', 'points')


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--duration', type=float, default=600.0,
                        help='seconds of camera frames, warm-up included (default 600)')
    parser.add_argument('--warmup', type=float, default=20.0,
                        help='seconds after the first output before measuring (default 20)')
    parser.add_argument('--window', type=float, default=60.0,
                        help='seconds per latency window (default 60: per minute)')
    parser.add_argument('--rate', type=float, default=30.0, help='camera rate, Hz (default 30)')
    parser.add_argument('--size', default='320x240', help='camera WIDTHxHEIGHT (default 320x240)')
    parser.add_argument('--model', type=Path, help='checkpoint folder (default: see above)')
    parser.add_argument('--processing-resolution', type=int, default=-1,
                        help="node's processing_resolution (default -1: the checkpoint's)")
    parser.add_argument('--max-rss-growth', type=float, default=0.05,
                        help='bound on (RSS end - RSS start) / RSS start (default 0.05)')
    parser.add_argument('--max-p99-ratio', type=float, default=1.5,
                        help='bound on p99 last window / first window (default 1.5)')
    parser.add_argument('--p99-slack-ms', type=float, default=50.0,
                        help='absolute slack of that bound, ms (default 50: timer noise)')
    parser.add_argument('--json', type=Path, help='write the report here')
    parser.add_argument('--check', action='store_true', help='exit 1 when a bound is missed')
    return parser.parse_args(argv)


def proc_status(pid: int) -> Dict[str, float]:
    """RSS (MB), thread count and CPU seconds of a process, from /proc."""
    fields: Dict[str, float] = {}
    with open(f'/proc/{pid}/status') as handle:
        for line in handle:
            key, _, value = line.partition(':')
            if key == 'VmRSS':
                fields['rss_mb'] = int(value.split()[0]) / 1024.0
            elif key == 'Threads':
                fields['threads'] = int(value)
    with open(f'/proc/{pid}/stat') as handle:
        stat = handle.read().rsplit(')', 1)[1].split()
    fields['cpu_s'] = (int(stat[11]) + int(stat[12])) / os.sysconf('SC_CLK_TCK')
    return fields


class Sampler(threading.Thread):
    """Samples the node's /proc status every second: [(monotonic s, fields)]."""

    def __init__(self, pid: int) -> None:
        super().__init__(name='soak-sampler', daemon=True)
        self.pid = pid
        self.samples: List[Any] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(1.0):
            try:
                fields = proc_status(self.pid)
                fields['load_1min'] = os.getloadavg()[0]
                self.samples.append((time.monotonic(), fields))
            except (OSError, IndexError, ValueError):
                return


class Listener:
    """This process's subscriptions: receive times of every output, the last diagnostics."""

    def __init__(self) -> None:
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import CameraInfo, Image, PointCloud2

        rclpy.init()
        self.node = rclpy.create_node('soak_listener')
        qos = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
        self.lock = threading.Lock()
        self.depth: List[Any] = []  # (monotonic receive s, latency ms)
        self.counts = dict.fromkeys(OUTPUTS, 0)
        self.first_s: Dict[str, float] = {}  # monotonic time of each output's first message
        self.diagnostics: Dict[str, str] = {}
        types = {'depth/image': Image, 'depth/camera_info': CameraInfo,
                 'depth/colored': Image, 'points': PointCloud2}
        self.subs = [self.node.create_subscription(
            types[name], f'{NS}/{name}', lambda msg, name=name: self._on_output(name, msg), qos)
            for name in OUTPUTS]
        self.subs.append(self.node.create_subscription(
            DiagnosticArray, '/diagnostics', self._on_diagnostics, 10))
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self._spin, daemon=True)
        self.thread.start()

    def _spin(self) -> None:
        from rclpy.executors import ExternalShutdownException
        try:
            self.executor.spin()
        except ExternalShutdownException:
            pass

    def _on_output(self, name: str, msg: Any) -> None:
        now_ns = time.time_ns()
        stamp = msg.header.stamp.sec * 10 ** 9 + msg.header.stamp.nanosec
        with self.lock:
            self.counts[name] += 1
            self.first_s.setdefault(name, time.monotonic())
            if name == 'depth/image':
                self.depth.append((time.monotonic(), (now_ns - stamp) / 1e6))

    def _on_diagnostics(self, msg: Any) -> None:
        for status in msg.status:
            if status.name.startswith(f'{NS}/depth_node'):
                with self.lock:
                    self.diagnostics = {kv.key: kv.value for kv in status.values}

    def close(self) -> None:
        import rclpy
        self.executor.shutdown(timeout_sec=2.0)
        self.node.destroy_node()
        rclpy.try_shutdown()


def _spawn(cmd: List[str], env: Dict[str, str], log: Path) -> subprocess.Popen:
    """Start ``cmd`` with stdout and stderr to the file ``log``.

    Never a pipe read only at the end: once its 64 KiB fill up, every log call of the child
    blocks in write(2), and a node logging a summary every 2 s freezes after ~7 minutes.
    """
    with open(log, 'w') as handle:
        proc = subprocess.Popen(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                cwd=REPO_ROOT)
    proc.log = log  # type: ignore[attr-defined]
    return proc


def _stop(proc: subprocess.Popen, sig: int = signal.SIGINT, timeout_s: float = 10.0) -> str:
    """Signal ``proc``, wait, kill if needed; its output."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return proc.log.read_text(errors='replace')  # type: ignore[attr-defined]


def _median_field(samples: List[Any], key: str) -> float:
    return float(np.median([fields[key] for _, fields in samples])) if samples else float('nan')


def _windows(depth: List[Any], samples: List[Any], start: float, end: float,
             window: float) -> List[Dict[str, Any]]:
    """Latency and process figures per window of ``window`` s from ``start`` to ``end``."""
    rows = []
    edges = list(np.arange(start, end, window)) + [end]
    for lo, hi in zip(edges[:-1], edges[1:]):
        if hi - lo < 0.5 * window:
            continue  # a short tail would make a noisy last window
        lat = np.array([ms for t, ms in depth if lo <= t < hi])
        times = [lo] + [t for t, _ in depth if lo <= t < hi] + [hi]
        inside = [s for s in samples if lo <= s[0] < hi]
        rows.append({
            'from_s': round(lo - start, 1), 'to_s': round(hi - start, 1),
            'frames_out': int(lat.size),
            'rate_hz': round(lat.size / (hi - lo), 2),
            'max_gap_s': round(float(np.max(np.diff(times))), 2),
            'latency_p50_ms': round(float(np.percentile(lat, 50)), 1) if lat.size else None,
            'latency_p99_ms': round(float(np.percentile(lat, 99)), 1) if lat.size else None,
            'rss_mb': round(_median_field(inside, 'rss_mb'), 1),
            'threads': int(_median_field(inside, 'threads')) if inside else None,
            'machine_load_1min': round(_median_field(inside, 'load_1min'), 2),
        })
    return rows


def _node_command(model: Path, args: argparse.Namespace) -> List[str]:
    return [*depth_node_command(), '--ros-args',
            '--params-file', str(REPO_ROOT / 'config' / 'depth.yaml'),
            '-p', f'model_path:={model}', '-p', 'device:=cpu',
            '-p', f'processing_resolution:={args.processing_resolution}',
            '-p', 'qos:=reliable', '-p', 'output_qos:=reliable',
            '-p', 'stats_period:=2.0', '-r', f'__ns:={NS}',
            '-r', 'image:=camera/image_raw', '-r', 'camera_info:=camera/camera_info']


def camera_command(rate_hz: float, size: str) -> List[str]:
    """The synthetic camera process on the soak's topics, reliable, ``size`` (WxH) at
    ``rate_hz``: it renders its frames while the node loads, then waits for its subscriber."""
    return [sys.executable, '-m', 'metricgold_ros.synthetic.camera', '--rate',
            str(rate_hz), '--frames', '0', '--qos', 'reliable', '--size', size,
            '--image-topic', f'{NS}/camera/image_raw',
            '--info-topic', f'{NS}/camera/camera_info', '--wait-subscribers', '120']


def soak(args: argparse.Namespace) -> Dict[str, Any]:
    """Run the soak; the report (see the module docstring)."""
    use_loopback()  # before rclpy starts here; the children inherit the domain
    env = loopback_env()
    env.setdefault('OMP_NUM_THREADS', '2')
    env['PYTHONUNBUFFERED'] = '1'
    with tempfile.TemporaryDirectory(prefix='soak-') as scratch:
        model = model_or_untrained(args.model, Path(scratch))
        node = _spawn(_node_command(model, args), env, Path(scratch) / 'node.log')
        camera = _spawn(camera_command(args.rate, args.size), env, Path(scratch) / 'camera.log')
        listener = Listener()
        sampler = Sampler(node.pid)
        sampler.start()
        try:
            deadline = time.monotonic() + 120
            while not listener.depth:
                if camera.poll() is not None or node.poll() is not None or \
                        time.monotonic() > deadline:
                    raise RuntimeError('no depth/image arrived:\n' + _stop(node) +
                                       _stop(camera))
                time.sleep(0.05)
            first_out = time.monotonic()
            begin = first_out + args.warmup
            end = first_out + args.duration
            time.sleep(max(0.0, begin - time.monotonic()))
            start_status = proc_status(node.pid)
            time.sleep(max(0.0, end - time.monotonic()))
            end_status = proc_status(node.pid)
            camera_out = _stop(camera)
            time.sleep(2.5)  # the node's next diagnostics carry the final counters
            node_log = _stop(node)
        finally:
            sampler.stop.set()
            for proc in (camera, node):
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait()
            listener.close()
    samples = [s for s in sampler.samples if begin <= s[0] <= end]
    return _report(args, model, listener, samples, (begin, end), (start_status, end_status),
                   camera_out, node_log, node.returncode)


def _report(args: argparse.Namespace, model: Path, listener: 'Listener', samples: List[Any],
            window: Tuple[float, float], statuses: Tuple[Dict[str, float], Dict[str, float]],
            camera_out: str, node_log: str, exit_code: Optional[int]) -> Dict[str, Any]:
    """The soak's report from what the listener, the sampler and the processes left."""
    (begin, end), (start_status, end_status) = window, statuses
    with listener.lock:
        depth = list(listener.depth)
        counts = dict(listener.counts)
        first = {k: round(v - listener.first_s['depth/image'], 2)
                 for k, v in listener.first_s.items()}
        diagnostics = dict(listener.diagnostics)
    windows = _windows(depth, samples, begin, end, args.window)
    sent = next((int(line.split()[2]) for line in camera_out.splitlines()
                 if line.startswith('synthetic_camera: sent')), None)
    # Start and end RSS: medians of the first / last 5 samples (one sample is noisy).
    rss_start = _median_field(samples[:5], 'rss_mb') if samples else start_status['rss_mb']
    rss_end = _median_field(samples[-5:], 'rss_mb') if samples else end_status['rss_mb']
    growth = (rss_end - rss_start) / rss_start
    p99_first = windows[0]['latency_p99_ms'] if windows else None
    p99_last = windows[-1]['latency_p99_ms'] if windows else None
    p99_ok = (p99_first is not None and p99_last is not None
              and p99_last <= args.max_p99_ratio * p99_first + args.p99_slack_ms)
    diag_int = {k: int(v) for k, v in diagnostics.items() if v.isdigit()}
    return {
        'duration_s': args.duration, 'warmup_s': args.warmup, 'window_s': args.window,
        'camera': {'rate_hz': args.rate, 'size': args.size, 'frames_sent': sent},
        'model': str(model), 'processing_resolution': args.processing_resolution,
        'frames': {'sent': sent,
                   'node_received': diag_int.get('frames received'),
                   'node_published': diag_int.get('frames published'),
                   'node_dropped': diag_int.get('frames dropped'),
                   'node_idle': diag_int.get('frames skipped (no subscribers)'),
                   'node_errors': diag_int.get('errors'),
                   'node_inference_failures': diag_int.get('inference failures'),
                   'received_here': counts, 'first_received_after_depth_s': first},
        'latency_windows': windows,
        'node_process': {
            'rss_mb_start': round(rss_start, 1), 'rss_mb_end': round(rss_end, 1),
            'rss_growth': round(growth, 4),
            'rss_mb_max': round(max((f['rss_mb'] for _, f in samples), default=float('nan')),
                                1),
            'threads_start': int(start_status['threads']),
            'threads_end': int(end_status['threads']),
            'cpu_s': round(end_status['cpu_s'] - start_status['cpu_s'], 1),
            'exit_code': exit_code,
        },
        'bounds': {
            'rss_growth_max': args.max_rss_growth, 'rss_ok': growth < args.max_rss_growth,
            'p99_first_ms': p99_first, 'p99_last_ms': p99_last,
            'p99_ratio_max': args.max_p99_ratio, 'p99_slack_ms': args.p99_slack_ms,
            'p99_ok': p99_ok,
            'threads_ok': int(end_status['threads']) <= int(start_status['threads']),
        },
        'node_log_tail': node_log.splitlines()[-3:],
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse_args(argv)
    if args.warmup >= args.duration:
        sys.exit(f'--warmup {args.warmup} must be shorter than --duration {args.duration}')
    report = soak(args)
    text = json.dumps(report, indent=2)
    if args.json is not None:
        args.json.write_text(text + '\n')
    print(text)
    bounds = report['bounds']
    ok = bounds['rss_ok'] and bounds['p99_ok'] and bounds['threads_ok']
    return 0 if ok or not args.check else 1


if __name__ == '__main__':
    sys.exit(main())
