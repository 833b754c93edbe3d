"""`metricgold bag IN... OUT`: many bags on local worker processes and on a local Ray cluster.

Real worker processes, a real Ray cluster (2 CPUs, loopback only), real bags written with
rosbags and the real bags of ../shared/data, the tiny real model. The fault tests kill a
worker with SIGKILL while it writes a bag and check that every output is complete and that
nothing partial is left under a final name.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bag_helpers import read_bag, write_camera_bag
from signal_helpers import interruptible
from metricgold_ros.tools import fleet
from metricgold_ros.tools.cli import main
from metricgold_ros.errors import BagError

REPO_ROOT = Path(__file__).resolve().parents[2]
FAST = ['--processing-resolution', '64']
REAL_BAGS = ('dgp_scene_01_front_camera', 'raspicam_aruco_images/aruco_images',
             'raspicam_aruco_images/aruco_images_mcap',
             'raspicam_aruco_images/aruco_images_sqlite3',
             'raspicam_fiducial_board_611/fiducial_board_611',
             'raspicam_fiducial_board_611/fiducial_board_611_mcap',
             'raspicam_fiducial_board_611/fiducial_board_611_sqlite3')


def make_tree(root, frames=(2, 3, 2)):
    """A folder of bags: rosbag2 mcap and sqlite3 folders and a ROS 1 .bag, nested."""
    (root / 'day1').mkdir(parents=True)
    write_camera_bag(root / 'day1' / 'cam_a', count=frames[0], seed=1)
    write_camera_bag(root / 'day1' / 'cam_b.bag', ros1=True, count=frames[1], seed=2,
                     compressed='jpeg')
    write_camera_bag(root / 'cam_c', storage='sqlite3', count=frames[2], seed=3)
    return {'day1/cam_a': frames[0], 'day1/cam_b': frames[1], 'cam_c': frames[2]}


def run_cli(capsys, *argv):
    """``metricgold bag ... --quiet`` in-process: (exit code, JSON summary or None, stderr)."""
    code = main(['bag', *map(str, argv), '--quiet'])
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    return code, (json.loads(lines[-1]) if lines else None), captured.err


def check_complete(out, expected):
    """Each output is a whole bag with every frame, with its record; nothing partial left."""
    for name, frames in expected.items():
        bag = read_bag(out / name)
        depth = [k for k in bag if k.endswith('/depth/image')]
        assert len(depth) == 1 and len(bag[depth[0]]) == frames, name
        record = json.loads(fleet.record_path(str(out / name)).read_text())
        assert record['summary']['frames'] == frames
    leftovers = [p for p in out.rglob('*') if '.partial-' in p.name or '.tmp-' in p.name]
    assert not leftovers


# -- discovery and completion records (no model) ---------------------------------------------


def test_find_bags_maps_each_bag_to_a_relative_output(tmp_path):
    make_tree(tmp_path / 'in')
    (tmp_path / 'in' / 'notes').mkdir()
    (tmp_path / 'in' / 'notes' / 'readme.txt').write_text('not a bag')
    (tmp_path / 'in' / '.hidden.partial-x').mkdir()
    found = fleet.find_bags([str(tmp_path / 'in')])
    assert [name for _, name in found] == ['cam_c', 'day1/cam_a', 'day1/cam_b']
    single = tmp_path / 'in' / 'day1' / 'cam_b.bag'
    assert fleet.find_bags([str(single)]) == [(single, 'cam_b')]
    assert fleet.wants_fleet([str(tmp_path / 'in')])
    assert not fleet.wants_fleet([str(tmp_path / 'in' / 'cam_c')])  # one bag: single mode
    assert not fleet.wants_fleet([str(single)])
    assert fleet.wants_fleet([str(single), str(tmp_path / 'in' / 'cam_c')])


def test_find_bags_refuses_clashes_and_empty_folders(tmp_path):
    (tmp_path / 'a').mkdir()
    write_camera_bag(tmp_path / 'a' / 'x.bag', ros1=True, count=1)
    write_camera_bag(tmp_path / 'a' / 'x', count=1)
    with pytest.raises(BagError, match='would both be written to OUTPUT/x'):
        fleet.find_bags([str(tmp_path / 'a')])
    (tmp_path / 'empty').mkdir()
    with pytest.raises(BagError, match='no bag found'):
        fleet.find_bags([str(tmp_path / 'empty')])
    with pytest.raises(BagError, match='overlaps'):
        fleet.plan_jobs([str(tmp_path / 'a')], str(tmp_path / 'a' / 'out'))


def test_completion_record_needs_the_bag_and_the_same_input(tmp_path):
    bag = write_camera_bag(tmp_path / 'in.bag', ros1=True, count=1)
    job = fleet.Job(0, str(bag.path), str(tmp_path / 'out' / 'in'), 'in')
    (tmp_path / 'out' / 'in').mkdir(parents=True)
    fleet.write_record(job, {'frames': 1})
    assert fleet.completed(job) is None  # no metadata.yaml: not a finished bag
    (tmp_path / 'out' / 'in' / 'metadata.yaml').write_text('rosbag2_bagfile_information: {}')
    assert fleet.completed(job) == {'frames': 1}
    os.utime(bag.path, ns=(1, 1))  # the input changed since
    assert fleet.completed(job) is None


def test_usage_and_data_errors(tmp_path, capsys):
    bag = write_camera_bag(tmp_path / 'in', count=1)
    for argv in ([bag.path, tmp_path / 'o', '--workers', '2'],  # one bag: no workers
                 [bag.path, bag.path, tmp_path / 'o', '--retries', '-1'],
                 [bag.path, bag.path, tmp_path / 'o', '--workers', '0']):
        with pytest.raises(SystemExit) as info:
            main(['bag', *map(str, argv)])
        assert info.value.code == 2, argv
    capsys.readouterr()
    (tmp_path / 'file').write_text('')
    code, _, err = run_cli(capsys, bag.path, bag.path, tmp_path / 'file')
    assert code == 1 and err.startswith('ERROR: ') and 'is a file' in err
    code, _, err = run_cli(capsys, bag.path, tmp_path / 'missing', tmp_path / 'o')
    assert code == 1 and 'missing: no such file' in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ['file', 'in']


# -- local worker processes -------------------------------------------------------------------


@pytest.mark.slow
def test_local_workers_many_bags_failure_and_resume(tmp_path, capsys, tiny_model_dir,
                                                    monkeypatch):
    expected = make_tree(tmp_path / 'in')
    broken = tmp_path / 'broken.bag'
    broken.write_bytes(b'#ROSBAG V2.0\n' + os.urandom(300))
    out = tmp_path / 'out'
    model = ['--model', tiny_model_dir, *FAST]
    monkeypatch.setattr(sys.stderr, 'isatty', lambda: True)  # the progress bar is drawn
    code = main(['bag', str(tmp_path / 'in'), str(broken), str(out), '--workers', '2',
                 '--summary-json', str(tmp_path / 'summary.json'), *map(str, model)])
    captured = capsys.readouterr()
    assert code == 1
    assert '7/7' in captured.err and 'frame/s' in captured.err  # one bar over every frame
    assert 'ERROR: 1 of 4 bags failed' in captured.err and str(broken) in captured.err
    summary = json.loads((tmp_path / 'summary.json').read_text())
    assert (summary['bags'], summary['ok'], summary['frames']) == (4, 3, 7)
    assert summary['failed'] == [str(broken)]
    assert summary['workers']['workers'] == 2
    by_name = {Path(b['output']).relative_to(out).as_posix(): b for b in summary['per_bag']}
    assert 'cannot be read as a rosbag' in by_name['broken']['error']
    assert by_name['day1/cam_b']['frames'] == 3 and by_name['day1/cam_b']['fps'] > 0
    check_complete(out, expected)
    assert not (out / 'broken').exists()
    # Again: the finished bags are skipped, only the broken one is tried (and fails) again.
    code, summary, err = run_cli(capsys, tmp_path / 'in', broken, out, '--workers', '1',
                                 *model)
    assert code == 1 and summary['skipped'] == 3 and summary['failed'] == [str(broken)]
    code, summary, err = run_cli(capsys, tmp_path / 'in', out, *model)
    assert code == 0 and (summary['skipped'], summary['ok']) == (3, 0), err


def descendants(pid):
    """Process ids below ``pid`` (read from /proc)."""
    children = {}
    for entry in Path('/proc').iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / 'stat').read_text().rsplit(')', 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def writer_of_partial(root_pid, out):
    """The process below ``root_pid`` that has a file open in a ``.partial-`` folder of out."""
    for pid in descendants(root_pid):
        try:
            targets = [os.readlink(f) for f in Path(f'/proc/{pid}/fd').iterdir()]
        except OSError:
            continue
        if any(str(out) in t and '.partial-' in t for t in targets):
            return pid
    return None


def kill_a_worker_mid_run(tmp_path, tiny_model_dir, extra):
    """Run 4 bags in a child process, SIGKILL the worker writing one; the run's summary."""
    expected = {}
    for i in range(4):
        write_camera_bag(tmp_path / 'in' / f'bag{i}', count=12, width=320, height=240,
                         seed=i)
        expected[f'bag{i}'] = 12
    out, summary_path = tmp_path / 'out', tmp_path / 'summary.json'
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS='1')
    proc = subprocess.Popen(
        [sys.executable, '-m', 'metricgold_ros.tools.cli', 'bag', str(tmp_path / 'in'),
         str(out), '--model', str(tiny_model_dir), '--processing-resolution', '128',
         '--summary-json', str(summary_path), '--quiet', *extra],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    victim = None
    try:
        deadline = time.monotonic() + 120
        while victim is None and proc.poll() is None and time.monotonic() < deadline:
            victim = writer_of_partial(proc.pid, out)
            time.sleep(0.05)
        assert victim is not None, 'no worker was ever seen writing a bag'
        time.sleep(0.3)  # a few frames into its bag
        os.kill(victim, signal.SIGKILL)
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:  # a failed test leaves no workers (or Ray) behind either
            for pid in descendants(proc.pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.decode()
    check_complete(out, expected)
    summary = json.loads(summary_path.read_text())
    assert summary['ok'] == 4 and summary['frames'] == 48
    assert sorted(b['attempts'] for b in summary['per_bag']) == [1, 1, 1, 2]
    return summary


@pytest.mark.slow
def test_local_worker_killed_mid_bag(tmp_path, tiny_model_dir):
    summary = kill_a_worker_mid_run(tmp_path, tiny_model_dir, ['--workers', '2'])
    assert summary['workers']['backend'] == 'local'


@pytest.mark.slow
def test_ctrl_c_keeps_finished_bags_and_leaves_nothing_partial(tmp_path, tiny_model_dir):
    for i in range(3):
        write_camera_bag(tmp_path / 'in' / f'bag{i}', count=12, width=320, height=240, seed=i)
    out = tmp_path / 'out'
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS='1')
    proc = subprocess.Popen(
        [sys.executable, '-m', 'metricgold_ros.tools.cli', 'bag', str(tmp_path / 'in'),
         str(out), '--model', str(tiny_model_dir), '--processing-resolution', '128',
         '--workers', '1', '--quiet'],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True, preexec_fn=interruptible)  # Ctrl-C works under nohup too
    try:
        deadline = time.monotonic() + 120
        while writer_of_partial(proc.pid, out) is None and proc.poll() is None:
            assert time.monotonic() < deadline, 'no worker was ever seen writing a bag'
            time.sleep(0.05)
        time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole process group
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err.decode()
    assert 'Interrupted.' in err.decode() and 'Traceback' not in err.decode()
    finished = {p.name for p in out.iterdir() if p.is_dir()}
    assert len(finished) < 3
    check_complete(out, {name: 12 for name in finished})


# -- a local Ray cluster (2 CPUs, loopback) ---------------------------------------------------


@pytest.fixture(scope='module')
def local_ray():
    """A Ray cluster on this machine for the module: 2 CPUs, no dashboard, loopback only."""
    from metricgold_ros.tools.fleet_ray import keep_local_environment

    keep_local_environment()  # before Ray is imported
    ray = pytest.importorskip('ray')
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={'env_vars': {'PYTHONPATH': str(REPO_ROOT)}})
    try:
        node = ray.nodes()[0]
        assert node['NodeManagerAddress'] == '127.0.0.1'
        yield ray
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_ray_real_and_generated_bags_failure_and_resume(tmp_path, capsys, tiny_model_dir,
                                                        shared_data, local_ray):
    expected = make_tree(tmp_path / 'gen')
    empty = tmp_path / 'gen' / 'zz_depth_encoded'  # cannot be processed: fails, others go on
    write_camera_bag(empty, count=1, declared_encoding='32FC1')
    out = tmp_path / 'out'
    argv = [shared_data / 'bags', tmp_path / 'gen', out, '--ray', '--model', tiny_model_dir,
            '--output-scale', '0.25', *FAST]
    code, summary, err = run_cli(capsys, *argv)
    assert code == 1 and f'{empty}: ' in err
    assert summary['workers']['backend'] == 'ray' and summary['workers']['actors'] == 2
    assert summary['failed'] == [str(empty)] and summary['ok'] == len(REAL_BAGS) + 3
    check_complete(out, expected)
    for name in REAL_BAGS:
        record = json.loads(fleet.record_path(str(out / name)).read_text())
        assert record['summary']['frames'] >= 1, name
    code, summary, err = run_cli(capsys, *argv)  # the re-run skips every finished bag
    assert code == 1 and summary['skipped'] == len(REAL_BAGS) + 3 and summary['ok'] == 0


@pytest.mark.slow
def test_ray_actor_killed_mid_bag(tmp_path, tiny_model_dir):
    pytest.importorskip('ray')
    summary = kill_a_worker_mid_run(tmp_path, tiny_model_dir,
                                    ['--ray', 'local', '--workers', '2'])
    assert summary['workers']['backend'] == 'ray'
