"""How the offline tools treat SIGINT and SIGTERM (one owner for both helpers).

:func:`sigterm_as_interrupt` makes a SIGTERM (what a fleet driver, ``timeout`` or a batch
system sends) raise KeyboardInterrupt like Ctrl-C, so partial outputs are removed on the way
out. :func:`interrupts_deferred` holds both signals back while an output is being renamed into
place or removed, and raises them again after. Both act on the main thread only: elsewhere
signals cannot be set, and Python runs handlers on the main thread anyway.
"""

import contextlib
import signal
import threading
from typing import Any, Iterator, List


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt like Ctrl-C, so the partial output is removed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f'signal {signum}')

    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back inside the block; one that came is raised again after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: List[int] = []
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda signum, frame: held.append(signum))
                for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in dict.fromkeys(held):
            signal.raise_signal(signum)
