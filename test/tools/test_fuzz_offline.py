"""Fault campaign of the offline tools: hostile output folders, bag layouts, images, CameraInfo.

Hypothesis draws what a careless or hostile user could put in the way, and each example checks
the promises of issue 22: no traceback (only our errors), no file of the user's lost, nothing
partial left. ``METRICGOLD_FUZZ_EXAMPLES`` raises the number of examples per property (the
campaign figure of the issue was taken with it); the default keeps the suite fast.
"""

import io
import os
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from metricgold_ros.camera import Calibration
from metricgold_ros.errors import BagError, InputError
from metricgold_ros.tools import bag_output, fleet
from metricgold_ros.tools.infer import load_rgb

EXAMPLES = int(os.environ.get('METRICGOLD_FUZZ_EXAMPLES', '40'))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=list(HealthCheck))
NAMES = st.text(alphabet='abxy[]*?._- 1', min_size=1, max_size=8).filter(
    lambda n: n not in ('.', '..') and '/' not in n)


def snapshot(root: Path, skip: Optional[Path] = None) -> Dict[str, bytes]:
    """Every regular file below ``root`` (links not followed) -> its bytes, ``skip`` left out."""
    files = {}
    for folder, dirs, names in os.walk(root):
        if skip is not None and Path(folder) == skip:
            dirs[:] = []
            continue
        dirs[:] = [d for d in dirs if skip is None or Path(folder, d) != skip]
        for name in names:
            path = Path(folder, name)
            if path.is_file() and not path.is_symlink() and path != skip:
                files[str(path.relative_to(root))] = path.read_bytes()
    return files


# -- what a user may have at OUTPUT ----------------------------------------------------------

@st.composite
def output_layouts(draw):
    """``(kind, files)``: what to put at OUTPUT before a run with --overwrite."""
    kind = draw(st.sampled_from(['absent', 'bag', 'folder', 'empty', 'file', 'link-folder',
                                 'link-bag', 'broken-link', 'metadata-folder']))
    files = draw(st.dictionaries(NAMES, st.binary(max_size=64), max_size=4))
    return kind, files


def _make(output: Path, kind: str, files: Dict[str, bytes], elsewhere: Path) -> None:
    def fill(folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (folder / name).write_bytes(data)

    if kind == 'bag':
        fill(output)
        (output / 'metadata.yaml').write_text('rosbag2_bagfile_information: {}')
    elif kind == 'folder':
        fill(output)
        (output / 'thesis.tex').write_text('years of work')
    elif kind == 'empty':
        output.mkdir()
    elif kind == 'file':
        output.write_bytes(b'user data ' + b''.join(files.values()))
    elif kind in ('link-folder', 'link-bag'):
        fill(elsewhere)
        (elsewhere / 'thesis.tex').write_text('years of work')
        if kind == 'link-bag':
            (elsewhere / 'metadata.yaml').write_text('rosbag2_bagfile_information: {}')
        output.symlink_to(elsewhere)
    elif kind == 'broken-link':
        output.symlink_to(elsewhere / 'missing')
    elif kind == 'metadata-folder':  # metadata.yaml is a folder: not a bag
        fill(output / 'metadata.yaml')


@FUZZ
@given(layout=output_layouts(), storage=st.sampled_from(['mcap', 'sqlite3']))
def test_overwrite_never_loses_a_users_file(layout, storage):
    kind, files = layout
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / 'in').mkdir()
        output = root / 'out'
        _make(output, kind, files, root / 'elsewhere')
        replaceable = kind in ('absent', 'bag', 'link-bag')
        before = snapshot(root, skip=output if kind == 'bag' else None)
        try:
            bag_output.check_output(output, root / 'in', overwrite=True)
            with bag_output.OutputBag(output, storage=storage, overwrite=True,
                                      background=False) as out:
                types = out.typestore.types
                out.write_message('/t', 1, types['std_msgs/msg/String'](data='x'))
                out.commit()
            accepted = True
        except BagError as err:
            accepted = False
            assert 'not a bag' in str(err) and 'move that away' in str(err)
        assert accepted == replaceable, kind
        after = snapshot(root, skip=output if accepted else None)
        assert {k: v for k, v in before.items() if not k.startswith('out/')} == \
            {k: v for k, v in after.items() if not k.startswith('out/')}
        if not accepted:
            assert after == before  # refused: not one byte changed
        else:
            assert (output / 'metadata.yaml').is_file()
        leftovers = [p.name for p in root.iterdir() if '.partial' in p.name or
                     '.replaced' in p.name]
        assert not leftovers


# -- fleet layouts: names that collide, nest, escape, link back ------------------------------

@st.composite
def bag_trees(draw):
    """A tree of fake bags (rosbag2 folders and bag files) with odd names and links."""
    entries = draw(st.lists(st.tuples(
        st.lists(NAMES, min_size=0, max_size=2),  # parent folders
        NAMES, st.sampled_from(['folder', '.mcap', '.db3', '.bag', 'plain'])),
        min_size=1, max_size=6))
    links = draw(st.lists(st.tuples(st.lists(NAMES, max_size=1), NAMES,
                                    st.sampled_from(['root', 'parent', 'missing'])),
                          max_size=2))
    extra_inputs = draw(st.lists(st.sampled_from(['.', 'first', 'nested']), max_size=2))
    return entries, links, extra_inputs


@FUZZ
@given(tree=bag_trees())
@example(tree=([([], '1', '.mcap'), (['1'], '1', 'folder')], [], []))  # 1.mcap and 1/1 nest
@example(tree=([([], 'run', 'folder')], [(['run'], 'loop', 'root')], ['.']))
def test_fleet_plans_are_refused_or_safe(tree):
    entries, links, extra_inputs = tree
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / 'in'
        root.mkdir()
        made = []
        for parents, name, kind in entries:
            folder = root.joinpath(*parents)
            try:
                folder.mkdir(parents=True, exist_ok=True)
                if kind == 'folder':
                    (folder / name).mkdir(exist_ok=True)
                    (folder / name / 'metadata.yaml').write_text('x')
                    made.append(folder / name)
                elif kind == 'plain':
                    (folder / name).write_text('not a bag')
                else:
                    (folder / (name + kind)).write_bytes(b'x')
                    made.append(folder / (name + kind))
            except (FileExistsError, NotADirectoryError, IsADirectoryError):
                continue  # the layout drew a name twice with different kinds
        for parents, name, target in links:
            link = root.joinpath(*parents, name)
            with_target = {'root': root, 'parent': link.parent, 'missing': root / 'gone'}
            try:
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(with_target[target])
            except (FileExistsError, NotADirectoryError):
                continue
        inputs = [str(root)]
        cwd = os.getcwd()
        try:
            os.chdir(root)
            for extra in extra_inputs:
                if extra == 'first' and made:
                    inputs.append(str(made[0]))
                elif extra == 'nested' and made:
                    inputs.append(str(made[-1]))
                elif extra == '.':
                    inputs.append('.')
            try:
                jobs = fleet.plan_jobs(inputs, str(Path(tmp) / 'out'))
            except BagError:
                return  # refused before any work, with our message
        finally:
            os.chdir(cwd)
        names = [job.name for job in jobs]
        assert len(set(names)) == len(names)
        for name in names:
            parts = Path(name).parts
            assert '..' not in parts and not Path(name).is_absolute()
            assert all(str(Path(*parts[:k])) not in names for k in range(1, len(parts)))
            assert Path(tmp, 'out', name).resolve().is_relative_to(Path(tmp, 'out').resolve())


@FUZZ
@given(name=NAMES, others=st.lists(NAMES, max_size=4))
def test_stale_partials_touch_only_their_own_bag(name, others):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        mine = folder / f'.{name}.partial-abc'
        mine.mkdir()
        theirs = [folder / f'.{other}.partial-xyz' for other in set(others) if other != name]
        for path in theirs:
            path.mkdir(exist_ok=True)
        fleet.remove_stale_partials(str(folder / name))
        assert not mine.exists() and all(path.is_dir() for path in theirs)


# -- images and CameraInfo -------------------------------------------------------------------

def _png(width: int, height: int, payload: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack('>I', len(data)) + kind + data + \
            struct.pack('>I', zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IDAT', zlib.compress(payload))
            + chunk(b'IEND', b''))


@st.composite
def image_files(draw):
    """Bytes of an image file: a valid small one, a cut one, a lying header, or noise."""
    from PIL import Image

    kind = draw(st.sampled_from(['valid', 'cut', 'header', 'noise']))
    if kind == 'header':
        return _png(draw(st.integers(1, 2 ** 31 - 1)), draw(st.integers(1, 2 ** 31 - 1)),
                    draw(st.binary(max_size=64)))
    if kind == 'noise':
        return draw(st.sampled_from([b'', b'\x89PNG\r\n\x1a\n', b'\xff\xd8\xff', b'GIF89a',
                                     b'BM'])) + draw(st.binary(max_size=256))
    size = (draw(st.integers(1, 40)), draw(st.integers(1, 40)))
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((size[1], size[0], 3), np.uint8)).save(
        buffer, format=draw(st.sampled_from(['PNG', 'JPEG', 'BMP', 'TIFF'])))
    data = buffer.getvalue()
    return data if kind == 'valid' else data[:draw(st.integers(0, len(data) - 1))]


@FUZZ
@given(data=image_files(), budget=st.integers(1, 4096 * 4096))
def test_any_image_file_is_an_image_or_an_input_error(data, budget):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / 'x.png'
        path.write_bytes(data)
        try:
            rgb = load_rgb(path, pixel_budget=budget)
        except InputError:
            return
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
        assert rgb.shape[0] * rgb.shape[1] <= budget


@FUZZ
@given(d=st.one_of(st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=40),
                   st.integers(0, 10 ** 6).map(np.zeros)),
       model=st.sampled_from(['plumb_bob', 'rational_polynomial', 'equidistant', '', 'x' * 300]),
       k=st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=0, max_size=12),
       size=st.tuples(st.integers(-5, 10 ** 6), st.integers(-5, 10 ** 6)))
def test_any_camera_info_is_a_calibration_or_its_problem(d, model, k, size):
    calibration = Calibration.from_fields(k, d, model, *size)
    assert (calibration.camera is None) == (calibration.problem is not None)
    assert len(calibration.d) <= 14


if __name__ == '__main__':
    pytest.main([__file__])


# -- hostile parameter sets for `metricgold bag` ---------------------------------------------

VALUES = st.sampled_from(['0', '-1', '1', '2', '64', '1e9', 'nan', 'inf', '-inf', '', 'x',
                          '0.5', '99999999999999999999'])
FLAGS = st.lists(st.one_of(
    st.tuples(st.sampled_from(['--output-scale', '--color-min-depth', '--color-max-depth',
                               '--points-stride', '--max-depth', '--max-frames', '--start',
                               '--end', '--max-pixels', '--camera-height-m',
                               '--camera-pitch-deg', '--camera-roll-deg', '--denoising-steps',
                               '--ensemble-size', '--fallback-processing-resolution', '--seed',
                               '--warm-start-strength', '--prefix', '--image-topic',
                               '--camera-info-topic', '--colormap', '--storage']), VALUES),
    st.tuples(st.sampled_from(['--no-copy', '--skip-bad-frames', '--points-rgb', '--no-points',
                               '--no-colored', '--warm-start', '--overwrite']), st.just(None))),
    max_size=4)


@pytest.fixture(scope='module')
def small_bag(tmp_path_factory):
    from bag_helpers import write_camera_bag

    return write_camera_bag(tmp_path_factory.mktemp('fuzzbag') / 'in', count=2, width=64,
                            height=48)


@settings(max_examples=max(10, EXAMPLES // 4), deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(flags=FLAGS)
@example(flags=[('--start', 'nan')])  # was a traceback (ValueError from round(nan))
@example(flags=[('--end', 'inf')])  # was a traceback (OverflowError)
def test_bag_under_hostile_flags_exits_cleanly_and_leaves_whole_outputs(
        flags, small_bag, fast_model, capsys):
    from metricgold_ros.tools.cli import main

    argv = ['--processing-resolution', '64']
    for flag, value in flags:
        argv += [flag] if value is None else [flag, value]
    before = snapshot(small_bag.path)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / 'out'
        try:
            code = main(['bag', str(small_bag.path), str(out), '--quiet', *argv])
        except SystemExit as exit_:  # argparse: a usage error
            code = exit_.code
        err = capsys.readouterr().err
        assert code in (0, 1, 2), (argv, err)
        assert 'Traceback' not in err, (argv, err)
        if code == 0:
            assert (out / 'metadata.yaml').is_file()
        else:
            assert not out.exists() or (out / 'metadata.yaml').is_file(), argv  # failures kept
        assert not [p for p in Path(tmp).iterdir() if '.partial' in p.name]
    assert snapshot(small_bag.path) == before  # the input is never touched
