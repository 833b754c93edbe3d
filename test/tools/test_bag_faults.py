"""`metricgold bag` under faults: a disk that fills up mid-write, damaged and odd input bags.
Every failure: ``ERROR: ...``, exit code 1, nothing under the OUTPUT name and no temporary
folder left behind. (SIGINT mid-run: test_bag.py::test_interrupt_leaves_no_output; SIGTERM is
the same KeyboardInterrupt: test_bag.py::test_sigterm_is_an_interrupt.)

The full disk is real, not a mock: a 1 MiB tmpfs mounted in a private mount namespace
(``unshare``; skipped where mounting is not permitted), and everywhere a file-size limit
(``RLIMIT_FSIZE``, SIGXFSZ ignored so writes fail with EFBIG) in a child process.
"""

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest

from bag_helpers import START_NS, read_bag, run_bag, write_camera_bag

pytestmark = pytest.mark.timeout(120)

REPO_ROOT = Path(__file__).resolve().parents[2]
FAST = ['--processing-resolution', '32']
CUSTOM_TYPE = 'my_pkg/msg/Custom'
CUSTOM_DEF = 'int32 value\nstring label\nfloat64[] samples\n'
SMALL_DISK = 1 << 20  # bytes: a few frames of output

# Runs `metricgold bag` for each storage into OUTPUT folders on a small tmpfs (when given),
# then under a file-size limit, all in one interpreter (one torch import), and reports per run
# the exit code, its stderr and what is left in OUTPUT's folder.
DRIVER = textwrap.dedent('''
    import contextlib, io, json, os, resource, signal, sys
    from metricgold_ros.tools.cli import main
    bag, model, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
    results = []
    for how, out_dir in (('tmpfs', sys.argv[4]), ('rlimit', sys.argv[5])):
        if how == 'rlimit':
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past it fail with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        for storage in ('mcap', 'sqlite3') if out_dir else ():
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                code = main(['bag', bag, os.path.join(out_dir, 'out-' + storage), '--storage',
                             storage, '--model', model, '--processing-resolution', '32',
                             '--quiet'])
            results.append({'how': how, 'storage': storage, 'code': code,
                            'stderr': err.getvalue(), 'left': sorted(os.listdir(out_dir))})
    print('RESULTS ' + json.dumps(results), flush=True)
''')





def _child_env():
    return dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(REPO_ROOT),
                PYTHONDONTWRITEBYTECODE='1')


def _tmpfs_command(mount_point: Path):
    """The command prefix that runs a child with a small tmpfs on ``mount_point``, or None."""
    unshare = shutil.which('unshare')
    if unshare is None:
        return None, 'unshare(1) is not installed'
    # Root: a private mount namespace; others: a user namespace maps them to root in it.
    flags = '-m' if os.geteuid() == 0 else '-rm'
    probe = subprocess.run([unshare, flags, 'mount', '-t', 'tmpfs', '-o', 'size=64k', 'tmpfs',
                            str(mount_point)], capture_output=True, text=True)
    if probe.returncode != 0:
        return None, f'cannot mount a tmpfs here: {probe.stderr.strip()}'
    script = f'mount -t tmpfs -o size={SMALL_DISK} tmpfs "$1" && shift && exec "$@"'
    return [unshare, flags, 'sh', '-c', script, 'sh', str(mount_point)], None


@pytest.fixture(scope='module')
def disk_full_runs(tmp_path_factory, tiny_model_dir):
    """One child process fills a 1 MiB tmpfs (when it can mount one), then hits a 1 MiB
    file-size limit, once per output storage: the runs' results."""
    root = tmp_path_factory.mktemp('diskfull')
    bag = write_camera_bag(root / 'in', count=8)  # ~3 MB of output: three small disks
    mount_point, limited = root / 'small', root / 'limited'
    mount_point.mkdir()
    limited.mkdir()
    prefix, skip_reason = _tmpfs_command(mount_point)
    done = subprocess.run(
        (prefix or []) + [sys.executable, '-c', DRIVER, str(bag.path), str(tiny_model_dir),
                          str(SMALL_DISK), str(mount_point) if prefix else '', str(limited)],
        cwd=REPO_ROOT, env=_child_env(), capture_output=True, text=True, timeout=100)
    line = next((l for l in done.stdout.splitlines() if l.startswith('RESULTS ')), None)
    assert line is not None, f'driver failed (rc {done.returncode}): {done.stderr[-3000:]}'
    return {'results': json.loads(line[len('RESULTS '):]), 'skip': skip_reason,
            'root': root}


def _check_disk_full(runs, how, words):
    results = [r for r in runs['results'] if r['how'] == how]
    assert [r['storage'] for r in results] == ['mcap', 'sqlite3'], runs
    for result in results:
        storage, error = result['storage'], result['stderr']
        assert result['code'] == 1, (storage, error)
        assert error.startswith('ERROR: OUTPUT ') and f'out-{storage}: writing failed' in error
        assert 'nothing was kept' in error and any(word in error for word in words), error
        assert 'full' in error and 'free space or write OUTPUT elsewhere' in error, error
        assert 'Traceback' not in error
        assert result['left'] == [], f'{how} {storage}: left behind {result["left"]}'


@pytest.mark.slow
def test_disk_full_on_a_small_tmpfs(disk_full_runs):
    """A real filesystem that runs out of space (ENOSPC) in the middle of the output."""
    if disk_full_runs['skip']:
        pytest.skip(disk_full_runs['skip'] + ' (the RLIMIT_FSIZE test covers a full disk)')
    _check_disk_full(disk_full_runs, 'tmpfs', ['No space left on device',
                                               'database or disk is full'])
    assert not list((disk_full_runs['root'] / 'small').iterdir())  # the mount is gone too


def test_file_size_limit_mid_write(disk_full_runs):
    """Portable: RLIMIT_FSIZE makes the kernel refuse writes past 1 MiB (EFBIG)."""
    _check_disk_full(disk_full_runs, 'rlimit', ['File too large', 'disk I/O error'])


def _cut(source: Path, target: Path, fraction: float) -> Path:
    """A copy of the bag (file or rosbag2 folder) with its data file cut at ``fraction``."""
    if source.is_file():
        data = source.read_bytes()
        target.write_bytes(data[:int(len(data) * fraction)])
        return target
    shutil.copytree(source, target)
    data_file = next(p for p in target.iterdir() if p.suffix in ('.mcap', '.db3'))
    data = data_file.read_bytes()
    data_file.write_bytes(data[:int(len(data) * fraction)])
    return target


@pytest.mark.parametrize('storage, fraction', [
    ('mcap', 0.05), ('mcap', 0.5), ('mcap', 0.98), ('sqlite3', 0.5), ('sqlite3', 0.95),
    ('ros1', 0.5), ('ros1', 0.9),
])
def test_truncated_input(tmp_path, capsys, fast_model, storage, fraction):
    name = 'in.bag' if storage == 'ros1' else 'in'
    (tmp_path / 'src').mkdir()
    bag = write_camera_bag(tmp_path / 'src' / name, storage='mcap' if storage == 'ros1'
                           else storage, ros1=storage == 'ros1', count=4)
    cut = _cut(bag.path, tmp_path / f'cut{bag.path.suffix}', fraction)
    code, _, err = run_bag(capsys, cut, tmp_path / 'out', *FAST)
    assert code == 1 and err.startswith('ERROR: INPUT ') and str(cut) in err, err
    assert 'truncated or corrupt' in err and 'reindex' in err, err
    assert 'Traceback' not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ['cut' + bag.path.suffix, 'src']


def _add_chunk_crcs(path: Path) -> list:
    """Write the CRC of every MCAP chunk (rosbags leaves 0: unchecked); the records' spans."""
    data = bytearray(path.read_bytes())
    pos, spans = 8, []
    while pos < len(data):
        op, length = data[pos], int.from_bytes(data[pos + 1:pos + 9], 'little')
        body = pos + 9
        if op == 0x06:  # Chunk: start, end, uncompressed size, crc, compression, records
            comp_len = int.from_bytes(data[body + 28:body + 32], 'little')
            rec_len = int.from_bytes(data[body + 32 + comp_len:body + 40 + comp_len], 'little')
            rec_start = body + 40 + comp_len
            crc = zlib.crc32(data[rec_start:rec_start + rec_len])
            data[body + 24:body + 28] = crc.to_bytes(4, 'little')
            spans.append((rec_start, rec_len))
        if op == 0x0F:  # DataEnd
            break
        pos = body + length
    path.write_bytes(bytes(data))
    return spans


def test_corrupt_chunk_found_mid_run(tmp_path, capsys, fast_model):
    """A bit-rotten MCAP chunk after the first frames were written: the partial bag goes."""
    bag = write_camera_bag(tmp_path / 'in', count=10, width=320, height=240,
                           camera_info=False, extra_topic=False)
    mcap = next(bag.path.glob('*.mcap'))
    spans = _add_chunk_crcs(mcap)
    assert len(spans) >= 2, 'rosbags closes chunks at 1 MiB: expected several'
    code, summary, _ = run_bag(capsys, bag.path, tmp_path / 'intact', *FAST)
    assert code == 0 and summary['frames'] == 10  # the checksums are right
    start, length = spans[-1]
    data = bytearray(mcap.read_bytes())
    data[start + length // 2:start + length // 2 + 64] = bytes(64)
    mcap.write_bytes(bytes(data))
    code, _, err = run_bag(capsys, bag.path, tmp_path / 'out', *FAST)
    assert code == 1 and 'reading failed' in err and 'checksum' in err.lower(), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ['in', 'intact']


def test_corrupt_sqlite_pages(tmp_path, capsys, fast_model):
    bag = write_camera_bag(tmp_path / 'in', storage='sqlite3', count=6)
    db = next(bag.path.glob('*.db3'))
    data = bytearray(db.read_bytes())
    data[len(data) // 3:len(data) // 3 + 40000] = bytes(40000)
    db.write_bytes(bytes(data))
    code, _, err = run_bag(capsys, bag.path, tmp_path / 'out', *FAST)
    assert code == 1 and err.startswith('ERROR: INPUT ') and 'malformed' in err, err
    assert 'truncated or corrupt' in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ['in']


def _with_custom_topic(source: Path, target: Path, storage: str, ros1: bool = False) -> None:
    """``source`` plus /custom messages of a type no typestore knows."""
    from rosbags.highlevel import AnyReader
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    store = get_typestore(Stores.ROS1_NOETIC if ros1 else Stores.ROS2_HUMBLE)
    store.register(get_types_from_msg(CUSTOM_DEF, CUSTOM_TYPE))
    custom = store.types[CUSTOM_TYPE]
    if ros1:
        from rosbags.rosbag1 import Writer as Writer1
        writer = Writer1(target)
        serialize = store.serialize_ros1
    else:
        from rosbags.rosbag2 import StoragePlugin, Writer
        writer = Writer(target, version=8, storage_plugin=StoragePlugin.MCAP
                        if storage == 'mcap' else StoragePlugin.SQLITE3)
        serialize = store.serialize_cdr
    with AnyReader([source]) as reader, writer:
        if ros1:
            conns = {c.id: writer.add_connection(c.topic, c.msgtype, typestore=reader.typestore)
                     for c in reader.connections}
        else:
            conns = {c.id: writer.add_connection(c.topic, c.msgtype, msgdef=c.msgdef.data,
                                                 rihs01=c.digest) for c in reader.connections}
        conn_custom = writer.add_connection('/custom', CUSTOM_TYPE, typestore=store)
        for i, (connection, log_ns, raw) in enumerate(reader.messages()):
            writer.write(conns[connection.id], log_ns, raw)
            if connection.topic == '/chatter':
                writer.write(conn_custom, log_ns + 1, serialize(custom(
                    value=i, label=f'm{i}', samples=np.arange(3.0)), CUSTOM_TYPE))


@pytest.mark.parametrize('storage', ['mcap', 'sqlite3', 'ros1'])
def test_unknown_type_with_definition_is_copied(tmp_path, capsys, fast_model, storage):
    ros1 = storage == 'ros1'
    bag = write_camera_bag(tmp_path / ('cam.bag' if ros1 else 'cam'), ros1=ros1,
                           storage='mcap' if ros1 else storage, count=2)
    source = tmp_path / ('in.bag' if ros1 else 'in')
    _with_custom_topic(bag.path, source, storage, ros1)
    code, summary, _ = run_bag(capsys, source, tmp_path / 'out', *FAST)
    assert code == 0 and summary['frames'] == 2 and not summary['warnings'], summary
    out = read_bag(tmp_path / 'out')
    labels = [msg.label for _, _, msg, _ in out['/custom']]
    assert labels == [f'm{i}' for i in (2, 5)], labels  # after each /chatter message
    assert out['/custom'][0][3].msgtype == CUSTOM_TYPE


def test_unknown_type_without_definition_is_skipped(tmp_path, capsys, fast_model):
    """A Humble-style bag (no definitions stored): standard types are read with Humble's
    definitions, a custom type cannot be, and is skipped with a warning naming it."""
    bag = write_camera_bag(tmp_path / 'cam', storage='sqlite3', count=2)
    source = tmp_path / 'in'
    _with_custom_topic(bag.path, source, 'sqlite3')
    with sqlite3.connect(next(source.glob('*.db3'))) as db:
        db.execute('DELETE FROM message_definitions')
    code, summary, _ = run_bag(capsys, source, tmp_path / 'out', *FAST)
    assert code == 0 and summary['frames'] == 2, summary
    assert len(summary['warnings']) == 1, summary['warnings']
    warning = summary['warnings'][0]
    assert '/custom' in warning and CUSTOM_TYPE in warning and 'not copied' in warning
    assert 'no definition' in warning
    out = read_bag(tmp_path / 'out')
    assert '/custom' not in out
    assert len(out['/chatter']) == 2 and len(out['/camera/depth/image']) == 2
    assert [t for t, *_ in out['/camera/image_raw']] == \
        [t for t, *_ in read_bag(bag.path)['/camera/image_raw']]


def _empty_image_topic_bag(path: Path, with_other_camera: bool) -> None:
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_HUMBLE)
    source = write_camera_bag(path.with_name(path.name + '-src'), count=2)
    with Writer(path, version=8, storage_plugin=StoragePlugin.MCAP) as writer:
        writer.add_connection('/empty_cam/image_raw', 'sensor_msgs/msg/Image', typestore=store)
        writer.add_connection('/empty_cam/camera_info', 'sensor_msgs/msg/CameraInfo',
                              typestore=store)
        if with_other_camera:
            from rosbags.highlevel import AnyReader
            with AnyReader([source.path]) as reader:
                conns = {c.id: writer.add_connection(c.topic, c.msgtype, typestore=store)
                         for c in reader.connections}
                for connection, log_ns, raw in reader.messages():
                    writer.write(conns[connection.id], log_ns, raw)
        else:
            text = writer.add_connection('/chatter', 'std_msgs/msg/String', typestore=store)
            msg = store.types['std_msgs/msg/String'](data='hello')
            writer.write(text, START_NS, store.serialize_cdr(msg, 'std_msgs/msg/String'))
    shutil.rmtree(source.path)


def test_image_topic_without_messages(tmp_path, capsys, fast_model):
    _empty_image_topic_bag(tmp_path / 'in', with_other_camera=False)
    code, _, err = run_bag(capsys, tmp_path / 'in', tmp_path / 'out', *FAST)
    assert code == 1 and '/empty_cam/image_raw has no messages' in err, err
    assert 'was the camera publishing' in err and '/chatter (1)' in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ['in']
    # Another camera topic that has messages is chosen over the empty one.
    _empty_image_topic_bag(tmp_path / 'in2', with_other_camera=True)
    code, summary, _ = run_bag(capsys, tmp_path / 'in2', tmp_path / 'out2', *FAST)
    assert code == 0 and summary['image_topic'] == '/camera/image_raw', summary
    assert summary['frames'] == 2
