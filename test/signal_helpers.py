"""Children that a test interrupts, whatever way the test run itself was started.

A test run started with SIGINT ignored (``nohup make test &``, a background job of a script,
some CI runners) hands SIG_IGN down to every child, and a Python child that starts with SIGINT
ignored never installs its KeyboardInterrupt handler: the Ctrl-C a test sends is then lost.
Tests that interrupt a child start it with :func:`interruptible` as ``preexec_fn``.
"""

import signal


def interruptible() -> None:
    """``preexec_fn`` of a child a test will interrupt: SIGINT and SIGTERM at their defaults."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
