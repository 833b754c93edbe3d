"""Issue 22, item 8 (the checkpoint part): a sharded-weights index may name only regular files
inside its folder, and a hostile config (zero norm groups or attention heads, absurd sizes) is a
CheckpointError naming the file, never a ZeroDivisionError or a terabyte allocation."""

import json
import os
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from hub_helpers import write_hub_cache
from metricgold_ros.errors import CheckpointError
from metricgold_ros.model import MetricGoldPipeline, load_checkpoint

INDEX = 'diffusion_pytorch_model.safetensors.index.json'


def shard(folder: Path, names=('part-1.safetensors', 'part-2.safetensors')) -> Path:
    """Split ``folder``'s weights into two shard files and an index naming them."""
    single = folder / 'diffusion_pytorch_model.safetensors'
    tensors = load_file(str(single))
    keys = sorted(tensors)
    halves = (keys[:len(keys) // 2], keys[len(keys) // 2:])
    weight_map = {}
    for name, part in zip(names, halves):
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: tensors[k] for k in part}, str(target))
        weight_map.update({k: name for k in part})
    single.unlink()
    (folder / INDEX).write_text(json.dumps({'metadata': {}, 'weight_map': weight_map}))
    return folder / INDEX


def rename_shard(index: Path, old: str, new: str) -> None:
    data = json.loads(index.read_text())
    data['weight_map'] = {k: (new if v == old else v) for k, v in data['weight_map'].items()}
    index.write_text(json.dumps(data))


@pytest.fixture
def sharded(tiny_model_dir, tmp_path):
    folder = shutil.copytree(tiny_model_dir, tmp_path / 'model')
    shard(folder / 'unet')
    return folder


def test_sharded_weights_load(sharded, tiny_model_dir):
    import torch

    ours = load_checkpoint(sharded).unet.state_dict()
    for key, value in load_checkpoint(tiny_model_dir).unet.state_dict().items():
        assert torch.equal(ours[key], value)


def test_absolute_shard_path_is_refused(sharded, tmp_path):
    outside = tmp_path / 'elsewhere' / 'part-2.safetensors'
    outside.parent.mkdir()
    shutil.move(sharded / 'unet' / 'part-2.safetensors', outside)
    rename_shard(sharded / 'unet' / INDEX, 'part-2.safetensors', str(outside))
    with pytest.raises(CheckpointError, match=rf'{INDEX}: shard .*elsewhere/part-2\.safetensors.* '
                       r'is not a file name inside .* \(absolute paths and \.\. are refused\)'):
        load_checkpoint(sharded)


def test_dotdot_shard_path_is_refused(sharded, tmp_path):
    shutil.move(sharded / 'unet' / 'part-2.safetensors', tmp_path / 'part-2.safetensors')
    rename_shard(sharded / 'unet' / INDEX, 'part-2.safetensors', '../../part-2.safetensors')
    with pytest.raises(CheckpointError, match=r"shard '\.\./\.\./part-2\.safetensors' is not a "
                       'file name inside'):
        load_checkpoint(sharded)


def test_symlink_leaving_the_folder_is_refused(sharded, tmp_path):
    outside = tmp_path / 'part-2.safetensors'
    shutil.move(sharded / 'unet' / 'part-2.safetensors', outside)
    os.symlink(outside, sharded / 'unet' / 'part-2.safetensors')
    with pytest.raises(CheckpointError, match=r"shard 'part-2\.safetensors' leads to .*, "
                       'outside .*unet .*symlink leaving the checkpoint'):
        load_checkpoint(sharded)


def test_shard_that_is_not_a_regular_file_is_refused(sharded):
    (sharded / 'unet' / 'part-2.safetensors').unlink()
    (sharded / 'unet' / 'part-2.safetensors').mkdir()
    with pytest.raises(CheckpointError, match=r"shard 'part-2\.safetensors' is missing or not "
                       'a regular file'):
        load_checkpoint(sharded)


def test_weight_map_of_the_wrong_type_is_refused(sharded):
    (sharded / 'unet' / INDEX).write_text(json.dumps({'weight_map': ['part-1.safetensors']}))
    with pytest.raises(CheckpointError, match=f'{INDEX}: weight_map must map tensor names'):
        load_checkpoint(sharded)


def test_sharded_snapshot_in_the_hub_cache_loads(sharded, tmp_path):
    """A hub snapshot's files are symlinks into the repository's blobs/: that is allowed."""
    snapshot = write_hub_cache(tmp_path / 'hub', 'org/sharded', sharded)
    assert (snapshot / 'unet' / 'part-1.safetensors').is_symlink()
    assert load_checkpoint(snapshot).unet is not None


HOSTILE = {  # name -> (sub-model, config change, words of the message)
    'vae-zero-groups': ('vae', {'norm_num_groups': 0}, 'norm_num_groups=0'),
    'unet-zero-groups': ('unet', {'norm_num_groups': 0}, 'norm_num_groups=0'),
    'unet-zero-heads': ('unet', {'attention_head_dim': 0}, 'attention_head_dim=0'),
    'unet-negative-heads': ('unet', {'attention_head_dim': -8}, 'attention_head_dim=-8'),
    'unet-zero-heads-list': ('unet', {'attention_head_dim': [8, 0, 8]},
                             'attention_head_dim=[8, 0, 8]'),
    'vae-huge-channels': ('vae', {'block_out_channels': [10 ** 9] * 4},
                          'block_out_channels=[1000000000'),
    'unet-boolean-groups': ('unet', {'norm_num_groups': True}, 'norm_num_groups=True'),
    'vae-zero-latent-channels': ('vae', {'latent_channels': 0}, 'latent_channels=0'),
}


@pytest.mark.parametrize('name', sorted(HOSTILE))
def test_hostile_config_is_a_checkpoint_error_naming_the_file(tiny_model_dir, tmp_path, name):
    sub, change, words = HOSTILE[name]
    folder = shutil.copytree(tiny_model_dir, tmp_path / name)
    config_path = folder / sub / 'config.json'
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **change}))
    with pytest.raises(CheckpointError) as info:
        MetricGoldPipeline.from_pretrained(folder, device='cpu')
    message = str(info.value)
    assert str(config_path) in message and words in message, message
