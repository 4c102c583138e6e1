"""The on-disk cache of trained networks (pretrained DDPMs, the feature classifier), safe for parallel runs.

Chapters share models: chapter 1 trains the DDPMs that chapters 2-5 sample from, and every chapter
scores with the same feature classifier. When notebooks run side by side (pytest-xdist), the first
one to need an entry trains it while holding a file lock on it; the others wait and then load it, so
each entry is trained once. Entries are written atomically (``train.save_model``), and an entry that
does not load (a truncated file from a killed run, a stale format) is trained again with a warning.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from filelock import FileLock

__all__ = ["cache_dir", "cache_lock", "load_or_build"]

T = TypeVar("T")


def cache_dir() -> Path:
    """Cache folder for trained networks: $MINIDIFF_CACHE, else ~/.cache/minidiff."""
    return Path(os.environ.get("MINIDIFF_CACHE") or Path.home() / ".cache" / "minidiff")


@contextmanager
def cache_lock(path) -> Iterator[None]:
    """Hold an inter-process lock on the cache entry ``path`` (a ``<path>.lock`` file next to it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        yield


def load_or_build(path, load: Callable[[Path], T], build: Callable[[Path], T]) -> T:
    """``load(path)`` if the entry exists and loads, else ``build(path)`` (which trains and saves it),
    all under :func:`cache_lock`. A file that exists but fails to load is built again, with a warning
    that names the error."""
    path = Path(path)
    with cache_lock(path):
        if path.exists():
            try:
                return load(path)
            except Exception as err:  # noqa: BLE001 - any unreadable entry is rebuilt, and said so
                warnings.warn(f"the cached file {path} does not load ({type(err).__name__}: {err}); "
                              "training it again and replacing it", RuntimeWarning, stacklevel=3)
        return build(path)
