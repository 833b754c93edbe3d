"""Checkpoint I/O: round trip, relative Marigold folders, and a specific error per corruption."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from metricgold_ros.errors import CheckpointError
from metricgold_ros.model import (
    MetricGoldPipeline, build_tiny_checkpoint, load_checkpoint, save_checkpoint)

RGB = (np.random.default_rng(1).random((40, 56, 3)) * 255).astype(np.uint8)


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    path = tmp_path / 'model'
    shutil.copytree(tiny_model_dir, path)
    return path


def test_save_load_gives_identical_predictions(tmp_path):
    checkpoint = build_tiny_checkpoint(seed=3, processing_resolution=64)
    before = MetricGoldPipeline(checkpoint)(RGB, seed=5).depth
    save_checkpoint(tmp_path / 'm', checkpoint)
    loaded = load_checkpoint(tmp_path / 'm')
    assert loaded.metadata == checkpoint.metadata
    after = MetricGoldPipeline(loaded)(RGB, seed=5).depth
    np.testing.assert_array_equal(before, after)


def test_save_refuses_to_overwrite(tiny_model_dir):
    with pytest.raises(CheckpointError, match='already exists'):
        save_checkpoint(tiny_model_dir, build_tiny_checkpoint())


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match='does not exist.*init-model'):
        load_checkpoint(tmp_path / 'nope')


@pytest.mark.parametrize('sub', ['unet', 'vae'])
def test_missing_sub_model(model_copy, sub):
    shutil.rmtree(model_copy / sub)
    with pytest.raises(CheckpointError, match=f'{sub} is missing'):
        load_checkpoint(model_copy)


def test_missing_scheduler(model_copy):
    shutil.rmtree(model_copy / 'scheduler')
    with pytest.raises(CheckpointError, match='scheduler_config.json is missing'):
        load_checkpoint(model_copy)


def test_four_channel_conv_in_is_named(model_copy):
    config_path = model_copy / 'unet' / 'config.json'
    config = json.loads(config_path.read_text())
    config['in_channels'] = 4
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r'config.json: conv_in has 4 input channels, '
                                              r'expected 8'):
        load_checkpoint(model_copy)


def test_weights_of_another_shape(model_copy):
    config_path = model_copy / 'unet' / 'config.json'
    config = json.loads(config_path.read_text())
    config['block_out_channels'] = [32, 64, 128]
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r'weights in .*unet do not match .*config.json'):
        load_checkpoint(model_copy)


@pytest.mark.parametrize('content,match', [
    ('{"d_min": 10, "d_max": 1}', 'not a valid depth range'),
    ('{"d_min": -1, "d_max": 1}', 'not a valid depth range'),
    ('{"d_max": 1}', "missing field 'd_min'"),
    ('{"d_min": "a", "d_max": 1}', 'bad or missing field'),
    ('{"d_min": 1, "d_max": 5, "default_denoising_steps": 0}', 'default_denoising_steps'),
    ('not json', 'not valid JSON'),
    ('[1, 2]', 'must hold a JSON object'),
])
def test_bad_metadata(model_copy, content, match):
    (model_copy / 'metricgold.json').write_text(content)
    with pytest.raises(CheckpointError, match=match) as info:
        load_checkpoint(model_copy)
    assert 'metricgold.json' in str(info.value)


def test_truncated_safetensors(model_copy):
    weights = model_copy / 'vae' / 'diffusion_pytorch_model.safetensors'
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match='diffusion_pytorch_model.safetensors is not a '
                                              'readable safetensors file'):
        load_checkpoint(model_copy)


def test_pickle_disguised_as_safetensors_is_not_executed(model_copy, tmp_path):
    marker = tmp_path / 'executed'

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), 'w'))

    weights = model_copy / 'unet' / 'diffusion_pytorch_model.safetensors'
    torch.save({'x': Payload()}, weights)
    with pytest.raises(CheckpointError, match='pickled data under a .safetensors name'):
        load_checkpoint(model_copy)
    assert not marker.exists()


def test_pickled_weights_are_refused_unless_allowed(model_copy):
    unet_dir = model_copy / 'unet'
    state = load_checkpoint(model_copy).unet.state_dict()
    (unet_dir / 'diffusion_pytorch_model.safetensors').unlink()
    torch.save(state, unet_dir / 'diffusion_pytorch_model.bin')
    with pytest.raises(CheckpointError, match='pickled weight file.*--allow-pickle'):
        load_checkpoint(model_copy)
    loaded = load_checkpoint(model_copy, allow_pickle=True)
    assert torch.equal(loaded.unet.conv_in.weight, state['conv_in.weight'])


def test_missing_embedding_without_text_encoder(model_copy):
    (model_copy / 'empty_text_embedding.safetensors').unlink()
    with pytest.raises(CheckpointError, match='empty_text_embedding.safetensors is missing'):
        load_checkpoint(model_copy)


def test_embedding_of_the_wrong_width(model_copy):
    save_file({'embedding': torch.zeros(1, 2, 7)},
              str(model_copy / 'empty_text_embedding.safetensors'))
    with pytest.raises(CheckpointError, match=r'\[1, T, 64\]'):
        load_checkpoint(model_copy)


def _write_tiny_text_encoder(path):
    """A real CLIP text encoder + tokenizer, tiny, with a hand-written vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer_dir = path / 'tokenizer'
    tokenizer_dir.mkdir()
    vocab = {'<|startoftext|>': 0, '<|endoftext|>': 1, 'a</w>': 2, 'b</w>': 3}
    (tokenizer_dir / 'vocab.json').write_text(json.dumps(vocab))
    (tokenizer_dir / 'merges.txt').write_text('#version: 0.2\n')
    CLIPTokenizer(str(tokenizer_dir / 'vocab.json'), str(tokenizer_dir / 'merges.txt')
                  ).save_pretrained(str(tokenizer_dir))
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=4, hidden_size=64, intermediate_size=64,
                            num_hidden_layers=1, num_attention_heads=2, bos_token_id=0,
                            eos_token_id=1, pad_token_id=1, max_position_embeddings=8)
    CLIPTextModel(config).save_pretrained(str(path / 'text_encoder'), safe_serialization=True)


def test_embedding_is_computed_from_the_text_encoder_and_cached(model_copy):
    pytest.importorskip('transformers')
    (model_copy / 'empty_text_embedding.safetensors').unlink()
    _write_tiny_text_encoder(model_copy)
    computed = load_checkpoint(model_copy).empty_text_embedding
    assert computed.shape == (1, 2, 64)
    assert not (model_copy / 'empty_text_embedding.safetensors').exists()
    load_checkpoint(model_copy, cache_embedding=True)
    assert (model_copy / 'empty_text_embedding.safetensors').exists()
    shutil.rmtree(model_copy / 'text_encoder')
    assert torch.equal(load_checkpoint(model_copy).empty_text_embedding, computed)


def test_marigold_folder_loads_in_relative_mode(model_copy):
    (model_copy / 'metricgold.json').unlink()
    index_path = model_copy / 'model_index.json'
    index = json.loads(index_path.read_text())
    index.update(scale_invariant=True, shift_invariant=True, default_denoising_steps=4,
                 default_processing_resolution=64)
    index_path.write_text(json.dumps(index))
    pipeline = MetricGoldPipeline.from_pretrained(model_copy, device='cpu')
    assert pipeline.relative and pipeline.metadata.default_denoising_steps == 4
    result = pipeline(RGB)
    assert result.relative and 0.0 <= result.depth.min() and result.depth.max() <= 1.0
    with pytest.raises(Exception, match='relative depth'):
        result.depth_m  # noqa: B018 - the property refuses


def test_metric_model_without_metadata_is_refused(model_copy):
    (model_copy / 'metricgold.json').unlink()
    index_path = model_copy / 'model_index.json'
    index = json.loads(index_path.read_text())
    index.update(scale_invariant=False, shift_invariant=False)
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match='depth range is unknown'):
        load_checkpoint(model_copy)
