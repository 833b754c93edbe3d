"""Resumable training state that ``--resume`` reads without unpickling anything.

accelerate writes the UNet (safetensors), Adam's state, the gradient scaler and the RNG states,
and reads them back with ``torch.load(weights_only=True)``. Objects registered with
``register_for_checkpointing`` it would read with ``weights_only=False``: a checkpoint folder
from someone else could run any code. So the two objects the trainer keeps besides, the LR
schedule and the EMA weights, are written here as JSON and safetensors and never registered:

- ``lr_scheduler.json``: ``LambdaLR.state_dict()`` (numbers; the schedule object's fields);
- ``ema.safetensors`` + ``ema.json``: the EMA's shadow weights and its counters.

Run folders of older versions hold ``custom_checkpoint_N.pkl`` instead; resuming one needs
``--trust-pickled-state`` (:func:`load_training_state`).
"""

import json
from pathlib import Path
from typing import Any, List, Optional

import torch

from metricgold_ros.errors import MetricGoldError

LR_SCHEDULER_FILE = 'lr_scheduler.json'
EMA_WEIGHTS_FILE = 'ema.safetensors'
EMA_FILE = 'ema.json'
PICKLED_STATE_GLOB = 'custom_checkpoint_*.pkl'


def save_extra_state(folder: Path, lr_scheduler: Any, ema: Any) -> None:
    """Write the LR schedule (JSON) and, when not None, the EMA (safetensors + JSON)."""
    from safetensors.torch import save_file

    state = lr_scheduler.state_dict()
    (folder / LR_SCHEDULER_FILE).write_text(json.dumps(state, allow_nan=False) + '\n')
    if ema is not None:
        data = ema.state_dict()
        shadow = data.pop('shadow_params')
        save_file({f'shadow.{i}': p.detach().contiguous().cpu() for i, p in enumerate(shadow)},
                  str(folder / EMA_WEIGHTS_FILE))
        (folder / EMA_FILE).write_text(json.dumps(data, allow_nan=False) + '\n')


def load_extra_state(folder: Path, lr_scheduler: Any, ema: Any) -> None:
    """Read what :func:`save_extra_state` wrote into ``lr_scheduler`` and ``ema``."""
    from safetensors.torch import load_file

    try:
        if lr_scheduler is not None:
            lr_scheduler.load_state_dict(json.loads((folder / LR_SCHEDULER_FILE).read_text()))
        if ema is not None:
            data = json.loads((folder / EMA_FILE).read_text())
            tensors = load_file(str(folder / EMA_WEIGHTS_FILE))
            shadow: List[torch.Tensor] = [tensors[f'shadow.{i}'] for i in range(len(tensors))]
            ema.load_state_dict({**data, 'shadow_params': shadow})
    except (OSError, ValueError, KeyError) as err:
        raise MetricGoldError(f'{folder}: the LR schedule or EMA state cannot be read ({err}); '
                              'the checkpoint is incomplete: remove it to resume from the one '
                              'before') from err


def pickled_state(folder: Path) -> List[Path]:
    """The pickled state files (``custom_checkpoint_N.pkl``) of an older run's checkpoint."""
    return sorted(folder.glob(PICKLED_STATE_GLOB))


def load_training_state(accelerator: Any, folder: Path, ema: Any, device: torch.device,
                        lr_scheduler: Any = None, *, trust_pickled_state: bool = False) -> None:
    """``accelerator.load_state(folder)`` plus the LR schedule and EMA, then the EMA weights
    back on the training ``device``.

    A checkpoint of an older version keeps the schedule and EMA pickled; reading it runs any
    code the files hold, so it is refused unless ``trust_pickled_state``. accelerate restores
    such objects with ``map_location='cpu'``; on a GPU the next ``ema.step`` would then mix CPU
    shadow weights with CUDA parameters and fail, hence the move.
    """
    pickled = pickled_state(folder)
    if pickled and not trust_pickled_state:
        raise MetricGoldError(
            f'{folder} keeps training state as pickles ({", ".join(p.name for p in pickled)}, '
            'written by an older metricgold); loading a pickle runs whatever code it holds. '
            'Pass --trust-pickled-state if you made this run folder yourself, or start a new '
            'run; checkpoints written from then on are pickle-free')
    if pickled:
        objects = [lr_scheduler] + ([ema] if ema is not None else [])
        accelerator.register_for_checkpointing(*objects)  # the order the old trainer used
        try:
            accelerator.load_state(str(folder))
        finally:  # new checkpoints keep these as JSON/safetensors, never as pickles again
            accelerator._custom_objects.clear()
    else:
        accelerator.load_state(str(folder))
        load_extra_state(folder, lr_scheduler, ema)
    if ema is not None:
        ema.to(device)


def nonfinite_tensors(named: Any, limit: int = 3) -> List[str]:
    """Names of up to ``limit`` tensors of ``named`` ((name, tensor) pairs) holding NaN/inf."""
    bad: List[str] = []
    for name, tensor in named:
        if not bool(torch.isfinite(tensor.detach()).all()):
            bad.append(name)
            if len(bad) >= limit:
                break
    return bad


def nonfinite_weights(unet: torch.nn.Module, ema: Optional[Any] = None) -> List[str]:
    """The UNet parameters (and EMA shadow weights) that hold NaN/inf: a checkpoint of them
    would be useless, and saving it could rotate the last good one away."""
    bad = nonfinite_tensors(unet.named_parameters())
    if ema is not None:
        bad += [f'ema.{name}' for name in nonfinite_tensors(
            (str(i), p) for i, p in enumerate(ema.shadow_params))]
    return bad
