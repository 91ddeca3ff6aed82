"""Exploring a run: the attention explorer for JupyterLab (`widget.py`) and a FiftyOne dataset
of a run (`fiftyone.py`), over the models a run directory holds (`runs.py`)."""

from .fiftyone import FiftyOneUnavailable, build_fiftyone, dataset_name
from .runs import RunModel, load_model, run_models
from .widget import KINDS, AttentionExplorer, ModelMaps, compute_maps, mapped_block, render_panel, select_map

__all__ = ["KINDS", "AttentionExplorer", "FiftyOneUnavailable", "ModelMaps", "RunModel", "build_fiftyone",
           "compute_maps", "dataset_name", "load_model", "mapped_block", "render_panel", "run_models", "select_map"]
