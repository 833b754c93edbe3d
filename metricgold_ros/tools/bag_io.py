"""Rosbag reading, topic selection and CameraInfo pairing for ``metricgold bag``.

Pure Python on top of ``rosbags``: no ROS installation needed. Reads rosbag2 (sqlite3, mcap)
and ROS 1 bags (writing is :mod:`metricgold_ros.tools.bag_output`). Times are integer nanoseconds.
"""

import bisect
import contextlib
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from metricgold_ros import messages
from metricgold_ros.camera import Calibration
from metricgold_ros.depth_frame import OUTPUT_TOPICS
from metricgold_ros.errors import BagError

IMAGE_TYPE = 'sensor_msgs/msg/Image'
COMPRESSED_TYPE = 'sensor_msgs/msg/CompressedImage'
CAMERA_INFO_TYPE = 'sensor_msgs/msg/CameraInfo'
IMAGE_TYPES = (IMAGE_TYPE, COMPRESSED_TYPE)
# Output topics of an earlier run: never auto-detected as the camera image.
OUTPUT_SUFFIXES = tuple(t for t in OUTPUT_TOPICS if t.startswith('depth/') and
                        t != 'depth/camera_info')
TRANSPORT_SUFFIXES = ('/compressed',)
TRUNCATED_HINT = ('the bag is truncated or corrupt (an interrupted recording?): for rosbag2 try '
                  '`ros2 bag reindex`, for ROS 1 `rosbag reindex`')


def norm_topic(topic: str) -> str:
    """A topic with exactly one leading slash, for comparisons ('a/b' and '/a/b' are one)."""
    return '/' + topic.strip('/')


def camera_namespace(image_topic: str) -> str:
    """'/cam/image_raw/compressed' -> '/cam'; the root namespace is ''."""
    base = norm_topic(image_topic)
    for suffix in TRANSPORT_SUFFIXES:
        if base.endswith(suffix):
            base = base[:-len(suffix)]
    return base.rsplit('/', 1)[0]


@contextlib.contextmanager
def open_bag(path: Path) -> Iterator[Any]:
    """An open ``rosbags`` AnyReader of a rosbag2 folder/file or a ROS 1 ``.bag``.

    Raises BagError naming the file and the fix when it is missing, not a bag or damaged.
    """
    from rosbags.highlevel import AnyReader
    from rosbags.typesys import Stores, get_typestore

    path = Path(path)
    if not path.exists():
        raise BagError(f'INPUT {path}: no such file or folder')
    if path.is_dir() and not (path / 'metadata.yaml').exists():
        raise BagError(f'INPUT {path}: a folder without metadata.yaml is not a rosbag2 bag; '
                       'give the bag folder, a .mcap/.db3 file or a ROS 1 .bag file')
    try:
        # Humble's rosbag2 stores no message definitions: read those bags with Humble's types.
        reader = AnyReader([path], default_typestore=get_typestore(Stores.ROS2_HUMBLE))
        reader.open()
    except Exception as err:  # rosbags raises several unrelated classes for a damaged file
        raise BagError(f'INPUT {path} cannot be read as a rosbag ({err}): give a rosbag2 '
                       f'folder, .mcap, .db3 or a ROS 1 .bag; if it is one, {TRUNCATED_HINT}'
                       ) from err
    try:
        yield reader
    finally:
        with contextlib.suppress(Exception):
            reader.close()


def guarded_messages(reader: Any, path: Path, **kwargs: Any) -> Iterator[Tuple[Any, int, bytes]]:
    """``reader.messages(**kwargs)`` with read failures (a damaged bag) as BagError."""
    iterator = reader.messages(**kwargs)
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except Exception as err:
            raise BagError(f'INPUT {path}: reading failed ({err}); {TRUNCATED_HINT}') from err
        yield item


def deserialize(reader: Any, path: Path, connection: Any, raw: bytes) -> Any:
    """One message of ``connection``; BagError when its bytes do not fit the type."""
    try:
        return reader.deserialize(raw, connection.msgtype)
    except Exception as err:
        raise BagError(f'INPUT {path}: a {connection.msgtype} message on {connection.topic} '
                       f'cannot be decoded ({err}); {TRUNCATED_HINT}') from err


def copy_problem(reader: Any, connection: Any) -> Optional[str]:
    """Why ``connection`` cannot be copied into the new bag, or None when it can.

    ROS 2 data is copied byte for byte and needs only a definition of its type (from the bag,
    or a standard type); ROS 1 data is converted, which needs its (always present) definition
    to translate to ROS 2.
    """
    from rosbags.interfaces import ConnectionExtRosbag2

    if isinstance(connection.ext, ConnectionExtRosbag2):
        if connection.msgdef.data and connection.digest:
            return None
        if connection.msgtype in reader.typestore.fielddefs:
            return None
        return (f'the bag holds no definition of {connection.msgtype} and it is not a standard '
                'ROS 2 Humble type')
    return None


def _listing(connections: Sequence[Any]) -> str:
    names = sorted({f'{c.topic} ({c.msgtype})' for c in connections})
    return ', '.join(names) if names else 'none'


def select_image_topic(connections: Sequence[Any], requested: Optional[str]) -> str:
    """The image topic to process: ``requested`` or the bag's only camera image topic."""
    images = [c for c in connections if c.msgtype in IMAGE_TYPES]
    if requested:
        found = [c for c in connections if norm_topic(c.topic) == norm_topic(requested)]
        if not found:
            raise BagError(f'--image-topic {requested} is not in the bag; its image topics: '
                           f'{_listing(images)}')
        if any(c.msgtype not in IMAGE_TYPES for c in found):
            raise BagError(f'--image-topic {requested} carries {found[0].msgtype}, not '
                           'sensor_msgs/Image or CompressedImage; its image topics: '
                           f'{_listing(images)}')
        return found[0].topic
    cameras = sorted({c.topic for c in images
                      if not norm_topic(c.topic).endswith(OUTPUT_SUFFIXES)})
    recorded = sorted({c.topic for c in images if c.topic in cameras
                       and getattr(c, 'msgcount', 1) > 0})
    if len(cameras) > 1 and len(recorded) == 1:
        return recorded[0]  # the others were declared but never received a message
    if len(cameras) == 1:
        return cameras[0]
    if not cameras:
        raise BagError('the bag has no sensor_msgs/Image or CompressedImage topic; its '
                       f'topics: {_listing(connections)}')
    raise BagError(f'the bag has {len(cameras)} image topics ({", ".join(cameras)}); choose '
                   'one with --image-topic')


def select_camera_info_topic(connections: Sequence[Any], image_topic: str,
                             requested: Optional[str]) -> Tuple[Optional[str], str]:
    """``(topic or None, how it was found)`` of the CameraInfo that belongs to ``image_topic``.

    Without ``requested``: ``camera_info`` beside the image (its transport suffix removed),
    then in each parent namespace, then the bag's only CameraInfo topic. Leading slashes are
    ignored, so 'cam/image/compressed' finds '/cam/camera_info'.
    """
    infos = [c for c in connections if c.msgtype == CAMERA_INFO_TYPE]
    by_name = {norm_topic(c.topic): c.topic for c in infos}
    if requested:
        found = [c for c in connections if norm_topic(c.topic) == norm_topic(requested)]
        if not found:
            raise BagError(f'--camera-info-topic {requested} is not in the bag; its CameraInfo '
                           f'topics: {_listing(infos)}')
        if found[0].msgtype != CAMERA_INFO_TYPE:
            raise BagError(f'--camera-info-topic {requested} carries {found[0].msgtype}, not '
                           f'sensor_msgs/CameraInfo; its CameraInfo topics: {_listing(infos)}')
        return found[0].topic, 'requested'
    namespace = camera_namespace(image_topic)
    while True:
        candidate = f'{namespace}/camera_info'
        if candidate in by_name:
            return by_name[candidate], 'sibling'
        if not namespace:
            break
        namespace = namespace.rsplit('/', 1)[0]
    if len(by_name) == 1:
        return next(iter(by_name.values())), 'only CameraInfo topic'
    return None, 'none found' if not by_name else f'ambiguous: {", ".join(sorted(by_name))}'


class CalibrationTable:
    """CameraInfo by header stamp: exact stamp, else the latest before, else the first after.

    The last fallback serves recordings whose first image precedes the first CameraInfo
    (calibrations are static). Identical calibrations are stored once.
    """

    def __init__(self, stamps_ns: List[int], calibrations: List[Calibration]) -> None:
        order = sorted(range(len(stamps_ns)), key=stamps_ns.__getitem__)
        self.stamps_ns = [stamps_ns[i] for i in order]
        self.calibrations = [calibrations[i] for i in order]

    @classmethod
    def read(cls, reader: Any, path: Path, connections: Sequence[Any]) -> 'CalibrationTable':
        """Read every CameraInfo of ``connections`` (small messages) from the whole bag."""
        stamps: List[int] = []
        calibrations: List[Calibration] = []
        seen: Dict[bytes, Calibration] = {}
        if connections:
            for connection, _, raw in guarded_messages(reader, path, connections=connections):
                msg = deserialize(reader, path, connection, raw)
                # Bytes 0-11 are the CDR encapsulation or ROS 1 seq, then the stamp: the
                # rest (frame_id, size, K, D...) identifies the calibration.
                key = bytes(raw[12:])
                calibration = seen.get(key) or seen.setdefault(
                    key, messages.calibration_from_info(msg))
                stamps.append(messages.stamp_ns(msg.header.stamp))
                calibrations.append(calibration)
        return cls(stamps, calibrations)

    def __len__(self) -> int:
        return len(self.stamps_ns)

    def lookup(self, stamp: int) -> Tuple[Optional[Calibration], str]:
        """``(calibration, 'exact' | 'before' | 'after' | 'none')`` for an image stamp (ns)."""
        if not self.stamps_ns:
            return None, 'none'
        i = bisect.bisect_right(self.stamps_ns, stamp)
        if i > 0:
            return self.calibrations[i - 1], 'exact' if self.stamps_ns[i - 1] == stamp \
                else 'before'
        return self.calibrations[0], 'after'
