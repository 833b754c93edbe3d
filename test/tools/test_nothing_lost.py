"""Nothing lost, no one let in: --overwrite, fleet names and records, atomic replacement.

Issue 22 items 1, 2, 3, 5, 7, 12 and the bench part of 8. Real bags written with rosbags, the
tiny real model where a bag is converted, real files in ``tmp_path``.
"""

import argparse
import dataclasses
import importlib.util
import json
import os
import stat
import sys
from pathlib import Path

import pytest

from bag_helpers import read_bag, write_camera_bag
from metricgold_ros import atomic
from metricgold_ros.errors import BagError
from metricgold_ros.tools import bag as bag_tool
from metricgold_ros.tools import fleet, fleet_run, fleet_workers
from metricgold_ros.tools.cli import main

REPO_ROOT = Path(__file__).resolve().parents[2]
FAST = ['--processing-resolution', '64']


def bag_args(*argv):
    """The parsed flags of ``metricgold bag ARGV``."""
    parser = argparse.ArgumentParser()
    bag_tool.add_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


def run_quiet(capsys, *argv):
    """``metricgold ... --quiet`` in-process: (exit code, last stdout line as JSON, stderr)."""
    code = main([*map(str, argv), '--quiet'])
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    return code, (json.loads(lines[-1]) if lines else None), captured.err


# -- 1. --overwrite replaces only what we would have written ---------------------------------


def test_fleet_overwrite_refuses_a_folder_that_is_not_a_bag(tmp_path, capsys, tiny_model_dir):
    for name in ('a', 'b'):
        write_camera_bag(tmp_path / 'in' / name, count=1)
    out = tmp_path / 'out'
    (out / 'a').mkdir(parents=True)
    (out / 'a' / 'thesis.tex').write_text('years of work')
    (out / 'b').write_text('a file where a bag would go')
    code, summary, err = run_quiet(capsys, 'bag', tmp_path / 'in', out, '--overwrite',
                                   '--model', tiny_model_dir, '--workers', '1', *FAST)
    assert code == 1 and 'thesis.tex' in err and 'not a bag' in err
    assert (out / 'a' / 'thesis.tex').read_text() == 'years of work'
    assert (out / 'b').read_text() == 'a file where a bag would go'
    assert summary['ok'] == 0 and len(summary['failed']) == 2


def test_init_model_overwrite_replaces_only_a_model_folder(tmp_path, capsys):
    folder = tmp_path / 'thesis'
    folder.mkdir()
    (folder / 'thesis.tex').write_text('years of work')
    code = main(['init-model', str(folder), '--tiny', '--overwrite'])
    err = capsys.readouterr().err
    assert code == 1 and 'thesis.tex' in err and 'model_index.json' in err
    assert (folder / 'thesis.tex').read_text() == 'years of work'
    model = tmp_path / 'model'
    assert main(['init-model', str(model), '--tiny']) == 0
    assert main(['init-model', str(model), '--tiny', '--overwrite', '--seed', '1']) == 0
    assert (model / 'model_index.json').is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith('.')]  # nothing left aside


# -- 2. fleet output names that nest or collide ----------------------------------------------


def test_nested_output_names_are_refused_before_any_work(tmp_path):
    write_camera_bag(tmp_path / 'in' / 'x' / 'y', count=1)
    write_camera_bag(tmp_path / 'other' / 'x', count=1)
    # 'x' (a bag) and 'x/y' (a bag in a folder of the same name): the second would be written
    # inside the first.
    with pytest.raises(BagError, match='inside the output of'):
        fleet.find_bags([str(tmp_path / 'other' / 'x'), str(tmp_path / 'in')])
    with pytest.raises(BagError, match='inside the output of'):
        fleet.check_names([(Path('a.mcap'), 'x'), (Path('b.mcap'), 'x/y')])
    with pytest.raises(BagError, match='would both be written'):
        fleet.check_names([(Path('a.mcap'), 'x'), (Path('b/x.bag'), 'x')])
    for bad in ('', '.', '..', '../x', '.x.partial-1'):
        with pytest.raises(BagError, match='not a plain'):
            fleet.check_names([(Path('a.mcap'), bad)])


def test_an_input_dot_is_named_by_its_folder(tmp_path, monkeypatch):
    bag = write_camera_bag(tmp_path / 'cam', count=1)
    other = write_camera_bag(tmp_path / 'cam2', count=1)
    monkeypatch.chdir(bag.path)
    found = fleet.find_bags(['.', str(other.path)])
    assert [name for _, name in found] == ['cam', 'cam2']
    jobs = fleet.plan_jobs(['.', str(other.path)], str(tmp_path / 'out'))
    assert [Path(job.output) for job in jobs] == [tmp_path / 'out' / 'cam',
                                                  tmp_path / 'out' / 'cam2']


# -- 3. a re-run skips only what is unchanged --------------------------------------------------


def _job(tmp_path, bag_path):
    return fleet.Job(0, str(bag_path), str(tmp_path / 'out' / 'in'), 'in')


def test_record_names_the_model_and_the_output_settings(tmp_path, tiny_model_dir):
    bag = write_camera_bag(tmp_path / 'in.bag', ros1=True, count=1)
    job = _job(tmp_path, bag.path)
    (tmp_path / 'out' / 'in').mkdir(parents=True)
    (tmp_path / 'out' / 'in' / 'metadata.yaml').write_text('rosbag2_bagfile_information: {}')
    settings = {'model': str(tiny_model_dir), 'processing_resolution': 64, 'overwrite': False,
                'device': 'cpu', 'max_depth_m': float('inf')}
    identity = fleet.run_identity(settings)
    fleet.write_record(job, {'frames': 1}, identity)
    assert fleet.completed(job, identity) == {'frames': 1}
    # Settings that change no output: still complete.
    same = fleet.run_identity(dict(settings, overwrite=True, device='cuda'))
    assert fleet.completed(job, same) == {'frames': 1}
    # Another processing resolution: out of date, and the reason says why.
    other = fleet.run_identity(dict(settings, processing_resolution=128))
    assert fleet.completed(job, other) is None
    assert 'processing_resolution' in fleet.stale_reason(job, other)
    # The model's weights changed (same folder): out of date.
    weights = next(p for p in Path(tiny_model_dir).rglob('*.json'))
    before = weights.read_bytes()
    try:
        weights.write_bytes(before + b' ')
        changed = fleet.run_identity(settings)
        assert fleet.completed(job, changed) is None
        assert 'model' in fleet.stale_reason(job, changed)
    finally:
        weights.write_bytes(before)
    # A record of the previous version (no model or settings): out of date.
    data = json.loads(fleet.record_path(job.output).read_text())
    data['version'] = 1
    fleet.record_path(job.output).write_text(json.dumps(data))
    assert fleet.completed(job, identity) is None and 'older' in fleet.stale_reason(job, identity)


def test_input_growing_while_read_is_not_marked_done(tmp_path, tiny_pipeline, tiny_model_dir):
    bag = write_camera_bag(tmp_path / 'rec.bag', ros1=True, count=3)
    job = fleet.Job(0, str(bag.path), str(tmp_path / 'out' / 'rec'), 'rec')
    args = bag_args(bag.path, tmp_path / 'x', '--model', tiny_model_dir, *FAST)
    settings = fleet_workers.job_settings(args)
    settings['model'] = str(tiny_model_dir)
    identity = fleet.run_identity(settings)
    settings['record_identity'] = identity

    def recorder_appends(n):  # the recorder is still writing the file
        with open(bag.path, 'ab') as handle:
            handle.write(b'\0' * 16)

    template = bag_tool.job_from_args(args)
    outcome = fleet_workers.convert_job(job, settings, template, tiny_pipeline, lambda n: None,
                                        recorder_appends)
    assert outcome.status == 'failed' and 'changed while it was read' in outcome.error
    assert (Path(job.output) / 'metadata.yaml').is_file()  # the output is kept ...
    assert fleet.completed(job, identity) is None  # ... but not marked done
    assert 'while it was read' in fleet.stale_reason(job, identity)
    # The next run redoes it (ours, out of date) without --overwrite, and then it is done.
    state, reason = fleet_run._earlier_run(job, identity, overwrite=False)
    assert state == 'redo' and 'while it was read' in reason
    outcome = fleet_workers.convert_job(dataclasses.replace(job, redo=True), settings,
                                        template, tiny_pipeline, lambda n: None, lambda n: None)
    assert outcome.status == 'ok', outcome.error
    assert fleet.completed(job, identity)['frames'] == 3
    assert len(next(v for k, v in read_bag(Path(job.output)).items()
                    if k.endswith('/depth/image'))) == 3


# -- 5. durability: fsync before the rename, the old output moved aside ---------------------


def test_atomic_replace_syncs_and_keeps_the_old_folder_until_the_new_one_is_in(
        tmp_path, monkeypatch):
    final = tmp_path / 'model'
    final.mkdir()
    (final / 'weights').write_text('old')
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(atomic.os, 'fsync', lambda fd: (synced.append(
        os.readlink(f'/proc/self/fd/{fd}')), real_fsync(fd))[1])
    real_replace = os.replace

    def failing_replace(src, dst):
        assert not Path(dst).exists()  # the old folder was moved aside, not deleted
        raise OSError(5, 'I/O error (injected)')

    monkeypatch.setattr(atomic.os, 'replace', failing_replace)
    with pytest.raises(OSError, match='injected'):
        with atomic.atomic_path(final, directory=True) as temp:
            (temp / 'weights').write_text('new')
    assert (final / 'weights').read_text() == 'old'  # put back: nothing lost
    assert sorted(p.name for p in tmp_path.iterdir()) == ['model']
    monkeypatch.setattr(atomic.os, 'replace', real_replace)
    synced.clear()
    with atomic.atomic_path(final, directory=True) as temp:
        (temp / 'weights').write_text('new')
    assert (final / 'weights').read_text() == 'new'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['model']
    assert any(s.endswith('/weights') for s in synced)  # the file, before the rename
    assert str(tmp_path) in synced  # the parent folder, after it


def test_a_file_never_replaces_a_folder(tmp_path):
    """write_atomic onto a folder (a PLY named like the user's folder) fails; the folder and its
    files stay, nothing is left aside."""
    folder = tmp_path / 'scan.ply'
    folder.mkdir()
    (folder / 'thesis.tex').write_text('years of work')
    with pytest.raises(OSError):
        atomic.write_atomic(folder, b'ply')
    assert (folder / 'thesis.tex').read_text() == 'years of work'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['scan.ply']


def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        atomic.write_atomic(tmp_path / 'private.json', b'{}')
        with atomic.atomic_path(tmp_path / 'folder', directory=True) as temp:
            (temp / 'x').write_text('x')
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / 'private.json').stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / 'folder').stat().st_mode) == 0o700
    os.umask(0o022)
    try:
        atomic.write_atomic(tmp_path / 'shared.json', b'{}')
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / 'shared.json').stat().st_mode) == 0o644


# -- 7. bare --ray starts a private cluster --------------------------------------------------


def test_bare_ray_means_a_private_local_cluster():
    assert bag_args('a', 'b', 'out', '--ray').ray == 'local'
    args = bag_args('a', 'b', 'out', '--ray', '10.0.0.5:6379')
    assert args.ray == '10.0.0.5:6379'


# -- 8. bench scripts: no fixed /tmp names ---------------------------------------------------


def test_gpu_check_writes_to_a_new_private_folder(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / 'bench'))
    monkeypatch.delenv('OUT', raising=False)
    spec = importlib.util.spec_from_file_location('gpu_check_for_test',
                                                  REPO_ROOT / 'bench' / 'gpu_check.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    first, second = module.output_folder(None), module.output_folder(None)
    try:
        assert first != second
        assert stat.S_IMODE(first.stat().st_mode) == 0o700
    finally:
        first.rmdir()
        second.rmdir()
    script = (REPO_ROOT / 'bench' / 'gpu_check.sh').read_text()
    assert 'mktemp -d' in script and 'PREFIX=${MG_PREFIX:-/tmp/' not in script


# -- 12. stale partials and symbolic links ---------------------------------------------------


def test_stale_partials_of_a_bracketed_name_leave_other_bags_alone(tmp_path):
    mine = tmp_path / '.run[1].partial-abc'
    theirs = tmp_path / '.run1.partial-xyz'  # another worker's bag 'run1', being written
    mine.mkdir()
    theirs.mkdir()
    removed = fleet.remove_stale_partials(str(tmp_path / 'run[1]'))
    assert removed == [mine.name] and theirs.is_dir() and not mine.exists()


def test_symlinked_folders_are_searched_once(tmp_path):
    write_camera_bag(tmp_path / 'in' / 'real' / 'cam', count=1)
    write_camera_bag(tmp_path / 'elsewhere' / 'cam2', count=1)
    (tmp_path / 'in' / 'linked').symlink_to(tmp_path / 'elsewhere')
    (tmp_path / 'in' / 'real' / 'loop').symlink_to(tmp_path / 'in')  # a cycle
    found = fleet.find_bags([str(tmp_path / 'in')])
    assert [name for _, name in found] == ['linked/cam2', 'real/cam']


if __name__ == '__main__':
    sys.exit(pytest.main([__file__]))


@pytest.mark.slow
def test_bare_ray_never_joins_the_cluster_ray_address_names():
    """Even with RAY_ADDRESS naming a cluster, bare --ray starts a private one on loopback and
    says so; joining needs the address given on the command line."""
    import subprocess

    pytest.importorskip('ray')
    code = '\n'.join([
        'import argparse',
        'from metricgold_ros.tools import bag, fleet_ray',
        'parser = argparse.ArgumentParser()',
        'bag.add_arguments(parser)',
        "args = parser.parse_args(['a', 'b', 'out', '--ray'])",
        'assert fleet_ray.connect(args.ray)',
        'import ray  # after connect: Ray reads its environment when imported',
        "print(ray.nodes()[0]['NodeManagerAddress'])",
        'ray.shutdown()'])
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), RAY_ADDRESS='192.0.2.1:6379')
    proc = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True,
                          text=True, timeout=180, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == '127.0.0.1'
    assert 'started a private Ray cluster on this machine' in proc.stderr
