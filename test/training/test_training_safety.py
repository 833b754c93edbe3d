"""Training that loses nothing and runs nobody's code (issue 22 items 4 and 6).

Real tiny training runs (the tiny architecture on 64x48 synthetic frames, a few seconds each):
a NaN/inf loss skips the step and then stops the run, checkpoints rotate by integer step, and
``--resume`` never unpickles a file unless told to trust it.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from test_training import _write_config, synthetic_root  # noqa: E402,F401 - the fixture
from training.progress import PROGRESS_FILE, latest_checkpoint, rotate_checkpoints  # noqa: E402
from training.state import (  # noqa: E402
    EMA_FILE, LR_SCHEDULER_FILE, load_extra_state, nonfinite_weights, save_extra_state)
from training.train import main as train_main  # noqa: E402


def _config(tmp_path: Path, root: Path, *, lr: str = '1.0e-3', steps: int = 6) -> Path:
    config = _write_config(tmp_path / 'tiny.yaml', root, '  tiny: true', steps=steps)
    text = config.read_text().replace('lr: 1.0e-3', f'lr: {lr}')
    config.write_text(text.replace('validation: {every: 2,', 'validation: {every: 100,'))
    return config


def _finite_file(path: Path) -> bool:
    from safetensors.torch import load_file

    return all(bool(torch.isfinite(t).all()) for t in load_file(str(path)).values())


# -- 4. non-finite losses, weights and rotation ---------------------------------------------


def test_a_nan_loss_skips_the_step_and_then_stops_the_run(tmp_path, synthetic_root, capsys):
    """lr 1e30: step 1 makes the weights huge, from step 2 on the loss is NaN."""
    config = _config(tmp_path, synthetic_root, lr='1.0e+30')
    out = tmp_path / 'run'
    assert train_main(['--config', str(config), '--output', str(out)]) == 1
    err = capsys.readouterr().err
    assert 'NaN/inf in 3 steps in a row (last: step 4)' in err and 'Lower train.lr' in err
    assert 'step 2: the loss is NaN/inf' in (out / 'train.log').read_text()
    assert not (out / 'final').exists()
    # The checkpoint before the NaNs is kept, and none was written of what came after.
    assert [p.name for p in (out / 'checkpoints').iterdir()] == ['step_000002']
    progress = json.loads((out / 'checkpoints' / 'step_000002' / PROGRESS_FILE).read_text())
    assert progress['step'] == 2 and None not in progress['loss'][:1]
    for weights in (out / 'checkpoints').rglob('*.safetensors'):
        assert _finite_file(weights), weights


def test_weights_with_nan_are_named():
    from metricgold_ros.model.tiny import tiny_unet_config
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**tiny_unet_config())
    assert nonfinite_weights(unet) == []
    with torch.no_grad():
        unet.conv_out.bias[0] = float('nan')
    assert nonfinite_weights(unet) == ['conv_out.bias']


def test_checkpoints_rotate_by_integer_step(tmp_path):
    for step in (999_998, 999_999, 1_000_000):
        folder = tmp_path / f'step_{step:06d}'
        folder.mkdir()
        (folder / PROGRESS_FILE).write_text('{}')
    (tmp_path / 'step_1000001').mkdir()  # no progress.json: incomplete, neither kept nor used
    newest = tmp_path / 'step_1000000'
    removed = rotate_checkpoints(tmp_path, 2, newest)
    assert sorted(p.name for p in removed) == ['step_999998']
    assert newest.is_dir() and (tmp_path / 'step_999999').is_dir()
    assert latest_checkpoint(tmp_path) == newest
    assert rotate_checkpoints(tmp_path, 0, newest) == [tmp_path / 'step_999999']  # keep >= 1
    assert newest.is_dir()


# -- 6. --resume never unpickles ------------------------------------------------------------


def test_schedule_and_ema_are_saved_without_pickles(tmp_path):
    from diffusers.training_utils import EMAModel
    from training.recipe import WarmupExponentialDecay

    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    optimizer = torch.optim.Adam(params, lr=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupExponentialDecay(2, 10, 0.1))
    ema = EMAModel(params, decay=0.9)
    for _ in range(3):
        optimizer.step()
        schedule.step()
        ema.step(params)
    save_extra_state(tmp_path, schedule, ema)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [LR_SCHEDULER_FILE, EMA_FILE, 'ema.safetensors'])
    schedule2 = torch.optim.lr_scheduler.LambdaLR(torch.optim.Adam(params, lr=0.1),
                                                  WarmupExponentialDecay(2, 10, 0.1))
    ema2 = EMAModel([torch.nn.Parameter(torch.zeros_like(p)) for p in params], decay=0.5)
    load_extra_state(tmp_path, schedule2, ema2)
    assert schedule2.state_dict() == schedule.state_dict()
    assert ema2.optimization_step == ema.optimization_step and ema2.decay == ema.decay
    for a, b in zip(ema.shadow_params, ema2.shadow_params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class _Planted:
    """A pickle that touches a file when loaded: what a hostile run folder could hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_resume_refuses_pickled_state_unless_trusted(tmp_path, synthetic_root, capsys):
    config = _config(tmp_path, synthetic_root, steps=4)
    out = tmp_path / 'run'
    assert train_main(['--config', str(config), '--output', str(out),
                       '--stop-at-step', '3']) == 0
    checkpoint = out / 'checkpoints' / 'step_000002'
    assert not list(checkpoint.glob('*.pkl')) or \
        {p.name for p in checkpoint.glob('*.pkl')} <= {'random_states_0.pkl'}
    assert not list(checkpoint.glob('custom_checkpoint_*'))  # nothing accelerate unpickles
    state = json.loads((checkpoint / LR_SCHEDULER_FILE).read_text())
    # An older version's checkpoint: the LR schedule pickled. A hostile one runs code.
    marker = tmp_path / 'code-ran'
    planted = checkpoint / 'custom_checkpoint_0.pkl'
    torch.save(_Planted(marker), planted)
    capsys.readouterr()
    assert train_main(['--config', str(config), '--output', str(out), '--resume']) == 1
    assert not marker.exists()
    assert '--trust-pickled-state' in capsys.readouterr().err
    # The user's own old run folder: resumed when trusted, and new checkpoints are pickle-free.
    torch.save(state, planted)
    (checkpoint / LR_SCHEDULER_FILE).unlink()
    assert train_main(['--config', str(config), '--output', str(out), '--resume',
                       '--trust-pickled-state']) == 0
    newest = latest_checkpoint(out / 'checkpoints')
    assert newest.name == 'step_000004'
    assert not list(newest.glob('custom_checkpoint_*'))
    assert (newest / LR_SCHEDULER_FILE).is_file()
    metrics = json.loads((out / 'metrics.json').read_text())
    assert len(metrics['loss']) == 4 and metrics['skipped_steps'] == []


if __name__ == '__main__':
    sys.exit(pytest.main([__file__]))
