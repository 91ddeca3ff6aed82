"""Test-wide setup: offline, no telemetry, and caches/run directories in a temp folder
so the suite never reads a teacher or dataset left by an earlier run."""

import os
import tempfile

_TMP = tempfile.mkdtemp(prefix="tinymim-tests-")
os.environ.update({
    "FIFTYONE_DO_NOT_TRACK": "true",
    "HF_HUB_OFFLINE": "1",
    "TINYMIM_CACHE": os.path.join(_TMP, "cache"),
    "TINYMIM_RUN_DIR": os.path.join(_TMP, "run"),
    "MPLBACKEND": "Agg",
})


def pytest_collection_modifyitems(config, items):
    """Notebooks train for minutes: mark them slow, so `-m "not slow"` gives the quick
    unit suite while iterating. The README's test command runs everything."""
    import pytest

    for item in items:
        if str(item.fspath).endswith(".ipynb"):
            item.add_marker(pytest.mark.slow)
