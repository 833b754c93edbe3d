"""The output-bag writer on its own: order, stamps, atomic commit, abort, overwrite, errors."""

import os
import signal

import numpy as np
import pytest

from bag_helpers import read_bag
from metricgold_ros import messages
from metricgold_ros.errors import BagError
from metricgold_ros.tools.bag_output import OutputBag, check_output


def _depth_msg(types, stamp_ns, value):
    header = types.Header(stamp=types.Time(sec=stamp_ns // 10 ** 9, nanosec=stamp_ns % 10 ** 9),
                          frame_id='cam')
    return messages.depth_image_msg(types, header, np.full((3, 4), value, np.float32))


@pytest.mark.parametrize('storage', ['mcap', 'sqlite3'])
@pytest.mark.parametrize('background', [True, False])
def test_messages_land_in_order_with_their_times(tmp_path, storage, background):
    path = tmp_path / 'out'
    with OutputBag(path, storage=storage, background=background) as out:
        types = messages.rosbags_types(out.typestore)
        for i in range(5):
            out.write_message('/cam/depth/image', 1_000 + i, _depth_msg(types, 10 ** 9 + i, i + 1))
        assert not path.exists()  # nothing under the final name before commit
        out.commit()
    assert out.counts == {'/cam/depth/image': 5}
    got = read_bag(path)['/cam/depth/image']
    assert [log_ns for log_ns, *_ in got] == [1_000 + i for i in range(5)]
    assert [messages.stamp_ns(msg.header.stamp) for _, _, msg, _ in got] == \
        [10 ** 9 + i for i in range(5)]
    assert [float(np.frombuffer(msg.data, '<f4')[0]) for _, _, msg, _ in got] == \
        [1.0, 2.0, 3.0, 4.0, 5.0]  # (a depth of 0 would be NaN: REP 118)
    assert [p.name for p in tmp_path.iterdir()] == ['out']  # no temporary left


def test_an_error_before_commit_leaves_nothing(tmp_path):
    path = tmp_path / 'out'
    with pytest.raises(RuntimeError, match='stop'):
        with OutputBag(path) as out:
            types = messages.rosbags_types(out.typestore)
            out.write_message('/d', 1, _depth_msg(types, 1, 1.0))
            raise RuntimeError('stop')
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('background', [True, False])
def test_sigterm_during_the_clean_up_still_leaves_nothing(tmp_path, monkeypatch, background):
    """Ctrl-C, then the SIGTERM a fleet driver sends the worker it stops, lands while the
    aborted bag is being removed: the folder still goes, and the SIGTERM is not lost."""
    def _interrupt(signum, frame):
        raise KeyboardInterrupt(f'signal {signum}')

    def _abort_storage_then_sigterm(self):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives mid clean-up
        original(self)

    original = OutputBag._abort_storage
    monkeypatch.setattr(OutputBag, '_abort_storage', _abort_storage_then_sigterm)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with pytest.raises(KeyboardInterrupt) as raised:
            with OutputBag(tmp_path / 'out', background=background) as out:
                out.write_message('/d', 1, _depth_msg(messages.rosbags_types(out.typestore),
                                                      1, 1.0))
                raise KeyboardInterrupt('Ctrl-C')
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert str(raised.value) == f'signal {int(signal.SIGTERM)}'  # held, then raised again
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_and_refusal_keeps_the_old_bag(tmp_path):
    path = tmp_path / 'out'
    for value, overwrite in ((1.0, False), (2.0, True)):
        with OutputBag(path, overwrite=overwrite) as out:
            out.write_message('/d', 1, _depth_msg(messages.rosbags_types(out.typestore), 1,
                                                  value))
            out.commit()
    msg = read_bag(path)['/d'][0][2]
    assert float(np.frombuffer(msg.data, '<f4')[0]) == 2.0
    with pytest.raises(BagError, match='exists'):
        check_output(path, tmp_path / 'input', overwrite=False)
    with pytest.raises(BagError, match='overlaps'):
        check_output(tmp_path / 'input' / 'x', tmp_path / 'input', overwrite=True)
    with pytest.raises(BagError, match='--storage'):
        OutputBag(tmp_path / 'x', storage='zip')
