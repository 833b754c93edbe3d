"""Hostile checkpoints beyond test_checkpoint.py: wrong dtype, one tensor of a wrong shape,
missing files, safetensors headers that lie, degenerate depth ranges, pickled text encoders; and
the ``depth_node`` process at start-up with each corrupt checkpoint: exit 1 with the specific
message, no traceback, nothing from the checkpoint executed."""

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from metricgold_ros.errors import CheckpointError
from metricgold_ros.model import load_checkpoint
from node_zygote import start_node
from ros_helpers import ros_env

pytestmark = pytest.mark.timeout(300)

UNET_WEIGHTS = Path('unet') / 'diffusion_pytorch_model.safetensors'
VAE_WEIGHTS = Path('vae') / 'diffusion_pytorch_model.safetensors'


def _rewrite_tensors(path: Path, change) -> None:
    tensors = load_file(str(path))
    save_file(change(tensors), str(path))


def truncated(folder: Path) -> None:
    weights = folder / UNET_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:4096])


def int8_weights(folder: Path) -> None:
    _rewrite_tensors(folder / UNET_WEIGHTS, lambda t: {k: v.to(torch.int8) for k, v in t.items()})


def nan_weights(folder: Path) -> None:
    def change(tensors):
        tensors['conv_out.bias'][1] = float('nan')
        return tensors
    _rewrite_tensors(folder / UNET_WEIGHTS, change)


def one_tensor_of_another_shape(folder: Path) -> None:
    def change(tensors):
        tensors['decoder.conv_in.bias'] = torch.zeros(3, 1)
        return tensors
    _rewrite_tensors(folder / VAE_WEIGHTS, change)


def header_too_large(folder: Path) -> None:
    weights = folder / UNET_WEIGHTS
    data = weights.read_bytes()
    weights.write_bytes((2 ** 62).to_bytes(8, 'little') + data[8:])


def offsets_past_the_end(folder: Path) -> None:
    weights = folder / UNET_WEIGHTS
    data = weights.read_bytes()
    size = int.from_bytes(data[:8], 'little')
    header = json.loads(data[8:8 + size])
    name = next(k for k in header if k != '__metadata__')
    header[name]['data_offsets'][1] += 10 ** 9
    text = json.dumps(header).encode()
    weights.write_bytes(len(text).to_bytes(8, 'little') + text + data[8 + size:])


def metadata(d_min, d_max):
    def write(folder: Path) -> None:
        (folder / 'metricgold.json').write_text(f'{{"d_min": {d_min}, "d_max": {d_max}}}')
    return write


def missing(relative: str):
    def remove(folder: Path) -> None:
        (folder / relative).unlink()
    return remove


def _marker(folder: Path) -> Path:
    return folder.parent / f'{folder.name}.EXECUTED'


class _Payload:
    """Unpickling this creates a file: proof that pickled code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, 'w'))


def pickle_as_safetensors(folder: Path) -> None:
    torch.save({'x': _Payload(_marker(folder))}, folder / UNET_WEIGHTS)


def pickled_text_encoder_only(folder: Path) -> None:
    """No cached embedding; a text encoder whose only weights are a malicious pickle."""
    (folder / 'empty_text_embedding.safetensors').unlink()
    for name in ('text_encoder', 'tokenizer'):
        (folder / name).mkdir()
    (folder / 'text_encoder' / 'config.json').write_text('{"model_type": "clip_text_model"}')
    torch.save({'x': _Payload(_marker(folder))}, folder / 'text_encoder' / 'pytorch_model.bin')


# name -> (corruption, words of the specific message)
CASES = {
    'truncated-safetensors': (truncated, ['diffusion_pytorch_model.safetensors is not a '
                                          'readable safetensors file', 'truncated']),
    'int8-weights': (int8_weights, ['weights in', 'unet do not match', 'conv_in.weight']),
    'nan-weights': (nan_weights, ['weights in', 'unet: conv_out.bias holds NaN or inf']),
    'one-tensor-wrong-shape': (one_tensor_of_another_shape, [
        'vae do not match', 'size mismatch for decoder.conv_in.bias']),
    'header-too-large': (header_too_large, ['not a readable safetensors file',
                                            'header too large']),
    'offsets-past-the-end': (offsets_past_the_end, ['not a readable safetensors file',
                                                    'offset']),
    'd_min-equals-d_max': (metadata(2.0, 2.0), ['metricgold.json', 'd_min=2.0, d_max=2.0',
                                                '0 < d_min < d_max']),
    'd_min-zero': (metadata(0, 10), ['d_min=0.0', 'not a valid depth range']),
    'd_min-nan': (metadata('NaN', 10), ['d_min=nan', 'not a valid depth range']),
    'd_max-infinite': (metadata(1, 'Infinity'), ['d_max=inf', 'finite metres']),
    'no-model_index': (missing('model_index.json'), ['model_index.json is missing']),
    'no-vae-config': (missing('vae/config.json'), ['vae/config.json is missing']),
    'no-unet-weights': (missing(str(UNET_WEIGHTS)), ['unet has no weights',
                                                     'diffusion_pytorch_model.safetensors']),
    'pickle-as-safetensors': (pickle_as_safetensors, ['pickled data under a .safetensors name']),
}
# Started as node processes too: one per kind of problem in the issue.
PROCESS_CASES = ['truncated-safetensors', 'int8-weights', 'one-tensor-wrong-shape',
                 'd_min-equals-d_max', 'd_min-zero', 'no-vae-config', 'pickle-as-safetensors',
                 'pickled-text-encoder']


def corrupt_copy(source: Path, target: Path, name: str) -> Path:
    shutil.copytree(source, target)
    corruption = pickled_text_encoder_only if name == 'pickled-text-encoder' else \
        CASES[name][0]
    corruption(target)
    return target


@pytest.mark.parametrize('name', sorted(set(CASES) - {'truncated-safetensors',
                                                       'pickle-as-safetensors'}))
def test_specific_error(tiny_model_dir, tmp_path, name):
    """(test_checkpoint.py covers truncation and the disguised pickle in-process.)"""
    folder = corrupt_copy(tiny_model_dir, tmp_path / name, name)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(folder)
    for word in CASES[name][1]:
        assert word in str(info.value), str(info.value)


def test_pickled_text_encoder_is_refused_without_running_it(tiny_model_dir, tmp_path):
    pytest.importorskip('transformers')
    folder = corrupt_copy(tiny_model_dir, tmp_path / 'te', 'pickled-text-encoder')
    try:
        with pytest.raises(CheckpointError, match='text_encoder has only pickled weights '
                           r'\(pytorch_model.bin\): .*--allow-pickle'):
            load_checkpoint(folder)
    finally:
        assert not _marker(folder).exists(), 'the pickled text encoder was executed'


@pytest.fixture(scope='module')
def node_runs(tiny_model_dir, tmp_path_factory):
    """depth_node started on every corrupt checkpoint at once: name -> (rc, stderr, executed).

    The nodes are forks of a warm interpreter (node_zygote.py) running depth_node.main(), so
    eight start-ups cost eight forks, not eight torch imports.
    """
    root = tmp_path_factory.mktemp('corrupt')
    folders = {name: corrupt_copy(tiny_model_dir, root / name, name) for name in PROCESS_CASES}
    env = ros_env()
    nodes = {name: start_node(['--ros-args', '-p', f'model_path:={folders[name]}', '-p',
                               'device:=cpu', '-r', f'__ns:=/ckpt_{name.replace("-", "_")}'],
                              env, root, name) for name in PROCESS_CASES}
    results = {}
    deadline = time.monotonic() + 180.0  # eight start-ups at once on two busy cores
    for name, node in nodes.items():
        code = node.wait(max(1.0, deadline - time.monotonic()))
        node.kill()
        results[name] = (code, node.stderr(), _marker(folders[name]).exists())
    return results


@pytest.mark.slow
@pytest.mark.parametrize('name', PROCESS_CASES)
def test_node_start_with_corrupt_checkpoint(node_runs, name):
    code, stderr, executed = node_runs[name]
    assert not executed, f'{name}: code from the checkpoint ran'
    assert code == 1, f'{name}: exit code {code}\n{stderr[-2000:]}'
    assert 'cannot start: model_path=' in stderr, stderr[-2000:]
    words = ['text_encoder has only pickled weights', '--allow-pickle'] \
        if name == 'pickled-text-encoder' else CASES[name][1]
    for word in words:
        assert word in stderr, f'{name}: {word!r} missing in\n{stderr[-2000:]}'
    assert 'Traceback' not in stderr, stderr[-3000:]
