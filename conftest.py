"""Project-wide pytest set-up (root conftest, so it applies to tests/ and notebooks/ alike).

- Experiments run at the "small" size unless MINIDIFF_SIZE is already set. It is set here at
  import, before any kernel starts, so the nbval notebook kernels inherit it.
- The test run uses two pytest-xdist workers (pytest.ini). On a 2-core machine two busy processes
  with several OpenMP threads each run 24-43x slower (OpenMP busy-waits for its threads), so every
  worker, and every notebook kernel it starts, runs torch on one thread, and OpenMP's waiting policy
  is PASSIVE. Both are set here before torch is imported.
- Chapter 1 trains the models that chapters 2-5 load, so it is scheduled first (the cache's file
  lock keeps a parallel chapter from using a half-written model either way; it would train its own).
- nbval reads --nbval-sanitize-with relative to the current directory; make it work from any
  directory by resolving it against the project root.
"""

import os
from pathlib import Path

os.environ.setdefault("MINIDIFF_SIZE", "small")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"

FIRST = "01_ddpm.ipynb"


def pytest_configure(config):
    sanitize = getattr(config.option, "nbval_sanitize_with", None)
    if sanitize and not Path(sanitize).is_file():
        candidate = Path(config.rootpath) / sanitize
        if candidate.is_file():
            config.option.nbval_sanitize_with = str(candidate)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


def pytest_collection_modifyitems(session, config, items):
    """Chapter 1 first (it trains and caches the models of chapters 2-5), the other files after it in
    their usual order. The order is the same in every worker, as pytest-xdist requires."""
    items.sort(key=lambda item: 0 if Path(str(item.fspath)).name == FIRST else 1)
