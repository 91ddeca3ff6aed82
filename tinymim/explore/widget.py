"""`AttentionExplorer` (ipywidgets): Q-K attention, V-V relations and attention rollout of any
block, head and query patch of any ViT a run directory holds (or any model or checkpoint
given), two models side by side -- a student's block next to the teacher block it was
distilled from. Maps of an image are computed once per model (one forward pass,
`attention.all_block_qkv`) and cached; a slider move only recolours and re-encodes a PNG.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from PIL import Image, ImageDraw
from torch import nn

from ..attention import all_block_qkv, attention_rollout, maps_from_qkv
from ..data.transforms import normalize
from ..distill import default_teacher_block
from ..pipeline import layout
from .runs import load_model, run_models

KINDS = ("QK", "VV", "rollout")


@dataclass
class ModelMaps:
    """Every block's maps of one model on one image (batch of one)."""

    qk: list[torch.Tensor]  # per block: heads x N x N
    vv: list[torch.Tensor]
    grid: tuple[int, int]
    prefix: int

    @property
    def depth(self) -> int:
        return len(self.qk)

    def heads(self, block: int) -> int:
        return self.qk[block - 1].shape[0]


@torch.no_grad()
def compute_maps(model: nn.Module, image: torch.Tensor) -> ModelMaps:
    """`image` (3 x H x W uint8) resized to the model's input, then all blocks' maps."""
    size = tuple(model.patch_embed.img_size)
    x = normalize(image[None].float() / 255 if image.dtype == torch.uint8 else image[None])
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
    maps = maps_from_qkv(all_block_qkv(model.eval(), x))
    return ModelMaps([m[0] for m in maps["qk"]], [m[0] for m in maps["vv"]], tuple(model.patch_embed.grid_size),
                     model.num_prefix_tokens)


def select_map(maps: ModelMaps, kind: str, block: int, head: int | None, query: tuple[int, int] | None) -> np.ndarray:
    """The grid (rows x cols) a query attends to: `query` = (row, col) of a patch, or None
    for the class token; QK/VV of one block and head (None: the mean over heads), or
    rollout through `block`."""
    gh, gw = maps.grid
    token = 0 if query is None else maps.prefix + query[0] * gw + query[1]
    if kind == "rollout":
        row = attention_rollout([a[None] for a in maps.qk], upto=block)[0, token]
    else:
        per_head = (maps.qk if kind == "QK" else maps.vv)[block - 1][:, token]
        row = per_head.mean(0) if head is None else per_head[head]
    return row[maps.prefix:].reshape(gh, gw).float().numpy()


def mapped_block(block: int, depth: int, other_depth: int, other_target: int) -> int:
    """The block of the other model shown next to `block` of this one: proportional depth,
    with this model's last block on the other's target block (student <-> teacher)."""
    if other_depth == depth:
        return block
    target = other_target if other_depth > depth else other_depth
    return max(1, min(other_depth, round(block * target / depth)))


def render_panel(image: torch.Tensor, heat: np.ndarray, opacity: float, query: tuple[int, int] | None,
                 title: str, size: int = 224) -> Image.Image:
    """The image with the map as a heat overlay (nearest upsampling: one cell per patch),
    the query patch outlined, a title line above."""
    rgb = Image.fromarray(image.permute(1, 2, 0).numpy()).convert("RGB").resize((size, size), Image.BICUBIC)
    h = heat - heat.min()
    h = h / h.max() if h.max() > 0 else h
    colored = (colormaps["inferno"](h)[..., :3] * 255).astype(np.uint8)
    overlay = Image.fromarray(colored).resize((size, size), Image.NEAREST)
    panel = Image.blend(rgb, overlay, opacity)
    draw = ImageDraw.Draw(panel)
    if query is not None:
        ch, cw = size / heat.shape[0], size / heat.shape[1]
        draw.rectangle([query[1] * cw, query[0] * ch, (query[1] + 1) * cw - 1, (query[0] + 1) * ch - 1],
                       outline=(0, 255, 128), width=2)
    out = Image.new("RGB", (size, size + 18), "white")
    out.paste(panel, (0, 18))
    ImageDraw.Draw(out).text((3, 3), title, fill=(0, 0, 0))
    return out


def _png(images: list[Image.Image]) -> bytes:
    canvas = Image.new("RGB", (sum(i.width for i in images) + 8 * (len(images) - 1), max(i.height for i in images)),
                       "white")
    x = 0
    for img in images:
        canvas.paste(img, (x, 0))
        x += img.width + 8
    buf = io.BytesIO()
    canvas.save(buf, format="png", compress_level=1)
    return buf.getvalue()


class AttentionExplorer:
    """Attention maps of one or two models on an image, driven by widgets.

    `AttentionExplorer(run_dir)` explores every model of a run directory on 200 val images of
    the run's data (a stratified subset); `AttentionExplorer(models={...}, images=..., labels=..., class_names=...)`
    any models (modules, checkpoint paths, `timm:` names) on any uint8 images. Display it
    with `display(explorer)` (or as the last expression of a cell).
    """

    def __init__(self, run_dir: str | os.PathLike | None = None,
                 models: Mapping[str, nn.Module | str | os.PathLike] | None = None,
                 images: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                 class_names: list[str] | None = None, profile: str = "smoke", display_size: int = 224):
        import ipywidgets as W

        sources: dict[str, Any] = dict(models or {})
        run = layout(run_dir, profile) if run_dir is not None else None
        entries = run_models(run) if run is not None and not sources else []
        sources = sources or {m.name: m.path for m in entries}
        if not sources:
            raise ValueError("no models to explore: pass run_dir (with notebooks 01-03 run into it) or models={...}")
        if images is None:  # the run's own val images (a folder's through the evaluation crop)
            from ..evaluation import eval_tensors
            from ..presets import get_config

            cfg = get_config("finetune", profile="smoke", overrides=run.on() if run is not None else None)
            val = eval_tensors(cfg, "val", n=max(200, cfg.num_classes))
            images, labels, class_names = val.images, val.labels, val.classes
        self.sources, self.images, self.labels = sources, images, labels
        self.class_names = class_names or []
        self.display_size = display_size
        self._models: dict[str, nn.Module] = {}
        self._maps: dict[tuple[str, str], ModelMaps] = {}
        self._uploaded: torch.Tensor | None = None
        self._indices = list(range(len(images)))  # the images the slider walks (the class filter's)
        self.current: dict[str, np.ndarray] = {}  # side -> the displayed map (before colouring)
        self.redraw_ms: list[float] = []

        names = list(sources)
        student = next((m.name for m in entries if m.arm == "student"), names[-1])
        teacher = next((m.name for m in entries if m.arm == "teacher"), "teacher" if "teacher" in names else "(none)")
        style = {"description_width": "70px"}
        self.w_image = W.IntSlider(0, 0, len(images) - 1, description="image", style=style)
        self.w_class = W.Dropdown(options=["all", *self.class_names], description="class", style=style)
        self.w_upload = W.FileUpload(accept="image/*", multiple=False, description="upload")
        self.w_left = W.Dropdown(options=names, value=student, description="model", style=style)
        self.w_right = W.Dropdown(options=["(none)", *names], value=teacher, description="beside", style=style)
        self.w_kind = W.ToggleButtons(options=KINDS, description="map", style=style)
        self.w_block = W.IntSlider(1, 1, 1, description="block", style=style)
        self.w_head = W.IntSlider(0, 0, 0, description="head", style=style)
        self.w_cls = W.Checkbox(value=False, description="class-token query")
        self.w_row = W.IntSlider(0, 0, 0, description="query row", style=style)
        self.w_col = W.IntSlider(0, 0, 0, description="query col", style=style)
        self.w_opacity = W.FloatSlider(0.6, min=0.0, max=1.0, step=0.05, description="opacity", style=style)
        self.w_view = W.Image(format="png")
        self.w_status = W.HTML()
        self._configure_left()
        for w in (self.w_image, self.w_right, self.w_kind, self.w_block, self.w_head, self.w_cls, self.w_row,
                  self.w_col, self.w_opacity):
            w.observe(lambda change: self.redraw(), names="value")
        self.w_left.observe(lambda change: (self._configure_left(), self.redraw()), names="value")
        self.w_class.observe(lambda change: self._filter_class(), names="value")
        self.w_upload.observe(lambda change: self._take_upload(), names="value")
        controls = W.VBox([W.HBox([self.w_image, self.w_class, self.w_upload]), W.HBox([self.w_left, self.w_right]),
                           self.w_kind, W.HBox([self.w_block, self.w_head]),
                           W.HBox([self.w_cls, self.w_row, self.w_col]), self.w_opacity])
        self.widget = W.VBox([controls, self.w_view, self.w_status])
        self.redraw()

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    # -- models, images, maps ------------------------------------------------------
    def model(self, name: str) -> nn.Module:
        if name not in self._models:
            self._models[name] = load_model(self.sources[name])
        return self._models[name]

    def image(self) -> tuple[str, torch.Tensor]:
        if self._uploaded is not None:
            return "upload", self._uploaded
        index = self._indices[self.w_image.value]
        return f"image-{index}", self.images[index]

    def maps(self, name: str) -> ModelMaps:
        key, image = self.image()
        if (name, key) not in self._maps:
            self._maps[(name, key)] = compute_maps(self.model(name), image)
        return self._maps[(name, key)]

    def _configure_left(self) -> None:
        m = self.model(self.w_left.value)
        depth, grid = len(m.blocks), tuple(m.patch_embed.grid_size)
        self.w_block.max, self.w_block.value = depth, depth
        self.w_head.max = max(blk.attn.num_heads for blk in m.blocks) - 1
        self.w_row.max, self.w_col.max = grid[0] - 1, grid[1] - 1
        self.w_row.value, self.w_col.value = grid[0] // 2, grid[1] // 2

    def _filter_class(self) -> None:
        """Walk only the images of the chosen class (back to a dataset image if one was uploaded)."""
        if self.labels is None or self.w_class.value == "all":
            self._indices = list(range(len(self.images)))
        else:
            wanted = self.class_names.index(self.w_class.value)
            self._indices = (self.labels == wanted).nonzero().flatten().tolist() or [0]
        self._uploaded = None
        with self.w_image.hold_trait_notifications():
            self.w_image.value = 0
            self.w_image.max = len(self._indices) - 1
        self.redraw()

    def _take_upload(self) -> None:
        files = self.w_upload.value
        if not files:
            return
        item = files[0] if isinstance(files, (list, tuple)) else next(iter(files.values()))
        img = Image.open(io.BytesIO(bytes(item["content"]))).convert("RGB")
        self._uploaded = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()
        self.redraw()

    # -- drawing --------------------------------------------------------------------
    def _side(self, name: str, block: int, head: int, query_frac: tuple[float, float] | None) -> tuple[np.ndarray, str, Any]:
        maps = self.maps(name)
        head = min(head, maps.heads(block) - 1)
        query = None
        if query_frac is not None:
            query = (min(maps.grid[0] - 1, int(query_frac[0] * maps.grid[0])),
                     min(maps.grid[1] - 1, int(query_frac[1] * maps.grid[1])))
        kind = self.w_kind.value
        heat = select_map(maps, kind, block, head, query)
        what = f"rollout to block {block}" if kind == "rollout" else f"{kind} block {block} head {head}"
        return heat, f"{name}: {what}", query

    def redraw(self) -> None:
        """Recompute nothing that is cached: pick the maps, colour them, show the PNG."""
        start = time.perf_counter()
        left = self.w_left.value
        block, head = self.w_block.value, self.w_head.value
        m = self.model(left)
        grid = m.patch_embed.grid_size
        query_frac = None if self.w_cls.value else ((self.w_row.value + 0.5) / grid[0], (self.w_col.value + 0.5) / grid[1])
        sides = {"left": (left, block)}
        right = self.w_right.value
        if right != "(none)":
            other = self.model(right)
            sides["right"] = (right, mapped_block(block, len(m.blocks), len(other.blocks), default_teacher_block(other)))
        _, image = self.image()
        panels = []
        for side, (name, blk) in sides.items():
            heat, title, query = self._side(name, blk, head, query_frac)
            self.current[side] = heat
            panels.append(render_panel(image, heat, self.w_opacity.value, query, title, self.display_size))
        self.w_view.value = _png(panels)
        ms = 1000 * (time.perf_counter() - start)
        self.redraw_ms.append(ms)
        key, _ = self.image()
        label = ""
        if self.labels is not None and self.class_names and key.startswith("image-"):
            label = f", label {self.class_names[int(self.labels[self._indices[self.w_image.value]])]}"
        self.w_status.value = f"<small>{key}{label} &middot; drawn in {ms:.0f} ms</small>"

    def save_png(self, path: str | os.PathLike) -> Path:
        """The current view as a PNG file (for reports)."""
        Path(path).write_bytes(self.w_view.value)
        return Path(path)
