"""tinymim: a reproduction kit for TinyMIM (CVPR 2023) -- distil MAE teachers into small ViTs.

Modules, ground up: config -> data, models, engine, reports -> mae, finetune, runner.
"""

__version__ = "0.1.0"
