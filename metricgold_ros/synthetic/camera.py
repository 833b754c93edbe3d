"""A camera process that plays a synthetic sequence over DDS: Image + CameraInfo at a fixed rate.

The sequence walks through a generated room, then drives down a generated street
(:mod:`metricgold_ros.synthetic.scenes`), so whoever receives the node's depth can regenerate
the exact ground truth of every frame from its index. Used by the demo and the soak test::

    python -m metricgold_ros.synthetic.camera --rate 5 --frames 40 --stamps-out stamps.json

Both scenes are filmed from one mounting, :data:`DEMO_MOUNTING` (``--camera-height-m``,
``--camera-pitch-deg``), about which the camera bobs as it walks or drives: pass the same to
the node (``camera_height_m``, ``camera_pitch_deg``) and its ground fit has the floor's scale.
"""

import argparse
import signal
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from metricgold_ros.atomic import write_json_atomic
from metricgold_ros.ros_env import use_loopback
from metricgold_ros.synthetic.scenes import Sample, camera_sequence

SCENES = (('indoor', 1), ('outdoor', 2))  # (kind, scene seed): a room, then a street
DEMO_MOUNTING = (1.5, 8.0)  # camera_height_m, camera_pitch_deg (looking down) of both scenes


def demo_frames(n_frames: int, width: int, height: int, fps: float,
                mounting: Optional[Tuple[float, float]] = DEMO_MOUNTING) -> List[Sample]:
    """The demo's frames: the first half in a room, the rest in a street (deterministic).

    ``mounting`` ``(camera_height_m, camera_pitch_deg)`` is the camera's nominal mounting in
    both scenes; ``None``: each scene's own (they differ).
    """
    indoor = (n_frames + 1) // 2
    frames: List[Sample] = []
    for (kind, seed), count in zip(SCENES, (indoor, n_frames - indoor)):
        frames.extend(camera_sequence(seed, kind, count, width, height, fps, mounting))
    return frames


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--rate', type=float, default=5.0, help='frames per second (Hz)')
    parser.add_argument('--frames', type=int, default=40, help='frames to send; 0: loop forever')
    parser.add_argument('--size', default='640x480', help='WIDTHxHEIGHT (default 640x480)')
    parser.add_argument('--image-topic', default='camera/image_raw')
    parser.add_argument('--info-topic', default='camera/camera_info')
    parser.add_argument('--frame-id', default='camera_optical_frame')
    parser.add_argument('--camera-height-m', type=float, default=DEMO_MOUNTING[0],
                        help='nominal camera height above the floor, metres (default '
                             f'{DEMO_MOUNTING[0]}); 0: each scene\'s own')
    parser.add_argument('--camera-pitch-deg', type=float, default=DEMO_MOUNTING[1],
                        help='nominal pitch, degrees, positive looking down (default '
                             f'{DEMO_MOUNTING[1]})')
    parser.add_argument('--wait-subscribers', type=float, default=60.0,
                        help='seconds to wait for a subscriber before sending (default 60)')
    parser.add_argument('--qos', choices=('sensor_data', 'reliable'), default='sensor_data',
                        help='publisher QoS: sensor_data (best effort, like camera drivers) or '
                        'reliable (loopback-only DDS loses large best-effort frames under load)')
    parser.add_argument('--stamps-out', type=Path,
                        help='write {stamp_ns: frame index} of every sent frame as JSON here')
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse_args(argv)
    # Ctrl-C / SIGINT stops the camera with its summary line even when it was started with
    # SIGINT ignored (a background job of a script, nohup: Python then installs no handler).
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
    width, height = (int(v) for v in args.size.lower().split('x'))
    loop = args.frames == 0
    mounting = (args.camera_height_m, args.camera_pitch_deg) if args.camera_height_m > 0 \
        else None
    try:
        frames = demo_frames(args.frames or 100, width, height, args.rate, mounting)
    except KeyboardInterrupt:  # stopped while rendering: nothing was sent
        print('synthetic_camera: sent 0 frames', flush=True)
        return 0
    use_loopback()
    import rclpy
    from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
    from rclpy.signals import SignalHandlerOptions
    from sensor_msgs.msg import CameraInfo, Image

    from metricgold_ros import messages

    types = messages.rclpy_types()
    # Ctrl-C as a plain KeyboardInterrupt between two frames: rclpy's own handler would shut
    # the context down under a publish in flight, which then fails with "context is invalid"
    # and skips the summary line that `bench/soak.py` and the tests read.
    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
    sent: dict = {}
    try:
        node = rclpy.create_node('synthetic_camera')
        qos = qos_profile_sensor_data if args.qos == 'sensor_data' else QoSProfile(
            depth=5, reliability=ReliabilityPolicy.RELIABLE)
        image_pub = node.create_publisher(Image, args.image_topic, qos)
        info_pub = node.create_publisher(CameraInfo, args.info_topic, qos)
        deadline = time.monotonic() + args.wait_subscribers
        while image_pub.get_subscription_count() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # let the subscriber's other endpoints match too
        period_s = 1.0 / args.rate
        next_s = time.monotonic()
        index = 0
        while loop or index < len(frames):
            sample = frames[index % len(frames)]
            stamp_ns = time.time_ns()
            header = messages.header_msg(types, stamp_ns, args.frame_id)
            info_pub.publish(messages.camera_info_msg(types, header, sample.intrinsics))
            image_pub.publish(messages.rgb_image_msg(types, header, sample.rgb))
            sent[str(stamp_ns)] = index % len(frames)
            index += 1
            next_s += period_s
            time.sleep(max(0.0, next_s - time.monotonic()))
    except KeyboardInterrupt:
        pass
    finally:
        rclpy.try_shutdown()
        if args.stamps_out is not None:
            write_json_atomic(args.stamps_out, sent)
    print(f'synthetic_camera: sent {len(sent)} frames', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
