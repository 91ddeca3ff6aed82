"""The profiles as data, and how a config is resolved from them.

A config is its dataclass's defaults (`config.py`), then the profile's preset
(`resources/presets/<profile>.yaml`: the paper's Tables 1-3 for `paper`, CPU-minute sizes for
`smoke`), then `key=value` overrides -- merged by OmegaConf's structured configs, which check
every value against its field's type (the errors name the key and what was expected) -- then
the dataclass's `validate`.
"""

from __future__ import annotations

import dataclasses
import json
import typing
import warnings
from functools import cache
from importlib import resources
from typing import Any

from .config import ARCH_SHAPES, CONFIGS, PROFILES, BaseConfig, ConfigError, FinetuneConfig, check_choice


@cache
def preset(profile: str) -> dict[str, Any]:
    """`resources/presets/<profile>.yaml` as plain data; a profile that `extends` another is that
    one with its stages' `defaults` updated key by key."""
    from omegaconf import OmegaConf

    check_choice("profile", profile, PROFILES)
    text = resources.files("tinymim.resources").joinpath("presets", f"{profile}.yaml").read_text()
    own = OmegaConf.to_container(OmegaConf.create(text))
    base = own.pop("extends", None)
    if base is None:
        return own
    merged = json.loads(json.dumps(preset(base)))  # a copy of the cached base
    for stage, recipe in own.items():
        merged[stage]["defaults"] |= recipe.get("defaults", {})
    return merged


def _values(cls: type[BaseConfig], overrides: dict[str, Any]) -> dict[str, Any]:
    """Command-line spellings made typed-merge input: 'none'/'null' -> None for an optional
    field; '0.9,0.95' or 'contrast,fog' -> a list for a tuple field."""
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in overrides.items():
        optional = type(None) in typing.get_args(hints.get(key))
        if isinstance(value, str) and optional and value.strip().lower() in ("none", "null"):
            value = None
        elif isinstance(value, str) and typing.get_origin(hints.get(key)) is tuple:
            value = json.loads(value) if value.startswith("[") else [v.strip() for v in value.split(",") if v.strip()]
        out[key] = value
    return out


def _merge(cls: type[BaseConfig], *layers: dict[str, Any]) -> BaseConfig:
    """The dataclass's defaults with each layer merged on top, one key at a time (so an
    error names the key), then the dataclass instance."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    merged = OmegaConf.structured(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    for layer in layers:
        for key, value in layer.items():
            if key not in fields:
                raise ConfigError(f"unknown key {key!r} for stage {cls.stage!r}; valid keys: {sorted(fields)}")
            try:
                merged = OmegaConf.merge(merged, {key: value})
            except OmegaConfBaseException:
                raise ConfigError(_type_error(cls, key, value)) from None
    return OmegaConf.to_object(merged)


def _type_error(cls: type[BaseConfig], key: str, value: Any) -> str:
    tp = typing.get_type_hints(cls)[key]
    args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple and Ellipsis not in args:
        return f"{key}: expected {len(args)} values, got {value!r}"
    kind = next((a for a in args if a is not type(None)), tp)
    kind = typing.get_args(kind)[0] if typing.get_origin(kind) is tuple else kind
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    return f"{key}: expected {names.get(kind, kind)}{' or none' if type(None) in args else ''}, got {value!r}"


def get_config(stage: str, model: str | None = None, profile: str = "smoke",
               overrides: dict[str, Any] | None = None) -> BaseConfig:
    """Resolve the config of `stage` for `model` under `profile`, then apply overrides.

    `model` defaults to the profile's (smoke: micro_tiny, or micro_base for `mae`; paper:
    vit_small, or vit_base). An unknown key or a value of the wrong type raises ConfigError
    naming the key and what was expected.
    """
    check_choice("stage", stage, tuple(CONFIGS))
    table = preset(profile)
    recipe, cls = table[stage], CONFIGS[stage]
    model = model or recipe["model"]
    if not isinstance(model, str):
        raise ConfigError(f"model: expected a model name, got {model!r}")
    known = list(recipe["models"]) if recipe["models"] is not None else list(ARCH_SHAPES)
    if model not in known:
        raise ConfigError(f"model: {model!r} has no {profile} recipe for stage {stage!r}; expected one of {known}")
    overrides = _values(cls, dict(overrides or {}))
    values = table["defaults"] | recipe["defaults"] | (recipe["models"] or {}).get(model, {})
    values = {"profile": profile, "model": model} | values
    if "steps" in overrides and "warmup_steps" not in overrides and values.get("warmup_steps") and overrides["steps"]:
        steps = int(overrides["steps"])
        if 0 < steps <= values["warmup_steps"]:  # keep the preset's warm-up share
            overrides["warmup_steps"] = values["warmup_steps"] * steps // values["steps"]
            warnings.warn(f"steps={steps}: warm-up scaled from {values['warmup_steps']} to {overrides['warmup_steps']} "
                          f"steps (the preset's share); set warmup_steps to choose", stacklevel=2)
    if "lr" in overrides:  # an explicit lr wins over the batch-scaled base lr
        values["blr"] = None
    if cls is FinetuneConfig and profile == "paper" and model == "vit_base" and "drop_path" not in overrides:
        epochs = int(overrides.get("pretrain_epochs", 300))
        values["drop_path"] = 0.2 if epochs >= 300 else 0.1  # Table 2's footnote
    if cls is FinetuneConfig and (overrides.get("dist_token") in (True, "true", "True") or values.get("dist_token")):
        values["global_pool"] = "token"  # DeiT pools the class and distillation tokens: record what runs
    cfg = _merge(cls, values, overrides)
    if cls is FinetuneConfig and cfg.num_classes is None:
        from .data import classes_of

        cfg.num_classes = len(classes_of(cfg.data))  # not given: the data's classes (a folder's: train/'s)
    if cfg.blr is not None:
        cfg.lr = cfg.blr * cfg.batch_size / 256  # from the (possibly overridden) batch size
    cfg.validate()
    return cfg


def config_from_dict(saved: dict[str, Any], overrides: dict[str, Any] | None = None) -> BaseConfig:
    """A config written by `to_dict` (a run's config.json, `tinymim config STAGE`) resolved
    again -- its stage, model and profile with every other field as an override, so it is
    checked like any override -- then `overrides` on top (e.g. the CLI's --set)."""
    values = dict(saved)
    missing = [k for k in ("stage", "profile", "model") if k not in values]
    if missing:
        raise ConfigError(f"config: no {missing} field(s); expected a tinymim config as written by "
                          f"`tinymim config STAGE` or a run's config.json")
    stage, profile, model = values.pop("stage"), values.pop("profile"), values.pop("model")
    if values.get("blr") is not None:
        values.pop("lr", None)  # derived from blr and batch_size: an overridden batch rescales it
    for key in ("teacher_resolved", "teacher_block_resolved"):  # what pretrain adds to its config.json
        values.pop(key, None)
    overrides = dict(overrides or {})
    model = overrides.pop("model", None) or model
    with warnings.catch_warnings():  # every field is explicit: nothing is scaled behind the user's back
        warnings.simplefilter("ignore")
        return get_config(stage, model, profile, values | overrides)
