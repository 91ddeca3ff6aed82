import json

import nbformat
import pytest

from tinymim.reports import load_metrics, record_metrics
from tinymim.runner import NotebookFailed, list_notebooks, run


def _notebook(path, body):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('profile = "smoke"\nrun_dir = None\nfail = False')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.fixture
def notebooks(tmp_path):
    d = tmp_path / "nbs"
    d.mkdir()
    _notebook(d / "01_first.ipynb", "from tinymim.reports import record_metrics\n"
                                    "record_metrics(run_dir, '01_first', {'value': 1, 'profile': profile})")
    _notebook(d / "02_second.ipynb", "if fail:\n    raise ValueError('bad input x')\n"
                                     "from tinymim.reports import record_metrics\n"
                                     "record_metrics(run_dir, '02_second', {'value': 2})")
    (d / "helper.ipynb").write_text("{}")  # not numbered: never run
    return d


def test_runs_in_order_records_metrics_and_skips_completed(notebooks, tmp_path):
    out = tmp_path / "run"
    res = run("smoke", out, notebooks_dir=notebooks, log=lambda *_: None)
    assert res.executed == ["01_first", "02_second"]
    assert (out / "notebooks" / "01_first.ipynb").exists()
    m = load_metrics(out)
    assert m["01_first"]["value"] == 1 and m["01_first"]["profile"] == "smoke" and m["02_second"]["value"] == 2
    again = run("smoke", out, notebooks_dir=notebooks, log=lambda *_: None)
    assert again.executed == [] and again.skipped == ["01_first", "02_second"]


def test_failure_names_notebook_and_cell_and_resumes_there(notebooks, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(NotebookFailed) as e:
        run("smoke", out, notebooks_dir=notebooks, parameters={"fail": True}, log=lambda *_: None)
    msg = str(e.value)
    assert "02_second.ipynb" in msg and "cell 2" in msg and "bad input x" in msg
    state = json.loads((out / "runner.json").read_text())
    assert state["01_first"]["status"] == "completed" and state["02_second"]["status"] == "failed"


def test_only_selects_by_number(notebooks):
    assert [p.stem for p in list_notebooks(notebooks, ["02"])] == ["02_second"]
    with pytest.raises(ValueError, match="09"):
        list_notebooks(notebooks, ["09"])


@pytest.mark.slow  # whole notebooks or studies: `make test`, not `make unit`
def test_the_study_notebook_runs_only_when_named(notebooks, tmp_path):
    _notebook(notebooks / "08_ablations.ipynb", "from tinymim.reports import record_metrics\n"
                                                "record_metrics(run_dir, '08', {'value': 8})")
    res = run("smoke", tmp_path / "run", notebooks_dir=notebooks, log=lambda *_: None)
    assert res.executed == ["01_first", "02_second"]  # a pipeline run leaves the hour-long study out
    res = run("smoke", tmp_path / "run", ["08"], notebooks_dir=notebooks, log=lambda *_: None)
    assert res.executed == ["08_ablations"] and load_metrics(tmp_path / "run")["08"]["value"] == 8


def test_metrics_refuse_non_data(tmp_path):
    record_metrics(tmp_path, "a", {"x": 1.5, "undefined": float("nan")})
    assert load_metrics(tmp_path)["a"]["undefined"] is None
    with pytest.raises(TypeError, match="not JSON data"):
        record_metrics(tmp_path, "b", {"x": object()})
    assert load_metrics(tmp_path)["a"]["x"] == 1.5


@pytest.mark.slow  # whole notebooks or studies: `make test`, not `make unit`
def test_a_torn_runner_state_reruns_instead_of_failing(notebooks, tmp_path):
    out = tmp_path / "run"
    run("smoke", out, notebooks_dir=notebooks, log=lambda *_: None)
    (out / "runner.json").write_text('{"01_first": {"status": "compl')  # killed mid-write (older versions)
    with pytest.warns(UserWarning, match="runner.json"):
        again = run("smoke", out, notebooks_dir=notebooks, log=lambda *_: None)
    assert again.executed == ["01_first", "02_second"]
    assert json.loads((out / "runner.json").read_text())["02_second"]["status"] == "completed"
