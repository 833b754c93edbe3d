"""Reading one diffusers sub-model folder: its config, checked, and its weights, checked.

A folder holds ``config.json`` and ``diffusion_pytorch_model[.VARIANT].safetensors`` (or a
sharded index ``diffusion_pytorch_model.safetensors.index[.VARIANT].json`` naming shard files
beside it), as diffusers saves them. Everything a hostile or damaged folder can hold ends in a
:class:`CheckpointError` naming the file: a config whose sizes are zero, negative, absurd or of
the wrong type (the networks would divide by zero or allocate terabytes); an index naming files
outside the folder (absolute paths, ``..``, symlinks leaving it; a hub snapshot's own links into
its ``blobs/`` are allowed); pickled weights unless allowed; NaN/inf weights; tensors that do
not fit the config.
"""

import inspect
import json
import os
from pathlib import Path
from typing import Dict, List, Optional

import torch
from safetensors import SafetensorError, safe_open

from metricgold_ros.errors import CheckpointError
from metricgold_ros.model.hub import snapshot_root

WEIGHT_NAME = 'diffusion_pytorch_model'
ALLOW_PICKLE_HINT = (
    'pickled weights can run code when loaded; convert them to safetensors, or pass '
    '--allow-pickle (Python: allow_pickle=True) if you trust the file')
PICKLE_SUFFIXES = ('.bin', '.ckpt', '.pt', '.pth')
# Config sizes a network is built from: each an integer >= 1 (or a list of them), at most the
# cap (SD2's largest is 1280 channels and 2 layers per block; SDXL's 10 transformer layers).
_SIZE_CAP = 16384
_COUNT_CAP = 64
_SIZES = ('in_channels', 'out_channels', 'latent_channels', 'norm_num_groups',
          'cross_attention_dim', 'attention_head_dim', 'num_attention_heads', 'sample_size',
          'block_out_channels', 'encoder_block_out_channels', 'decoder_block_out_channels',
          'upsampling_scaling_factor')
_COUNTS = ('layers_per_block', 'transformer_layers_per_block', 'num_encoder_blocks',
           'num_decoder_blocks')


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; missing, unreadable or not an object: CheckpointError."""
    if not path.is_file():
        raise CheckpointError(f'{path} is missing')
    try:
        data = json.loads(path.read_text(encoding='utf-8'))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f'{path} is not valid JSON: {err}') from err
    if not isinstance(data, dict):
        raise CheckpointError(f'{path} must hold a JSON object, found {type(data).__name__}')
    return data


def check_config(config: dict, config_path: Path) -> None:
    """Refuse sizes a network cannot be built from, before diffusers divides by them."""
    for key in (*_SIZES, *_COUNTS):
        value = config.get(key)
        if value is None:
            continue
        cap = _COUNT_CAP if key in _COUNTS else _SIZE_CAP
        values = value if isinstance(value, (list, tuple)) else [value]
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= cap
                                 for v in values):
            raise CheckpointError(
                f'{config_path}: {key}={value!r}; expected an integer from 1 to {cap} (or a '
                'non-empty list of them): this config cannot describe a working network (a '
                'damaged or hostile file); use the checkpoint as published')
    groups = config.get('norm_num_groups')
    for key in ('block_out_channels', 'decoder_block_out_channels'):
        channels = config.get(key)
        if isinstance(groups, int) and isinstance(channels, (list, tuple)) and \
                any(c % groups for c in channels):
            raise CheckpointError(
                f'{config_path}: {key}={channels!r} is not divisible into norm_num_groups='
                f'{groups} groups; use the checkpoint as published')


def load_module(cls: type, folder: Path, allow_pickle: bool,
                variant: Optional[str] = None) -> torch.nn.Module:
    """Build ``cls`` from ``folder/config.json`` without random init, then load its weights."""
    from accelerate import init_empty_weights

    config_path = folder / 'config.json'
    if not folder.is_dir():
        raise CheckpointError(f'{folder} is missing: expected a {cls.__name__} sub-folder')
    config = read_json(config_path)
    check_config(config, config_path)
    # Keys the class does not take are ignored by diffusers either way, with a warning on every
    # load (AutoencoderTiny saves 'block_out_channels' and then warns about it).
    accepted = inspect.signature(cls.__init__).parameters
    config = {k: v for k, v in config.items() if k.startswith('_') or k in accepted}
    try:
        with init_empty_weights():
            module = cls.from_config(config)
    except (TypeError, ValueError, KeyError, ArithmeticError, AttributeError, IndexError,
            RuntimeError, AssertionError) as err:
        raise CheckpointError(f'{config_path} does not describe a {cls.__name__}: '
                              f'{type(err).__name__}: {err}') from err
    state = read_state_dict(folder, allow_pickle, variant)
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f'weights in {folder}: {name} holds NaN or inf values (a '
                                  'diverged training run or a damaged file); use another '
                                  'checkpoint')
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        first_line = str(err).splitlines()[0]
        detail = '; '.join(line.strip() for line in str(err).splitlines()[1:4])
        raise CheckpointError(
            f'weights in {folder} do not match {config_path}: {first_line} {detail}') from err
    return module.float().eval().requires_grad_(False)


def read_state_dict(folder: Path, allow_pickle: bool,
                    variant: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Weights of one sub-model folder: safetensors (plain, variant or sharded), else pickles.

    ``variant`` (e.g. ``'fp16'``) reads ``*.{variant}.safetensors`` as diffusers names them; a
    folder without them is an error naming the file, never a silent fall-back.
    """
    suffix = f'.{variant}' if variant else ''
    names = [f'{WEIGHT_NAME}{suffix}.safetensors', f'model{suffix}.safetensors']
    if not variant:  # diffusers' fp16 downloads hold only the variant files
        names.insert(1, f'{WEIGHT_NAME}.fp16.safetensors')
    for name in names:
        if (folder / name).is_file():
            return load_safetensors(folder / name)
    for index in (folder / f'{WEIGHT_NAME}.safetensors.index{suffix}.json',
                  folder / f'model.safetensors.index{suffix}.json'):
        if index.is_file():
            state: Dict[str, torch.Tensor] = {}
            for shard in shard_files(index):
                state.update(load_safetensors(shard))
            return state
    pickled = [p for p in sorted(folder.glob('*')) if p.suffix in PICKLE_SUFFIXES
               and (not variant or p.stem.endswith(suffix))]
    if pickled and not allow_pickle:
        raise CheckpointError(f'{pickled[0]} is a pickled weight file: {ALLOW_PICKLE_HINT}')
    if pickled:
        try:
            return torch.load(pickled[0], map_location='cpu', weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file
            raise CheckpointError(f'{pickled[0]} could not be read as weights: {err}') from err
    if variant:
        present = sorted(p.name for p in folder.glob('*.safetensors')) or ['no weights']
        raise CheckpointError(
            f'{folder / names[0]} is missing: variant={variant!r} asks for it, the folder has '
            f'{", ".join(present)}; use a checkpoint published with that variant, or leave '
            'variant empty for the plain weights')
    raise CheckpointError(
        f'{folder} has no weights: expected {WEIGHT_NAME}.safetensors (or a sharded index)')


def shard_files(index: Path) -> List[Path]:
    """The shard files a sharded index names: each a regular file inside the index's folder.

    Refused, naming the index: a name that is not a plain relative path (absolute, ``..``,
    empty), a file that is missing or not regular, or one reached through a symlink leaving
    the folder (a hub snapshot's links into its repository's ``blobs/`` are allowed).
    """
    folder = index.parent
    weight_map = read_json(index).get('weight_map')
    if not isinstance(weight_map, dict) or not weight_map or \
            not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f'{index}: weight_map must map tensor names to shard file names')
    allowed = [Path(os.path.realpath(folder))]
    root = snapshot_root(folder)
    if root is not None:
        allowed.append(Path(os.path.realpath(root / 'blobs')))
    shards = []
    for name in sorted(set(weight_map.values())):
        parts = Path(name).parts
        if not parts or Path(name).is_absolute() or '..' in parts or '\\' in name or \
                name.startswith('~'):
            raise CheckpointError(f'{index}: shard {name!r} is not a file name inside {folder} '
                                  '(absolute paths and .. are refused); a hostile or damaged '
                                  'index')
        path = folder / name
        real = Path(os.path.realpath(path))
        if not any(_inside(real, base) for base in allowed):
            raise CheckpointError(f'{index}: shard {name!r} leads to {real}, outside {folder} '
                                  '(a symlink leaving the checkpoint); refused')
        if not real.is_file():
            raise CheckpointError(f'{index}: shard {name!r} is missing or not a regular file '
                                  f'in {folder}')
        shards.append(path)
    return shards


def _inside(path: Path, base: Path) -> bool:
    return path == base or base in path.parents


def load_safetensors(path: Path) -> Dict[str, torch.Tensor]:
    """All tensors of one safetensors file, on the CPU."""
    try:
        with safe_open(str(path), framework='pt', device='cpu') as handle:
            # clone(): tensors straight from the file can sit at unaligned addresses, and
            # oneDNN then sums in another order - reloaded models would differ in the last bit.
            return {key: handle.get_tensor(key).clone() for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f'{path} is not a readable safetensors file (truncated, corrupt or pickled data '
            f'under a .safetensors name): {err}') from err

