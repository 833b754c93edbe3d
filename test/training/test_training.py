"""Training: the recipe's pieces, SD2 conversion, resume == uninterrupted, and the CI smoke run."""

import copy
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from metricgold_ros.errors import MetricGoldError  # noqa: E402
from metricgold_ros.model import (  # noqa: E402
    MetricGoldPipeline, compute_empty_text_embedding, save_checkpoint)
from metricgold_ros.model.tiny import (  # noqa: E402
    tiny_scheduler_config, tiny_unet_config, tiny_vae_config)
from training import recipe  # noqa: E402
from training.config import ConfigError, load_config, resolve_accumulation  # noqa: E402
from training.data import augment, nearest_resize  # noqa: E402
from training.train import (  # noqa: E402
    canonical_depth, encode_latents, load_training_state, main as train_main)
from training.vae_stage import depth_as_image  # noqa: E402

SMOKE_CONFIG = REPO_ROOT / 'training' / 'configs' / 'smoke.yaml'
BUNDLED_MODEL = REPO_ROOT / 'metricgold_ros' / 'models' / 'metricgold-tiny'


# -- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def synthetic_root(tmp_path_factory) -> Path:
    """A few synthetic frames of each kind in the Virtual KITTI 2 layout, 64x48 px."""
    from metricgold_ros.synthetic.vkitti import write_vkitti2

    root = tmp_path_factory.mktemp('synthetic')
    write_vkitti2(root / 'train', 4, seed=0, width=64, height=48)
    write_vkitti2(root / 'val', 1, seed=1000, width=64, height=48)
    return root


def _write_config(path: Path, data_root: Path, model: str, *, steps: int = 4,
                  extra_train: str = '') -> Path:
    path.write_text(f"""
seed: 3
cpu_threads: 1
model:
{model}
  d_min_m: 0.5
  d_max_m: 80.0
  processing_resolution: 64
vae_stage: {{steps: 2, batch_size: 2, crop_px: 16, scale_batches: 1, val_images: 1}}
data:
  train:
    - {{type: vkitti2, root: '{data_root}/train', probability: 0.5}}
    - {{type: vkitti2, root: '{data_root}/train', probability: 0.5}}
  val: [{{type: vkitti2, root: '{data_root}/val'}}]
  resolution: [48, 64]
  cache: true
train:
  steps: {steps}
  batch_size: 2
  lr: 1.0e-3
  warmup_steps: 2
  checkpoint_every: 2
  log_every: 1
{extra_train}
validation: {{every: 2, log_images: 1}}
""")
    return path


def _fake_sd2_folder(path: Path) -> Path:
    """A Stable Diffusion 2 layout with tiny networks: 4-channel UNet, CLIP text encoder."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    UNet2DConditionModel(**{**tiny_unet_config(), 'in_channels': 4}).save_pretrained(
        path / 'unet', safe_serialization=True)
    AutoencoderKL(**tiny_vae_config()).save_pretrained(path / 'vae', safe_serialization=True)
    DDIMScheduler(**{**tiny_scheduler_config(), 'timestep_spacing': 'leading'}).save_pretrained(
        path / 'scheduler')
    vocab = {'<|startoftext|>': 0, '<|endoftext|>': 1, 'a</w>': 2, 'b</w>': 3, 'c</w>': 4}
    (path / 'tok_src').mkdir()
    (path / 'tok_src' / 'vocab.json').write_text(json.dumps(vocab))
    (path / 'tok_src' / 'merges.txt').write_text('#version: 0.2\n')
    CLIPTokenizer(str(path / 'tok_src' / 'vocab.json'),
                  str(path / 'tok_src' / 'merges.txt')).save_pretrained(path / 'tokenizer')
    CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=8, bos_token_id=0, eos_token_id=1,
        pad_token_id=1)).save_pretrained(path / 'text_encoder', safe_serialization=True)
    return path


# -- recipe -----------------------------------------------------------------------------------

def test_widen_conv_in_halves_both_halves_and_keeps_the_function():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    original = UNet2DConditionModel(**{**tiny_unet_config(), 'in_channels': 4}).eval()
    converted = recipe.widen_conv_in(copy.deepcopy(original))
    weight, old = converted.conv_in.weight, original.conv_in.weight
    assert weight.shape == (old.shape[0], 8, *old.shape[2:])
    assert converted.config.in_channels == 8
    assert torch.equal(weight[:, :4], old / 2) and torch.equal(weight[:, 4:], old / 2)
    assert torch.equal(converted.conv_in.bias, original.conv_in.bias)
    # W [a, b] / 2 + bias: for b = 0 the old layer at a / 2, for b = a the old layer at a.
    z, text = torch.randn(1, 4, 8, 8), torch.randn(1, 2, 64)
    with torch.no_grad():
        def run(model, latent):
            return model(latent, 500, encoder_hidden_states=text).sample

        torch.testing.assert_close(run(converted, torch.cat([z, torch.zeros_like(z)], 1)),
                                   run(original, z / 2), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(run(converted, torch.cat([z, z], 1)), run(original, z),
                                   atol=1e-5, rtol=1e-5)


def test_multi_res_noise_shape_statistics_and_annealing():
    x = torch.zeros(4, 4, 48, 64)
    noise = recipe.multi_res_noise_like(x, 0.9, torch.Generator().manual_seed(0))
    assert noise.shape == x.shape and noise.dtype == x.dtype
    assert abs(float(noise.std()) - 1.0) < 1e-5 and abs(float(noise.mean())) < 0.2
    again = recipe.multi_res_noise_like(x, 0.9, torch.Generator().manual_seed(0))
    assert torch.equal(noise, again)

    def neighbour_correlation(n):
        return float(torch.corrcoef(torch.stack([n[..., :-1].flatten(),
                                                 n[..., 1:].flatten()]))[0, 1])

    # Annealed: t = 0 gives white noise, t near T strongly correlated (low-frequency) noise.
    timesteps = torch.tensor([0, 0, 999, 999])
    strength = recipe.annealed_strength(timesteps, 1000, 0.9)
    assert torch.allclose(strength, torch.tensor([0.0, 0.0, 0.8991, 0.8991]))
    mixed = recipe.multi_res_noise_like(x, strength, torch.Generator().manual_seed(1))
    assert abs(neighbour_correlation(mixed[:2])) < 0.05
    assert neighbour_correlation(mixed[2:]) > 0.3


def test_latent_mask_needs_every_pixel_of_the_block():
    valid = torch.ones(1, 1, 16, 24, dtype=torch.bool)
    valid[0, 0, 9, 17] = False  # one pixel in latent block (1, 2)
    mask = recipe.latent_valid_mask(valid, 8)
    assert mask.shape == (1, 1, 2, 3)
    assert mask.sum() == 5 and not mask[0, 0, 1, 2]


def test_masked_loss_ignores_invalid_pixels():
    generator = torch.Generator().manual_seed(0)
    prediction = torch.randn(2, 4, 6, 8, generator=generator)
    target = torch.randn(2, 4, 6, 8, generator=generator)
    valid = torch.ones(2, 1, 48, 64, dtype=torch.bool)
    valid[0, :, :20, :30] = False
    valid[1, :, 40:, :] = False
    mask = recipe.latent_valid_mask(valid, 8)
    loss = recipe.masked_mse(prediction, target, mask)
    changed_p, changed_t = prediction.clone(), target.clone()
    hidden = ~mask.expand_as(prediction)
    changed_p[hidden] = 1e3
    changed_t[hidden] = -7.0
    assert torch.equal(recipe.masked_mse(changed_p, changed_t, mask), loss)
    expected = ((prediction - target) ** 2)[mask.expand_as(prediction)].mean()
    assert torch.allclose(loss, expected)
    nothing = recipe.masked_mse(prediction.requires_grad_(), target, torch.zeros_like(mask))
    nothing.backward()
    assert float(nothing.detach()) == 0.0 and prediction.grad is not None



def test_gradient_loss_wants_steps_not_offsets_and_ignores_invalid_pixels():
    step = torch.zeros(1, 1, 16, 16)
    step[..., 8:] = 1.0  # a depth boundary: one step of height 1 between columns 7 and 8
    blur = step.clone()
    blur[..., 6:10] = torch.tensor([0.2, 0.4, 0.6, 0.8])  # the same step smeared over 4 px
    valid = torch.ones(1, 1, 16, 16, dtype=torch.bool)
    loss = recipe.masked_gradient_loss
    assert float(loss(step + 0.5, step, valid)) == 0.0  # an offset (a scale in log) is free
    assert float(loss(blur, step, valid, scales=1)) == pytest.approx(
        (0.2 * 4 + 0.8) * 16 / (2 * 16 * 15))  # |d/dx| of the residual over all pairs
    assert float(loss(blur, step, valid)) > float(loss(step * 0.9, step, valid)) > 0
    hidden = valid.clone()
    hidden[..., 4:12] = False  # the blur is where nothing is known
    noisy = blur.clone()
    noisy[~hidden] = 1e3
    assert float(loss(noisy, step, hidden)) == 0.0
    nothing = loss(blur.requires_grad_(), step, torch.zeros_like(valid))
    nothing.backward()
    assert float(nothing.detach()) == 0.0 and blur.grad is not None
    with pytest.raises(ValueError, match='must match'):
        loss(step, step[..., :8], valid)



def test_border_weights_count_the_edge_pixels_more_in_the_mse():
    weights = recipe.border_weights(6, 8, 2, 3.0)
    assert weights.shape == (1, 1, 6, 8) and float(weights[0, 0, 2:4, 2:6].max()) == 1.0
    assert float(weights[0, 0, :2].min()) == float(weights[0, 0, :, -2:].min()) == 3.0
    prediction, target = torch.zeros(1, 1, 6, 8), torch.zeros(1, 1, 6, 8)
    valid = torch.ones(1, 1, 6, 8, dtype=torch.bool)
    target[..., 0, 0] = 1.0  # one error, in the corner
    plain = recipe.masked_mse(prediction, target, valid)
    assert float(plain) == pytest.approx(1 / 48)
    assert float(recipe.masked_mse(prediction, target, valid, weights)) == pytest.approx(
        3 / float(weights.sum()))
    target[..., 0, 0], target[..., 3, 3] = 0.0, 1.0  # the same error, in the middle
    assert float(recipe.masked_mse(prediction, target, valid, weights)) == pytest.approx(
        1 / float(weights.sum()))
    assert torch.equal(recipe.masked_mse(prediction, target, valid, torch.ones(1, 1, 6, 8)),
                       recipe.masked_mse(prediction, target, valid))


def test_velocity_target_is_the_v_parameterisation():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(**{k: v for k, v in tiny_scheduler_config().items()
                                 if k not in ('set_alpha_to_one', 'steps_offset')})
    x0, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([0, 500, 999])
    alpha = scheduler.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    expected = alpha.sqrt() * noise - (1 - alpha).sqrt() * x0
    torch.testing.assert_close(recipe.velocity_target(scheduler, x0, noise, t), expected)


def test_warmup_exponential_decay():
    schedule = recipe.WarmupExponentialDecay(warmup_steps=10, decay_steps=110, final_ratio=0.01)
    assert schedule(0) == pytest.approx(0.1) and schedule(9) == pytest.approx(1.0)
    assert schedule(10) == pytest.approx(1.0) and schedule(60) == pytest.approx(0.1)
    assert schedule(110) == pytest.approx(0.01) and schedule(10 ** 6) == pytest.approx(0.01)


def test_depth_image_fills_invalid_as_far_and_masks_out_of_range():
    depth = torch.tensor([[[[0.0, 0.2, 5.0, 100.0, float('nan')]]]])
    valid = torch.tensor([[[[False, True, True, True, True]]]])
    image, mask = depth_as_image(depth, valid, 0.5, 80.0)
    assert image.shape == (1, 3, 1, 5)
    expected_mid = 2 * math.log(5.0 / 0.5) / math.log(160.0) - 1
    torch.testing.assert_close(image[0, 0, 0], torch.tensor([1.0, -1.0, expected_mid, 1.0, 1.0]))
    assert mask[0, 0, 0].tolist() == [False, False, True, False, False]


def test_augment_flips_and_crops_rgb_and_depth_together():
    depth = np.tile(np.arange(1, 65, dtype=np.float32), (48, 1))
    rgb = np.repeat(np.arange(64, dtype=np.uint8)[None, :, None], 48, 0).repeat(3, 2)
    item = {'rgb': rgb, 'depth_m': depth, 'valid': depth > 2}
    out = augment(item, (48, 64), (1.0, 1.0), 1.0, np.random.default_rng(0))
    assert out['rgb'].shape == (3, 48, 64) and out['depth_m'].shape == (1, 48, 64)
    assert out['depth_m'][0, 0, 0] == 64 and out['depth_m'][0, 0, -1] == 1
    assert out['rgb'][0, 0, 0] == pytest.approx(63 / 127.5 - 1)
    assert not out['valid'][0, 0, -1] and out['valid'][0, 0, 0]
    small = augment(item, (24, 24), (1.0, 1.5), 0.0, np.random.default_rng(1))
    assert small['depth_m'].shape == (1, 24, 24)
    assert set(small['depth_m'].unique().tolist()) <= set(range(1, 65))  # nearest: no blends


@pytest.mark.parametrize('name', ['smoke', 'tiny_bundled', 'metricgold_sd2'])
def test_shipped_configs_are_valid(tmp_path, name):
    config = load_config(REPO_ROOT / 'training' / 'configs' / f'{name}.yaml', tmp_path)
    assert config.model.d_min_m == 0.5 and config.model.d_max_m == 80.0
    if name == 'metricgold_sd2':
        assert config.train.effective_batch_size == 32
        # Accumulation follows the number of processes: 1 GPU, 1 node x 8, 2 nodes x 8.
        assert [resolve_accumulation(config.train, n) for n in (1, 8, 16)] == [16, 2, 1]
        assert config.train.lr == 3e-5 and config.train.steps == 30000
        assert config.train.objective == 'diffusion' and config.model.zero_terminal_snr
        assert config.model.canonical_focal_px is None
        assert [s.type for s in config.data.train] == ['hypersim', 'vkitti2', 'tartanair']
        assert config.data.train[0].split_file.endswith('filename_list_train_filtered.txt')
        vkitti_train, vkitti_val = config.data.train[1], config.data.val[1]
        assert vkitti_train.cameras == ['Camera_0', 'Camera_1']
        assert vkitti_train.scenes == ['Scene02', 'Scene06', 'Scene18', 'Scene20']
        assert vkitti_val.scenes == ['Scene01'] and vkitti_val.root == vkitti_train.root
    else:
        assert config.model.tiny and config.data.generate


@pytest.mark.parametrize('name, start, resolution, focal', [
    ('tiny_bundled_e2e', 'runs/tiny/final', 128, None),
    ('tiny_bundled_e2e_192', 'runs/e2e/final', 192, None),
    ('tiny_bundled_e2e_camera', 'runs/e2e/final', 128, 100.0)])
def test_shipped_e2e_fine_tune_configs_are_valid(tmp_path, name, start, resolution, focal):
    """The bundled model's E2E-FT fine-tune: from a checkpoint, single step, same training seeds."""
    config = load_config(REPO_ROOT / 'training' / 'configs' / f'{name}.yaml', tmp_path)
    assert config.model.pretrained == start and not config.model.tiny
    assert config.model.canonical_focal_px == focal
    assert config.train.objective == 'e2e_ft' and config.model.denoising_steps == 1
    assert config.model.processing_resolution == resolution and config.cpu_threads == 1
    assert config.data.generate['train'].seed == 0 and config.data.generate['train'].count == 2000


def test_config_rejects_unknown_keys_and_reads_yaml_floats(tmp_path):
    path = tmp_path / 'bad.yaml'
    path.write_text('model: {tiny: true, d_min_m: 1, d_max_m: 10}\n'
                    'data: {train: [{type: vkitti2, root: x}]}\ntrain: {stesp: 3}\n')
    with pytest.raises(ConfigError, match=r'train: unknown key\(s\) \[.stesp.\]'):
        load_config(path, tmp_path)
    path.write_text('model: {pretrained: P, d_min_m: 1, d_max_m: 10}\n'
                    "data: {train: [{type: vkitti2, root: '{output}/d'}]}\ntrain: {lr: 3e-5}\n")
    config = load_config(path, tmp_path)
    assert config.train.lr == 3e-5 and config.data.train[0].root == f'{tmp_path}/d'
    path.write_text('model: {tiny: true}\ndata: {train: [{type: vkitti2, root: x}]}\n')
    with pytest.raises(ConfigError, match='needs its depth range'):
        load_config(path, tmp_path)


def test_effective_batch_derives_or_checks_the_accumulation(tmp_path):
    path = tmp_path / 'c.yaml'
    path.write_text('model: {tiny: true, d_min_m: 1, d_max_m: 10}\nvae_stage: {steps: 1}\n'
                    'data: {train: [{type: vkitti2, root: x}]}\n'
                    'train: {batch_size: 2, effective_batch_size: 32}\n')
    train = load_config(path, tmp_path).train
    assert train.gradient_accumulation_steps is None
    assert resolve_accumulation(train, 2) == 8
    with pytest.raises(ConfigError, match=r'effective_batch_size: 32 is not a multiple of '
                                          r'batch_size 2 x 3 process\(es\) = 6'):
        resolve_accumulation(train, 3)
    train.gradient_accumulation_steps = 4
    assert resolve_accumulation(train, 4) == 4
    with pytest.raises(ConfigError, match=r'2 x gradient_accumulation_steps 4 x 2 process\(es\) '
                                          r'= 16; remove gradient_accumulation_steps'):
        resolve_accumulation(train, 2)
    train.effective_batch_size = None
    assert resolve_accumulation(train, 8) == 4
    train.gradient_accumulation_steps = None
    assert resolve_accumulation(train, 8) == 1


@pytest.mark.parametrize('body, message', [
    ('train: {objective: e2e}', r'train.objective: .e2e. is not one of'),
    ('train: {objective: e2e_ft}\nmodel: {tiny: true, d_min_m: 1, d_max_m: 10, '
     'denoising_steps: 4}', 'model.denoising_steps: 4: an e2e_ft model runs one step'),
    ('model: {tiny: true, d_min_m: 1, d_max_m: 10, canonical_focal_px: -5}',
     'model.canonical_focal_px: -5.0 must be a focal length'),
    ('data: {train: [{type: vkitti2, root: v}], val: [{type: vkitti2, root: v}]}',
     r'data.val\[0\].scenes: validation reads v, which training also reads'),
    ('data: {train: [{type: vkitti2, root: v, scenes: [Scene01, Scene02]}], '
     'val: [{type: vkitti2, root: v, scenes: [Scene01]}]}',
     r"\['Scene01'\] are also training scenes of v"),
    ('train: {gradient_loss_weight: 0.5}', 'gradient_loss_weight: the gradient loss compares '
     'decoded depth: it needs objective: e2e_ft'),
    ('train: {train_decoder: true}', 'train.train_decoder: only the e2e_ft objective'),
    ('train: {border_weight: 3}', 'train.border_weight: weights decoded depth pixels'),
    ('train: {objective: e2e_ft, border_weight: 0}\nmodel: {tiny: true, d_min_m: 1, '
     'd_max_m: 10}', r'train.border_weight/border_px: 0(\.0)?/8: need a weight > 0'),
    ('train: {objective: e2e_ft, gradient_loss_weight: -1}\nmodel: {tiny: true, d_min_m: 1, '
     'd_max_m: 10}', r'train.gradient_loss_weight: -1(\.0)? must be >= 0'),
])
def test_config_rejects_bad_objective_focal_and_leaking_splits(tmp_path, body, message):
    base = {'model': 'model: {tiny: true, d_min_m: 1, d_max_m: 10}',
            'data': 'data: {train: [{type: vkitti2, root: x}]}'}
    for section in base:
        if body.startswith(section) or f'\n{section}:' in body:
            base[section] = ''
    path = tmp_path / 'c.yaml'
    path.write_text('vae_stage: {steps: 1}\n' + '\n'.join(v for v in base.values() if v) +
                    '\n' + body + '\n')
    with pytest.raises(ConfigError, match=message):
        load_config(path, tmp_path)


def test_ema_is_back_on_the_training_device_after_resume(tmp_path):
    """The EMA is read on the CPU; on a GPU the next ema.step mixed CPU and CUDA tensors.
    Here the training device is 'meta', which the CPU-loaded state is not on either, so the
    move is visible without a GPU."""
    from diffusers.training_utils import EMAModel
    from training.state import save_extra_state

    class AcceleratorState:
        """The part of accelerate's state that is not the EMA: nothing to load here."""

        def __init__(self):
            self.folders = []

        def load_state(self, folder):
            self.folders.append(folder)

    saved = EMAModel([torch.nn.Parameter(torch.full((2, 2), 3.0))], decay=0.9)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), lambda n: 1.0)
    save_extra_state(tmp_path, schedule, saved)
    ema = EMAModel([torch.nn.Parameter(torch.zeros(2, 2))], decay=0.9)
    accelerator = AcceleratorState()
    load_training_state(accelerator, tmp_path, ema, torch.device('meta'), schedule)
    assert accelerator.folders == [str(tmp_path)]
    assert [p.device.type for p in ema.shadow_params] == ['meta']
    load_training_state(accelerator, tmp_path, None, torch.device('meta'), schedule)


def test_depth_targets_are_encoded_in_float32_under_bf16_autocast():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**tiny_vae_config()).eval()
    rgb = torch.rand(2, 3, 32, 32) * 2 - 1
    depth = (torch.rand(2, 1, 32, 32) * 2 - 1).expand(-1, 3, -1, -1)

    def bf16():
        return torch.autocast('cpu', dtype=torch.bfloat16)

    rgb_latent, depth_latent = encode_latents(vae, rgb, depth, bf16)
    with torch.no_grad():
        scale = vae.config.scaling_factor
        fp32_depth = vae.encode(depth).latent_dist.mode() * scale
        fp32_rgb = vae.encode(rgb).latent_dist.mode() * scale
    assert depth_latent.dtype == rgb_latent.dtype == torch.float32
    assert torch.equal(depth_latent, fp32_depth)  # the target: not quantised
    assert not torch.equal(rgb_latent, fp32_rgb)  # the input: bf16 as configured
    torch.testing.assert_close(rgb_latent, fp32_rgb, atol=0.1, rtol=0.05)


def test_depth_resize_is_centre_aligned_nearest():
    columns = np.arange(96, dtype=np.float32)
    depth = np.tile(columns, (6, 1))
    # 3:1 down: each output pixel takes the middle one of its three (OpenCV's INTER_NEAREST
    # takes the left one, a shift of a third of an output pixel against area-resized RGB).
    assert nearest_resize(depth, (2, 32))[0].tolist() == list(range(1, 96, 3))
    assert nearest_resize(depth, (12, 192))[0, :6].tolist() == [0, 0, 1, 1, 2, 2]
    assert np.array_equal(nearest_resize(depth, (6, 96)), depth)
    mask = np.zeros((6, 96), bool)
    mask[:, 48:] = True
    assert nearest_resize(mask, (2, 32)).dtype == bool
    # The RGB edge (area resize) and the depth edge land in the same output column.
    rgb = np.repeat(mask[:, :, None].astype(np.uint8) * 255, 3, 2)
    item = {'rgb': rgb, 'depth_m': np.where(mask, 9.0, 1.0).astype(np.float32), 'valid': mask,
            'intrinsics': (40.0, 44.0, 47.5, 2.5)}
    out = augment(item, (16, 64), (1.0, 1.0), 0.0, np.random.default_rng(0))
    # 96 x 6 covers 64 x 16 at scale 16/6: 256 x 16, crop 64 wide; focal scales the same way.
    assert out['focal_px'] == pytest.approx(0.5 * (40 * 256 / 96 + 44 * 16 / 6))
    left = out['view'][3]
    edge_rgb = int(np.argmax(out['rgb'][0, 0].numpy() > 0)) + left
    edge_depth = int(np.argmax(out['depth_m'][0, 0].numpy() > 5)) + left
    assert edge_rgb == edge_depth == 128


def test_canonical_depth_scales_each_sample_by_its_focal_length():
    depth = torch.stack([torch.full((1, 2, 2), 4.0), torch.full((1, 2, 2), 6.0)])
    depth[0, 0, 0, 0] = 0.0  # invalid stays 0
    scaled = canonical_depth(depth, [500.0, 2000.0], 1000.0)
    assert scaled[:, 0, 1, 1].tolist() == [8.0, 3.0] and scaled[0, 0, 0, 0] == 0
    assert canonical_depth(depth, None, None) is depth
    with pytest.raises(MetricGoldError, match='canonical_focal_px: a training sample has'):
        canonical_depth(depth, [500.0, None], 1000.0)


def test_metadata_round_trips_canonical_focal_and_e2e_ft(tmp_path, tiny_model_dir):
    from metricgold_ros.errors import CheckpointError
    from metricgold_ros.model import load_checkpoint

    folder = tmp_path / 'model'
    shutil.copytree(tiny_model_dir, folder)
    assert load_checkpoint(folder).metadata.canonical_focal_px is None
    meta_path = folder / 'metricgold.json'
    meta = json.loads(meta_path.read_text())
    assert 'e2e_ft' not in meta and 'canonical_focal_px' not in meta
    meta_path.write_text(json.dumps({**meta, 'canonical_focal_px': 721.5, 'e2e_ft': True}))
    loaded = load_checkpoint(folder)
    assert loaded.metadata.canonical_focal_px == 721.5 and loaded.metadata.e2e_ft
    save_checkpoint(tmp_path / 'again', loaded)
    again = json.loads((tmp_path / 'again' / 'metricgold.json').read_text())
    assert again['canonical_focal_px'] == 721.5 and again['e2e_ft'] is True
    for bad in ({'canonical_focal_px': 0}, {'e2e_ft': 'false'}):
        meta_path.write_text(json.dumps({**meta, **bad}))
        with pytest.raises(CheckpointError, match='canonical_focal_px|e2e_ft'):
            load_checkpoint(folder)


# -- whole runs -------------------------------------------------------------------------------

@pytest.mark.slow
def test_stable_diffusion_start_converts_and_trains(tmp_path, synthetic_root):
    sd2 = _fake_sd2_folder(tmp_path / 'sd2')
    config = _write_config(tmp_path / 'sd2.yaml', synthetic_root,
                           f"  pretrained: '{sd2}'", steps=2)
    assert train_main(['--config', str(config), '--output', str(tmp_path / 'run')]) == 0
    final = tmp_path / 'run' / 'final'
    pipeline = MetricGoldPipeline.from_pretrained(final, device='cpu', dtype='float32')
    assert pipeline.unet.config.in_channels == 8
    assert torch.equal(pipeline.empty_text_embedding, compute_empty_text_embedding(sd2))
    assert pipeline.metadata.d_min_m == 0.5 and pipeline.metadata.d_max_m == 80.0
    assert pipeline.scheduler.config.timestep_spacing == 'trailing'
    assert pipeline.scheduler.config.rescale_betas_zero_snr  # an SD2 start: Marigold v1.1's
    rgb = np.zeros((48, 64, 3), np.uint8)
    assert pipeline(rgb).depth.shape == (48, 64)
    # Fine-tuning continues from a MetricGold checkpoint (starting point b).
    again = _write_config(tmp_path / 'mg.yaml', synthetic_root, f"  pretrained: '{final}'",
                          steps=1)
    assert train_main(['--config', str(again), '--output', str(tmp_path / 'run2')]) == 0
    assert (tmp_path / 'run2' / 'final' / 'metricgold.json').is_file()
    continued = json.loads((tmp_path / 'run2' / 'final' / 'scheduler' /
                            'scheduler_config.json').read_text())
    assert continued['rescale_betas_zero_snr']  # a checkpoint keeps its own schedule


@pytest.mark.slow
@pytest.mark.parametrize('precision', ['bf16', 'fp16'])
def test_mixed_precision_trains_on_the_cpu(tmp_path, synthetic_root, tiny_model_dir, precision):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # accelerate keeps one precision per process
    try:
        config = _write_config(tmp_path / 'mp.yaml', synthetic_root,
                               f"  pretrained: '{tiny_model_dir}'", steps=2,
                               extra_train=f'  mixed_precision: {precision}')
        assert train_main(['--config', str(config), '--output', str(tmp_path / 'run')]) == 0
    finally:
        AcceleratorState._reset_state(True)
    metrics = json.loads((tmp_path / 'run' / 'metrics.json').read_text())
    assert metrics['config']['train']['mixed_precision'] == precision
    assert all(math.isfinite(loss) for loss in metrics['loss'])
    pipeline = MetricGoldPipeline.from_pretrained(tmp_path / 'run' / 'final', device='cpu')
    assert next(pipeline.unet.parameters()).dtype == torch.float32  # fp32 master weights


@pytest.mark.slow
def test_resume_matches_an_uninterrupted_run(tmp_path, synthetic_root):
    from safetensors.torch import load_file

    config = _write_config(tmp_path / 'tiny.yaml', synthetic_root, '  tiny: true', extra_train=(
        '  gradient_accumulation_steps: 2\n  ema: true\n  ema_decay: 0.9'))
    straight, broken = tmp_path / 'straight', tmp_path / 'broken'
    assert train_main(['--config', str(config), '--output', str(straight)]) == 0
    # Killed after step 3: the step-2 checkpoint is the newest, step 3 is lost and redone.
    assert train_main(['--config', str(config), '--output', str(broken),
                       '--stop-at-step', '3']) == 0
    assert not (broken / 'final').exists()
    assert sorted(p.name for p in (broken / 'checkpoints').iterdir()) == ['step_000002']
    assert train_main(['--config', str(config), '--output', str(broken)]) == 1  # no --resume
    assert train_main(['--config', str(config), '--output', str(broken), '--resume']) == 0
    unet_file = Path('unet') / 'diffusion_pytorch_model.safetensors'
    for run in (straight, broken):
        assert MetricGoldPipeline.from_pretrained(run / 'final', device='cpu')
        # final/ is the last checkpoint's model/ (EMA weights), linked rather than copied
        assert (run / 'final' / unet_file).samefile(
            run / 'checkpoints' / 'step_000004' / 'model' / unet_file)
    # Same batches, noise and optimizer state: the trajectories are the same. Usually bit for
    # bit; 1e-6 leaves room for oneDNN, whose CPU kernels can sum in another order depending on
    # where in memory a tensor lands (seen once in many runs, at 1e-7).
    weights = [load_file(str(run / 'final' / 'unet' / 'diffusion_pytorch_model.safetensors'))
               for run in (straight, broken)]
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], atol=1e-6, rtol=0,
                                   msg=key)
    metrics = [json.loads((run / 'metrics.json').read_text()) for run in (straight, broken)]
    assert len(metrics[0]['loss']) == 4
    np.testing.assert_allclose(metrics[0]['loss'], metrics[1]['loss'], atol=1e-6, rtol=0)
    np.testing.assert_allclose(metrics[0]['val_abs_rel'], metrics[1]['val_abs_rel'],
                               atol=1e-6, rtol=0)
    assert metrics[0]['val_steps'] == [0, 2, 4]
    assert metrics[0]['vae']['depth_abs_rel'] > 0


def test_e2e_ft_objective_learns_and_marks_its_checkpoint(tmp_path, synthetic_root):
    """Single-step E2E-FT training, camera-aware: loss falls, metricgold.json says so.

    One fixed batch (training on the two frames of the val folder, no flips; validating on
    the train folder), so that the loss curve shows learning rather than which frames a step
    drew. It starts from the bundled model, whose VAE decodes depth (a random one would
    bound what the UNet can reach through it).
    """
    config = _write_config(tmp_path / 'e2e.yaml', synthetic_root,
                           f"  pretrained: '{BUNDLED_MODEL}'\n  canonical_focal_px: 50.0\n"
                           '  gradient_checkpointing: true',  # through the VAE decoder too
                           steps=12, extra_train='  objective: e2e_ft\n  final_lr_ratio: 1.0')
    text = config.read_text().replace('checkpoint_every: 2', 'checkpoint_every: 12').replace(
        'validation: {every: 2', 'validation: {every: 12').replace(
        f'{synthetic_root}/train', 'SWAP').replace(f'{synthetic_root}/val',
                                                   f'{synthetic_root}/train').replace(
        'SWAP', f'{synthetic_root}/val').replace(
        'cache: true', 'cache: true\n  hflip_p: 0.0').replace('lr: 1.0e-3', 'lr: 3.0e-3')
    config.write_text(text)
    assert train_main(['--config', str(config), '--output', str(tmp_path / 'run')]) == 0
    metrics = json.loads((tmp_path / 'run' / 'metrics.json').read_text())
    loss = metrics['loss']
    assert len(loss) == 12 and all(math.isfinite(v) for v in loss)
    assert np.mean(loss[-3:]) < 0.5 * loss[0], loss
    final = tmp_path / 'run' / 'final'
    meta = json.loads((final / 'metricgold.json').read_text())
    assert meta['e2e_ft'] is True and meta['canonical_focal_px'] == 50.0
    assert meta['default_denoising_steps'] == 1
    pipeline = MetricGoldPipeline.from_pretrained(final, device='cpu', dtype='float32')
    assert pipeline.metadata.e2e_ft and pipeline.metadata.canonical_focal_px == 50.0
    assert pipeline(np.zeros((48, 64, 3), np.uint8)).depth.shape == (48, 64)


def test_e2e_ft_can_fine_tune_the_decoder_and_resume_it(tmp_path, synthetic_root):
    """train.train_decoder: the decoder (and post_quant_conv) learn with the UNet, the encoder,
    which reads the images, stays as it was, and a resumed run continues the same trajectory
    (with the gradient loss and the border weights on)."""
    from safetensors.torch import load_file

    config = _write_config(tmp_path / 'dec.yaml', synthetic_root,
                           f"  pretrained: '{BUNDLED_MODEL}'", extra_train=(
                               '  objective: e2e_ft\n  train_decoder: true\n  ema: true\n'
                               '  ema_decay: 0.5\n  gradient_loss_weight: 0.5\n'
                               '  border_weight: 3.0'))
    straight, broken = tmp_path / 'straight', tmp_path / 'broken'
    assert train_main(['--config', str(config), '--output', str(straight)]) == 0
    assert train_main(['--config', str(config), '--output', str(broken),
                       '--stop-at-step', '3']) == 0
    assert train_main(['--config', str(config), '--output', str(broken), '--resume']) == 0
    vae_file = Path('vae') / 'diffusion_pytorch_model.safetensors'
    start = load_file(str(BUNDLED_MODEL / vae_file))
    runs = [load_file(str(run / 'final' / vae_file)) for run in (straight, broken)]
    for key, value in start.items():
        changed = not torch.equal(runs[0][key], value)
        assert changed == key.startswith(('decoder.', 'post_quant_conv.')), key
        torch.testing.assert_close(runs[0][key], runs[1][key], atol=1e-6, rtol=0, msg=key)
    assert MetricGoldPipeline.from_pretrained(straight / 'final', device='cpu')


@pytest.mark.slow
def test_smoke_run_learns(tmp_path):
    """The CI scale proof, run exactly as documented (budget: 5 minutes on 2 CPU cores)."""
    output = tmp_path / 'smoke'
    result = subprocess.run(
        [sys.executable, 'training/train.py', '--config', 'training/configs/smoke.yaml',
         '--output', str(output)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((output / 'metrics.json').read_text())
    start, end = metrics['val_abs_rel_start'], metrics['val_abs_rel_end']
    summary = (f'AbsRel untrained {start:.3f}, after the VAE stage '
               f'{metrics["val_abs_rel_unet_start"]:.3f}, end {end:.3f}, constant '
               f'{metrics["val_abs_rel_constant"]:.3f}')
    assert end < 0.5 * start, summary
    # Beyond the VAE stage: the UNet must beat its own start and the best constant depth.
    assert end < 0.9 * metrics['val_abs_rel_unet_start'], summary
    assert end < 0.9 * metrics['val_abs_rel_constant'], summary
    assert metrics['val_delta1_end'] > metrics['val_delta1_constant'], summary
    assert metrics['loss_end'] < 0.6 * metrics['loss_start']
    assert 0 < metrics['vae_depth_abs_rel'] < 0.25
    assert metrics['wall_time_s']['total'] < 300
    pipeline = MetricGoldPipeline.from_pretrained(output / 'final', device='cpu')
    depth = pipeline(np.full((72, 96, 3), 128, np.uint8)).depth
    assert depth.shape == (72, 96) and np.isfinite(depth).all()
    assert sorted(p.name for p in (output / 'checkpoints').iterdir()) == [
        'step_000150', 'step_000300']
    assert list((output / 'logs').glob('events.out.tfevents.*'))
