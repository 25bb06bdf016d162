"""Work run on the other core beside the caller's own."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Callable, TypeVar

T = TypeVar("T")


def in_background(job: Callable[[], T], name: str = "lowmag-beside") -> "Future[T]":
    """Run ``job`` in a new daemon thread now; its result (or exception) comes from the future.

    A thread per job, never a pool: a pool's threads do not survive a fork (training data
    loaders fork), and a job submitted there would wait forever."""
    future: Future[T] = Future()

    def run() -> None:
        try:
            future.set_result(job())
        except BaseException as error:  # handed to whoever waits on the future
            future.set_exception(error)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future
