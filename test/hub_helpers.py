"""Test helpers: a Hugging Face hub cache built offline, and tiny checkpoints laid out exactly as
the published Marigold / E2E-FT repositories are (file names, ``model_index.json`` fields,
scheduler class and config), with random weights of the real architecture.

The cache is laid out as huggingface_hub lays it out, with its own helpers where it has them
(``repo_folder_name``, its relative-symlink maker): ``models--org--name/refs/<branch>`` holding
the commit hash, ``snapshots/<commit>/<file>`` relative symlinks to ``blobs/<sha256>``. Tests
check the result with ``huggingface_hub.scan_cache_dir``, the hub's own reader.

Published layouts (read from the model repositories' files, December 2026):
- ``prs-eth/marigold-depth-v1-1``: ``MarigoldDepthPipeline``, depth, scale- and shift-invariant,
  4 steps and 768 px by default, ``DDIMScheduler`` with trailing spacing, v-prediction; CLIP text
  encoder and tokenizer; fp16 variants beside the plain weights.
- ``prs-eth/marigold-depth-lcm-v1-0``: ``MarigoldPipeline`` (the older class name), 1 step and
  768 px by default, ``LCMScheduler``; fp16 variants.
- ``GonzaloMG/marigold-e2e-ft-depth``: a ``StableDiffusionPipeline`` folder (no Marigold
  fields: its processing resolution is the caller's, 768 on its card) with the 8-channel UNet
  and a ``DDIMScheduler`` (trailing); one deterministic step.
"""

import copy
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Dict, Optional

SCHEDULER_BASE = {
    'beta_end': 0.012, 'beta_schedule': 'scaled_linear', 'beta_start': 0.00085,
    'clip_sample': False, 'num_train_timesteps': 1000, 'prediction_type': 'v_prediction',
    'set_alpha_to_one': False, 'steps_offset': 1, 'trained_betas': None,
}
PUBLISHED = {
    'prs-eth/marigold-depth-v1-1': {
        'model_index': {
            '_class_name': 'MarigoldDepthPipeline', '_diffusers_version': '0.32.0',
            'prediction_type': 'depth', 'scale_invariant': True, 'shift_invariant': True,
            'default_denoising_steps': 4, 'default_processing_resolution': 768},
        'scheduler': {'_class_name': 'DDIMScheduler', **SCHEDULER_BASE,
                      'timestep_spacing': 'trailing', 'rescale_betas_zero_snr': False},
        'variants': ('fp16',),
        'card': {'steps': None, 'ensemble_size': 1, 'processing_resolution': None},
    },
    'prs-eth/marigold-depth-lcm-v1-0': {
        'model_index': {
            '_class_name': 'MarigoldPipeline', '_diffusers_version': '0.25.0',
            'prediction_type': 'depth', 'scale_invariant': True, 'shift_invariant': True,
            'default_denoising_steps': 1, 'default_processing_resolution': 768},
        'scheduler': {'_class_name': 'LCMScheduler', **SCHEDULER_BASE,
                      'original_inference_steps': 50, 'timestep_scaling': 10.0,
                      'timestep_spacing': 'leading'},
        'variants': ('fp16',),
        'card': {'steps': None, 'ensemble_size': 1, 'processing_resolution': None},
    },
    'GonzaloMG/marigold-e2e-ft-depth': {
        'model_index': {
            '_class_name': 'StableDiffusionPipeline', '_diffusers_version': '0.31.0.dev0',
            'feature_extractor': [None, None], 'image_encoder': [None, None],
            'requires_safety_checker': False, 'safety_checker': [None, None]},
        'scheduler': {'_class_name': 'DDIMScheduler', **SCHEDULER_BASE,
                      'timestep_spacing': 'trailing', 'rescale_betas_zero_snr': False},
        'variants': (),
        'card': {'steps': 1, 'ensemble_size': 1, 'processing_resolution': 768},
    },
}
COMPONENTS = {
    'unet': ['diffusers', 'UNet2DConditionModel'], 'vae': ['diffusers', 'AutoencoderKL'],
    'text_encoder': ['transformers', 'CLIPTextModel'],
    'tokenizer': ['transformers', 'CLIPTokenizer'],
}


def write_tiny_clip(folder: Path, hidden_size: int, variants=()) -> None:
    """A tiny CLIP text encoder (``text_encoder/``) and tokenizer (``tokenizer/``)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer_dir = folder / 'tokenizer'
    tokenizer_dir.mkdir(parents=True)
    chars = [chr(c) for c in range(33, 127)]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({f'{c}</w>': len(chars) + i for i, c in enumerate(chars)})
    vocab.update({'<|startoftext|>': len(vocab), '<|endoftext|>': len(vocab) + 1})
    (tokenizer_dir / 'vocab.json').write_text(json.dumps(vocab))
    (tokenizer_dir / 'merges.txt').write_text('#version: 0.2\n')
    CLIPTokenizer(vocab_file=str(tokenizer_dir / 'vocab.json'),
                  merges_file=str(tokenizer_dir / 'merges.txt'),
                  model_max_length=77).save_pretrained(tokenizer_dir)  # CLIP's 77 tokens
    torch.manual_seed(3)
    encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=hidden_size,
        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
        projection_dim=hidden_size, bos_token_id=len(vocab) - 2, eos_token_id=len(vocab) - 1,
        pad_token_id=len(vocab) - 1))
    for variant in variants:  # first: the plain save writes config.json's dtype, float32
        copy.deepcopy(encoder).half().save_pretrained(
            folder / 'text_encoder', safe_serialization=True, variant=variant)
    encoder.save_pretrained(folder / 'text_encoder', safe_serialization=True)


def write_published_layout(path: Path, repo: str, seed: int = 1) -> Path:
    """A tiny random-weight checkpoint with ``repo``'s published file names and configs."""
    import torch
    from safetensors.torch import save_file

    from metricgold_ros.model.tiny import TINY_CROSS_ATTENTION_DIM, build_tiny_checkpoint

    spec = PUBLISHED[repo]
    checkpoint = build_tiny_checkpoint(seed=seed)
    path.mkdir(parents=True)
    for name, module in (('unet', checkpoint.unet), ('vae', checkpoint.vae)):
        module.save_pretrained(path / name, safe_serialization=True)
        for variant in spec['variants']:
            half = {k: v.half().contiguous() for k, v in module.state_dict().items()}
            save_file(half, str(path / name / f'diffusion_pytorch_model.{variant}.safetensors'))
    write_tiny_clip(path, TINY_CROSS_ATTENTION_DIM, spec['variants'])
    (path / 'scheduler').mkdir()
    (path / 'scheduler' / 'scheduler_config.json').write_text(json.dumps(spec['scheduler']))
    index = {**spec['model_index'], **COMPONENTS,
             'scheduler': ['diffusers', spec['scheduler']['_class_name']]}
    (path / 'model_index.json').write_text(json.dumps(index, indent=2))
    (path / 'README.md').write_text(f'tiny stand-in for {repo}\n')
    torch.manual_seed(0)
    return path


def write_hub_cache(cache: Path, repo: str, source: Path, *, branch: str = 'main',
                    commit: Optional[str] = None) -> Path:
    """Put ``source``'s files into ``cache`` as huggingface_hub stores a downloaded snapshot.

    Returns the snapshot folder. ``commit`` defaults to a hash of the files.
    """
    from huggingface_hub.file_download import _create_symlink, repo_folder_name

    storage = cache / repo_folder_name(repo_id=repo, repo_type='model')
    files: Dict[str, str] = {}
    for file in sorted(p for p in source.rglob('*') if p.is_file()):
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        blob = storage / 'blobs' / digest
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            shutil.copyfile(file, blob)
        files[file.relative_to(source).as_posix()] = digest
    commit = commit or hashlib.sha1(json.dumps(files, sort_keys=True).encode()).hexdigest()
    snapshot = storage / 'snapshots' / commit
    for relative, digest in files.items():
        link = snapshot / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        _create_symlink(str(storage / 'blobs' / digest), str(link))
    (storage / 'refs').mkdir(exist_ok=True)
    (storage / 'refs' / branch).write_text(commit)
    return snapshot


def hub_env(monkeypatch, home: Path) -> Path:
    """``HF_HOME=home`` and ``HF_HUB_OFFLINE=1`` for this test; returns the cache folder."""
    for name in ('HF_HUB_CACHE', 'HUGGINGFACE_HUB_CACHE', 'TRANSFORMERS_OFFLINE'):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv('HF_HOME', str(home))
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    return home / 'hub'


def subprocess_hub_env(home: Path) -> Dict[str, str]:
    """The environment of a child process that sees only the offline cache in ``home``."""
    env = {k: v for k, v in os.environ.items()
           if k not in ('HF_HUB_CACHE', 'HUGGINGFACE_HUB_CACHE')}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE='1')
    return env
