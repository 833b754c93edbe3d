"""Test utilities for real rclpy over real DDS (loopback only): messages, a spinning harness,
collectors, and a camera publisher process (``python test/ros_helpers.py camera --help``).

Importing this module needs no ROS; rclpy and the message packages are imported when used.
Every process that starts rclpy must run with loopback discovery and its own domain id:
``ros_env()`` gives subprocesses the test's environment (conftest.py set it before import).
"""

import argparse
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]


def ros_env(**extra: str) -> Dict[str, str]:
    """Environment for a subprocess: this one's (domain id included), loopback discovery."""
    from metricgold_ros.ros_env import loopback_env
    env = loopback_env()
    env.setdefault('OMP_NUM_THREADS', '2')
    env['PYTHONUNBUFFERED'] = '1'
    env.update(extra)
    return env


def console_script(name: str) -> Path:
    """A console script of the running environment (``.venv/bin/NAME``)."""
    return Path(sys.executable).parent / name


def synthetic_frame(seed: int = 0, width: int = 160, height: int = 120
                    ) -> Tuple[np.ndarray, Tuple[float, float, float, float]]:
    """A realistic RGB uint8 [H,W,3] frame and its (fx, fy, cx, cy) in pixels."""
    try:
        from metricgold_ros.synthetic.scenes import render_sample
    except ImportError:  # the renderer is optional here: a gradient with plausible intrinsics
        u = np.linspace(0, 255, width, dtype=np.float32)
        v = np.linspace(0, 255, height, dtype=np.float32)[:, None]
        rgb = np.stack(np.broadcast_arrays(u + 0 * v, v + 0 * u, (u + v + 40 * seed) % 256),
                       axis=-1).astype(np.uint8)
        return rgb, (0.8 * width, 0.8 * width, (width - 1) / 2, (height - 1) / 2)
    sample = render_sample(seed, 'indoor', width, height)
    return sample.rgb, (sample.fx_px, sample.fy_px, sample.cx_px, sample.cy_px)


def header(stamp_ns: int, frame_id: str = 'camera_optical_frame') -> Any:
    """A std_msgs/Header."""
    from metricgold_ros import messages
    return messages.header_msg(messages.rclpy_types(), stamp_ns, frame_id)


def image_msg(rgb: np.ndarray, stamp_ns: int, encoding: str = 'rgb8',
              frame_id: str = 'camera_optical_frame', row_padding: int = 0) -> Any:
    """sensor_msgs/Image of ``rgb`` in a writable encoding, rows padded by ``row_padding``."""

    from metricgold_ros.image_encodings import rgb_to_buffer
    data, step = rgb_to_buffer(rgb, encoding)
    if row_padding:
        rows = np.frombuffer(data, np.uint8).reshape(rgb.shape[0], step)
        padded = np.full((rgb.shape[0], step + row_padding), 0xAB, np.uint8)
        padded[:, :step] = rows
        data, step = padded.tobytes(), step + row_padding
    return raw_image_msg(stamp_ns, encoding, rgb.shape[0], rgb.shape[1], step, data, frame_id)


def raw_image_msg(stamp_ns: int, encoding: str, height: int, width: int, step: int,
                  data: bytes, frame_id: str = 'camera_optical_frame') -> Any:
    """sensor_msgs/Image with exactly these fields (for bad-input tests)."""
    import array

    from sensor_msgs.msg import Image
    return Image(header=header(stamp_ns, frame_id), height=height, width=width,
                 encoding=encoding, is_bigendian=0, step=step, data=array.array('B', data))


def camera_info_msg(stamp_ns: int, width: int, height: int,
                    k: Sequence[float], frame_id: str = 'camera_optical_frame',
                    d: Sequence[float] = (0.0,) * 5) -> Any:
    """sensor_msgs/CameraInfo with K = ``(fx, fy, cx, cy)``, plumb_bob with ``d``."""
    from sensor_msgs.msg import CameraInfo
    fx, fy, cx, cy = k
    return CameraInfo(header=header(stamp_ns, frame_id), width=width, height=height,
                      distortion_model='plumb_bob', d=[float(v) for v in d],
                      k=[fx, 0.0, cx, 0.0, fy, cy, 0.0, 0.0, 1.0],
                      r=[1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
                      p=[fx, 0.0, cx, 0.0, 0.0, fy, cy, 0.0, 0.0, 0.0, 1.0, 0.0])


def image_array(msg: Any) -> np.ndarray:
    """A 32FC1 / bgr8 Image's pixels as [H,W] float32 / [H,W,3] uint8 (honours step)."""
    channels, dtype = {'32FC1': (1, '<f4'), 'bgr8': (3, np.uint8)}[msg.encoding]
    rows = np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height, msg.step)
    itemsize = np.dtype(dtype).itemsize
    pixels = rows[:, :msg.width * channels * itemsize].copy().view(dtype)
    return pixels.reshape(msg.height, msg.width) if channels == 1 else \
        pixels.reshape(msg.height, msg.width, channels)


def cloud_array(msg: Any) -> Dict[str, np.ndarray]:
    """PointCloud2 fields (float32) as [H,W] arrays by name."""
    raw = np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height, msg.row_step)
    out = {}
    for field in msg.fields:
        cols = raw[:, :msg.width * msg.point_step].reshape(msg.height, msg.width,
                                                            msg.point_step)
        out[field.name] = cols[:, :, field.offset:field.offset + 4].copy().view('<f4')[..., 0]
    return out


def sensor_qos() -> Any:
    """Best effort, keep last 5: matches the node's default sensor-data publishers."""
    from rclpy.qos import qos_profile_sensor_data
    return qos_profile_sensor_data


def reliable_qos(depth: int = 10) -> Any:
    """Reliable, keep last ``depth``: a publisher that every subscriber matches."""
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    return QoSProfile(depth=depth, reliability=ReliabilityPolicy.RELIABLE)


def wait_until(predicate: Callable[[], Any], timeout_s: float, period_s: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned) or the time is up."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(period_s)


class Collector:
    """Keeps every message of one topic with its receive time (thread-safe)."""

    def __init__(self, node: Any, msg_type: Any, topic: str, qos: Any,
                 keep: Optional[Callable[[Any], Any]] = None) -> None:
        self._lock = threading.Lock()
        self._keep = keep or (lambda msg: msg)
        self.items: List[Tuple[float, Any]] = []
        self.subscription = node.create_subscription(msg_type, topic, self._on_msg, qos)

    def _on_msg(self, msg: Any) -> None:
        item = (time.time(), self._keep(msg))
        with self._lock:
            self.items.append(item)

    def messages(self) -> List[Any]:
        with self._lock:
            return [msg for _, msg in self.items]

    def clear(self) -> None:
        with self._lock:
            self.items.clear()

    def wait_for(self, predicate: Callable[[Any], bool], timeout_s: float) -> Any:
        """The first kept message matching ``predicate`` (waiting for it), else None."""
        def found() -> Any:
            return next((msg for msg in self.messages() if predicate(msg)), None)
        return wait_until(found, timeout_s)


def stamp_of(msg: Any) -> int:
    """Header stamp in integer nanoseconds."""
    from metricgold_ros.messages import stamp_ns
    return stamp_ns(msg.header.stamp)


class RosHarness:
    """rclpy in its own context with a SingleThreadedExecutor spinning in a thread.

    Not a MultiThreadedExecutor: the rclpy of the Kilted wheels (before ros2/rclpy#1547)
    re-submits callbacks still queued in its thread pool, so its spin thread busy-loops while
    messages arrive and starves the node's inference thread of the GIL (model period 7 s
    instead of 0.4 s in test_node_slow).

    ``with RosHarness() as ros:`` gives ``ros.node`` (a helper node for publishers and
    collectors) and ``ros.add_node(other)``; leaving shuts everything down.
    """

    def __init__(self, name: str = 'test_harness') -> None:
        import rclpy
        from rclpy.context import Context
        from rclpy.executors import SingleThreadedExecutor
        self.context = Context()
        rclpy.init(context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.node = rclpy.create_node(name, context=self.context)
        self._nodes = [self.node]
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        from rclpy.executors import ExternalShutdownException
        try:
            self.executor.spin()
        except ExternalShutdownException:
            pass

    def add_node(self, node: Any, activate: bool = True) -> Any:
        """Spin ``node``; a lifecycle node is configured and activated first (``activate``)."""
        if activate and hasattr(node, 'trigger_configure'):
            from rclpy.lifecycle import TransitionCallbackReturn

            assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
            assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
        self._nodes.append(node)
        self.executor.add_node(node)
        return node

    def collector(self, msg_type: Any, topic: str, qos: Any = None,
                  keep: Optional[Callable[[Any], Any]] = None) -> Collector:
        return Collector(self.node, msg_type, topic, qos or sensor_qos(), keep)

    def publisher(self, msg_type: Any, topic: str, qos: Any = None) -> Any:
        return self.node.create_publisher(msg_type, topic, qos or reliable_qos())

    def close(self) -> None:
        import rclpy
        self.executor.shutdown(timeout_sec=2.0)
        for node in reversed(self._nodes):
            if hasattr(node, 'close'):
                node.close()
            node.destroy_node()
        rclpy.try_shutdown(context=self.context)
        self._thread.join(2.0)

    def __enter__(self) -> 'RosHarness':
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class PairPublisher:
    """Publishes ``make(stamp_ns) -> (image, camera_info)`` at ``rate_hz`` in a thread,
    stamped with the wall clock (a camera inside the test process)."""

    def __init__(self, image_pub: Any, info_pub: Any, make: Callable[[int], Any],
                 rate_hz: float) -> None:
        self.image_pub, self._info_pub, self._make = image_pub, info_pub, make
        self._period_s = 1.0 / rate_hz
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._period_s):
            image, info = self._make(time.time_ns())
            self._info_pub.publish(info)
            self.image_pub.publish(image)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2.0)


def wait_for_subscribers(publisher: Any, count: int = 1, timeout_s: float = 10.0) -> bool:
    """Whether ``publisher`` matched ``count`` subscriptions within the time."""
    return bool(wait_until(lambda: publisher.get_subscription_count() >= count, timeout_s))


def wait_for_publishers(subscription: Any, count: int = 1, timeout_s: float = 10.0) -> bool:
    """Whether ``subscription`` matched ``count`` publishers within the time."""
    return bool(wait_until(lambda: subscription.get_publisher_count() >= count, timeout_s))


def camera_main(argv: Optional[Sequence[str]] = None) -> int:
    """A camera process: Image + CameraInfo at ``--rate`` Hz, stamped with the wall clock."""
    parser = argparse.ArgumentParser(description='publish synthetic camera frames')
    parser.add_argument('--image-topic', default='image')
    parser.add_argument('--info-topic', default='camera_info')
    parser.add_argument('--rate', type=float, default=10.0)
    parser.add_argument('--count', type=int, default=0, help='frames to send; 0: until killed')
    parser.add_argument('--width', type=int, default=160)
    parser.add_argument('--height', type=int, default=120)
    parser.add_argument('--encoding', default='bgr8')
    parser.add_argument('--frame-id', default='camera_optical_frame')
    parser.add_argument('--wait-subscribers', type=float, default=30.0,
                        help='seconds to wait for the node to subscribe before sending')
    args = parser.parse_args(argv)
    from metricgold_ros.ros_env import use_loopback
    use_loopback()
    signal.signal(signal.SIGTERM, _interrupt)
    import rclpy
    from rclpy.signals import SignalHandlerOptions
    # Signals as plain KeyboardInterrupts between two frames: rclpy's handler would shut the
    # context down under a publish in flight ("context is invalid", exit 1).
    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
    try:
        node = rclpy.create_node('test_camera')
        image_pub = node.create_publisher(_msg('Image'), args.image_topic, reliable_qos(5))
        info_pub = node.create_publisher(_msg('CameraInfo'), args.info_topic, reliable_qos(5))
        wait_for_subscribers(image_pub, 1, args.wait_subscribers)
        rgb, k = synthetic_frame(0, args.width, args.height)
        sent = 0
        next_s = time.monotonic()
        while args.count == 0 or sent < args.count:
            stamp = time.time_ns()
            info_pub.publish(camera_info_msg(stamp, args.width, args.height, k, args.frame_id))
            image_pub.publish(image_msg(rgb, stamp, args.encoding, args.frame_id))
            sent += 1
            next_s += 1.0 / args.rate
            time.sleep(max(0.0, next_s - time.monotonic()))
        print(f'sent {sent} frames', flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        rclpy.try_shutdown()
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _msg(name: str) -> Any:
    import sensor_msgs.msg
    return getattr(sensor_msgs.msg, name)


if __name__ == '__main__':
    sys.path.insert(0, str(REPO_ROOT))
    if len(sys.argv) > 1 and sys.argv[1] == 'camera':
        sys.exit(camera_main(sys.argv[2:]))
    sys.exit(f'usage: {sys.argv[0]} camera [--help]')
