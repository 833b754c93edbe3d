"""Relative (Marigold) mode against diffusers' real MarigoldDepthPipeline, and E2E-FT's one step.

A tiny Marigold-layout folder (what ``MarigoldDepthPipeline.save_pretrained`` writes, plus our
cached empty-text embedding) is loaded by diffusers and by us; both run at the same seed, steps
and processing resolution on the CPU in float32, and the depths (and uncertainties) must agree
to 1e-4. The cases hit every place the two used to differ: sizes floored vs rounded (1242x375),
an odd size, a processing resolution above the input's, the checkpoint's own (leading) spacing
and aligned ensembles.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from metricgold_ros.errors import InputError

TOLERANCE = 1e-4
CASES = [  # (height, width), processing resolution, steps, ensemble size, timestep spacing
    pytest.param((375, 1242), 128, 1, 1, 'trailing', id='1242x375-e1'),
    pytest.param((375, 1242), 128, 2, 3, 'trailing', id='1242x375-e3'),
    pytest.param((61, 97), 64, 2, 1, 'trailing', id='odd-e1'),
    pytest.param((61, 97), 64, 1, 3, 'trailing', id='odd-e3'),
    pytest.param((50, 70), 96, 1, 1, 'trailing', id='upscale-e1'),
    pytest.param((50, 70), 96, 1, 3, 'trailing', id='upscale-e3'),
    pytest.param((48, 64), 64, 2, 1, 'leading', id='leading-spacing-e1'),
    pytest.param((48, 64), 64, 2, 3, 'lcm', id='lcm-scheduler-e3'),  # adds noise between steps
]
SCHEDULERS = ('trailing', 'leading', 'lcm')


def _image(height, width, seed=0):
    """A smooth colour field plus noise: structure the tiny networks respond to."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    base = np.stack([np.sin(6 * xx), np.cos(4 * yy), np.sin(3 * (xx + yy))], axis=-1)
    return np.clip(127.5 + 90 * base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)


def write_marigold_folder(path: Path, spacing: str = 'trailing', steps=4, resolution=64) -> Path:
    """A tiny Marigold checkpoint as diffusers saves it, plus empty_text_embedding.safetensors.

    ``spacing``: DDIM's timestep spacing, or 'lcm' for an LCM scheduler (Marigold's LCM
    releases).
    """
    from diffusers import DDIMScheduler, LCMScheduler, MarigoldDepthPipeline
    from safetensors.torch import save_file

    from metricgold_ros.model.tiny import build_tiny_checkpoint, tiny_scheduler_config

    checkpoint = build_tiny_checkpoint(seed=1)
    if spacing == 'lcm':
        scheduler = LCMScheduler.from_config(tiny_scheduler_config())
    else:
        scheduler = DDIMScheduler(**{**tiny_scheduler_config(), 'timestep_spacing': spacing})
    MarigoldDepthPipeline(
        unet=checkpoint.unet, vae=checkpoint.vae, scheduler=scheduler, text_encoder=None,
        tokenizer=None, prediction_type='depth', scale_invariant=True, shift_invariant=True,
        default_denoising_steps=steps, default_processing_resolution=resolution,
    ).save_pretrained(path, safe_serialization=True)
    save_file({'embedding': checkpoint.empty_text_embedding.contiguous()},
              str(path / 'empty_text_embedding.safetensors'))
    return path


def load_reference(path: Path, ours):
    """diffusers' own loader and pipeline on ``path``, around our pipeline's UNet and VAE.

    The very same modules: diffusers' ensembling amplifies float round-off (its alignment
    takes finite-difference gradients of a float32 cost), so even diffusers against itself,
    with the same weights loaded at other addresses (oneDNN sums in another order), differs
    by ~3e-2 for 3 members. Everything else (scheduler, defaults) comes from diffusers' loader.
    """
    from diffusers import MarigoldDepthPipeline
    from safetensors.torch import load_file

    reference = MarigoldDepthPipeline.from_pretrained(
        path, unet=ours.unet, vae=ours.vae, text_encoder=None, tokenizer=None)
    reference.empty_text_embedding = load_file(
        str(path / 'empty_text_embedding.safetensors'))['embedding']
    reference.set_progress_bar_config(disable=True)
    return reference


def compare(ours, reference, rgb, resolution, steps, ensemble, seed=0):
    """Max |depth diff| and max |uncertainty diff| (None for one member), ours vs diffusers."""
    mine = ours(rgb, denoising_steps=steps, ensemble_size=ensemble,
                processing_resolution=resolution, seed=seed)
    theirs = reference(rgb, num_inference_steps=steps, ensemble_size=ensemble,
                       processing_resolution=resolution, output_uncertainty=ensemble > 1,
                       generator=torch.Generator().manual_seed(seed), output_type='np')
    expected = theirs.prediction[0, :, :, 0]
    assert mine.depth.shape == expected.shape
    depth_diff = float(np.abs(mine.depth - expected).max())
    if ensemble == 1:
        assert mine.uncertainty is None
        return depth_diff, None
    return depth_diff, float(np.abs(mine.uncertainty - theirs.uncertainty[0, :, :, 0]).max())


@pytest.fixture(scope='module')
def threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope='module')
def folders(tmp_path_factory, threads):
    root = tmp_path_factory.mktemp('marigold')
    return {spacing: write_marigold_folder(root / spacing, spacing) for spacing in SCHEDULERS}


@pytest.mark.parametrize('size, resolution, steps, ensemble, spacing', CASES)
def test_relative_mode_equals_diffusers_marigold(folders, size, resolution, steps, ensemble,
                                                 spacing):
    if ensemble > 1:
        pytest.importorskip('scipy', reason='diffusers aligns Marigold ensembles with scipy')
    from metricgold_ros.model import MetricGoldPipeline

    ours = MetricGoldPipeline.from_pretrained(folders[spacing], device='cpu')
    assert ours.relative and ours.dtype == torch.float32 and not ours.e2e_ft
    reference = load_reference(folders[spacing], ours)
    assert type(ours.scheduler) is type(reference.scheduler)
    assert dict(ours.scheduler.config) == dict(reference.scheduler.config)
    assert ours.scheduler.config.timestep_spacing == spacing or spacing == 'lcm'
    rgb = _image(*size)
    depth_diff, uncertainty_diff = compare(ours, reference, rgb, resolution, steps, ensemble)
    assert depth_diff <= TOLERANCE
    if ensemble > 1:
        assert uncertainty_diff <= TOLERANCE
    # Not vacuous: another seed moves the result by far more than the tolerance.
    other = ours(rgb, denoising_steps=steps, ensemble_size=ensemble,
                 processing_resolution=resolution, seed=1).depth
    assert np.abs(other - ours(rgb, denoising_steps=steps, ensemble_size=ensemble,
                               processing_resolution=resolution, seed=0).depth).max() > 1e-2


def test_missing_defaults_are_asked_for_not_guessed(tmp_path, threads):
    from metricgold_ros.model import MetricGoldPipeline

    folder = write_marigold_folder(tmp_path / 'm', steps=None, resolution=None)
    ours = MetricGoldPipeline.from_pretrained(folder, device='cpu')
    assert ours.metadata.default_denoising_steps is None
    rgb = _image(40, 48)
    with pytest.raises(InputError, match='denoising_steps=None .* pass denoising_steps'):
        ours(rgb, processing_resolution=48)
    with pytest.raises(InputError, match='processing_resolution=None'):
        ours(rgb, denoising_steps=1)
    assert ours(rgb, denoising_steps=1, processing_resolution=48).depth.shape == (40, 48)


# --- E2E-FT ------------------------------------------------------------------------------------

def _reference_single_step(checkpoint, rgb, resolution):
    """E2E-FT as published, written out: zero latent, t = T - 1, v -> x0, decode, mean, clip."""
    from diffusers import DDPMScheduler

    from metricgold_ros.model import image_ops
    from metricgold_ros.model.codec import decode_depth

    schedule = DDPMScheduler.from_config(checkpoint.scheduler.config)
    t = schedule.config.num_train_timesteps - 1
    alpha = schedule.alphas_cumprod[t]
    image, padding, size = image_ops.prepare_image(rgb, resolution, torch.device('cpu'),
                                                   torch.float32)
    scale = checkpoint.vae.config.scaling_factor
    with torch.no_grad():
        rgb_latent = checkpoint.vae.encode(image).latent_dist.mode() * scale
        x_t = torch.zeros_like(rgb_latent)
        v = checkpoint.unet(torch.cat([rgb_latent, x_t], 1), t,
                            encoder_hidden_states=checkpoint.empty_text_embedding).sample
        x0 = alpha.sqrt() * x_t - (1 - alpha).sqrt() * v
        value = checkpoint.vae.decode(x0 / scale).sample.mean(1, keepdim=True).clamp(-1, 1)
    value = image_ops.resize(image_ops.unpad(value, padding), size)[0, 0]
    meta = checkpoint.metadata
    return decode_depth(value, meta.d_min_m, meta.d_max_m).numpy()


@pytest.fixture
def e2e_model(tmp_path, threads):
    from metricgold_ros.model import build_tiny_checkpoint, save_checkpoint

    path = save_checkpoint(tmp_path / 'e2e', build_tiny_checkpoint(seed=2))
    meta_path = path / 'metricgold.json'
    meta = json.loads(meta_path.read_text())
    assert meta.get('e2e_ft', False) is False  # written only when true
    meta['e2e_ft'] = True
    meta_path.write_text(json.dumps(meta))
    return path


def test_e2e_ft_is_one_deterministic_x0_step(e2e_model):
    from metricgold_ros.model import MetricGoldPipeline, load_checkpoint

    ours = MetricGoldPipeline.from_pretrained(e2e_model, device='cpu', dtype='auto')
    assert ours.e2e_ft and ours.dtype == torch.float32
    rgb = _image(45, 61)
    calls = []
    hook = ours.unet.register_forward_hook(lambda module, args, out: calls.append(args[1]))
    try:
        first = ours(rgb, processing_resolution=64, seed=0)
        second = ours(rgb, processing_resolution=64, seed=123)
    finally:
        hook.remove()
    assert [int(t) for t in calls] == [999, 999]  # one UNet call per frame, at t = T - 1
    np.testing.assert_array_equal(first.depth, second.depth)  # no noise anywhere
    expected = _reference_single_step(load_checkpoint(e2e_model), rgb, 64)
    np.testing.assert_allclose(np.log(first.depth), np.log(expected), atol=1e-4)
    members = ours(rgb, processing_resolution=64, ensemble_size=3)
    np.testing.assert_array_equal(members.depth, first.depth)
    assert members.uncertainty.shape == first.depth.shape and not members.uncertainty.any()
    with pytest.raises(InputError, match='E2E-FT model, trained for exactly one step'):
        ours(rgb, denoising_steps=2)


def test_e2e_ft_differs_from_sampling_and_is_recognised_in_published_layouts(e2e_model):
    from metricgold_ros.model import MetricGoldPipeline, load_checkpoint

    rgb = _image(40, 40)
    single = MetricGoldPipeline.from_pretrained(e2e_model, device='cpu')(
        rgb, processing_resolution=40).depth
    meta_path = e2e_model / 'metricgold.json'
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, 'e2e_ft': False}))
    sampled = MetricGoldPipeline.from_pretrained(e2e_model, device='cpu')(
        rgb, processing_resolution=40, denoising_steps=1).depth
    assert np.abs(np.log(single) - np.log(sampled)).max() > 1e-2
    # A relative E2E-FT folder as its training script saves it: no metricgold.json, a
    # StableDiffusionPipeline model_index and a DDPMScheduler.
    meta_path.unlink()
    index_path = e2e_model / 'model_index.json'
    index = json.loads(index_path.read_text())
    index.update(_class_name='StableDiffusionPipeline', default_denoising_steps=None,
                 scale_invariant=True, shift_invariant=True)
    index_path.write_text(json.dumps(index))
    config_path = e2e_model / 'scheduler' / 'scheduler_config.json'
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, '_class_name': 'DDPMScheduler'}))
    meta = load_checkpoint(e2e_model).metadata
    assert meta.relative and meta.e2e_ft and meta.default_denoising_steps == 1
    relative = MetricGoldPipeline.from_pretrained(e2e_model, device='cpu')(
        rgb, processing_resolution=40).depth
    decoded = (np.log(single / 0.5) / np.log(80.0 / 0.5))  # the same x0, as [0, 1]
    assert np.abs(relative - decoded).max() < 1e-4


def test_e2e_ft_flag_must_be_a_boolean(e2e_model):
    from metricgold_ros.errors import CheckpointError
    from metricgold_ros.model import load_checkpoint

    meta_path = e2e_model / 'metricgold.json'
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), 'e2e_ft': 'yes'}))
    with pytest.raises(CheckpointError, match='e2e_ft'):
        load_checkpoint(e2e_model)


def test_predict_x0_single_step_keeps_gradients_for_training():
    from diffusers import DDIMScheduler

    from metricgold_ros.model.single_step import predict_x0_single_step, x0_from_model_output
    from metricgold_ros.model.tiny import build_tiny_checkpoint, tiny_scheduler_config

    checkpoint = build_tiny_checkpoint(seed=3)
    unet = checkpoint.unet.train().requires_grad_(True)
    scheduler = DDIMScheduler(**tiny_scheduler_config())
    rgb_latent = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    x0 = predict_x0_single_step(unet, scheduler, rgb_latent, checkpoint.empty_text_embedding)
    assert x0.shape == (2, 4, 8, 8)
    x0.square().mean().backward()
    assert unet.conv_in.weight.grad is not None and unet.conv_in.weight.grad.abs().sum() > 0
    # epsilon and sample parameterisations, from the definitions.
    out, x_t = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    alpha = scheduler.alphas_cumprod[500]
    eps = DDIMScheduler(**{**tiny_scheduler_config(), 'prediction_type': 'epsilon'})
    np.testing.assert_allclose(x0_from_model_output(eps, out, x_t, 500),
                               (x_t - (1 - alpha).sqrt() * out) / alpha.sqrt(), rtol=1e-6)
    sample = DDIMScheduler(**{**tiny_scheduler_config(), 'prediction_type': 'sample'})
    assert x0_from_model_output(sample, out, x_t, 500) is out
