"""The node's plain-Python parts without ROS: mailbox, stats, rate limiting, parameter mapping,
bundled-model lookup."""

import math
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metricgold_ros import model_paths
from metricgold_ros.node.parameters import PARAMETERS, check_parameter, frame_options
from metricgold_ros.node.runtime import FrameStats, Mailboxes, RateLimiter, StampCache


def default_values():
    return {spec.name: spec.default for spec in PARAMETERS}


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_mailbox_keeps_only_the_newest_and_counts_drops():
    box = Mailboxes(1)
    assert box.take(timeout_s=0.0) == []
    assert box.put(0, 1) is False
    assert box.put(0, 2) is True and box.put(0, 3) is True
    assert box.take(timeout_s=0.0) == [(0, 3)] and box.take(timeout_s=0.0) == []


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 2)), max_size=40))
def test_mailbox_accounting(ops):
    """Any sequence of put (True, stream) / take (False): each stream's items come out
    newest-first, none lost: taken + dropped + waiting = put."""
    box, taken, puts, dropped = Mailboxes(3), [], 0, 0
    for is_put, stream in ops:
        if is_put:
            dropped += box.put(stream, (stream, puts))
            puts += 1
        else:
            taken += [item for _, item in box.take(timeout_s=0.0)]
    for stream in range(3):
        mine = [n for s, n in taken if s == stream]
        assert mine == sorted(mine)
    waiting = len(box.take(timeout_s=0.0))
    assert len(taken) + dropped + waiting == puts


def test_mailbox_take_wakes_on_put_and_on_close():
    box = Mailboxes(2)
    got = []
    consumer = threading.Thread(target=lambda: got.append(box.take(timeout_s=5.0)))
    consumer.start()
    time.sleep(0.05)
    box.put(1, 'frame')
    consumer.join(1.0)
    assert got == [[(1, 'frame')]]
    closer = threading.Thread(target=lambda: got.append(box.take(timeout_s=5.0)))
    start = time.monotonic()
    closer.start()
    box.close()
    closer.join(1.0)
    assert got == [[(1, 'frame')], []] and time.monotonic() - start < 1.0
    box.put(0, 'late')
    assert box.take(timeout_s=0.0) == []


def test_mailboxes_batch_what_waits_and_gather_for_partners():
    box = Mailboxes(3)
    box.put(2, 'c')
    box.put(0, 'a')
    assert box.take(timeout_s=0.0) == [(0, 'a'), (2, 'c')]  # one batch, in stream order
    # gather: a partner that arrives within gather_s joins the batch; a full set returns at once
    box.put(0, 'a2')
    threading.Timer(0.05, lambda: box.put(1, 'b2')).start()
    threading.Timer(0.1, lambda: box.put(2, 'c2')).start()
    start = time.monotonic()
    assert box.take(timeout_s=1.0, gather_s=5.0) == [(0, 'a2'), (1, 'b2'), (2, 'c2')]
    assert time.monotonic() - start < 4.0
    box.put(1, 'b3')
    start = time.monotonic()
    assert box.take(timeout_s=1.0, gather_s=0.1) == [(1, 'b3')]  # nobody came: waited gather_s
    assert time.monotonic() - start >= 0.09


def test_mailboxes_limit_serves_every_stream_in_turn():
    """With a batch limit below the number of busy streams, none starves."""
    box = Mailboxes(4)
    served = []
    for _ in range(8):
        for stream in range(4):
            box.put(stream, stream)
        served += [stream for stream, _ in box.take(timeout_s=0.0, limit=3)]
    assert sorted(served.count(stream) for stream in range(4)) == [6, 6, 6, 6]


def test_rate_limiter_reports_each_key_once_per_period_with_held_count():
    clock = FakeClock()
    limiter = RateLimiter(period_s=5.0, max_keys=2, clock=clock)
    assert limiter.check('a') == 0
    assert limiter.check('a') is None and limiter.check('a') is None
    assert limiter.check('b') == 0  # another problem is reported at once
    clock.now += 5.0
    assert limiter.check('a') == 2
    limiter.check('c')  # evicts the oldest key ('b')
    assert limiter.check('b') == 0


def test_frame_stats_snapshot_and_period_reset():
    clock = FakeClock()
    stats = FrameStats(window=3, clock=clock)
    stats.count('received', 5)
    stats.count('dropped', 2)
    stats.count('errors')
    for latency in (0.1, 0.2, 0.3, 0.4):
        stats.record(latency, {'unet': 0.05, 'vae_decode': 0.01})
    clock.now += 2.0
    snap = stats.snapshot()
    assert (snap.received, snap.published, snap.dropped, snap.errors) == (5, 4, 2, 1)
    assert snap.latency_p50_ms == pytest.approx(300.0)  # window of the last 3
    assert snap.stage_ms == pytest.approx({'unet': 50.0, 'vae_decode': 10.0})
    assert snap.period_s == 2.0 and snap.period_published == 4
    assert 'dropped 2' in snap.summary() and 'p50 300 ms' in snap.summary()
    assert ('frames dropped', '2') in snap.key_values()
    empty = stats.snapshot()
    assert empty.published == 4 and empty.period_published == 0
    assert math.isnan(empty.latency_p50_ms) and 'nothing published' in empty.summary()


def test_stamp_cache_exact_then_latest():
    cache = StampCache(size=2)
    assert cache.match(1) is None
    cache.add(10, 'a')
    cache.add(20, 'b')
    assert cache.match(10) == 'a' and cache.match(15) == 'b'
    cache.add(30, 'c')
    assert cache.match(10) == 'c'  # evicted: the latest


def test_frame_options_map_parameter_conventions():
    values = default_values()
    options = frame_options(values)
    assert options.denoising_steps is None and options.processing_resolution is None
    assert options.seed == 0 and options.max_depth_m == math.inf
    assert options.color_min_m is None and options.color_max_m is None
    assert options.edge_refine is True
    values.update(denoising_steps=3, processing_resolution=0, seed=-1, max_depth=12.5,
                  color_min_depth=0.5, points_stride=4, publish_points=False, edge_refine=False)
    options = frame_options(values)
    assert options.edge_refine is False
    assert (options.denoising_steps, options.processing_resolution, options.seed) == (3, 0, None)
    assert options.max_depth_m == 12.5 and options.color_min_m == 0.5
    assert options.points_stride == 4 and options.points is False


@pytest.mark.parametrize('name, value, words', [
    ('ensemble_size', 0, 'outside'),
    ('ensemble_size', 2.0, 'expected int'),
    ('colormap', 'sparkly', 'not one of'),
    ('device', 'gpu0', 'device'),
    ('dtype', 'float64', 'not one of'),
    ('color_max_depth', 0.5, 'color_min_depth'),
])
def test_check_parameter_refuses_with_reason(name, value, words):
    values = dict(default_values(), color_min_depth=1.0)
    reason = check_parameter(name, value, values)
    assert reason is not None and words in reason and name.split('_')[0] in reason


def test_check_parameter_accepts_defaults_and_unknown_names():
    values = default_values()
    assert all(check_parameter(n, values[n], values) is None for n in values)
    assert check_parameter('use_sim_time', True, values) is None
    assert check_parameter('device', 'cuda:1', values) is None


def test_bundled_model_path(tmp_path, monkeypatch):
    folder = tmp_path / 'metricgold-tiny'
    folder.mkdir()
    monkeypatch.setattr(model_paths, 'bundled_model_candidates', lambda: [folder])
    assert model_paths.bundled_model_path() is None  # a folder without model_index.json
    (folder / 'model_index.json').write_text('{}')
    assert model_paths.bundled_model_path() == folder
    message = model_paths.missing_model_message()
    assert 'model_path' in message and 'metricgold init-model' in message


def test_bundled_model_candidates_start_beside_the_package():
    first = model_paths.bundled_model_candidates()[0]
    assert first.parent.parent.name == 'metricgold_ros' and first.name == 'metricgold-tiny'
