"""Models by Hugging Face id: resolved offline through a hub cache laid out as huggingface_hub
lays it out, loaded by our loader, through `metricgold infer`, `metricgold bag` and the API the
node calls (model_paths.load_model); uncached ids fail in one line; folders win over ids."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from bag_helpers import read_bag, run_bag, write_camera_bag
from hub_helpers import hub_env, write_hub_cache
from metricgold_ros.errors import CheckpointError
from metricgold_ros.model import MetricGoldPipeline, build_tiny_checkpoint, save_checkpoint
from metricgold_ros.model.hub import _progress_class, hub_cache_dir, parse_repo_id
from metricgold_ros.model_paths import load_model, resolve_model_path
from metricgold_ros.tools.cli import main

REPO = 'metricgold-test/tiny-depth'
RGB = np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)


@pytest.fixture(scope='module')
def models(tmp_path_factory):
    """Two tiny metric checkpoints that differ (d_max 80 m and 20 m)."""
    root = tmp_path_factory.mktemp('hubmodels')
    return [save_checkpoint(root / f'm{i}', build_tiny_checkpoint(
        seed=i, processing_resolution=64, d_max_m=(80.0, 20.0)[i])) for i in range(2)]


@pytest.fixture
def cache(tmp_path, monkeypatch, models):
    """HF_HOME in tmp_path, offline, holding REPO (main: model 0, branch v2: model 1)."""
    hub = hub_env(monkeypatch, tmp_path / 'hf')
    write_hub_cache(hub, REPO, models[0])
    write_hub_cache(hub, REPO, models[1], branch='v2')
    torch.set_num_threads(1)
    return hub


def test_the_cache_is_laid_out_as_huggingface_hub_reads_it(cache):
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(cache)
    assert not info.warnings, info.warnings
    (repo,) = info.repos
    assert repo.repo_id == REPO and repo.repo_type == 'model'
    assert {ref for revision in repo.revisions for ref in revision.refs} == {'main', 'v2'}
    link = next(cache.glob('models--*/snapshots/*/unet/diffusion_pytorch_model.safetensors'))
    assert link.is_symlink() and not os.path.isabs(os.readlink(link))
    assert os.readlink(link).startswith('../../../blobs/')
    assert hub_cache_dir() == cache


def test_load_by_id_offline_equals_the_folder(cache, models):
    notes = []
    by_id = load_model(REPO, 'model_path', device='cpu', notify=notes.append)
    by_folder = MetricGoldPipeline.from_pretrained(models[0], device='cpu')
    assert by_id.metadata.d_max_m == 80.0
    np.testing.assert_array_equal(by_id(RGB).depth, by_folder(RGB).depth)
    assert any(REPO in n and str(cache) in n and 'HF_HUB_OFFLINE' in n for n in notes), notes


def test_revision_after_at(cache):
    assert load_model(f'{REPO}@v2', '--model', device='cpu').metadata.d_max_m == 20.0
    commit = (cache / f'models--{REPO.replace("/", "--")}' / 'refs' / 'v2').read_text()
    path = resolve_model_path(f'{REPO}@{commit}', '--model')
    assert path.name == commit and path.parent.name == 'snapshots'


def test_uncached_id_is_one_line_naming_id_cache_and_command(cache):
    with pytest.raises(CheckpointError) as info:
        load_model('prs-eth/not-downloaded@v3', 'model_path', device='cpu')
    message = str(info.value)
    assert '\n' not in message
    for words in ("model_path='prs-eth/not-downloaded@v3'", str(cache), 'HF_HUB_OFFLINE=1',
                  '`hf download prs-eth/not-downloaded --revision v3`',
                  '`huggingface-cli download prs-eth/not-downloaded --revision v3`'):
        assert words in message, message


def test_a_folder_wins_over_an_id_of_the_same_spelling(cache, models, tmp_path, monkeypatch):
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(models[1], tmp_path / REPO)  # ./metricgold-test/tiny-depth, d_max 20 m
    assert resolve_model_path(REPO, '--model').resolve() == (tmp_path / REPO).resolve()
    assert load_model(REPO, '--model', device='cpu').metadata.d_max_m == 20.0


def test_neither_folder_nor_id(tmp_path):
    with pytest.raises(CheckpointError, match=r'--model /nope/a/b: no such folder, and not a '
                       r'Hugging Face id \(org/name\[@revision\]\)'):
        resolve_model_path('/nope/a/b', '--model')


@pytest.mark.parametrize('text, expected', [
    ('prs-eth/marigold-depth-v1-1', ('prs-eth/marigold-depth-v1-1', None)),
    ('GonzaloMG/marigold-e2e-ft-depth@main', ('GonzaloMG/marigold-e2e-ft-depth', 'main')),
    ('org/name@0123abcd', ('org/name', '0123abcd')),
    ('./models/x', None), ('/abs/x', None), ('~/x', None), ('a/b/c', None), ('a/../b', None),
    ('a--b/c', None), ('name', None), ('org/name@', None),
])
def test_parse_repo_id(text, expected):
    parsed = parse_repo_id(text)
    assert (None if parsed is None else tuple(parsed)) == expected


def test_a_download_fetches_only_what_the_loader_reads():
    from huggingface_hub.utils import filter_repo_objects

    from metricgold_ros.model.hub import allow_patterns, ignore_patterns

    files = ['model_index.json', 'README.md', 'scheduler/scheduler_config.json',
             'unet/config.json', 'unet/diffusion_pytorch_model.safetensors',
             'unet/diffusion_pytorch_model.fp16.safetensors', 'unet/diffusion_pytorch_model.bin',
             'vae/diffusion_pytorch_model.fp16-00001-of-00002.safetensors',
             'vae/diffusion_pytorch_model.safetensors.index.fp16.json',
             'text_encoder/model.safetensors', 'text_encoder/model.fp16.safetensors',
             'text_encoder/pytorch_model.bin', 'tokenizer/vocab.json', 'tokenizer/merges.txt',
             'empty_text_embedding.safetensors', 'doc/teaser.jpg', 'model.onnx']

    def fetched(variant, allow_pickle=False):
        return set(filter_repo_objects(files, allow_patterns=allow_patterns(variant, allow_pickle),
                                       ignore_patterns=ignore_patterns(variant)))

    common = {'model_index.json', 'README.md', 'scheduler/scheduler_config.json',
              'unet/config.json', 'vae/diffusion_pytorch_model.safetensors.index.fp16.json',
              'tokenizer/vocab.json', 'tokenizer/merges.txt', 'empty_text_embedding.safetensors'}
    assert fetched(None) == common | {'unet/diffusion_pytorch_model.safetensors',
                                      'text_encoder/model.safetensors'}
    assert fetched('fp16') == common | {
        'unet/diffusion_pytorch_model.fp16.safetensors', 'text_encoder/model.fp16.safetensors',
        'vae/diffusion_pytorch_model.fp16-00001-of-00002.safetensors'}
    assert fetched(None, allow_pickle=True) - fetched(None) == {
        'unet/diffusion_pytorch_model.bin', 'text_encoder/pytorch_model.bin'}


def test_download_progress_goes_to_the_log():
    notes = []
    progress = _progress_class("model_path='org/name'", notes.append)(
        total=3, desc='Fetching 3 files', unit='file')
    for _ in range(3):
        progress.update(1)
    progress.close()
    assert notes[0] == "model_path='org/name': Fetching 3 files 1/3 file"
    assert notes[-1] == "model_path='org/name': Fetching 3 files 3/3 file"
    notes.clear()
    progress = _progress_class('--model org/name', notes.append)(
        total=3_400_000_000, desc='Downloading bytes', unit='B', unit_scale=True)
    progress.update(1_200_000_000)
    progress.close()
    assert notes == ['--model org/name: Downloading bytes 1.20G/3.40G B']


def test_infer_by_id(cache, models, tmp_path, capsys):
    Image.fromarray(RGB).save(tmp_path / 'frame.png')
    for name, model in (('id', REPO), ('folder', models[0])):
        code = main(['infer', str(tmp_path / 'frame.png'), '--out', str(tmp_path / name),
                     '--model', str(model), '--device', 'cpu', '--quiet', '--no-colored',
                     '--no-points'])
        captured = capsys.readouterr()
        assert code == 0, captured.err
    depth = np.load(tmp_path / 'id' / 'frame_depth.npy')
    assert depth.shape == RGB.shape[:2] and np.isfinite(depth).all()
    np.testing.assert_array_equal(depth, np.load(tmp_path / 'folder' / 'frame_depth.npy'))

    code = main(['infer', str(tmp_path / 'frame.png'), '--out', str(tmp_path / 'out2'),
                 '--model', 'org/absent', '--quiet'])
    err = capsys.readouterr().err
    assert code == 1 and 'Traceback' not in err, err
    (line,) = [line for line in err.splitlines() if line.startswith('ERROR')]
    assert '--model org/absent: not in the Hugging Face cache' in line, err
    assert 'hf download org/absent' in line


def test_bag_by_id(cache, tmp_path, capsys):
    bag = write_camera_bag(tmp_path / 'in', count=2, width=64, height=48)
    code, summary, err = run_bag(capsys, bag.path, tmp_path / 'out', '--model', f'{REPO}@v2',
                                 '--device', 'cpu', '--no-colored', '--no-points')
    assert code == 0, err
    assert summary is not None
    depths = read_bag(tmp_path / 'out')
    topic = next(t for t in depths if t.endswith('depth/image'))
    assert len(depths[topic]) == 2
    message = depths[topic][0][2]
    depth = np.frombuffer(bytes(message.data), dtype=np.float32)
    assert np.nanmax(depth) <= 20.0 + 1e-3  # model 1 (branch v2): d_max 20 m



@pytest.mark.slow
def test_node_loads_by_id_at_configure(models, tmp_path):
    """depth_node with model_path set to an id: resolved in the offline cache while it
    configures, the lookup in its log; an uncached id stops it with the one line (exit 1)."""
    from node_zygote import start_node, wait_for_text
    from ros_helpers import ros_env

    home = tmp_path / 'hf'
    write_hub_cache(home / 'hub', REPO, models[0])
    env = ros_env(HF_HOME=str(home), HF_HUB_OFFLINE='1')
    env.pop('HF_HUB_CACHE', None)
    node = start_node(['--ros-args', '-p', f'model_path:={REPO}', '-p', 'device:=cpu',
                       '-r', '__ns:=/hub_ok'], env, tmp_path, 'ok')
    try:
        assert wait_for_text(node, lambda text: f'loaded {REPO}' in text, 120.0), node.stderr()
    finally:
        node.kill()
    assert f"model_path='{REPO}': looking up the Hugging Face repository in the hub cache " \
        f"{home / 'hub'} (HF_HUB_OFFLINE: no downloads)" in node.stderr()
    absent = start_node(['--ros-args', '-p', 'model_path:=org/absent', '-p', 'device:=cpu',
                         '-r', '__ns:=/hub_absent'], env, tmp_path, 'absent')
    code = absent.wait(120.0)
    absent.kill()
    stderr = absent.stderr()
    assert code == 1, stderr[-2000:]
    assert "model_path='org/absent': not in the Hugging Face cache" in stderr
    assert 'hf download org/absent' in stderr and 'Traceback' not in stderr
