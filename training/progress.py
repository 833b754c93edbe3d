"""Bookkeeping of a training run: checkpoints on disk, ``metrics.json``, log output.

``progress.json`` (in every ``checkpoints/step_NNNNNN/``) holds what the accelerator state does
not: the step, the data position (``MixedBatchSampler`` state: seed and batch number), the loss,
learning-rate and validation curves, the VAE stage report and the constant-depth baseline.
"""

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from training.config import Config

PROGRESS_FILE = 'progress.json'
LOGGER = logging.getLogger('metricgold.train')


def checkpoint_folder(folder: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives under ``folder`` (``DIR/checkpoints``)."""
    return folder / f'step_{step:06d}'


def checkpoints_by_step(folder: Path) -> List[Tuple[int, Path]]:
    """The complete ``step_N`` folders (with progress.json) as ``(step, folder)``, by step.

    Ordered by the integer step, not the name: ``step_1000000`` comes after ``step_999999``.
    """
    found = []
    for path in folder.glob('step_*'):
        match = re.fullmatch(r'step_(\d+)', path.name)
        if match and path.is_dir() and (path / PROGRESS_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(folder: Path) -> Optional[Path]:
    """The complete ``step_NNNNNN`` folder with the highest step, or None."""
    done = checkpoints_by_step(folder)
    return done[-1][1] if done else None


def rotate_checkpoints(folder: Path, keep: int, newest: Path) -> List[Path]:
    """Delete all but the ``keep`` newest complete checkpoints (by step); ``newest``, the one
    just written, always stays. Returns the deleted folders."""
    done = [path for _, path in checkpoints_by_step(folder)]
    old = [path for path in done[:max(0, len(done) - max(1, keep))] if path != newest]
    for path in old:
        shutil.rmtree(path)
    return old


def checkpoint_bytes(unet: 'torch.nn.Module', vae: 'torch.nn.Module', ema: bool) -> tuple:
    """``(state, model)``: bytes of one resumable checkpoint's accelerator state (the UNet's
    weights, Adam's two moments, the EMA copy) and of its loadable ``model/`` (UNet + VAE)."""
    def size(module):
        return sum(p.numel() * p.element_size() for p in module.parameters())

    return size(unet) * (3 + int(ema)), size(unet) + size(vae)


def check_checkpoint_disk(output: Path, state_bytes: int, model_bytes: int,
                          keep: Optional[int]) -> None:
    """Log what the run's checkpoints will take and warn now when ``output``'s disk is short.

    With ``keep`` checkpoints kept, a new one is written before the oldest goes, and
    ``final/`` is linked to the last one's ``model/`` (``keep`` None: no checkpoints).
    """
    free = shutil.disk_usage(output).free
    if keep is None:
        need = model_bytes
        LOGGER.info('no resumable checkpoints (train.checkpoint_every: null); final/ %s, %s '
                    'free in %s', _size(model_bytes), _size(free), output)
    else:
        need = (keep + 1) * (state_bytes + model_bytes)
        LOGGER.info('checkpoints: %s each (accelerator state %s + model/ %s), up to %d at '
                    'once; %s free in %s', _size(state_bytes + model_bytes), _size(state_bytes),
                    _size(model_bytes), keep + 1, _size(free), output)
    if free < need:
        LOGGER.warning('%s has %s free but the checkpoints need ~%s: the run will fail when '
                       'the disk fills. Free space, lower train.keep_checkpoints, or set '
                       'train.checkpoint_every: null (final/ only, no --resume)',
                       output, _size(free), _size(need))


def _size(nbytes: float) -> str:
    return f'{nbytes / 1e9:.1f} GB' if nbytes >= 1e8 else f'{nbytes / 1e6:.0f} MB'


def link_final(checkpoint_model: Path, final: Path) -> bool:
    """``final`` as hard links to the files of the last checkpoint's ``model/`` (the same
    weights: no second copy on disk), renamed into place complete; False when the file system
    cannot link (the caller then writes ``final`` itself)."""
    from metricgold_ros.atomic import atomic_path

    try:
        with atomic_path(final, directory=True) as temp:
            shutil.copytree(checkpoint_model, temp, copy_function=os.link, dirs_exist_ok=True)
    except OSError as err:
        LOGGER.info('final/ is written out (hard links to %s failed: %s)', checkpoint_model, err)
        return False
    return True


def summarize(progress: dict, config: Config, wall_s: Dict[str, float],
              total_s: float) -> dict:
    """``metrics.json``: start/end numbers first, then the curves.

    ``val_abs_rel_start`` is the model before any training: for a from-scratch (tiny) model
    the random VAE and UNet, before the VAE stage (``val_abs_rel_unet_start`` is the one after
    it); otherwise the pretrained starting point. ``val_abs_rel_constant`` is the best constant
    depth (the training median) on the same frames: a model that learnt nothing beats neither.
    """
    val = progress['val']
    losses = [x for x in progress['loss'] if x is not None]  # None: a skipped (NaN/inf) step
    vae = dict(progress.get('vae') or {})
    untrained = vae.pop('val_untrained', None)
    first = untrained or (val[0] if val else None)
    baseline = progress.get('baseline') or {}
    window = max(1, min(10, len(losses) // 5 or 1))
    summary = {
        'val_abs_rel_start': first['abs_rel'] if first else None,
        'val_abs_rel_end': val[-1]['abs_rel'] if val else None,
        'val_delta1_start': first['delta1'] if first else None,
        'val_delta1_end': val[-1]['delta1'] if val else None,
        'val_abs_rel_unet_start': val[0]['abs_rel'] if val else None,
        'val_abs_rel_constant': baseline.get('abs_rel'),
        'val_delta1_constant': baseline.get('delta1'),
        'constant_depth_m': baseline.get('depth_m'),
        'loss_start': float(np.mean(losses[:window])) if losses else None,
        'loss_end': float(np.mean(losses[-window:])) if losses else None,
        'steps': progress['step'],
        'vae_depth_abs_rel': vae.get('depth_abs_rel'),
        'wall_time_s': {'total': total_s, **wall_s},
        'val_steps': [v['step'] for v in val],
        'val_abs_rel': [v['abs_rel'] for v in val],
        'val_delta1': [v['delta1'] for v in val],
        'loss': progress['loss'],
        'skipped_steps': progress.get('skipped_steps', []),
        'lr': progress['lr'],
        'val': val,
    }
    if untrained:
        summary['val_untrained'] = untrained
    if vae:
        curve = vae.pop('loss', [])
        vae['loss_start'] = float(np.mean(curve[:10])) if curve else None
        vae['loss_end'] = float(np.mean(curve[-10:])) if curve else None
        summary['vae'] = {**vae, 'loss': curve}
    summary['config'] = config.to_dict()
    return summary


def fmt(value: Optional[float]) -> str:
    return 'n/a' if value is None else f'{value:.4f}'


def setup_logging(output: Path, main_process: bool) -> None:
    """INFO lines of the trainer's modules to stderr and ``output/train.log`` (main process)."""
    handlers: List[logging.Handler] = [logging.StreamHandler()]
    if main_process:
        handlers.append(logging.FileHandler(output / 'train.log'))
    for handler in handlers:
        handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(name)s: %(message)s'))
        handler._metricgold_train = True
    for name in ('metricgold', 'training'):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO if main_process else logging.WARNING)
        for old in [h for h in logger.handlers if getattr(h, '_metricgold_train', False)]:
            logger.removeHandler(old)
            old.close()
        for handler in handlers:
            logger.addHandler(handler)
