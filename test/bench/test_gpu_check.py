"""The GPU device check (bench/gpu_check.py) rehearsed on the CPU with tiny models.

One run of the whole script (~1 min here) proves every section works before a GPU is lent;
the unit tests cover the parts a CPU run cannot reach: the peak table, a section stopped by
its budget, and the wheel slimming for the GPU machine.
"""

import json
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / 'bench'))

import gpu_check  # noqa: E402
import gpu_check_matrix  # noqa: E402
import gpu_wheels  # noqa: E402

SECTIONS = ('environment', 'model', 'flops', 'transfers', 'matrix', 'tuning', 'node',
            'compiled')
# Ours vs diffusers on the same networks and noise: they differ only by the input resize
# (uint8 vs float, one grey level at most), 2e-3 to 5e-3 in log depth on the tiny model.
MAX_LOG_DEPTH_DIFF = 0.05


@pytest.mark.timeout(240)
def test_tiny_run_writes_every_section(tmp_path, capsys):
    from ros_helpers import ros_env

    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / 'bench' / 'gpu_check.py'), '--tiny', '--out',
         str(tmp_path), '--budget', '200', '--node-seconds', '3'],
        env=ros_env(OUT=''), cwd=REPO_ROOT, capture_output=True, text=True, timeout=230)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / 'gpu_check.json').read_text())
    table = (tmp_path / 'gpu_check.md').read_text()
    with capsys.disabled():
        print(f"\n[gpu_check --tiny] {report['elapsed_s']} s: " + ', '.join(
            f"{k} {v['status']} {v.get('seconds')} s" for k, v in report['sections'].items()))
    sections = report['sections']
    assert report['finished'] is True
    assert set(SECTIONS) <= set(sections)
    for name in SECTIONS:
        assert sections[name]['status'] in ('ok', 'partial', 'skipped'), (name, sections[name])

    env = sections['environment']
    assert env['mode'] == 'tiny (CPU)' and env['measured_matmul_tflops'] > 0
    assert env['peak_dense_flops'] > 0  # no GPU: the measured matrix-product rate

    rows = sections['flops']['rows']
    assert {(r['steps'], r['ensemble']) for r in rows} == {(1, 1), (1, 5), (4, 1), (4, 5)}
    assert all(r['total_tflop'] > 0 and r['floor_ms'] > 0 for r in rows)
    assert sections['transfers']['download_pageable_ms'] >= 0

    cells = sections['matrix']['cells']
    assert sections['matrix']['status'] == 'ok' and len(cells) == 5  # every axis value once
    assert {key.split('/')[1] for key in cells} == {'eager', 'channels_last'}
    for key, cell in cells.items():
        assert cell['ours_ms'] > 0 and cell['diffusers_ms'] > 0, key
        assert 0 < cell['floor_share'] and cell['finite'], key
        assert cell['max_abs_log_depth_diff'] < MAX_LOG_DEPTH_DIFF, key
    assert '| fp32 | eager | 480x640 | 1 | 1 |' in table

    variants = sections['tuning']['variants']
    assert set(variants) == {'as is', 'no per-stage sync'}
    assert all(v['ours_ms'] > 0 for v in variants.values())

    compiled = sections['compiled']['modes']['default']
    assert all(cell['ours_ms'] > 0 for cell in compiled.values())

    node = sections['node']
    if sections['environment']['rclpy']['ok']:
        assert node['status'] == 'ok', node
        assert node['frames_per_s_received'] > 0
        assert node['stamp_to_received_ms']['p50'] > 0
        assert node['node_rss_peak_mb'] > 0
        assert 'Node end to end' in table
    else:
        assert node['status'] == 'skipped'


def test_peak_table_matches_device_names():
    assert gpu_check.peak_for('NVIDIA H200')[0] == pytest.approx(989.4e12)
    assert gpu_check.peak_for('NVIDIA H100 80GB HBM3')[0] == pytest.approx(989.4e12)
    assert gpu_check.peak_for('NVIDIA H100 PCIe')[0] == pytest.approx(756.5e12)
    assert gpu_check.peak_for('NVIDIA L40S')[0] == pytest.approx(362.1e12)
    peak, source = gpu_check.peak_for('Some Future GPU')
    assert peak is None and source.startswith('unknown')


def test_section_budget_stops_cleanly_and_records_skips(tmp_path):
    args = SimpleNamespace(budget=100.0, tiny=True, dtypes=['fp32'],
                           layouts=['eager', 'channels_last'], steps=[1, 4], ensembles=[1, 5],
                           max_departures=5, resolution=64)
    check = gpu_check.Check(args, tmp_path)
    cells = gpu_check_matrix.matrix_cells(check)
    assert len(cells) == 16 and gpu_check_matrix.cell_key(cells[0]) == 'fp32/eager/480x640/s1/e1'
    check.budget.section_end = check.budget.start  # the section's time is spent

    def setup(_cell):
        raise AssertionError('no cell may start')

    out = gpu_check_matrix.run_cells(check, cells, setup, True, 1, 1)
    assert out['cells'] == {} and len(out['skipped']) == 16
    assert all('section budget' in s for s in out['skipped'])


def test_run_section_records_an_error_and_goes_on(tmp_path):
    args = SimpleNamespace(budget=100.0, tiny=True)
    check = gpu_check.Check(args, tmp_path)

    def broken(_check):
        raise ValueError('planted')

    check.run_section('broken', broken, 10.0)
    check.run_section('fine', lambda _check: {'value': 1}, 10.0)
    report = json.loads((tmp_path / 'gpu_check.json').read_text())
    assert report['sections']['broken']['status'] == 'error'
    assert 'planted' in report['sections']['broken']['error']
    assert report['sections']['fine'] == {'status': 'ok', 'budget_s': 10.0, 'value': 1,
                                          'seconds': report['sections']['fine']['seconds']}
    assert 'broken: error: ValueError: planted' in (tmp_path / 'gpu_check.md').read_text()


def test_slim_wheel_keeps_the_soname_copy(tmp_path):
    wheel = tmp_path / 'ros_fastdds-3.2.3-cp312-cp312-manylinux_2_28_x86_64.whl'
    lib = b'\x7fELF' + bytes(range(256)) * 64
    names = ['libfastdds.so', 'libfastdds.so.3.2', 'libfastdds.so.3.2.2']
    with zipfile.ZipFile(wheel, 'w', zipfile.ZIP_DEFLATED) as out:
        for name in names:
            out.writestr(f'ros_fastdds-3.2.3.data/data/lib/{name}', lib)
        out.writestr('ros_fastdds-3.2.3.data/data/lib/libother.so', b'other')
        out.writestr('ros_fastdds-3.2.3.dist-info/RECORD', ''.join(
            f'ros_fastdds-3.2.3.data/data/lib/{n},sha256=x,1\n' for n in names + ['libother.so']))
    assert gpu_wheels.slim_wheel(wheel)[0] == 2
    with zipfile.ZipFile(wheel) as slim:
        kept = sorted(Path(n).name for n in slim.namelist() if '/lib/' in n)
        record = slim.read('ros_fastdds-3.2.3.dist-info/RECORD').decode()
        assert slim.read('ros_fastdds-3.2.3.data/data/lib/libfastdds.so.3.2') == lib
    assert kept == ['libfastdds.so.3.2', 'libother.so']
    assert 'libfastdds.so.3.2,' in record and 'libfastdds.so.3.2.2' not in record
    assert gpu_wheels.slim_wheel(wheel) == (0, 0)  # idempotent
