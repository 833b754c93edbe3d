"""Rosbag reading, topic selection, CameraInfo pairing and atomic output for ``metricgold bag``.

Pure Python on top of ``rosbags``: no ROS installation needed. Reads rosbag2 (sqlite3, mcap)
and ROS 1 bags; writes rosbag2. Times are integer nanoseconds throughout.
"""

import bisect
import contextlib
import io
import os
import shutil
import signal
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from metricgold_ros import messages
from metricgold_ros.camera import Intrinsics
from metricgold_ros.errors import BagError, InputError

IMAGE_TYPE = 'sensor_msgs/msg/Image'
COMPRESSED_TYPE = 'sensor_msgs/msg/CompressedImage'
CAMERA_INFO_TYPE = 'sensor_msgs/msg/CameraInfo'
IMAGE_TYPES = (IMAGE_TYPE, COMPRESSED_TYPE)
# Output topics of an earlier run: never auto-detected as the camera image.
OUTPUT_SUFFIXES = ('depth/image', 'depth/colored', 'depth/uncertainty')
TRANSPORT_SUFFIXES = ('/compressed',)
STORAGES = ('mcap', 'sqlite3')
BAG_VERSION = 8  # rosbag2 metadata version with message definitions that Humble+ tools read
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


def stamp_ns(header: Any) -> int:
    """A message header's stamp as integer nanoseconds."""
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


@contextlib.contextmanager
def open_bag(path: Path) -> Iterator[Any]:
    """An open ``rosbags`` AnyReader of a rosbag2 folder/file or a ROS 1 ``.bag``.

    Raises BagError naming the file and the fix when it is missing, not a bag or damaged.
    """
    from rosbags.highlevel import AnyReader

    path = Path(path)
    if not path.exists():
        raise BagError(f'INPUT {path}: no such file or folder')
    if path.is_dir() and not (path / 'metadata.yaml').exists():
        raise BagError(f'INPUT {path}: a folder without metadata.yaml is not a rosbag2 bag; '
                       'give the bag folder, a .mcap/.db3 file or a ROS 1 .bag file')
    try:
        reader = AnyReader([path])
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


@dataclass(frozen=True)
class Calibration:
    """One distinct CameraInfo: its intrinsics, or why they cannot be used."""

    camera: Optional[Intrinsics]
    problem: Optional[str]
    distortion_model: str
    d: Tuple[float, ...]


def calibration_of(msg: Any) -> Calibration:
    """Calibration of a CameraInfo of either ROS version (``k``/``d`` or ``K``/``D``)."""
    d = msg.d if hasattr(msg, 'd') else getattr(msg, 'D', ())
    model = str(msg.distortion_model)
    try:
        return Calibration(messages.intrinsics_from_camera_info(msg), None, model,
                           tuple(float(v) for v in d))
    except InputError as err:
        return Calibration(None, str(err), model, tuple(float(v) for v in d))


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
                calibration = seen.get(key) or seen.setdefault(key, calibration_of(msg))
                stamps.append(stamp_ns(msg.header))
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


def check_output(output: Path, input_path: Path, overwrite: bool) -> None:
    """Refuse an OUTPUT that exists (unless ``overwrite``), overlaps INPUT or has no parent."""
    out, inp = output.resolve(), input_path.resolve()
    if out == inp or inp in out.parents or out in inp.parents:
        raise BagError(f'OUTPUT {output} overlaps INPUT {input_path}; write the new bag '
                       'somewhere else')
    if not out.parent.is_dir():
        raise BagError(f'OUTPUT {output}: folder {out.parent} does not exist; create it first')
    if output.suffix == '.bag':
        raise BagError(f'OUTPUT {output}: ROS 1 output is not supported; give a folder name '
                       'for the new rosbag2 bag')
    if (output.exists() or output.is_symlink()) and not overwrite:
        raise BagError(f'OUTPUT {output} exists; pass --overwrite to replace it, or choose '
                       'another name')


class OutputBag:
    """A rosbag2 bag written under a temporary sibling name, moved to ``path`` on commit.

    Until :meth:`commit` the bag lives in ``.NAME.partial-XXXX`` beside ``path``; leaving the
    context without committing (error, Ctrl-C) deletes it, so ``path`` never holds half a bag.
    """

    def __init__(self, path: Path, *, storage: str = 'mcap', overwrite: bool = False,
                 typestore: Any = None) -> None:
        from rosbags.typesys import Stores, get_typestore

        if storage not in STORAGES:
            raise BagError(f"--storage {storage}: use one of {', '.join(STORAGES)}")
        self.path = Path(path)
        self.storage = storage
        self.overwrite = overwrite
        self.typestore = typestore or get_typestore(Stores.ROS2_HUMBLE)
        self.counts: Dict[str, int] = {}
        self._writer: Any = None
        self._temp_dir: Optional[Path] = None
        self._connections: Dict[Any, Any] = {}
        self._converters: Dict[Any, Callable[[bytes], Any]] = {}
        self._cache: Dict[str, object] = {}

    def __enter__(self) -> 'OutputBag':
        from rosbags.rosbag2 import StoragePlugin, Writer

        self._temp_dir = Path(tempfile.mkdtemp(prefix=f'.{self.path.name}.partial-',
                                               dir=self.path.parent))
        plugin = StoragePlugin.MCAP if self.storage == 'mcap' else StoragePlugin.SQLITE3
        self._writer = Writer(self._temp_dir / self.path.name, version=BAG_VERSION,
                              storage_plugin=plugin)
        self._writer.open()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._temp_dir is not None:
            self._abort()

    def add_copy(self, reader: Any, connection: Any) -> None:
        """Copy ``connection`` of ``reader``: ROS 2 data as is, ROS 1 data converted to CDR."""
        from rosbags.interfaces import ConnectionExtRosbag2

        ext = connection.ext
        if isinstance(ext, ConnectionExtRosbag2):
            msgtype, convert = connection.msgtype, _unchanged
            kwargs: Dict[str, Any] = {'serialization_format': ext.serialization_format,
                                      'offered_qos_profiles': ext.offered_qos_profiles}
            if connection.msgdef.data and connection.digest:
                kwargs.update(msgdef=connection.msgdef.data, rihs01=connection.digest)
            else:
                kwargs['typestore'] = reader.typestore
        else:
            msgtype, convert = self._ros1_converter(reader, connection)
            kwargs = {'typestore': self.typestore,
                      'offered_qos_profiles': _latched_qos() if ext.latching else []}
        for existing in self._writer.connections:  # ROS 1 callers of one topic share one
            if (existing.topic, existing.msgtype) == (connection.topic, msgtype) and \
                    existing.ext.offered_qos_profiles == kwargs['offered_qos_profiles']:
                self._connections[connection.id] = existing
                break
        else:
            self._connections[connection.id] = self._writer.add_connection(
                connection.topic, msgtype, **kwargs)
        self._converters[connection.id] = convert

    def _ros1_converter(self, reader: Any, connection: Any) -> Tuple[str, Callable]:
        """Target type and bytes converter of a ROS 1 connection (rosbags' own conversion)."""
        from rosbags.convert.converter import (STATIC_MSGTYPE_RENAMES,
                                               generate_message_converter)
        from rosbags.typesys import get_types_from_msg

        msgtype = STATIC_MSGTYPE_RENAMES.get(connection.msgtype, connection.msgtype)
        if msgtype not in self.typestore.fielddefs:  # a custom type: keep its definition
            types = get_types_from_msg(
                reader.typestore.generate_msgdef(connection.msgtype, ros_version=2)[0], msgtype)
            types.pop('std_msgs/msg/Header', None)
            self.typestore.register(types)
        with contextlib.redirect_stdout(io.StringIO()):  # it prints 'will be migrated'
            convert = generate_message_converter(
                reader.typestore, self.typestore, connection.msgtype, msgtype, self._cache,
                src_is2=False, dst_is2=True)
        return msgtype, convert

    def write_copy(self, connection: Any, timestamp_ns: int, raw: bytes) -> None:
        """Write one message of a connection registered with :meth:`add_copy`."""
        try:
            data = self._converters[connection.id](raw)
        except Exception as err:
            raise BagError(f'{connection.topic}: a {connection.msgtype} message cannot be '
                           f'converted to ROS 2 ({err}); skip the topic with --no-copy') from err
        target = self._connections[connection.id]
        self._writer.write(target, timestamp_ns, data)
        self.counts[target.topic] = self.counts.get(target.topic, 0) + 1

    def write_message(self, topic: str, timestamp_ns: int, msg: Any) -> None:
        """Serialize a message of the output typestore (``msg.__msgtype__``) onto ``topic``."""
        msgtype = msg.__msgtype__
        key = (topic, msgtype)
        if key not in self._connections:
            self._connections[key] = self._writer.add_connection(topic, msgtype,
                                                                 typestore=self.typestore)
        self._writer.write(self._connections[key], timestamp_ns,
                           self.typestore.serialize_cdr(msg, msgtype))
        self.counts[topic] = self.counts.get(topic, 0) + 1

    def commit(self) -> None:
        """Finish the bag and move it to its final name (replacing one if ``overwrite``)."""
        assert self._temp_dir is not None
        self._writer.close()
        self._writer = None
        with _sigint_ignored():  # the swap must not be interrupted half way
            if self.path.exists() or self.path.is_symlink():
                if not self.overwrite:
                    raise BagError(f'OUTPUT {self.path} appeared while writing; the new bag is '
                                   'discarded')
                os.rename(self.path, self._temp_dir / f'{self.path.name}.replaced')
            os.rename(self._temp_dir / self.path.name, self.path)
            _remove(self._temp_dir)
            self._temp_dir = None

    def _abort(self) -> None:
        """Drop the unfinished bag (and its temporary folder)."""
        with _sigint_ignored():  # a second Ctrl-C must not leave the temporary folder behind
            if self._writer is not None and self._writer.storage is not None:
                with contextlib.suppress(Exception):
                    self._writer.storage.abort()
            self._writer = None
            if self._temp_dir is not None:
                _remove(self._temp_dir)
            self._temp_dir = None


def _unchanged(raw: Any) -> Any:
    """A ROS 2 message is copied byte for byte."""
    return raw


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Ignore Ctrl-C inside the block (main thread only; elsewhere signals cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _latched_qos() -> List[Any]:
    """The QoS rosbags' converter gives latched ROS 1 topics (transient local)."""
    from rosbags.convert.converter import LATCH

    return list(LATCH)
