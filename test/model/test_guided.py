"""Edge refinement (the guided filter): its algebra against a direct implementation, its
checkpoint field, and what it does to the pipeline's depth and to depth boundaries."""

import dataclasses
import json
import shutil

import numpy as np
import pytest

from metricgold_ros.errors import CheckpointError
from metricgold_ros.model import MetricGoldPipeline, load_checkpoint, save_checkpoint
from metricgold_ros.model.guided import grey_guide, guided_filter

RNG = np.random.default_rng(5)


def direct_guided_filter(guide, source, radius, eps):
    """He et al.'s Algorithm 1 with each window summed pixel by pixel (mirrored border)."""
    def mean(x):
        padded = np.pad(x.astype(np.float64), radius, mode='reflect')
        out = np.zeros_like(x, np.float64)
        for dy in range(2 * radius + 1):
            for dx in range(2 * radius + 1):
                out += padded[dy:dy + x.shape[0], dx:dx + x.shape[1]]
        return out / (2 * radius + 1) ** 2

    mean_i, mean_p = mean(guide), mean(source)
    a = (mean(guide * source) - mean_i * mean_p) / (mean(guide * guide) - mean_i ** 2 + eps)
    b = mean_p - a * mean_i
    return mean(a) * guide + mean(b)


@pytest.mark.parametrize('radius,eps', [(1, 1e-3), (3, 3e-4), (6, 1e-2)])
def test_matches_a_direct_implementation(radius, eps):
    guide = RNG.random((23, 31)).astype(np.float32)
    source = RNG.standard_normal((23, 31)).astype(np.float32)
    np.testing.assert_allclose(guided_filter(guide, source, radius, eps),
                               direct_guided_filter(guide, source, radius, eps), atol=2e-5)


def test_constant_stays_constant_and_a_ramp_steps_at_the_image_edge():
    guide = np.zeros((40, 60), np.float32)
    guide[:, 30:] = 1.0  # the image: a dark and a bright half
    np.testing.assert_allclose(guided_filter(guide, np.full((40, 60), 0.3), 8, 1e-3), 0.3,
                               atol=1e-6)
    # The model's depth: the same two planes, blurred into a ramp 16 px wide.
    ramp = np.clip((np.arange(60) - 22) / 16.0, 0.0, 1.0)[None].repeat(40, 0)
    refined = guided_filter(guide, ramp, 8, 1e-3)
    step = np.abs(np.diff(refined[20]))
    steepest_before = np.abs(np.diff(ramp[20])).max()  # 1/16 a pixel
    assert step.argmax() == 29 and step[29] > 6 * steepest_before
    assert np.abs(refined[:, :22]).max() < 0.2 and np.abs(refined[:, 38:] - 1).max() < 0.2


def test_texture_below_eps_is_smoothed_over():
    guide = 0.5 + 0.005 * RNG.standard_normal((40, 40)).astype(np.float32)  # faint texture
    noisy = 0.1 * RNG.standard_normal((40, 40)).astype(np.float32)
    refined = guided_filter(guide, noisy, 4, 1e-2)
    assert refined.std() < 0.3 * noisy.std()


def test_radius_zero_and_shapes():
    source = RNG.random((8, 8)).astype(np.float32)
    np.testing.assert_array_equal(guided_filter(source, source, 0, 1e-3), source)
    assert guided_filter(source, source, 100, 1e-3).shape == (8, 8)  # clipped radius
    with pytest.raises(ValueError, match='guide shape'):
        guided_filter(np.zeros((8, 9)), source, 2, 1e-3)


def test_grey_guide_of_rgb_grey_and_rgba():
    rgb = (RNG.random((30, 40, 3)) * 255).astype(np.uint8)
    grey = grey_guide(rgb, (30, 40))
    expected = (rgb.astype(np.float64) @ [0.299, 0.587, 0.114]) / 255
    np.testing.assert_allclose(grey, expected, atol=1.5 / 255)
    rgba = np.concatenate([rgb, np.full((30, 40, 1), 7, np.uint8)], axis=2)
    np.testing.assert_array_equal(grey_guide(rgba, (30, 40)), grey)
    assert grey_guide(rgb[..., 0], (15, 20)).shape == (15, 20)


@pytest.fixture
def refined_model(tiny_model_dir, tmp_path):
    """The tiny test checkpoint saved again with an edge refinement in its metadata."""
    checkpoint = load_checkpoint(tiny_model_dir)
    checkpoint.metadata = dataclasses.replace(checkpoint.metadata, edge_refine_radius_px=3,
                                              edge_refine_eps=2e-3)
    return save_checkpoint(tmp_path / 'refined', checkpoint)


def test_metadata_round_trip(refined_model, tiny_model_dir):
    saved = json.loads((refined_model / 'metricgold.json').read_text())
    assert (saved['edge_refine_radius_px'], saved['edge_refine_eps']) == (3, 2e-3)
    meta = load_checkpoint(refined_model).metadata
    assert (meta.edge_refine_radius_px, meta.edge_refine_eps) == (3, 2e-3)
    # A checkpoint without one writes neither key (older readers never see them).
    plain = json.loads((tiny_model_dir / 'metricgold.json').read_text())
    assert 'edge_refine_radius_px' not in plain and 'edge_refine_eps' not in plain


@pytest.mark.parametrize('fields,match', [
    ({'edge_refine_radius_px': -1}, 'edge_refine_radius_px'),
    ({'edge_refine_radius_px': 2.5}, 'edge_refine_radius_px'),
    ({'edge_refine_radius_px': '3'}, 'edge_refine_radius_px'),
    ({'edge_refine_radius_px': True}, 'edge_refine_radius_px'),
    ({'edge_refine_radius_px': 65}, 'edge_refine_radius_px'),
    ({'edge_refine_radius_px': 3, 'edge_refine_eps': 0}, 'edge_refine_eps'),
    ({'edge_refine_radius_px': 3, 'edge_refine_eps': 'x'}, 'bad or missing field'),
])
def test_bad_edge_refine_metadata(refined_model, tmp_path, fields, match):
    model = tmp_path / 'bad'
    shutil.copytree(refined_model, model)
    meta = json.loads((model / 'metricgold.json').read_text())
    (model / 'metricgold.json').write_text(json.dumps({**meta, **fields}))
    with pytest.raises(CheckpointError, match=match) as info:
        load_checkpoint(model)
    assert 'metricgold.json' in str(info.value)


def test_pipeline_applies_it_in_log_depth_and_can_skip_it(refined_model, tiny_pipeline):
    rgb = (RNG.random((60, 80, 3)) * 255).astype(np.uint8)
    rgb[:, 40:] //= 4  # an image edge down the middle
    refined = MetricGoldPipeline.from_pretrained(refined_model, device='cpu', dtype='float32')
    plain = tiny_pipeline(rgb).depth
    np.testing.assert_array_equal(refined(rgb, edge_refine=False).depth, plain)
    out = refined(rgb)
    # The guided filter of the log depth, with the radius enlarged from the processed size
    # (the tiny model's 128 px for an 80 px image: 3 px -> 2 px).
    expected = np.exp(guided_filter(grey_guide(rgb, (60, 80)), np.log(plain), 2, 2e-3))
    np.testing.assert_allclose(out.depth, expected, rtol=1e-4)
    assert not np.allclose(out.depth, plain, rtol=1e-3)
    # Batches and smaller outputs take it too; grayscale images guide as well.
    small = refined.predict_batch([rgb, rgb[..., 0]], output_sizes=[(30, 40), None])
    assert small[0].depth.shape == (30, 40) and small[1].depth.shape == (60, 80)
    assert np.isfinite(small[0].depth).all() and (small[1].depth > 0).all()


def test_relative_checkpoints_state_none(tiny_model_dir):
    checkpoint = load_checkpoint(tiny_model_dir)
    with pytest.raises(CheckpointError, match='metric checkpoints only'):
        dataclasses.replace(checkpoint.metadata, relative=True,
                            edge_refine_radius_px=2).validate('test')


def test_the_bundled_model_draws_depth_boundaries_with_it():
    """Issue 24, item 3: boundary F1 on streets, with the bundled model's refinement and
    without (BENCHMARKS.md 16: held-out outdoor F1 0.018 -> 0.26)."""
    from metricgold_ros.boundaries import BoundaryCounts, boundary_counts
    from metricgold_ros.canonical_camera import for_camera
    from metricgold_ros.model_paths import bundled_model_path
    from metricgold_ros.synthetic.scenes import render_sample

    pipeline = MetricGoldPipeline.from_pretrained(bundled_model_path(), device='cpu',
                                                  dtype='float32')
    assert pipeline.metadata.edge_refine_radius_px > 0
    counts = {True: BoundaryCounts(), False: BoundaryCounts()}
    for seed in range(600_000, 600_006):
        street = render_sample(seed, 'outdoor', 320, 240)
        for refine in counts:
            depth = for_camera(pipeline(street.rgb, edge_refine=refine).depth_m,
                               pipeline.metadata, street.intrinsics, 128)
            counts[refine] += boundary_counts(depth, street.depth_m, street.valid, 0.10, 2, 3,
                                              planar_gt=True)
    assert counts[True].f1 > 0.15 and counts[True].f1 > 4 * counts[False].f1, \
        (counts[True].f1, counts[False].f1)
