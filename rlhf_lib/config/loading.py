"""Loading a preset: TOML -> StudyConfig, with overrides, and every value checked (unknown keys, wrong types, NaN
or infinity, out-of-range values) with an error naming the file, the key and what is allowed."""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from rlhf_lib.config.knobs import CONFIG_DIR, ConfigError, StudyConfig


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = get_origin(annotation)
    if origin is Literal:
        return value in get_args(annotation)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if annotation is list:
        return isinstance(value, list)
    return True


def _finite(value: Any) -> bool:
    """No NaN or infinity anywhere in `value` (a number, or a list or table of them)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    return True


def _describe(annotation: Any, meta: dict[str, Any]) -> str:
    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(annotation))
    name = getattr(annotation, "__name__", str(annotation))
    low, high = meta.get("low"), meta.get("high")
    if low is not None and high is not None:
        return f"a {name} in [{low}, {high}]"
    if low is not None:
        return f"a {name} >= {low}"
    return f"a {name}"


def _build(cls: type, values: dict[str, Any], source: str, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        where = f"{prefix}{key}"
        if key not in known:
            allowed = ", ".join(sorted(known))
            raise ConfigError(f"{source}: unknown key '{where}'. Allowed keys here: {allowed}.")
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{where}' must be a table [{where}].")
            kwargs[key] = _build(annotation, value, source, f"{where}.")
            continue
        meta = dict(known[key].metadata)
        if not _finite(value):  # NaN passes every range check (all comparisons are False) and inf passes open ones
            raise ConfigError(f"{source}: bad value {value!r} for '{where}': NaN and infinity are not allowed; "
                              f"expected {_describe(annotation, meta)}.")
        if not _type_ok(value, annotation):
            raise ConfigError(f"{source}: bad value {value!r} for '{where}': expected {_describe(annotation, meta)}.")
        if annotation is float:
            value = float(value)
        low, high = meta.get("low"), meta.get("high")
        if (low is not None and value < low) or (high is not None and value > high):
            raise ConfigError(f"{source}: bad value {value!r} for '{where}': expected {_describe(annotation, meta)}.")
        kwargs[key] = value
    return cls(**kwargs)


def _check_consistency(cfg: StudyConfig, source: str) -> None:
    if cfg.labelers.k_min > cfg.labelers.k_max:
        raise ConfigError(f"{source}: 'labelers.k_min' ({cfg.labelers.k_min}) exceeds 'labelers.k_max' ({cfg.labelers.k_max}).")
    if cfg.labelers.labelers_per_prompt > min(cfg.labelers.train_labelers, cfg.labelers.heldout_labelers):
        raise ConfigError(f"{source}: 'labelers.labelers_per_prompt' exceeds the size of a labeler population.")
    for key, low, high, low_open in (("temperatures", 0.0, 5.0, True), ("feature_layers", 0.0, 1.0, True),
                                     ("head_weight_decays", 0.0, math.inf, False)):
        values = getattr(cfg.reward, key)
        numbers = values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if not numbers or not all((v > low if low_open else v >= low) and v <= high for v in values):
            bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
            raise ConfigError(f"{source}: 'reward.{key}' must be a non-empty list of numbers in {bounds}, got {values!r}.")
    if cfg.ppo.minibatch > cfg.ppo.rollout_batch:
        raise ConfigError(f"{source}: 'ppo.minibatch' ({cfg.ppo.minibatch}) exceeds 'ppo.rollout_batch' ({cfg.ppo.rollout_batch}).")
    if cfg.ppo.rollout_batch % cfg.ppo.minibatch:
        raise ConfigError(f"{source}: 'ppo.rollout_batch' must be a multiple of 'ppo.minibatch'.")
    if cfg.model.quantize_4bit and cfg.model.finetune == "full":
        raise ConfigError(f"{source}: 'model.quantize_4bit' needs 'model.finetune' = 'lora' (a 4-bit base is frozen).")


def config_from_dict(values: dict[str, Any], source: str = "<dict>") -> StudyConfig:
    """Build and validate a StudyConfig from nested plain data."""
    cfg = _build(StudyConfig, values, source, "")
    _check_consistency(cfg, source)
    return cfg


def load_preset(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> StudyConfig:
    """Load `configs/<name>.toml` (or a path to a .toml file), apply dotted overrides, validate."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = CONFIG_DIR / f"{name_or_path}.toml"
    if not path.exists():
        available = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.toml")))
        raise ConfigError(f"No preset file {path}. Available presets: {available}.")
    with path.open("rb") as handle:
        try:
            values = tomllib.load(handle)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: not valid TOML: {err}") from err
    values.setdefault("preset", path.stem)
    for dotted, value in (overrides or {}).items():
        node = values
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        _merge_override(node, leaf, value)
    return config_from_dict(values, str(path))


def _merge_override(node: dict[str, Any], key: str, value: Any) -> None:
    """node[key] = value, except that a table merges into a table: {"ppo": {"learning_rate": 1e-3}} changes
    that one knob and keeps the preset's other [ppo] values (replacing the table would reset them to defaults)."""
    if isinstance(value, dict) and isinstance(node.get(key), dict):
        for sub_key, sub_value in value.items():
            _merge_override(node[key], sub_key, sub_value)
    else:
        node[key] = value


def describe_knobs() -> str:
    """Every knob with its default and doc, as Markdown (for the README and notebooks)."""
    lines = []
    for section in dataclasses.fields(StudyConfig):
        section_type = typing.get_type_hints(StudyConfig)[section.name]
        if not dataclasses.is_dataclass(section_type):
            lines.append(f"- `{section.name}`: {section.metadata.get('doc', '')}")
            continue
        lines.append(f"\n**[{section.name}]**")
        for knob in dataclasses.fields(section_type):
            lines.append(f"- `{knob.name}`: {knob.metadata.get('doc', '')}")
    return "\n".join(lines)
