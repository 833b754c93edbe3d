"""MetricGoldPipeline on a tiny real model: shapes, ranges, determinism, ensembling, steps."""

import numpy as np
import pytest
import torch

from metricgold_ros.errors import InputError


def _image(height, width, channels=3, seed=0):
    shape = (height, width) if channels == 1 else (height, width, channels)
    return (np.random.default_rng(seed).random(shape) * 255).astype(np.uint8)


@pytest.mark.parametrize('shape', [(479, 641, 3), (100, 1000, 3), (37, 23, 3), (64, 48, 1),
                                   (50, 70, 4)])
def test_output_matches_input_size_and_range(tiny_pipeline, shape):
    height, width, channels = shape
    result = tiny_pipeline(_image(height, width, channels), processing_resolution=64)
    meta = tiny_pipeline.metadata
    assert result.depth.shape == (height, width) and result.depth.dtype == np.float32
    assert np.isfinite(result.depth).all()
    assert result.depth.min() >= meta.d_min_m * (1 - 1e-6)
    assert result.depth.max() <= meta.d_max_m * (1 + 1e-6)
    assert result.uncertainty is None and not result.relative
    assert result.rgb_latent.shape[1] == 4 and result.depth_latent.shape[0] == 1


def test_same_seed_same_output_other_seed_differs(tiny_pipeline):
    rgb = _image(60, 80)
    first = tiny_pipeline(rgb, seed=1, denoising_steps=2).depth
    again = tiny_pipeline(rgb, seed=1, denoising_steps=2).depth
    other = tiny_pipeline(rgb, seed=2, denoising_steps=2).depth
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-4


def test_ensemble_is_the_log_space_median_of_its_members(tiny_pipeline):
    from metricgold_ros.model.codec import decode_depth

    rgb = _image(64, 64)  # processed at 64: no resize, so members compare pixel by pixel
    result = tiny_pipeline(rgb, ensemble_size=3, seed=0, processing_resolution=64)
    assert result.uncertainty.shape == (64, 64) and (result.uncertainty >= 0).all()
    assert result.uncertainty.max() > 0 and result.depth_latent.shape[0] == 3
    with torch.no_grad():
        decoded = tiny_pipeline.vae.decode(result.depth_latent / tiny_pipeline.latent_scale)[0]
    meta = tiny_pipeline.metadata
    members_m = decode_depth(decoded.mean(dim=1).clamp(-1, 1), meta.d_min_m, meta.d_max_m)
    log_median = torch.log(members_m).median(dim=0).values
    np.testing.assert_allclose(np.log(result.depth), log_median.numpy(), atol=1e-5)
    log_std = torch.log(members_m).std(dim=0).numpy()
    np.testing.assert_allclose(result.uncertainty, result.depth * log_std, rtol=1e-3, atol=1e-5)


def test_one_trailing_step_calls_the_unet_once_per_member(tiny_pipeline):
    calls = []
    handle = tiny_pipeline.unet.register_forward_hook(
        lambda module, args, output: calls.append(args[0].shape[0]))
    try:
        tiny_pipeline(_image(40, 40), denoising_steps=1, ensemble_size=3)
        one_step = list(calls)
        calls.clear()
        tiny_pipeline(_image(40, 40), denoising_steps=4, ensemble_size=1)
    finally:
        handle.remove()
    assert one_step == [3]  # one call, batch of 3 members
    assert calls == [1, 1, 1, 1]
    assert int(tiny_pipeline.scheduler.timesteps[0]) == 999  # trailing spacing starts at T


def test_warm_start_uses_the_previous_latent(tiny_pipeline):
    rgb = _image(48, 64)
    cold = tiny_pipeline(rgb, denoising_steps=4, seed=0)
    warm = tiny_pipeline(rgb, denoising_steps=4, seed=0, init_latent=cold.depth_latent,
                         warm_start_strength=0.5)
    assert warm.depth.shape == cold.depth.shape
    assert not np.array_equal(warm.depth, cold.depth)
    # A latent of another shape (camera changed resolution) falls back to a cold start.
    other = tiny_pipeline(rgb, denoising_steps=4, seed=0,
                          init_latent=torch.zeros(1, 4, 3, 3))
    np.testing.assert_array_equal(other.depth, cold.depth)


def test_output_size_and_timings(tiny_pipeline):
    result = tiny_pipeline(_image(120, 160), output_size=(60, 80))
    assert result.depth.shape == (60, 80)
    assert {'preprocess', 'vae_encode', 'unet', 'vae_decode', 'postprocess'} <= set(
        result.timings_s)


@pytest.mark.parametrize('kwargs,match', [
    ({'denoising_steps': 0}, 'denoising_steps=0'),
    ({'ensemble_size': 0}, 'ensemble_size=0'),
    ({'processing_resolution': 5}, 'processing_resolution=5'),
    ({'warm_start_strength': 0.0}, 'warm_start_strength'),
])
def test_bad_arguments_are_named(tiny_pipeline, kwargs, match):
    with pytest.raises(InputError, match=match):
        tiny_pipeline(_image(16, 16), **kwargs)


@pytest.mark.parametrize('image,match', [
    (np.zeros((10, 10, 3), np.float32), 'dtype is float32'),
    (np.zeros((10, 10, 2), np.uint8), 'shape'),
    (np.zeros((0, 10, 3), np.uint8), 'shape'),
    ([[1, 2]], 'numpy array'),
])
def test_bad_images_are_refused(tiny_pipeline, image, match):
    with pytest.raises(InputError, match=match):
        tiny_pipeline(image)


def test_bfloat16_runs_on_cpu(tiny_model_dir):
    from metricgold_ros.model import MetricGoldPipeline

    pipeline = MetricGoldPipeline.from_pretrained(tiny_model_dir, device='cpu', dtype='bfloat16')
    result = pipeline(_image(40, 56))
    assert result.depth.dtype == np.float32 and np.isfinite(result.depth).all()
    assert next(pipeline.unet.parameters()).dtype == torch.bfloat16


def test_a_batch_gives_each_image_what_it_gets_alone(tiny_pipeline):
    """Several cameras in one pass: same size, same warm state -> one UNet batch of N*E; each
    image keeps its own seed and warm start; another size runs in its own pass."""
    images = [_image(60, 80, seed=1), _image(60, 80, seed=2), _image(48, 48, seed=3)]
    seeds = [5, 6, 7]
    alone = [tiny_pipeline(rgb, seed=seed, denoising_steps=2, ensemble_size=2,
                           processing_resolution=64) for rgb, seed in zip(images, seeds)]
    calls = []
    handle = tiny_pipeline.unet.register_forward_hook(
        lambda module, args, output: calls.append(args[0].shape[0]))
    try:
        batched = tiny_pipeline.predict_batch(images, seeds=seeds, denoising_steps=2,
                                              ensemble_size=2, processing_resolution=64)
    finally:
        handle.remove()
    assert calls == [4, 4, 2, 2]  # 2 steps of the two 60x80 images (2 members each), then 48x48
    for one, many in zip(alone, batched):
        assert many.depth.shape == one.depth.shape
        np.testing.assert_allclose(many.depth, one.depth, rtol=1e-4)
        np.testing.assert_allclose(many.uncertainty, one.uncertainty, rtol=1e-3, atol=1e-5)
        assert many.depth_latent.shape == one.depth_latent.shape
    assert np.abs(batched[0].depth - batched[1].depth).max() > 1e-3  # not one image repeated
    # Warm-started and cold images of one size run apart (their schedules differ).
    warm = tiny_pipeline.predict_batch(images[:2], seeds=seeds[:2], denoising_steps=2,
                                       processing_resolution=64,
                                       init_latents=[alone[0].depth_latent[:1], None])
    cold = tiny_pipeline(images[1], seed=seeds[1], denoising_steps=2, processing_resolution=64)
    np.testing.assert_allclose(warm[1].depth, cold.depth, rtol=1e-4)


def test_a_batch_needs_one_value_per_image(tiny_pipeline):
    with pytest.raises(InputError, match='seeds: 1 values for 2 images'):
        tiny_pipeline.predict_batch([_image(8, 8), _image(8, 8)], seeds=[0])


def test_large_ensembles_run_in_chunks_with_the_same_result(tiny_pipeline):
    """max_batch_latents bounds the latents per UNet/decoder call (memory); the depth is the
    same as in one call, to round-off."""
    rgb = _image(48, 64)
    calls = []
    handle = tiny_pipeline.unet.register_forward_hook(
        lambda module, args, output: calls.append(args[0].shape[0]))
    try:
        whole = tiny_pipeline(rgb, ensemble_size=5, denoising_steps=1, processing_resolution=64)
        assert calls == [5]
        calls.clear()
        tiny_pipeline.max_batch_latents = 2
        chunked = tiny_pipeline(rgb, ensemble_size=5, denoising_steps=1,
                                processing_resolution=64)
    finally:
        tiny_pipeline.max_batch_latents = 8
        handle.remove()
    assert calls == [2, 2, 1]
    np.testing.assert_allclose(chunked.depth, whole.depth, rtol=1e-4)
    np.testing.assert_allclose(chunked.uncertainty, whole.uncertainty, rtol=1e-3, atol=1e-5)
