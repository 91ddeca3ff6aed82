"""Test-wide setup: offline, no telemetry, caches/run directories in a temp folder so the
suite never reads a teacher or dataset left by an earlier run, and the notebooks at the
`tiny` profile (their parameters cell reads TINYMIM_NOTEBOOK_PROFILE): nbmake checks that
they run; `make run` runs them at `smoke`, and the committed report shows its numbers."""

import os
import tempfile

import pytest

_TMP = tempfile.mkdtemp(prefix="tinymim-tests-")
os.environ.update({
    "FIFTYONE_DO_NOT_TRACK": "true",
    "HF_HUB_OFFLINE": "1",
    "TINYMIM_CACHE": os.path.join(_TMP, "cache"),
    "TINYMIM_RUN_DIR": os.path.join(_TMP, "run"),
    "MPLBACKEND": "Agg",
    "TINYMIM_NOTEBOOK_PROFILE": "tiny",
})


def pytest_collection_modifyitems(config, items):
    """Notebooks train for minutes: mark them slow, so `-m "not slow"` gives the quick
    unit suite while iterating. The README's test command runs everything."""
    for item in items:
        if str(item.fspath).endswith(".ipynb"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """The real local SLURM of tests/local_slurm.py, for the whole session: installed with apt
    when missing (as `make test` does), skipped with the reason where that is impossible --
    except under CI=true, where a missing SLURM fails the tests that need it."""
    from tests.local_slurm import LocalSlurm, install

    refuse = pytest.fail if os.environ.get("CI") == "true" else pytest.skip
    why = install()
    if why:
        refuse(why)
    try:
        cluster = LocalSlurm(tmp_path_factory.mktemp("slurm")).start()
    except (RuntimeError, OSError, KeyError) as e:  # e.g. not root: munged cannot run as `munge`
        refuse(f"cannot start a local SLURM here: {e}")
    saved = {k: os.environ.get(k) for k in cluster.env}
    os.environ.update(cluster.env)  # submitit's sbatch/squeue/scancel/sacct find this cluster
    try:
        yield cluster
    finally:
        cluster.stop()
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)

