"""The published checkpoints by name, at tiny size: prs-eth/marigold-depth-v1-1,
prs-eth/marigold-depth-lcm-v1-0 and GonzaloMG/marigold-e2e-ft-depth, laid out as published
(file names, model_index.json, scheduler, CLIP text encoder, fp16 variants), loaded by id from
an offline hub cache and run as their model cards say; fp16 variants; missing variant files."""

import numpy as np
import pytest
import torch

from hub_helpers import PUBLISHED, hub_env, write_hub_cache, write_published_layout
from metricgold_ros.errors import CheckpointError
from metricgold_ros.model import load_checkpoint
from metricgold_ros.model_paths import load_model

RGB = np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8)
EXPECTED = {  # what each must load as: scheduler, spacing, steps, resolution, e2e_ft
    'prs-eth/marigold-depth-v1-1': ('DDIMScheduler', 'trailing', 4, 768, False),
    'prs-eth/marigold-depth-lcm-v1-0': ('LCMScheduler', 'leading', 1, 768, False),
    'GonzaloMG/marigold-e2e-ft-depth': ('DDIMScheduler', 'trailing', 1, None, True),
}


@pytest.fixture(scope='module')
def layouts(tmp_path_factory):
    """Each published layout as a folder (the files a download leaves in the snapshot)."""
    pytest.importorskip('transformers')
    root = tmp_path_factory.mktemp('published')
    return {repo: write_published_layout(root / repo.replace('/', '_'), repo)
            for repo in PUBLISHED}


@pytest.fixture
def cache(tmp_path, monkeypatch, layouts):
    hub = hub_env(monkeypatch, tmp_path / 'hf')
    for repo, folder in layouts.items():
        write_hub_cache(hub, repo, folder)
    torch.set_num_threads(1)
    return hub


@pytest.mark.parametrize('repo', sorted(PUBLISHED))
def test_published_layout_loads_by_id_and_runs_as_its_card_says(cache, repo):
    scheduler, spacing, steps, resolution, e2e_ft = EXPECTED[repo]
    card = PUBLISHED[repo]['card']
    pipeline = load_model(repo, 'model_path', device='cpu', notify=lambda line: None)
    meta = pipeline.metadata
    assert pipeline.relative and meta.e2e_ft is e2e_ft
    assert type(pipeline.scheduler).__name__ == scheduler
    assert pipeline.scheduler.config.timestep_spacing == spacing
    assert (meta.default_denoising_steps, meta.default_processing_resolution) == \
        (steps, resolution)
    calls = []
    hook = pipeline.unet.register_forward_hook(lambda *args: calls.append(1))
    try:
        result = pipeline(RGB, denoising_steps=card['steps'],
                          ensemble_size=card['ensemble_size'],
                          processing_resolution=card['processing_resolution'])
    finally:
        hook.remove()
    assert len(calls) == steps  # the card's steps: the checkpoint's default, E2E-FT's one
    assert result.depth.shape == RGB.shape[:2] and np.isfinite(result.depth).all()
    assert result.depth.min() >= 0.0 and result.depth.max() <= 1.0 and result.depth.std() > 0
    latent_h = 768 * RGB.shape[0] // RGB.shape[1] // 8
    assert result.rgb_latent.shape[-2:] == (latent_h, 768 // 8)  # processed at 768 px


def test_e2e_ft_asks_for_the_resolution_its_model_index_lacks(cache):
    from metricgold_ros.errors import InputError

    pipeline = load_model('GonzaloMG/marigold-e2e-ft-depth', 'model_path', device='cpu',
                          notify=lambda line: None)
    with pytest.raises(InputError, match='processing_resolution=None and the checkpoint '
                       'states no default_processing_resolution'):
        pipeline(RGB)


def test_fp16_variant_loads_the_fp16_files(cache, layouts):
    repo = 'prs-eth/marigold-depth-v1-1'
    plain = load_model(repo, 'model_path', device='cpu', notify=lambda line: None)
    half = load_model(repo, 'model_path', device='cpu', variant='fp16',
                      notify=lambda line: None)
    for name in ('unet', 'vae'):
        ours = dict(getattr(half, name).named_parameters())
        for key, value in getattr(plain, name).named_parameters():
            assert ours[key].dtype == torch.float32  # run in the pipeline's dtype, as loaded
            torch.testing.assert_close(ours[key], value.half().float(), rtol=0, atol=0)
    assert not torch.equal(half.unet.conv_in.weight, plain.unet.conv_in.weight)
    # The text encoder's fp16 file too: the empty-prompt embedding is that of fp16 weights.
    assert not torch.equal(half.empty_text_embedding, plain.empty_text_embedding)
    torch.testing.assert_close(half.empty_text_embedding, plain.empty_text_embedding,
                               rtol=0.02, atol=0.02)
    depth = half(RGB, processing_resolution=64).depth
    assert np.isfinite(depth).all()


def test_missing_variant_is_an_error_naming_the_file(cache, layouts):
    with pytest.raises(CheckpointError, match=r'unet/diffusion_pytorch_model\.bf16\.safetensors '
                       r"is missing: variant='bf16' asks for it"):
        load_model('prs-eth/marigold-depth-v1-1', '--model', device='cpu', variant='bf16',
                   notify=lambda line: None)
    with pytest.raises(CheckpointError, match=r'diffusion_pytorch_model\.fp16\.safetensors is '
                       r"missing: variant='fp16'"):
        load_model('GonzaloMG/marigold-e2e-ft-depth', '--model', device='cpu', variant='fp16',
                   notify=lambda line: None)


def test_variant_of_a_local_folder(layouts):
    folder = layouts['prs-eth/marigold-depth-lcm-v1-0']
    half = load_checkpoint(folder, variant='fp16')
    plain = load_checkpoint(folder)
    torch.testing.assert_close(half.vae.decoder.conv_out.weight,
                               plain.vae.decoder.conv_out.weight.half().float(), rtol=0, atol=0)


@pytest.mark.parametrize('repo', ['prs-eth/marigold-depth-v1-1',
                                  'prs-eth/marigold-depth-lcm-v1-0'])
def test_by_id_equals_diffusers_on_the_same_snapshot(cache, repo):
    """diffusers' MarigoldDepthPipeline on the very snapshot (its own scheduler, defaults, text
    encoder and tokenizer; our networks, see test_marigold_parity.load_reference) gives our
    depth at the checkpoint's default steps."""
    from diffusers import MarigoldDepthPipeline

    ours = load_model(repo, 'model_path', device='cpu', notify=lambda line: None)
    snapshot = next(cache.glob(f'models--{repo.replace("/", "--")}/snapshots/*'))
    reference = MarigoldDepthPipeline.from_pretrained(snapshot, unet=ours.unet, vae=ours.vae)
    reference.set_progress_bar_config(disable=True)
    mine = ours(RGB, processing_resolution=64, seed=0).depth
    theirs = reference(RGB, processing_resolution=64, generator=torch.Generator().manual_seed(0),
                       output_type='np').prediction[0, :, :, 0]
    assert np.abs(mine - theirs).max() < 1e-4
