"""The new bag of ``metricgold bag``: rosbag2, written atomically, on a background thread.

:class:`OutputBag` writes under a temporary sibling name and renames the finished bag into
place, so the final name never holds half a bag. Serializing and storing run on one writer
thread, in submission order, while the caller runs the model on the next frame; writer
failures surface at the next call or at :meth:`OutputBag.commit`. Times are integer ns.
"""

import contextlib
import errno
import io
import os
import queue
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from metricgold_ros.atomic import describe, fsync_path, fsync_tree
from metricgold_ros.errors import BagError
from metricgold_ros.tools.signals import interrupts_deferred

STORAGES = ('mcap', 'sqlite3')
BAG_SUFFIXES = ('.bag', '.mcap', '.db3')
BAG_VERSION = 8  # rosbag2 metadata version with message definitions that Humble+ tools read
QUEUE_DEPTH = 64  # pending writes (a frame is ~5 of them): bounds memory, lets the model run on


def is_bag(path: Path) -> bool:
    """A rosbag2 folder (with metadata.yaml), or a .bag/.mcap/.db3 file."""
    if path.is_dir():
        return (path / 'metadata.yaml').is_file()
    return path.is_file() and path.suffix in BAG_SUFFIXES


def check_replaceable(output: Path) -> None:
    """BagError unless ``output`` is absent or a bag that ``--overwrite`` may replace.

    ``--overwrite`` replaces only what this tool would have written there: a rosbag2 folder
    (with metadata.yaml) or a bag file. Anything else (an ordinary folder, a text file) is a
    user's data and is refused with what is there.
    """
    if not (output.exists() or output.is_symlink()) or is_bag(output):
        return
    raise BagError(f'OUTPUT {output} is {describe(output)}, not a bag: --overwrite replaces '
                   'only a rosbag2 folder (with metadata.yaml) or a .mcap/.db3/.bag file. '
                   'Choose another OUTPUT, or move that away yourself')


def check_output(output: Path, input_path: Path, overwrite: bool) -> None:
    """Refuse an OUTPUT that exists (unless ``overwrite`` and it is a bag), overlaps INPUT or
    has no parent."""
    out, inp = output.resolve(), input_path.resolve()
    if out == inp or inp in out.parents or out in inp.parents:
        raise BagError(f'OUTPUT {output} overlaps INPUT {input_path}; write the new bag '
                       'somewhere else')
    parent = output.absolute().parent  # where the new bag goes (OUTPUT may be a link)
    if not parent.is_dir():
        raise BagError(f'OUTPUT {output}: folder {parent} does not exist; create it first')
    if output.suffix == '.bag':
        raise BagError(f'OUTPUT {output}: ROS 1 output is not supported; give a folder name '
                       'for the new rosbag2 bag')
    if (output.exists() or output.is_symlink()) and not overwrite:
        raise BagError(f'OUTPUT {output} exists; pass --overwrite to replace it, or choose '
                       'another name')
    if overwrite:
        check_replaceable(output)


class OutputBag:
    """A rosbag2 bag written under ``.NAME.partial-XXXX`` beside ``path``, moved there on commit.

    Leaving the context without :meth:`commit` (an error, Ctrl-C) deletes the temporary
    folder. ``counts`` holds the messages submitted per topic.
    """

    def __init__(self, path: Path, *, storage: str = 'mcap', overwrite: bool = False,
                 typestore: Any = None, background: bool = True) -> None:
        from rosbags.typesys import Stores, get_typestore

        if storage not in STORAGES:
            raise BagError(f"--storage {storage}: use one of {', '.join(STORAGES)}")
        self.path = Path(path)
        self.storage = storage
        self.overwrite = overwrite
        self.typestore = typestore or get_typestore(Stores.ROS2_HUMBLE)
        self.counts: Dict[str, int] = {}
        self.writer_busy_s = 0.0  # time the writer thread spent serializing and storing
        self._background = background
        self._writer: Any = None
        self._temp_dir: Optional[Path] = None
        self._connections: Dict[Any, Any] = {}
        self._converters: Dict[Any, Callable[[Any], Any]] = {}
        self._cache: Dict[str, object] = {}
        self._queue: 'queue.Queue[Optional[Tuple[Callable, tuple, bool]]]' = queue.Queue(
            QUEUE_DEPTH)
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def __enter__(self) -> 'OutputBag':
        from rosbags.rosbag2 import StoragePlugin, Writer

        try:  # `__exit__` does not run when `__enter__` raises: clean up here
            with interrupts_deferred():  # the folder is known before a Ctrl-C can land
                self._temp_dir = Path(tempfile.mkdtemp(prefix=f'.{self.path.name}.partial-',
                                                       dir=self.path.parent))
            plugin = StoragePlugin.MCAP if self.storage == 'mcap' else StoragePlugin.SQLITE3
            self._writer = Writer(self._temp_dir / self.path.name, version=BAG_VERSION,
                                  storage_plugin=plugin)
            if self._background:  # sqlite3 wants every call on the thread that opened the bag
                self._thread = threading.Thread(target=self._work, name='bag-writer',
                                                daemon=True)
                self._thread.start()
            self._submit(self._writer.open)
        except BaseException:
            self._abort()
            raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._temp_dir is not None:
            self._abort()

    # -- what callers submit (runs on the writer thread, in order) -------------------------

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
        self._converters[connection.id] = convert
        self._submit(self._add_copy, connection.id, connection.topic, msgtype, kwargs)

    def write_copy(self, connection: Any, timestamp_ns: int, raw: Any) -> None:
        """Write one message of a connection registered with :meth:`add_copy`."""
        self.counts[connection.topic] = self.counts.get(connection.topic, 0) + 1
        self._submit(self._write_copy, connection, timestamp_ns, raw)

    def write_message(self, topic: str, timestamp_ns: int, msg: Any) -> None:
        """Serialize a message of the output typestore (``msg.__msgtype__``) onto ``topic``."""
        self.counts[topic] = self.counts.get(topic, 0) + 1
        self._submit(self._write_message, topic, timestamp_ns, msg)

    def commit(self) -> None:
        """Finish the bag and move it to its final name (replacing a bag if ``overwrite``).

        The new bag's files and folder are fsynced before the rename and the parent folder
        after it; a bag being replaced is moved aside first and deleted only once the new one
        holds the name.
        """
        assert self._temp_dir is not None
        self._submit(self._writer.close)
        self._stop_worker(discard=False)
        self._writer = None
        new = self._temp_dir / self.path.name
        fsync_tree(new)
        with interrupts_deferred():  # the swap must not be interrupted half way
            if self.path.exists() or self.path.is_symlink():
                if not self.overwrite:
                    raise BagError(f'OUTPUT {self.path} appeared while writing; the new bag is '
                                   'discarded')
                check_replaceable(self.path)  # it may have changed since the run started
                os.rename(self.path, self._temp_dir / f'{self.path.name}.replaced')
            try:
                os.rename(new, self.path)
            except BaseException:
                aside = self._temp_dir / f'{self.path.name}.replaced'
                if aside.exists() or aside.is_symlink():
                    os.rename(aside, self.path)  # the old output back, nothing lost
                raise
            fsync_path(self.path.parent)
            _remove(self._temp_dir)
            self._temp_dir = None

    # -- the writer thread's side -------------------------------------------------------------

    def _submit(self, function: Callable, *args: Any) -> None:
        if self._error is not None:
            raise self._error
        if self._thread is None:
            try:
                function(*args)
            except BaseException as err:
                raise self._as_bag_error(err) from err
        else:
            self._queue.put((function, args, False))

    def _work(self) -> None:
        """Run submitted writes in order; after a failure, only the clean-up (``always``)."""
        while True:
            item = self._queue.get()
            if item is None:
                return
            if item[2]:
                with contextlib.suppress(Exception):
                    item[0](*item[1])
            elif self._error is None:
                start = time.perf_counter()
                try:
                    item[0](*item[1])
                except BaseException as err:  # re-raised on the caller's thread
                    self._error = self._as_bag_error(err)
                self.writer_busy_s += time.perf_counter() - start

    def _as_bag_error(self, err: BaseException) -> BaseException:
        """Storage failures (disk full, permissions) as a BagError naming OUTPUT."""
        import sqlite3

        from rosbags.rosbag2 import WriterError

        if isinstance(err, (OSError, WriterError, sqlite3.Error)):
            hint = ''
            if getattr(err, 'errno', None) in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) or \
                    'disk is full' in str(err):
                hint = (f' - the disk holding {self.path.parent} is full (or a file-size limit '
                        'was hit): free space or write OUTPUT elsewhere')
            elif 'disk I/O error' in str(err):
                hint = (f' - the disk holding {self.path.parent} may be full (or a file-size '
                        'limit was hit): free space or write OUTPUT elsewhere')
            wrapped = BagError(f'OUTPUT {self.path}: writing failed ({err}); nothing was '
                               f'kept{hint}')
            wrapped.__cause__ = err
            return wrapped
        return err

    def _stop_worker(self, discard: bool, last: Optional[Callable[[], Any]] = None) -> None:
        """Finish (or, with ``discard``, drop) the pending writes, run ``last``, end the thread.

        ``last`` runs even after a failure, and its own errors are ignored (clean-up).
        """
        if self._thread is None:
            if last is not None:
                with contextlib.suppress(Exception):
                    last()
            return
        if discard:
            with contextlib.suppress(queue.Empty):
                while True:
                    self._queue.get_nowait()
        if last is not None:
            self._queue.put((last, (), True))
        self._queue.put(None)
        self._thread.join()
        self._thread = None
        if self._error is not None and not discard:
            raise self._error

    def _add_copy(self, key: Any, topic: str, msgtype: str, kwargs: Dict[str, Any]) -> None:
        for existing in self._writer.connections:  # ROS 1 callers of one topic share one
            if (existing.topic, existing.msgtype) == (topic, msgtype) and \
                    existing.ext.offered_qos_profiles == kwargs['offered_qos_profiles']:
                self._connections[key] = existing
                return
        self._connections[key] = self._writer.add_connection(topic, msgtype, **kwargs)

    def _write_copy(self, connection: Any, timestamp_ns: int, raw: Any) -> None:
        try:
            data = self._converters[connection.id](raw)
        except Exception as err:
            raise BagError(f'{connection.topic}: a {connection.msgtype} message cannot be '
                           f'converted to ROS 2 ({err}); skip the topic with --no-copy') from err
        self._writer.write(self._connections[connection.id], timestamp_ns, data)

    def _write_message(self, topic: str, timestamp_ns: int, msg: Any) -> None:
        msgtype = msg.__msgtype__
        key = (topic, msgtype)
        if key not in self._connections:
            self._connections[key] = self._writer.add_connection(topic, msgtype,
                                                                 typestore=self.typestore)
        self._writer.write(self._connections[key], timestamp_ns,
                           self.typestore.serialize_cdr(msg, msgtype))

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

    def _abort(self) -> None:
        """Drop the unfinished bag (and its temporary folder)."""
        # A second Ctrl-C, or the SIGTERM a fleet driver sends a worker it is stopping, must
        # not leave the temporary folder behind.
        with interrupts_deferred():
            self._stop_worker(discard=True, last=self._abort_storage)
            self._writer = None
            if self._temp_dir is not None:
                _remove(self._temp_dir)
            self._temp_dir = None

    def _abort_storage(self) -> None:
        if self._writer is not None and self._writer.storage is not None:
            self._writer.storage.abort()


def _unchanged(raw: Any) -> Any:
    """A ROS 2 message is copied byte for byte."""
    return raw


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
