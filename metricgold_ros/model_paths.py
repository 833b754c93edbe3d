"""Finding and loading the model: a given folder or hub id, else the bundled one, else an error.

The one implementation behind the node's ``model_path``, the tools' ``--model``, the bench,
the demo and the soak script. Nothing here imports torch or ament at module import.
"""

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, List, Optional

from metricgold_ros.errors import CheckpointError

if TYPE_CHECKING:
    from metricgold_ros.model import MetricGoldPipeline

PACKAGE = 'metricgold_ros'
BUNDLED_MODEL = 'metricgold-tiny'
README_MODEL_SECTION = 'README.md, section "Model"'


def bundled_model_candidates() -> List[Path]:
    """Folders that may hold the bundled model, in the order they are tried.

    First beside this module (a source checkout, ``pip install`` and ``colcon build`` all put
    ``models/`` there as package data), then the package's ament share directory when an ament
    index is on the path (a colcon install that placed the model under ``share/``).
    """
    candidates = [Path(__file__).resolve().parent / 'models' / BUNDLED_MODEL]
    try:
        from ament_index_python.packages import (  # imported late: optional, ROS only
            PackageNotFoundError, get_package_share_directory)
    except ImportError:
        return candidates
    try:
        share = Path(get_package_share_directory(PACKAGE))
    except (PackageNotFoundError, LookupError, ValueError, OSError):
        return candidates
    candidates.append(share / 'models' / BUNDLED_MODEL)
    return candidates


def bundled_model_path() -> Optional[Path]:
    """The bundled model folder when one is installed (has ``model_index.json``), else None."""
    for folder in bundled_model_candidates():
        if (folder / 'model_index.json').is_file():
            return folder
    return None


def bundled_model_notice(path: Path, option: str) -> str:
    """The one line that says the bundled model is in use, and what it is."""
    return (f'{option} not set: using the bundled model {BUNDLED_MODEL} ({path}), a small model '
            'trained on synthetic rooms and streets for demos and tests, not for real '
            f'decisions (see its MODEL_CARD.md); set {option} for a real checkpoint')


def missing_model_message(option: str = 'model_path') -> str:
    """What to tell a user who started without a model: the option, the command, the doc."""
    looked = ', '.join(str(path) for path in bundled_model_candidates())
    usage = f'{option} DIR' if option.startswith('-') else f'-p {option}:=DIR'
    return (f'{option} is not set and no bundled model is installed (looked in {looked}). '
            'Create one with `metricgold init-model DIR --tiny` (untrained, for smoke tests) or '
            f'download a trained MetricGold checkpoint, then pass {usage}; see '
            f'{README_MODEL_SECTION}.')


def _said(option: str, value: object) -> str:
    """``--model /x`` for a flag, ``model_path='/x'`` for a node parameter."""
    return f'{option} {value}' if option.startswith('-') else f'{option}={str(value)!r}'


def _stderr(line: str) -> None:
    print(f'metricgold: {line}', file=sys.stderr)


def resolve_model_path(given: Optional[str], option: str,
                       notify: Callable[[str], None] = _stderr, *,
                       variant: Optional[str] = None, allow_pickle: bool = False) -> Path:
    """The model folder: ``given`` (a folder or a hub id), else the bundled model.

    Args:
        given: a local folder; or a Hugging Face repository id ``org/name[@revision]``,
            resolved through the hub cache (downloaded once, see :mod:`.model.hub`); empty or
            None for the bundled model (said once through ``notify``). A folder wins over an
            id of the same spelling.
        option: how the user sets it (``'model_path'``, ``'--model'``), for the messages.
        notify: gets the bundled-model notice, the hub lookup and download progress.
        variant, allow_pickle: which weights a download fetches (``*.{variant}.safetensors``;
            pickles only when allowed).
    Raises:
        CheckpointError: ``given`` is neither a folder nor a resolvable id, or none was given
            and none is installed.
    """
    if given:
        return _folder_or_repo_id(given, option, notify, variant, allow_pickle)
    path = bundled_model_path()
    if path is None:
        raise CheckpointError(missing_model_message(option))
    notify(bundled_model_notice(path, option))
    return path


def _folder_or_repo_id(given: str, option: str, notify: Callable[[str], None],
                       variant: Optional[str], allow_pickle: bool) -> Path:
    """``given`` as a local folder, else as a hub id; neither: the one-line error."""
    from metricgold_ros.model.hub import parse_repo_id, resolve_repo_id

    path = Path(given).expanduser()
    if path.is_dir():
        return path
    repo_id = parse_repo_id(given)
    if repo_id is not None:
        return resolve_repo_id(repo_id, _said(option, given), notify, variant=variant,
                               allow_pickle=allow_pickle)
    raise CheckpointError(
        f'{_said(option, given)}: no such folder, and not a Hugging Face id (org/name'
        '[@revision]). Pass a local MetricGold or Marigold checkpoint folder or a hub id '
        '(`metricgold init-model DIR --tiny` writes an untrained one for smoke tests; see '
        f'{README_MODEL_SECTION})')


def _decoder_option(option: str) -> str:
    """``--decoder`` beside ``--model``, ``decoder`` beside the node's ``model_path``."""
    return '--decoder' if option.startswith('-') else 'decoder'


def load_model(given: Optional[str], option: str, *, device: str = 'auto',
               dtype: str = 'auto', allow_pickle: bool = False,
               notify: Callable[[str], None] = _stderr, variant: Optional[str] = None,
               decoder: Optional[str] = None, **kwargs: bool) -> 'MetricGoldPipeline':
    """The pipeline of :func:`resolve_model_path`'s folder on ``device``.

    Args:
        given, option, notify: as :func:`resolve_model_path` (a folder, a hub id or empty).
        variant: weights variant (``'fp16'``: ``*.fp16.safetensors``); empty or None: plain.
        decoder: a light decoder for the decode stage, a folder or hub id of an
            ``AutoencoderTiny`` (TAESD) or ``AutoencoderKL``; empty or None: the model's VAE.
            Encoding stays with the model's VAE.

    Every way a folder can fail to load (missing or corrupt files, wrong architecture, a
    loader's own exception) ends in a :class:`CheckpointError` that names the folder, never a
    traceback. ``kwargs`` go to :meth:`MetricGoldPipeline.from_pretrained`.
    """
    variant = variant or None
    path = resolve_model_path(given, option, notify, variant=variant, allow_pickle=allow_pickle)
    decoder_path = None
    if decoder:
        decoder_path = _folder_or_repo_id(decoder, _decoder_option(option), notify, None,
                                          allow_pickle)
    from metricgold_ros.model import MetricGoldPipeline  # torch/diffusers: imported when needed

    try:
        return MetricGoldPipeline.from_pretrained(path, device=device, dtype=dtype,
                                                  allow_pickle=allow_pickle, variant=variant,
                                                  decoder=decoder_path, **kwargs)
    except CheckpointError as err:
        raise CheckpointError(f'{_said(option, given or path)}: {err}') from err
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, ImportError) as err:
        raise CheckpointError(f'{_said(option, given or path)} cannot be loaded: '
                              f'{type(err).__name__}: {err}') from err


def model_or_untrained(given: Optional[Path], scratch: Path,
                       notify: Callable[[str], None] = _stderr) -> Path:
    """``given``, else the bundled model, else an untrained tiny model written in ``scratch``.

    For the demo and the soak run, which must run on a clone without trained weights; the
    untrained model's depth is meaningless, and ``notify`` says so.
    """
    if given is not None:
        return resolve_model_path(str(given), '--model', notify)
    bundled = bundled_model_path()
    if bundled is not None:
        return bundled
    from metricgold_ros.model import build_tiny_checkpoint, save_checkpoint

    path = scratch / '.untrained-model'
    notify(f'no bundled model found; using a randomly initialised tiny model ({path}): depth '
           'will be meaningless')
    if not path.exists():
        save_checkpoint(path, build_tiny_checkpoint())
    return path
