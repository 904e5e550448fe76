"""Processes that must not outlive the one that started them."""

from __future__ import annotations

import os
import threading
import time


def exit_with(parent: int) -> None:
    """Exit this process once `parent` (the pid that started it) is gone. Killed outright, a
    parent cannot stop its children (a process pool's workers, a server's worker), which would
    otherwise idle on their memory (and a GPU) forever. A daemon thread checks once a second."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
