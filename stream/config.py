"""Typed configuration files: YAML in, validated dataclasses out; an unknown key is an error."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from emloc.settings import EMLoCSettings, SettingsError, preset


class ConfigError(ValueError):
    """A configuration file cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class ModelConfig:
    """path: a local checkpoint folder or hub id; None runs the built-in tiny model."""

    path: str | None = None
    device: str | None = None
    fps: float = 2.0
    max_frame_pixels: int = 144 * 28 * 28

    def __post_init__(self) -> None:
        if self.fps <= 0:
            raise ConfigError(f"model.fps must be > 0, got {self.fps}")
        if self.max_frame_pixels < 28 * 28:
            raise ConfigError(f"model.max_frame_pixels must be >= {28 * 28}, got {self.max_frame_pixels}")


@dataclass(frozen=True)
class Config:
    emloc: EMLoCSettings = field(default_factory=EMLoCSettings)
    model: ModelConfig = field(default_factory=ModelConfig)


def load_config(path: str | Path) -> Config:
    """Reads a YAML config. `emloc.preset` names a preset whose values the other keys override."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as error:
        raise ConfigError(f"{path}: cannot read config: {error.strerror or error}") from error
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config is a mapping of sections, got {type(data).__name__}")
    try:
        return config_from_dict(data)
    except (ConfigError, SettingsError, TypeError) as error:
        raise ConfigError(f"{path}: {error}") from error


def config_from_dict(data: dict) -> Config:
    _check_keys("config", data, {f.name for f in fields(Config)})
    emloc = dict(data.get("emloc") or {})
    name = emloc.pop("preset", None)
    settings = preset(name, **emloc) if name else EMLoCSettings.from_dict(emloc)
    model = dict(data.get("model") or {})
    _check_keys("model", model, {f.name for f in fields(ModelConfig)})
    return Config(emloc=settings, model=ModelConfig(**model))


def _check_keys(section: str, data: dict, known: set[str]) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {section}; known keys are {sorted(known)}")
