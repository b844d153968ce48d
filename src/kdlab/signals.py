"""SIGTERM (what schedulers and ``kill`` send) handled like Ctrl-C: cleanup runs, one message, exit code 143.

:func:`raise_on_sigterm` makes the first SIGTERM raise :class:`Terminated` (a ``KeyboardInterrupt``) wherever the
main thread is, so the ``except BaseException`` cleanups of atomic writes and checkpoints remove their temporaries
and the last complete checkpoint stays resumable. Nothing else is removed: a run stopped before its first checkpoint
keeps its ``config.yaml`` and ``--resume`` starts it at epoch 1 (:meth:`kdlab.engine.trainer.Trainer.run`). A second
SIGTERM during that cleanup ends the process at once; the temporaries it leaves are removed by the next writer
(:mod:`kdlab.engine.atomic`).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

#: exit status of a process ended by SIGTERM (128 + 15), as shells report it
SIGTERM_EXIT = 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process without more cleanup
    raise Terminated()


def raise_on_sigterm() -> None:
    """Make SIGTERM raise :class:`Terminated` in the main thread (a no-op when called from another thread)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)
