"""Project-wide pytest set-up (root conftest, so it applies to tests/ and notebooks/ alike).

- Experiments run at the "small" size unless MINIDIFF_SIZE is already set. It is set here at
  import, before any kernel starts, so the nbval notebook kernels inherit it.
- nbval reads --nbval-sanitize-with relative to the current directory; make it work from any
  directory by resolving it against the project root.
"""

import os
from pathlib import Path

os.environ.setdefault("MINIDIFF_SIZE", "small")


def pytest_configure(config):
    sanitize = getattr(config.option, "nbval_sanitize_with", None)
    if sanitize and not Path(sanitize).is_file():
        candidate = Path(config.rootpath) / sanitize
        if candidate.is_file():
            config.option.nbval_sanitize_with = str(candidate)
