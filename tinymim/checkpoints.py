"""Checkpoints: atomic writes, and ONE safe reader of encoders, teachers and classifiers.

Every stage loads pre-trained weights through `open_checkpoint` + `load_encoder`, so the
rules are written once: where the state dict sits (`model`, `state_dict`, `module` or
the top level), which prefixes are stripped (`module.`, `encoder.`, `backbone.`), that
MAE's decoder is dropped, how the position embedding follows the model (patch grid and
distillation-token slot), and which keys may legitimately differ. Nothing is unpickled
beyond tensors and plain data (`torch.load(weights_only=True)` or safetensors).
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .models import ARCHS, ModelSpec, build_model, model_spec

CHECKPOINT_FORMAT = "tinymim/1"
# keys of an MAE `_full` checkpoint (decoder, mask token) that an encoder does not need
_DECODER_PREFIXES = ("decoder_", "mask_token")
_WRAPPER_PREFIXES = ("module.", "encoder.", "backbone.")
# what a classifier has and an encoder checkpoint lacks (or the other way round)
CLASSIFIER_KEYS = ("head.", "head_dist.", "fc_norm.")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read safely or does not fit the model."""


# ---------------------------------------------------------------------------------
# writes


TMP_SUFFIX = ".tmp"  # our temp files are ".<name>.<random>.tmp" beside their target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Any, previous: str | os.PathLike | None = None) -> Path:
    """Write `path` through `write(file)` into a temp file in the same folder, fsync, then
    rename it over `path`: a crash mid-write leaves the previous file intact, never a
    truncated one. With `previous`, the old `path` is first renamed there, so a run
    always has a complete last-but-one copy. Files get the usual mode (0644 under the
    default umask), not mkstemp's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            try:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            except (OSError, RuntimeError) as e:  # torch's zip writer reports a short write as RuntimeError
                _explain_failed_write(e, path, os.fstat(f.fileno()).st_size)
                raise
        if previous is not None and path.exists():
            os.replace(path, previous)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class WriteFailed(OSError):
    """A file could not be written for want of room: disk, quota or file-size limit."""


_NO_ROOM = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def _explain_failed_write(error: BaseException, path: Path, written: int) -> None:
    """Raise `WriteFailed` naming the file and the likely cause when a failed write is a lack of
    room -- judged from the error number, the free space and the process's file-size limit
    (torch reports these as an opaque "unexpected pos"); otherwise return, and the error stands."""
    import resource

    free = shutil.disk_usage(path.parent).free
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    at_limit = limit != resource.RLIM_INFINITY and written >= limit - (1 << 20)
    if getattr(error, "errno", None) not in _NO_ROOM and free > (64 << 20) and not at_limit:
        return
    cause = (f"the file-size limit of {limit} bytes (ulimit -f) is reached" if at_limit
             else f"the disk or quota is full ({free >> 20} MiB free on its file system)")
    raise WriteFailed(f"{path}: cannot write it after {written} bytes: {cause}; free space (or raise the limit) and "
                      f"run again -- the previous file is intact, training resumes from the last complete "
                      f"checkpoint") from error


def atomic_save(obj: Any, path: str | os.PathLike, previous: str | os.PathLike | None = None) -> Path:
    """torch.save through `atomic_write`."""
    return atomic_write(path, lambda f: torch.save(obj, f), previous)


def atomic_write_json(data: Any, path: str | os.PathLike) -> Path:
    """A JSON run-state file (eval.json, config.json, ...) through `atomic_write`."""
    text = json.dumps(data, indent=2)
    return atomic_write(path, lambda f: f.write(text.encode()))


def sweep_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Remove our own orphan temp files (a killed write leaves them; at paper scale each
    can be a GB). Returns what was removed."""
    removed = []
    for p in Path(folder).glob(f".*{TMP_SUFFIX}"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                            metadata: Mapping[str, str] | None = None) -> Path:
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=dict(metadata or {}))
    return atomic_write(path, lambda f: f.write(data))


def save_model(model: nn.Module, path: str | os.PathLike, extra: Mapping[str, Any] | None = None,
               safetensors: bool = False) -> Path:
    """Our checkpoint format: weights + the ModelSpec that rebuilds them + plain metadata;
    with `safetensors`, the same weights and spec beside it as `<stem>.safetensors`."""
    spec = model_spec(model)
    payload = {"format": CHECKPOINT_FORMAT, "spec": spec.to_dict(), "model": model.state_dict(), **dict(extra or {})}
    out = atomic_save(payload, path)
    if safetensors:
        atomic_save_safetensors(model.state_dict(), Path(path).with_suffix(".safetensors"),
                                metadata={"tinymim_spec": json.dumps(spec.to_dict())})
    return out


# ---------------------------------------------------------------------------------
# reads


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a `.pth`/`.pt` or `.safetensors` file without ever unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
        out: dict[str, Any] = {"model": tensors}
        if "tinymim_spec" in meta:
            out["spec"] = json.loads(meta["tinymim_spec"])
            out["format"] = CHECKPOINT_FORMAT
        return out
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load -- the file contains Python objects beyond tensors and plain data "
            f"(a pickle that could run code). Only weights_only checkpoints are accepted; convert it in a "
            f"trusted environment. Details: {str(e).splitlines()[0]}"
        ) from None
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return obj


@dataclass
class Checkpoint:
    """An encoder or classifier checkpoint, read once: its cleaned weights, the ModelSpec
    it records (tinymim checkpoints; None for MAE/timm/DeiT files) and its metadata."""

    path: Path
    state_dict: dict[str, torch.Tensor]
    spec: ModelSpec | None
    meta: dict[str, Any]

    @property
    def prefix_tokens(self) -> int:
        """Class token (+ distillation token) slots at the front of its position embedding."""
        return 2 if "dist_token" in self.state_dict else 1


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read `path` and find its weights: under `model`, `state_dict`, `module` or the top
    level; `module.`/`encoder.`/`backbone.` prefixes stripped; MAE's decoder dropped."""
    path = Path(path)
    raw = read_checkpoint(path)
    for key in ("model", "state_dict", "module"):
        if isinstance(raw.get(key), Mapping):
            sd = raw[key]
            break
    else:
        sd = raw
    cleaned: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        for prefix in _WRAPPER_PREFIXES:
            if k.startswith(prefix):
                k = k[len(prefix):]
        if not k.startswith(_DECODER_PREFIXES):
            cleaned[k] = v
    if not cleaned:
        raise CheckpointError(f"{path}: no tensors found (looked under 'model', 'state_dict', 'module' and the top level)")
    spec = ModelSpec.from_dict(raw["spec"]) if isinstance(raw.get("spec"), Mapping) else None
    meta = {k: v for k, v in raw.items() if k not in ("model", "state_dict", "module", "spec")
            and not isinstance(v, torch.Tensor)}
    return Checkpoint(path, cleaned, spec, meta)


def _fit_pos_embed(pe: torch.Tensor, src_prefix: int, model: VisionTransformer, source: str) -> torch.Tensor:
    """A checkpoint's position embedding made to fit `model`: the distillation-token slot
    added (a copy of the class token's, where DeiT starts it) or dropped, and the patch
    grid resampled bicubically when it differs."""
    dst_prefix = model.num_prefix_tokens if not model.no_embed_class else 0
    if dst_prefix == src_prefix + 1:
        pe = torch.cat([pe[:, :1], pe[:, :1], pe[:, 1:]], dim=1)
    elif dst_prefix == src_prefix - 1:
        pe = torch.cat([pe[:, :1], pe[:, 2:]], dim=1)
    if pe.shape == model.pos_embed.shape:
        return pe
    n_src = pe.shape[1] - dst_prefix
    old = int(round(n_src ** 0.5))
    if old * old != n_src:
        raise CheckpointError(f"{source}: pos_embed has {pe.shape[1]} tokens, not {dst_prefix} prefix + a square grid")
    return resample_abs_pos_embed(pe, new_size=list(model.patch_embed.grid_size), old_size=[old, old],
                                  num_prefix_tokens=dst_prefix)


def _matches(key: str, patterns: Sequence[str]) -> bool:
    """A key prefix ("head.") or a glob ("blocks.*.ls1.gamma")."""
    return any(key.startswith(p) or fnmatch.fnmatchcase(key, p) for p in patterns)


def load_weights(
    model: nn.Module,
    sd: Mapping[str, torch.Tensor],
    source: str,
    allow_missing: Sequence[str] = (),
    allow_unexpected: Sequence[str] = (),
) -> list[str]:
    """Load `sd` into `model`, failing with the exact keys and shapes that do not fit.

    `allow_missing` / `allow_unexpected` are key prefixes or globs that may legitimately differ
    (e.g. the classifier head when fine-tuning a pre-trained encoder). Returns the model's keys
    the checkpoint did not provide (they keep their initialisation).
    """
    own = model.state_dict()
    fresh = [k for k in own if k not in sd]
    missing = [k for k in fresh if not _matches(k, allow_missing)]
    unexpected = [k for k in sd if k not in own and not _matches(k, allow_unexpected)]
    mismatched = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sd if k in own and sd[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:20]}{' ...' if len(missing) > 20 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}")
    if mismatched:
        problems.append("shape mismatch: " + "; ".join(mismatched[:20]))
    if problems:
        raise CheckpointError(f"{source}: does not fit the model -- " + " | ".join(problems))
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    return fresh


# what a segmentation backbone (the release's BEiT-style ViT) adds to an encoder: created, not loaded
SEGMENTATION_ONLY = ("blocks.*.attn.relative_position_bias_table", "blocks.*.ls1.gamma", "blocks.*.ls2.gamma")


def _fit_rel_pos_tables(sd: dict[str, torch.Tensor], model: nn.Module) -> None:
    """A checkpoint's relative position bias tables (BEiT, a tinymim segmenter) resampled to the
    model's window when they differ -- the release's geometric interpolation, in timm."""
    from timm.layers import resize_rel_pos_bias_table

    own = model.state_dict()
    for key, table in list(sd.items()):
        if key.endswith("relative_position_bias_table") and key in own and table.shape != own[key].shape:
            window = model.get_submodule(key.rsplit(".", 1)[0]).window
            sd[key] = resize_rel_pos_bias_table(table, window, tuple(own[key].shape))
        elif key.endswith("relative_position_index"):
            sd.pop(key)  # derived from the window, never loaded (the release drops it too)


def load_encoder(model: VisionTransformer, ckpt: Checkpoint, allow_missing: Sequence[str] = (),
                 allow_unexpected: Sequence[str] = ()) -> list[str]:
    """Load a checkpoint's encoder weights into `model` (the one rule every stage uses);
    returns the keys the checkpoint did not provide.

    The position embedding is fitted to the model (`_fit_pos_embed`); a distillation
    token in the checkpoint is dropped when the model has none. The final `norm` of a
    checkpoint is dropped when the model pools through `fc_norm` instead (MAE fine-tuning),
    and may be missing from a classifier checkpoint (which has `fc_norm`). Relative position
    tables are resampled to the model's window. Any other key that is missing or unexpected
    beyond the allowed prefixes is an error listing it.
    """
    sd = dict(ckpt.state_dict)
    own = model.state_dict()
    if "pos_embed" in sd:
        sd["pos_embed"] = _fit_pos_embed(sd["pos_embed"], ckpt.prefix_tokens, model, str(ckpt.path))
    if "dist_token" not in own:
        sd.pop("dist_token", None)
    _fit_rel_pos_tables(sd, model)
    missing_ok, unexpected_ok = list(allow_missing), list(allow_unexpected)
    if not any(k.startswith("norm.") for k in own):
        unexpected_ok.append("norm.")
    if not any(k.startswith("norm.") for k in sd) and any(k.startswith("fc_norm.") for k in sd):
        missing_ok.append("norm.")
    return load_weights(model, sd, str(ckpt.path), allow_missing=missing_ok, allow_unexpected=unexpected_ok)


def _infer_arch(sd: Mapping[str, torch.Tensor], path: Path) -> str:
    """Guess the arch of a plain ViT state dict from its widths and depth."""
    try:
        width = sd["patch_embed.proj.weight"].shape[0]
        patch = sd["patch_embed.proj.weight"].shape[-1]
    except KeyError:
        raise CheckpointError(f"{path}: no 'patch_embed.proj.weight' -- not a ViT checkpoint") from None
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for name, a in ARCHS.items():  # the first match is the plain model (vit_tiny before TinyMIM*-T)
        if (a.embed_dim, a.depth, a.patch_size) == (width, depth, patch):
            return name
    raise CheckpointError(f"{path}: no known model has width {width}, depth {depth}, patch {patch}; "
                          f"pass the model name explicitly")


def load_teacher(name: str | None, path: str | os.PathLike | None = None, img_size: int | None = None,
                 heads: int | None = None) -> VisionTransformer:
    """A frozen, eval-mode ViT encoder from a checkpoint.

    Accepts official MAE encoder checkpoints (`{'model': ...}` with MAE/timm key names)
    and their `_full` variant (decoder and mask token dropped), `module.`/`encoder.`
    prefixes, safetensors files, and our own checkpoints, whose recorded head layout is
    used as is (a distilled student whose last block has 12 heads is rebuilt that way).
    `name` is the arch (e.g. 'vit_base'); None infers it from the weights. `name` may
    also be 'timm:<model name>' to take timm's pretrained weights -- from `path` when
    given (offline), otherwise from the hub (an explicit, online user choice).
    The position embedding is interpolated when `img_size` differs from the checkpoint's.
    """
    if name and name.startswith("timm:"):
        model = _load_timm_teacher(name[5:], path, img_size)
    else:
        if path is None:
            raise CheckpointError(f"teacher {name!r}: a checkpoint path is required")
        ckpt = open_checkpoint(path)
        if ckpt.spec is not None:  # ours: rebuild exactly what was trained, without the classifier
            if name and name != ckpt.spec.arch:
                raise CheckpointError(f"{path}: checkpoint holds a {ckpt.spec.arch}, but teacher {name!r} was asked for")
            spec = replace(ckpt.spec, num_classes=0, extra_fc=0, dist_token=False, global_pool="avg",
                           img_size=img_size or ckpt.spec.img_size)
        else:
            spec = ModelSpec.create(name or _infer_arch(ckpt.state_dict, ckpt.path), heads=heads, img_size=img_size)
        model = build_model(spec, mae_init=False)
        load_encoder(model, ckpt, allow_unexpected=CLASSIFIER_KEYS)
    model.eval().requires_grad_(False)
    return model


def _timm_create(name: str, path: Any, **kwargs: Any) -> nn.Module:
    """timm.create_model with pretrained weights, its refusals named (an unknown model, a
    file that is not weights-only, keys that do not fit)."""
    import timm

    try:
        return timm.create_model(name, pretrained=True, **kwargs)  # offline with a weights file; hub only by user choice
    except Exception as e:  # timm/torch raise RuntimeError, UnpicklingError, KeyError, ...
        first = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"timm:{name} with weights {path}: {type(e).__name__}: {first}") from e


def _load_timm_teacher(timm_name: str, path: str | os.PathLike | None, img_size: int | None) -> VisionTransformer:

    kwargs: dict[str, Any] = {"num_classes": 0}
    if img_size:
        kwargs["img_size"] = img_size
    if path is not None:
        if not Path(path).is_file():
            raise CheckpointError(f"{path}: checkpoint file not found")
        kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
    model = _timm_create(timm_name, path, **kwargs)  # offline with a file; hub only if the user gives none
    if not isinstance(model, VisionTransformer):
        raise CheckpointError(f"timm:{timm_name} is a {type(model).__name__}, not a VisionTransformer")
    arch = next((k for k, a in ARCHS.items() if (a.embed_dim, a.depth) == (model.embed_dim, len(model.blocks))), None)
    if arch is None:
        raise CheckpointError(f"timm:{timm_name}: width {model.embed_dim} / depth {len(model.blocks)} is not a known arch")
    model.tinymim_spec = ModelSpec.create(arch, img_size=model.patch_embed.img_size[0],  # type: ignore[attr-defined]
                                          heads=model.blocks[0].attn.num_heads)
    return model


def load_classifier(source: str | os.PathLike, num_classes: int | None = 1000) -> nn.Module:
    """A frozen, eval-mode classifier: a fine-tuned tinymim checkpoint path (rebuilt from
    its recorded spec), or 'timm:<model name>=<weights file>' for any timm classifier
    (offline). Used as the hard-label teacher of DeiT-style distillation fine-tuning and
    for evaluation; `num_classes=None` accepts a tinymim checkpoint's own class count."""
    source = str(source)
    if source.startswith("timm:"):
        name, sep, path = source[5:].partition("=")
        if not sep or not Path(path).is_file():
            raise CheckpointError(f"{source}: expected timm:<model name>=<existing weights file>")
        model = _timm_create(name, path, num_classes=num_classes or 1000,  # offline: weights from `path`
                             pretrained_cfg_overlay={"file": path})
    else:
        ckpt = open_checkpoint(source)
        if ckpt.spec is None or ckpt.spec.num_classes <= 0:
            raise CheckpointError(f"{source}: not a tinymim classifier checkpoint (no model spec with a classifier); "
                                  f"for other classifiers use timm:<model name>=<weights file>")
        if num_classes is not None and ckpt.spec.num_classes != num_classes:
            raise CheckpointError(f"{source}: a {ckpt.spec.num_classes}-class classifier, {num_classes} classes expected")
        model = build_model(ckpt.spec, mae_init=False)
        load_encoder(model, ckpt)
    return model.eval().requires_grad_(False)
