"""A light decoder (AutoencoderTiny / TAESD, or a second AutoencoderKL) for the decode stage:
encoding stays with the model's VAE, the decode stage uses it, it loads from a folder or a hub
id, and a smaller one makes the decode stage faster."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from hub_helpers import hub_env, write_hub_cache
from metricgold_ros.errors import CheckpointError
from metricgold_ros.model import MetricGoldPipeline, build_tiny_checkpoint, save_checkpoint
from metricgold_ros.model_paths import bundled_model_path, load_model
from metricgold_ros.tools.cli import main

RGB = np.random.default_rng(2).integers(0, 255, (48, 64, 3), dtype=np.uint8)
LIGHT_DECODER = bundled_model_path().parent / 'metricgold-tiny-taesd' \
    if bundled_model_path() is not None else None


def tiny_taesd(**sizes):
    """A randomly initialised AutoencoderTiny in the UNet's latent space (scaling factor 1)."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(5)
    config = dict(encoder_block_out_channels=(16,) * 4, decoder_block_out_channels=(16,) * 4,
                  num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1))
    config.update(sizes)
    return AutoencoderTiny(**config).eval()


@pytest.fixture(scope='module')
def taesd_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp('taesd') / 'taesd'
    tiny_taesd().save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_light_decoder_replaces_only_the_decode_stage(tiny_model_dir, taesd_dir):
    full = MetricGoldPipeline.from_pretrained(tiny_model_dir, device='cpu')
    light = MetricGoldPipeline.from_pretrained(tiny_model_dir, device='cpu', decoder=taesd_dir)
    assert type(light.decoder).__name__ == 'AutoencoderTiny' and full.decoder is None
    ours, theirs = light(RGB), full(RGB)
    torch.testing.assert_close(ours.rgb_latent, theirs.rgb_latent, rtol=0, atol=0)
    torch.testing.assert_close(ours.depth_latent, theirs.depth_latent, rtol=0, atol=0)
    assert np.abs(np.log(ours.depth) - np.log(theirs.depth)).max() > 1e-3
    # The decode stage is the tiny autoencoder's decoder on the UNet's latents (scale 1).
    with torch.no_grad():
        expected = light.decoder.decode(ours.depth_latent).sample.mean(1, keepdim=True)
    torch.testing.assert_close(light._decode(ours.depth_latent), expected.clamp(-1, 1))


def test_a_whole_checkpoint_as_decoder_uses_its_vae(tiny_model_dir):
    full = MetricGoldPipeline.from_pretrained(tiny_model_dir, device='cpu')
    same = MetricGoldPipeline.from_pretrained(tiny_model_dir, device='cpu',
                                              decoder=tiny_model_dir)
    assert type(same.decoder).__name__ == 'AutoencoderKL'
    np.testing.assert_array_equal(same(RGB).depth, full(RGB).depth)


def test_decoder_by_hub_id_through_the_node_api(tiny_model_dir, taesd_dir, tmp_path,
                                               monkeypatch):
    hub = hub_env(monkeypatch, tmp_path / 'hf')
    write_hub_cache(hub, 'madebyollin/taesd-test', taesd_dir)
    notes = []
    pipeline = load_model(str(tiny_model_dir), 'model_path', device='cpu',
                          decoder='madebyollin/taesd-test', notify=notes.append)
    by_folder = MetricGoldPipeline.from_pretrained(tiny_model_dir, device='cpu',
                                                   decoder=taesd_dir)
    np.testing.assert_array_equal(pipeline(RGB).depth, by_folder(RGB).depth)
    assert any(n.startswith("decoder='madebyollin/taesd-test'") for n in notes), notes
    with pytest.raises(CheckpointError, match="decoder='org/absent': not in the Hugging Face "
                       'cache'):
        load_model(str(tiny_model_dir), 'model_path', device='cpu', decoder='org/absent',
                   notify=notes.append)


def test_decoders_that_do_not_fit_are_refused(tiny_model_dir, tmp_path):
    wrong = tmp_path / 'wrong'
    tiny_taesd(latent_channels=8).save_pretrained(wrong, safe_serialization=True)
    with pytest.raises(CheckpointError, match=r'decoder .*wrong/config.json: latent_channels=8, '
                       "but the model's latents have 4 channels"):
        MetricGoldPipeline.from_pretrained(tiny_model_dir, device='cpu', decoder=wrong)
    unet = shutil.copytree(tiny_model_dir / 'unet', tmp_path / 'unet')
    with pytest.raises(CheckpointError, match="_class_name='UNet2DConditionModel'; a decoder "
                       'is one of AutoencoderTiny, AutoencoderKL'):
        MetricGoldPipeline.from_pretrained(tiny_model_dir, device='cpu', decoder=unet)
    with pytest.raises(CheckpointError, match=r'--decoder /no/such/taesd: no such folder'):
        load_model(str(tiny_model_dir), '--model', device='cpu', decoder='/no/such/taesd')


def test_a_light_decoder_makes_the_decode_stage_faster(tmp_path, taesd_dir):
    """A model whose VAE is heavier than the tiny one (SD's layout at a quarter of its width):
    the decode stage with the light decoder takes a fraction of the VAE's time."""
    from diffusers import AutoencoderKL

    from metricgold_ros.model.tiny import tiny_vae_config

    torch.manual_seed(0)
    vae = AutoencoderKL(**{**tiny_vae_config(), 'block_out_channels': (32, 64, 128, 128),
                           'layers_per_block': 2, 'norm_num_groups': 32})
    model = save_checkpoint(tmp_path / 'heavy', build_tiny_checkpoint(vae=vae))
    times = {}
    for name, decoder in (('full', None), ('light', taesd_dir)):
        pipeline = MetricGoldPipeline.from_pretrained(model, device='cpu', decoder=decoder)
        runs = [pipeline(RGB, processing_resolution=256).timings_s['vae_decode']
                for _ in range(3)]
        times[name] = min(runs)
    assert times['light'] < 0.5 * times['full'], times


def test_infer_with_decoder_flag(tiny_model_dir, taesd_dir, tmp_path, capsys):
    Image.fromarray(RGB).save(tmp_path / 'frame.png')
    for name, extra in (('full', []), ('light', ['--decoder', str(taesd_dir)])):
        code = main(['infer', str(tmp_path / 'frame.png'), '--out', str(tmp_path / name),
                     '--model', str(tiny_model_dir), '--device', 'cpu', '--quiet',
                     '--no-colored', '--no-points', *extra])
        assert code == 0, capsys.readouterr().err
    full = np.load(tmp_path / 'full' / 'frame_depth.npy')
    light = np.load(tmp_path / 'light' / 'frame_depth.npy')
    assert full.shape == light.shape and np.abs(np.log(full) - np.log(light)).max() > 1e-3


@pytest.mark.skipif(LIGHT_DECODER is None or not (LIGHT_DECODER / 'config.json').is_file(),
                    reason='the bundled light decoder metricgold-tiny-taesd is not installed')
def test_bundled_light_decoder_follows_the_full_decoder():
    """metricgold-tiny-taesd (training/distill_decoder.py) on held-out scenes: its depth stays
    close to the full decoder's (BENCHMARKS.md scores both against ground truth)."""
    from metricgold_ros.synthetic.scenes import render_sample

    full = load_model(None, '--model', device='cpu', notify=lambda line: None)
    light = load_model(None, '--model', device='cpu', decoder=str(LIGHT_DECODER),
                       notify=lambda line: None)
    errors = []
    for seed, kind in ((900_000, 'indoor'), (900_001, 'outdoor')):
        rgb = render_sample(seed, kind, 128, 96).rgb
        errors.append(np.median(np.abs(np.log(light(rgb).depth) - np.log(full(rgb).depth))))
    assert max(errors) < 0.1, errors


def test_distill_recipe_writes_a_decoder_the_pipeline_loads(tiny_model_dir, tmp_path):
    """training/distill_decoder.py end to end at toy size: the folder it writes is a decoder
    for its teacher, its losses are recorded, and a typo in the config is named."""
    import json
    import sys

    from metricgold_ros.errors import InputError
    from conftest import REPO_ROOT

    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from training import distill_decoder

    config_path = tmp_path / 'distill.yaml'
    config_path.write_text(
        f'teacher: {tiny_model_dir}\n'
        'student: {decoder_block_out_channels: [8, 8, 8, 8], num_decoder_blocks: [1, 1, 1, 1],'
        ' encoder_block_out_channels: [8, 8, 8, 8], num_encoder_blocks: [1, 1, 1, 1]}\n'
        'data: {per_kind: 1, val_per_kind: 1, width: 64, height: 48}\n'
        'train: {steps: 4, batch_size: 2, log_every: 2}\n')
    assert distill_decoder.main(['--config', str(config_path), '--output',
                                 str(tmp_path / 'out')]) == 0
    summary = json.loads((tmp_path / 'out' / 'distill.json').read_text())
    assert [entry['step'] for entry in summary['history']] == [0, 2, 3]
    pipeline = MetricGoldPipeline.from_pretrained(tiny_model_dir, device='cpu',
                                                  decoder=tmp_path / 'out')
    assert type(pipeline.decoder).__name__ == 'AutoencoderTiny'
    assert np.isfinite(pipeline(RGB).depth).all()
    config_path.write_text(f'teacher: {tiny_model_dir}\ntrain: {{stesp: 4}}\n')
    with pytest.raises(InputError, match="train: unknown key 'stesp'"):
        distill_decoder.load_config(config_path)
