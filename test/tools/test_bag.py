"""`metricgold bag`: synthetic and real bags round-tripped through rosbags in tmp_path."""

import os
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import cv2
import numpy as np
import pytest

from bag_helpers import START_NS, read_bag, run_bag, write_camera_bag
from metricgold_ros.tools import bag_io
from metricgold_ros.tools.cli import main
from metricgold_ros.errors import BagError
from signal_helpers import interruptible

REPO_ROOT = Path(__file__).resolve().parents[2]
FAST = ['--processing-resolution', '64']
OUTPUTS = ('depth/image', 'depth/camera_info', 'depth/colored', 'points')
Conn = namedtuple('Conn', 'topic msgtype')





def expected_rgb(rgb, encoding):
    """What a bag reader sees of ``rgb`` written as ``encoding`` (mono8 drops the colour)."""
    if encoding == 'mono8':
        return cv2.cvtColor(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    return rgb


def check_copies(inp, out):
    """Every input topic is in the output, message bytes, log times and definitions equal."""
    for topic, records in inp.items():
        assert [(t, raw) for t, raw, _, _ in records] == \
            [(t, raw) for t, raw, _, _ in out[topic]], topic
        src, dst = records[0][3], out[topic][0][3]
        assert (src.msgtype, src.digest, src.msgdef) == (dst.msgtype, dst.digest, dst.msgdef)


def check_outputs(out, bag, prefix='/camera'):
    """One of each output per image, stamped like it; the cloud is depth projected with K."""
    image_log = [t for t, *_ in read_bag(bag.path)[bag.image_topic]]
    for suffix in OUTPUTS:
        records = out[f'{prefix}/{suffix}']
        assert [m.header.stamp.sec * 10**9 + m.header.stamp.nanosec
                for _, _, m, _ in records] == bag.stamps_ns, suffix
        assert [t for t, *_ in records] == image_log, suffix
        assert {m.header.frame_id for _, _, m, _ in records} == {'camera_optical'}
    for (_, _, depth_msg, _), (_, _, info, _), (_, _, cloud, _) in zip(
            out[f'{prefix}/depth/image'], out[f'{prefix}/depth/camera_info'],
            out[f'{prefix}/points']):
        assert depth_msg.encoding == '32FC1'
        depth = np.frombuffer(depth_msg.data, '<f4').reshape(depth_msg.height, depth_msg.width)
        assert depth.shape == (bag.camera.height, bag.camera.width)
        assert np.isfinite(depth).all() and (depth > 0).all()
        np.testing.assert_allclose(info.k.reshape(3, 3), bag.camera.k, rtol=1e-9)
        assert (cloud.height, cloud.width, cloud.point_step) == (*depth.shape, 12)
        xyz = np.frombuffer(cloud.data, '<f4').reshape(*depth.shape, 3)
        v, u = np.mgrid[0:depth.shape[0], 0:depth.shape[1]]
        cam = bag.camera
        np.testing.assert_allclose(xyz[..., 2], depth)
        np.testing.assert_allclose(xyz[..., 0], (u - cam.cx_px) * depth / cam.fx_px,
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(xyz[..., 1], (v - cam.cy_px) * depth / cam.fy_px,
                                   rtol=1e-5, atol=1e-5)
    return [np.frombuffer(m.data, '<f4').reshape(m.height, m.width)
            for _, _, m, _ in out[f'{prefix}/depth/image']]


@pytest.mark.parametrize('storage, encoding, padding, compressed, out_storage', [
    ('mcap', 'rgb8', 0, None, 'mcap'),
    ('sqlite3', 'bgr8', 8, None, 'sqlite3'),
    ('mcap', 'mono8', 3, None, 'sqlite3'),
    ('sqlite3', 'rgb8', 0, 'jpeg', 'mcap'),
    ('mcap', 'rgb8', 0, 'png', 'mcap'),
])
def test_round_trip(tmp_path, capsys, fast_model, storage, encoding, padding, compressed,
                    out_storage):
    bag = write_camera_bag(tmp_path / 'in', storage=storage, count=2, encoding=encoding,
                           row_padding=padding, compressed=compressed)
    code, summary, _ = run_bag(capsys, bag.path, tmp_path / 'out', '--storage', out_storage,
                               *FAST)
    assert code == 0
    assert summary['frames'] == 2 and summary['camera_info_pairing'] == {'exact': 2}
    assert (tmp_path / 'out' / f'out.{"mcap" if out_storage == "mcap" else "db3"}').is_file()
    inp, out = read_bag(bag.path), read_bag(tmp_path / 'out')
    check_copies(inp, out)
    depths = check_outputs(out, bag)
    if compressed != 'jpeg':  # lossless input: the bag tool saw exactly the written pixels
        want = fast_model(expected_rgb(bag.rgbs[0], encoding), processing_resolution=64).depth
        np.testing.assert_array_equal(depths[0], want)
    assert not list(tmp_path.glob('.out.partial-*'))


def test_ros1_bag_is_written_as_ros2(tmp_path, capsys, fast_model):
    bag = write_camera_bag(tmp_path / 'in.bag', ros1=True, count=2, compressed='jpeg')
    code, summary, _ = run_bag(capsys, bag.path, tmp_path / 'out', *FAST)
    assert code == 0 and summary['frames'] == 2
    out = read_bag(tmp_path / 'out')
    infos = out['/camera/camera_info']
    assert infos[0][3].ext.serialization_format == 'cdr'
    np.testing.assert_allclose(infos[0][2].k.reshape(3, 3), bag.camera.k)  # K became k
    assert [m.data for _, _, m, _ in out['/chatter']] == ['frame 0', 'frame 1']
    check_outputs(out, bag)
    # Processing the result again would duplicate the outputs: refused before any work.
    code, _, err = run_bag(capsys, tmp_path / 'out', tmp_path / 'again')
    assert code == 1 and '--prefix' in err and not (tmp_path / 'again').exists()


def test_pairing_without_exact_stamps(tmp_path, capsys, fast_model):
    # CameraInfo stamped 50 ms after each image: the first image has only a later one.
    bag = write_camera_bag(tmp_path / 'in', count=2, info_offset_ns=50_000_000)
    code, summary, _ = run_bag(capsys, bag.path, tmp_path / 'out', '--ensemble-size', '2',
                               *FAST)
    assert code == 0
    assert summary['camera_info_pairing'] == {'after': 1, 'before': 1}
    assert summary['messages']['/camera/points'] == 2
    assert summary['messages']['/camera/depth/uncertainty'] == 2  # ensembles add their spread


def test_no_camera_info_writes_depth_only(tmp_path, capsys, fast_model):
    bag = write_camera_bag(tmp_path / 'in', count=2, camera_info=False)
    code, summary, _ = run_bag(capsys, bag.path, tmp_path / 'out', *FAST)
    assert code == 0
    assert summary['messages']['/camera/depth/image'] == 2
    assert '/camera/points' not in summary['messages']
    assert '/camera/depth/camera_info' not in summary['messages']
    assert any('clouds' in w and 'CameraInfo' in w for w in summary['warnings'])


@pytest.mark.parametrize('broken, message', [
    ({'info_k': [0.0] * 9}, 'uncalibrated'),
    ({'info_size': (100, 100)}, 'another aspect ratio'),
])
def test_unusable_camera_info_gives_depth_only(tmp_path, capsys, fast_model, broken, message):
    bag = write_camera_bag(tmp_path / 'in', count=2, **broken)
    code, summary, _ = run_bag(capsys, bag.path, tmp_path / 'out', *FAST)
    assert code == 0 and summary['messages']['/camera/depth/image'] == 2
    assert '/camera/points' not in summary['messages']
    assert len(summary['warnings']) == 1 and message in summary['warnings'][0]


def test_selection_prefix_and_no_copy(tmp_path, capsys, fast_model):
    bag = write_camera_bag(tmp_path / 'in', count=3)
    # Images are logged at +0, +0.1, +0.2 s: the window [0.05, 0.15) s holds one.
    code, summary, _ = run_bag(capsys, bag.path, tmp_path / 'window', '--start', '0.05',
                               '--end', '0.15', *FAST)
    assert code == 0 and summary['frames'] == 1
    out = read_bag(tmp_path / 'window')
    assert [t for t, *_ in out['/chatter']] == [START_NS + 100_000_000 + 2000]
    code, summary, _ = run_bag(capsys, bag.path, tmp_path / 'few', '--max-frames', '2',
                               '--no-copy', '--prefix', 'mg', '--no-points', '--no-colored',
                               *FAST)
    assert code == 0 and summary['frames'] == 2
    assert set(read_bag(tmp_path / 'few')) == {'/mg/depth/image', '/mg/depth/camera_info'}


def test_overwrite(tmp_path, capsys, fast_model):
    bag = write_camera_bag(tmp_path / 'in', count=1, extra_topic=False)
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'thesis.tex').write_text('a user\'s file, not a bag')
    code, _, err = run_bag(capsys, bag.path, out, *FAST)
    assert code == 1 and '--overwrite' in err and (out / 'thesis.tex').exists()
    code, _, err = run_bag(capsys, bag.path, out, '--overwrite', *FAST)  # not a bag: refused
    assert code == 1 and 'thesis.tex' in err and 'not a bag' in err, err
    assert sorted(p.name for p in out.iterdir()) == ['thesis.tex']
    (out / 'thesis.tex').unlink()
    out.rmdir()
    code, summary, _ = run_bag(capsys, bag.path, out, *FAST)
    assert code == 0 and summary['frames'] == 1
    code, summary, _ = run_bag(capsys, bag.path, out, '--overwrite', *FAST)  # a bag: replaced
    assert code == 0 and summary['frames'] == 1 and (out / 'metadata.yaml').exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ['in', 'out']


def test_data_errors_exit_1(tmp_path, capsys):
    bag = write_camera_bag(tmp_path / 'in', count=1)
    cases = [
        ([tmp_path / 'missing', tmp_path / 'o1'], 'no such file'),
        ([bag.path, tmp_path / 'o2', '--image-topic', '/nope'], '/camera/image_raw'),
        ([bag.path, tmp_path / 'o3', '--camera-info-topic', '/chatter'], 'CameraInfo'),
        ([bag.path, tmp_path / 'o4', '--model', tmp_path / 'no-model'], 'init-model'),
        ([bag.path, bag.path / 'inside'], 'overlaps'),
    ]
    garbage = tmp_path / 'garbage.mcap'
    garbage.write_bytes(b'\x89MCAP0\r\n' + os.urandom(200))
    cases.append(([garbage, tmp_path / 'o5'], 'cannot be read as a rosbag'))
    truncated = tmp_path / 'truncated'
    truncated.mkdir()
    (truncated / 'metadata.yaml').write_bytes((bag.path / 'metadata.yaml').read_bytes())
    data = (bag.path / 'in.mcap').read_bytes()
    (truncated / 'in.mcap').write_bytes(data[:len(data) // 2])
    cases.append(([truncated, tmp_path / 'o6'], 'truncated'))
    for argv, message in cases:
        code, _, err = run_bag(capsys, *argv)
        assert code == 1 and err.startswith('ERROR: ') and message in err, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['garbage.mcap', 'in', 'truncated']


def test_no_model_names_the_fixes(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr('metricgold_ros.model_paths.bundled_model_path', lambda: None)
    bag = write_camera_bag(tmp_path / 'in', count=1)
    code, _, err = run_bag(capsys, bag.path, tmp_path / 'out')
    assert code == 1
    assert '--model' in err and 'metricgold init-model DIR --tiny' in err and 'README' in err


def test_unsupported_encoding(tmp_path, capsys, fast_model):
    bag = write_camera_bag(tmp_path / 'in', count=2, declared_encoding='32FC1')
    code, _, err = run_bag(capsys, bag.path, tmp_path / 'out', *FAST)
    assert code == 1 and "'32FC1' is not supported" in err and '--skip-bad-frames' in err
    code, _, err = run_bag(capsys, bag.path, tmp_path / 'out', '--skip-bad-frames', *FAST)
    assert code == 1 and '2 skipped' in err
    assert not (tmp_path / 'out').exists() and not list(tmp_path.glob('.out.partial-*'))


@pytest.mark.parametrize('compressed', [None, 'png'])
def test_pixel_budget_refuses_before_decoding(tmp_path, capsys, fast_model, compressed):
    bag = write_camera_bag(tmp_path / 'in', count=2, compressed=compressed)
    code, _, err = run_bag(capsys, bag.path, tmp_path / 'out', '--max-pixels', '19199', *FAST)
    assert code == 1 and '160 = 19200 pixels exceeds the pixel budget 19199' in err, err
    assert not (tmp_path / 'out').exists() and not list(tmp_path.glob('.out.partial-*'))
    code, summary, err = run_bag(capsys, bag.path, tmp_path / 'out', '--max-pixels', '19200',
                                 *FAST)
    assert code == 0 and summary['frames'] == 2, err


@pytest.mark.parametrize('argv', [['--ensemble-size', '0'], ['--start', '2', '--end', '1'],
                                  ['--storage', 'rosbag1']])
def test_usage_errors_exit_2(tmp_path, argv):
    with pytest.raises(SystemExit) as info:
        main(['bag', str(tmp_path / 'in'), str(tmp_path / 'out'), *argv])
    assert info.value.code == 2


def test_topic_selection():
    conns = [Conn('raspicam_node/camera/image/compressed', bag_io.COMPRESSED_TYPE),
             Conn('/raspicam_node/camera/camera_info', bag_io.CAMERA_INFO_TYPE),
             Conn('/other/camera_info', bag_io.CAMERA_INFO_TYPE)]
    image = bag_io.select_image_topic(conns, None)
    assert image == 'raspicam_node/camera/image/compressed'
    assert bag_io.camera_namespace(image) == '/raspicam_node/camera'
    assert bag_io.select_camera_info_topic(conns, image, None) == \
        ('/raspicam_node/camera/camera_info', 'sibling')
    assert bag_io.select_camera_info_topic(conns, image, 'other/camera_info')[0] == \
        '/other/camera_info'
    # A parent namespace's camera_info serves /cam/left/image_raw.
    nested = [Conn('/cam/left/image_raw', bag_io.IMAGE_TYPE),
              Conn('/cam/camera_info', bag_io.CAMERA_INFO_TYPE),
              Conn('/x/camera_info', bag_io.CAMERA_INFO_TYPE)]
    assert bag_io.select_camera_info_topic(nested, '/cam/left/image_raw', None)[0] == \
        '/cam/camera_info'
    two = conns + [Conn('/b/image_raw', bag_io.IMAGE_TYPE),
                   Conn('/b/depth/image', bag_io.IMAGE_TYPE)]
    with pytest.raises(BagError, match='2 image topics.*--image-topic'):
        bag_io.select_image_topic(two, None)
    with pytest.raises(BagError, match='no sensor_msgs/Image'):
        bag_io.select_image_topic(conns[1:], None)
    with pytest.raises(BagError, match='carries sensor_msgs/msg/CameraInfo'):
        bag_io.select_image_topic(conns, '/other/camera_info')


def test_calibration_lookup():
    a, b = object(), object()
    table = bag_io.CalibrationTable([300, 100], [b, a])
    assert table.lookup(100) == (a, 'exact')
    assert table.lookup(200) == (a, 'before')
    assert table.lookup(400) == (b, 'before')
    assert table.lookup(50) == (a, 'after')
    assert bag_io.CalibrationTable([], []).lookup(5) == (None, 'none')


@pytest.mark.slow
def test_interrupt_leaves_no_output(tmp_path, tiny_model_dir):
    bag = write_camera_bag(tmp_path / 'in', count=40, width=320, height=240,
                           extra_topic=False)
    out = tmp_path / 'out'
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.Popen(
        [sys.executable, '-m', 'metricgold_ros.tools.cli', 'bag', str(bag.path), str(out),
         '--model', str(tiny_model_dir), '--processing-resolution', '320', '--quiet'],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        preexec_fn=interruptible)  # its Ctrl-C works even when this run ignores SIGINT
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob('.out.partial-*')) and proc.poll() is None:
            assert time.monotonic() < deadline, 'the run never started writing'
            time.sleep(0.05)
        time.sleep(0.5)  # a few frames into the run
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err.decode()
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ['in']


REAL_BAGS = [
    ('raspicam_fiducial_board_611/fiducial_board_611.bag', 'after'),
    ('raspicam_fiducial_board_611/fiducial_board_611_sqlite3', 'after'),
    ('raspicam_aruco_images/aruco_images_mcap', 'after'),
    ('dgp_scene_01_front_camera', 'exact'),
]


@pytest.mark.parametrize('name, pairing', REAL_BAGS)
def test_real_bags(tmp_path, capsys, fast_model, shared_data, name, pairing):
    source = shared_data / 'bags' / name
    code, summary, _ = run_bag(capsys, source, tmp_path / 'out', '--output-scale', '0.25',
                               *FAST)
    assert code == 0
    images = summary['image_topic']
    prefix = bag_io.camera_namespace(images)
    assert summary['frames'] == summary['messages'][images] >= 1
    assert set(summary['camera_info_pairing']) == {pairing}
    for suffix in OUTPUTS:
        assert summary['messages'][f'{prefix}/{suffix}'] == summary['frames']
    if name.endswith('.bag'):  # ROS 1 -> ROS 2 equals the faithful conversion beside it
        out = read_bag(tmp_path / 'out')
        ref = read_bag(source.parent / 'fiducial_board_611_mcap')
        for topic, records in ref.items():
            assert [(t, raw) for t, raw, *_ in records] == \
                [(t, raw) for t, raw, *_ in out[topic]], topic


def test_progress_bar_and_summary_on_a_terminal(tmp_path, capsys, fast_model, monkeypatch):
    bag = write_camera_bag(tmp_path / 'in', count=2)
    monkeypatch.setattr(sys.stderr, 'isatty', lambda: True)
    assert main(['bag', str(bag.path), str(tmp_path / 'out'), *FAST]) == 0
    captured = capsys.readouterr()
    assert '2/2' in captured.err and 'frame/s' in captured.err  # tqdm: count, rate, ETA
    assert 'wrote' in captured.out and 'frames/s' in captured.out
    assert 'outside the model' in captured.out and 'vae_decode' in captured.out


def test_sigterm_is_an_interrupt():
    from metricgold_ros.tools.signals import sigterm_as_interrupt

    before = signal.getsignal(signal.SIGTERM)  # SIG_DFL, or Ray's after a Ray test ran here
    with pytest.raises(KeyboardInterrupt):
        with sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    assert signal.getsignal(signal.SIGTERM) == before


def test_mounting_adds_the_metric_scale_topic(tmp_path, capsys, fast_model):
    """--camera-height-m (the node's camera_height_m) fits every frame: depth/scale per image."""
    bag = write_camera_bag(tmp_path / 'in', count=2)
    code, summary, _ = run_bag(capsys, bag.path, tmp_path / 'out', '--camera-height-m', '1.5',
                               '--camera-pitch-deg', '10', '--camera-roll-deg', '-1.5', *FAST)
    assert code == 0
    assert summary['messages']['/camera/depth/scale'] == summary['frames'] == 2
    assert sum(summary['ground_fit'].values()) == 2
    records = read_bag(tmp_path / 'out')['/camera/depth/scale']
    assert [m.header.stamp.sec * 10**9 + m.header.stamp.nanosec for _, _, m, _ in records] == \
        bag.stamps_ns
    for _, _, msg, connection in records:
        assert connection.msgtype == 'diagnostic_msgs/msg/DiagnosticArray'
        values = {kv.key: kv.value for kv in msg.status[0].values}
        assert values['state'] in ('ok', 'no_floor', 'poor_fit') and float(values['scale']) > 0
    # Without a mounting: no depth/scale, as before.
    code, summary, _ = run_bag(capsys, bag.path, tmp_path / 'out2', *FAST)
    assert code == 0 and '/camera/depth/scale' not in summary['messages']
    assert summary['ground_fit'] == {}
    with pytest.raises(SystemExit) as exc:
        main(['bag', str(bag.path), str(tmp_path / 'out3'), '--camera-pitch-deg', '95'])
    assert exc.value.code == 2 and '--camera-pitch-deg' in capsys.readouterr().err
