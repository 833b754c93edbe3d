"""Hugging Face repository ids (``org/name[@revision]``) -> a snapshot folder in the hub cache.

A model named by id is downloaded once into huggingface_hub's standard cache (``HF_HUB_CACHE``,
else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``) and then loaded from that folder by the
same safetensors-only loader as any local folder. Only what the loader reads is fetched:
configs, tokenizer files and safetensors weights of the asked variant (pickled weights only
with ``allow_pickle``). Offline (``HF_HUB_OFFLINE=1``, or the hub unreachable) a cached model
loads; an uncached one is a one-line :class:`CheckpointError` naming the id, the cache folder
and the command that downloads it elsewhere.

The environment is read at each call (huggingface_hub reads it once, at import), so a process
that sets ``HF_HOME`` or ``HF_HUB_OFFLINE`` after importing this still gets what it set.
Nothing here imports torch; huggingface_hub is imported when an id is resolved.
"""

import os
import re
import time
from pathlib import Path
from typing import Callable, List, NamedTuple, Optional

from metricgold_ros.errors import CheckpointError

# org/name as the hub spells repository names (letters, digits, '-', '_', '.'), then an
# optional @revision (a branch, tag or commit hash).
_REPO_ID = re.compile(r'^(?P<repo>[\w.-]+/[\w.-]+)(@(?P<revision>[\w./-]+))?$')
_TRUE = {'1', 'ON', 'YES', 'TRUE'}  # huggingface_hub's spelling of a true environment value
PROGRESS_EVERY_S = 5.0
KNOWN_VARIANTS = ('fp16', 'bf16', 'fp32', 'non_ema', 'ema')


class RepoId(NamedTuple):
    """A parsed ``org/name[@revision]``; ``revision`` None means the default branch."""

    repo: str
    revision: Optional[str]

    def __str__(self) -> str:
        return self.repo if self.revision is None else f'{self.repo}@{self.revision}'


def parse_repo_id(text: str) -> Optional[RepoId]:
    """``RepoId`` when ``text`` is spelled as a hub id (``org/name[@revision]``), else None.

    Anything with more than one ``/`` before ``@``, a leading ``.``, ``~`` or ``/``, ``..`` or
    ``--`` (huggingface_hub's own rules) is a path, never an id.
    """
    match = _REPO_ID.match(text.strip())
    if match is None:
        return None
    repo = match.group('repo')
    if '..' in repo or '--' in repo or any(part.startswith('.') or part.endswith('.')
                                            for part in repo.split('/')):
        return None
    revision = match.group('revision')
    if revision is not None and ('..' in revision or revision.startswith('/')):
        return None
    return RepoId(repo, revision)


def hub_cache_dir() -> Path:
    """The hub cache folder huggingface_hub would use with the current environment."""
    home = os.environ.get('HF_HOME') or os.path.join(
        os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache'),
        'huggingface')
    hub = os.environ.get('HF_HUB_CACHE') or os.environ.get('HUGGINGFACE_HUB_CACHE') or \
        os.path.join(os.path.expandvars(os.path.expanduser(home)), 'hub')
    return Path(os.path.expandvars(os.path.expanduser(hub)))


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) forbids downloads."""
    value = os.environ.get('HF_HUB_OFFLINE') or os.environ.get('TRANSFORMERS_OFFLINE') or ''
    return value.upper() in _TRUE


def download_command(repo_id: RepoId) -> str:
    """The shell command that puts ``repo_id`` into a hub cache on a machine with network."""
    revision = '' if repo_id.revision is None else f' --revision {repo_id.revision}'
    return f'hf download {repo_id.repo}{revision}'


def allow_patterns(variant: Optional[str], allow_pickle: bool) -> List[str]:
    """What a snapshot download fetches: configs, tokenizers and the variant's weights."""
    patterns = ['*.json', '*.txt', '*.md', 'tokenizer/*', 'empty_text_embedding.safetensors']
    if variant:  # diffusers' names: NAME.fp16.safetensors, NAME.fp16-00001-of-00002.safetensors
        patterns += [f'*.{variant}.safetensors', f'*.{variant}-*.safetensors']
    else:
        patterns += ['*.safetensors']
    if allow_pickle:
        suffix = f'.{variant}' if variant else ''
        patterns += [f'*{suffix}.bin', f'*{suffix}.ckpt']
    return patterns


def ignore_patterns(variant: Optional[str]) -> List[str]:
    """The other variants' weights (the plain ones when a variant is asked for them too)."""
    return [pattern for other in KNOWN_VARIANTS if other != variant
            for pattern in (f'*.{other}.safetensors', f'*.{other}-*.safetensors')]


def resolve_repo_id(repo_id: RepoId, said: str, notify: Callable[[str], None], *,
                    variant: Optional[str] = None, allow_pickle: bool = False) -> Path:
    """The local snapshot folder of ``repo_id``, downloaded into the hub cache when needed.

    Args:
        said: how the user named it (``"model_path='org/name'"``, ``'--model org/name'``),
            the start of every message.
        notify: gets one line when the lookup starts, and download progress every few
            seconds while files arrive.
        variant: fetch ``*.{variant}.safetensors`` instead of the plain weights.
    Raises:
        CheckpointError: not cached and cannot be downloaded (offline, unreachable, no such
            repository or revision), in one line with the command that fetches it.
    """
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError,
                                            LocalEntryNotFoundError, RepositoryNotFoundError,
                                            RevisionNotFoundError)
    except ImportError as err:  # pragma: no cover - installed with diffusers
        raise CheckpointError(f'{said}: a hub id needs huggingface_hub '
                              '(`pip install huggingface_hub`)') from err
    cache = hub_cache_dir()
    offline = hub_offline()
    notify(f'{said}: looking up the Hugging Face repository in the hub cache {cache}'
           + (' (HF_HUB_OFFLINE: no downloads)' if offline else '; downloading what is missing'))
    try:
        folder = snapshot_download(
            repo_id.repo, revision=repo_id.revision, cache_dir=str(cache),
            local_files_only=offline, allow_patterns=allow_patterns(variant, allow_pickle),
            ignore_patterns=ignore_patterns(variant), tqdm_class=_progress_class(said, notify))
    except LocalEntryNotFoundError as err:
        why = 'HF_HUB_OFFLINE=1 forbids downloading' if offline else \
            'the hub could not be reached'
        raise CheckpointError(
            f'{said}: not in the Hugging Face cache {cache} and {why}; on a machine with '
            f'network run `{download_command(repo_id)}` (older huggingface_hub: '
            f'`huggingface-cli download {download_command(repo_id)[len("hf download "):]}`) '
            'and copy its '
            f'{cache.name}/models--{repo_id.repo.replace("/", "--")} folder into {cache} '
            '(or set HF_HOME to where it is)') from err
    except (RepositoryNotFoundError, GatedRepoError) as err:
        raise CheckpointError(f'{said}: no such repository on the hub, or it is private or '
                              'gated (log in with `hf auth login`); check the spelling, or '
                              'pass a local folder') from err
    except RevisionNotFoundError as err:
        raise CheckpointError(f'{said}: the repository has no revision '
                              f'{repo_id.revision!r}; give a branch, tag or commit hash') from err
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise CheckpointError(f'{said}: download failed: {type(err).__name__}: '
                              f'{str(err).splitlines()[0] if str(err) else ""}') from err
    return Path(folder)


def snapshot_root(folder: Path) -> Optional[Path]:
    """The ``models--org--name`` folder when ``folder`` lies in a hub snapshot, else None.

    Snapshot files are symlinks into that folder's ``blobs/``; a checkpoint there may read
    them (and nothing else outside itself).
    """
    folder = Path(os.path.abspath(folder))
    for parent in (folder, *folder.parents):
        if parent.parent.name == 'snapshots' and parent.parent.parent.name.startswith(
                'models--'):
            return parent.parent.parent
    return None


def _progress_class(said: str, notify: Callable[[str], None]) -> type:
    """A tqdm class that reports through ``notify`` at most every few seconds, not a bar."""
    from tqdm.auto import tqdm

    class LoggedProgress(tqdm):  # type: ignore[misc, valid-type]
        """huggingface_hub's progress, as log lines."""

        def __init__(self, *args, **kwargs) -> None:
            self._devnull = open(os.devnull, 'w')  # noqa: SIM115 - closed in close()
            kwargs.update(disable=False, file=self._devnull)
            super().__init__(*args, **kwargs)
            self._said_at = 0.0

        def update(self, n: float = 1) -> Optional[bool]:
            shown = super().update(n)
            now = time.monotonic()
            if now - self._said_at >= PROGRESS_EVERY_S or (self.total and self.n >= self.total):
                self._said_at = now
                def size(value: float) -> str:
                    return self.format_sizeof(value, divisor=1000) if self.unit_scale else \
                        f'{value:g}'

                total = f'/{size(self.total)}' if self.total else ''
                notify(f'{said}: {self.desc or "downloading"} {size(self.n)}{total} '
                       f'{self.unit or ""}'.rstrip())
            return shown

        def close(self) -> None:
            super().close()
            self._devnull.close()

    return LoggedProgress
