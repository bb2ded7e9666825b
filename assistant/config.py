"""Options as frozen dataclasses, the user's directories, and layered settings.

Precedence, lowest first: built-in defaults < ``config.toml`` in the config dir
< ``IRIS_*`` environment variables < command-line flags.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from assistant.errors import BadSetting

QUANT_CHOICES = ("4bit", "8bit", "int8", "none", "auto")


@dataclass(frozen=True)
class GenerationOptions:
    """Sampling settings, kept per conversation. ``temperature == 0`` means greedy."""

    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    max_new_tokens: int = 512
    repetition_penalty: float = 1.0
    seed: int | None = None

    def with_setting(self, name: str, value: str) -> GenerationOptions:
        """Return a copy with one option parsed from text; ``BadSetting`` if invalid."""
        known = {f.name: f for f in dataclasses.fields(self)}
        if name not in known:
            raise BadSetting(f"unknown setting {name!r}; known: {', '.join(known)}")
        parsed = _parse_number(name, value, int if name in ("top_k", "max_new_tokens", "seed") else float)
        return dataclasses.replace(self, **{name: parsed})._validated()

    def _validated(self) -> GenerationOptions:
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise BadSetting(message)
        return self

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GenerationOptions:
        options = cls()
        for key, value in values.items():
            options = options.with_setting(key, str(value))
        return options


def _parse_number(name: str, value: str, kind: type) -> Any:
    if name == "seed" and value.strip().lower() in ("none", "off", ""):
        return None
    try:
        return kind(value)
    except ValueError:
        raise BadSetting(f"{name} needs a{'n integer' if kind is int else ' number'}, got {value!r}") from None


@dataclass(frozen=True)
class ModelOptions:
    """What to load: ``model`` is an HF dir, hub id or ``.gguf`` file; None is the embedded default, which
    the front end resolves to its directory (and ``name``, the name shown for it) before loading."""

    model: str | None = None
    name: str | None = None
    quant: str = "auto"
    adapters: tuple[str, ...] = ()
    device: str = "auto"
    trust_pickle: bool = False

    def __post_init__(self) -> None:
        if self.quant not in QUANT_CHOICES:
            raise BadSetting(f"--quant must be one of {', '.join(QUANT_CHOICES)}, got {self.quant!r}")


BACKEND_CHOICES = ("local", "openai")


@dataclass(frozen=True)
class BackendOptions:
    """Where answers come from: this process (``local``) or an OpenAI-compatible server."""

    kind: str = "local"
    base_url: str | None = None
    api_key_env: str | None = None
    context_length: int | None = None
    timeout: float = 60.0

    def __post_init__(self) -> None:
        if self.kind not in BACKEND_CHOICES:
            raise BadSetting(f"--backend must be one of {', '.join(BACKEND_CHOICES)}, got {self.kind!r}")
        if self.kind == "openai" and not self.base_url:
            raise BadSetting("--backend openai needs --base-url (e.g. http://127.0.0.1:8000/v1)")


@dataclass(frozen=True)
class Paths:
    """Where Iris keeps data (SQLite), cache (converted models) and config."""

    data: Path
    cache: Path
    config: Path

    @classmethod
    def default(cls) -> Paths:
        home = os.environ.get("IRIS_HOME")
        if home:
            root = Path(home).expanduser()
            return cls(data=root / "data", cache=root / "cache", config=root / "config")
        import platformdirs

        return cls(
            data=Path(platformdirs.user_data_dir("iris")),
            cache=Path(platformdirs.user_cache_dir("iris")),
            config=Path(platformdirs.user_config_dir("iris")),
        )

    @property
    def database(self) -> Path:
        return self.data / "iris.db"

    @property
    def config_file(self) -> Path:
        return self.config / "config.toml"

    @property
    def input_history(self) -> Path:
        return self.data / "input_history"


@dataclass(frozen=True)
class Settings:
    """Everything a front end needs to start, after layering file, env and flags."""

    model: ModelOptions = field(default_factory=ModelOptions)
    backend: BackendOptions = field(default_factory=BackendOptions)
    kv_cache_mb: int = 1024
    feature_cache_mb: int = 256
    generation: GenerationOptions = field(default_factory=GenerationOptions)
    system_prompt: str = "You are a helpful AI assistant named Iris."
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 50_000_000


_ENV_TO_MODEL = {"IRIS_MODEL": "model", "IRIS_QUANT": "quant", "IRIS_DEVICE": "device"}
_GENERATION_NAMES = [f.name for f in dataclasses.fields(GenerationOptions)]
_KNOWN_CONFIG_KEYS = {"model", "quant", "device", "adapters", "generation", "system_prompt",
                      "max_image_bytes", "max_image_pixels", "kv_cache_mb", "feature_cache_mb", "backend",
                      "discord"}
_ENV_TO_BACKEND = {"IRIS_BACKEND": "kind", "IRIS_BASE_URL": "base_url", "IRIS_API_KEY_ENV": "api_key_env"}


def load_settings(paths: Paths, environ: dict[str, str] | None = None) -> Settings:
    """Read ``config.toml`` then ``IRIS_*`` variables; flags are applied by the caller."""
    environ = dict(os.environ) if environ is None else environ
    raw: dict[str, Any] = {}
    if paths.config_file.is_file():
        try:
            raw = tomllib.loads(paths.config_file.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise BadSetting(f"{paths.config_file}: {exc}") from None
    model_raw: dict[str, Any] = {k: raw[k] for k in ("model", "quant", "device") if k in raw}
    if "adapters" in raw:
        model_raw["adapters"] = tuple(raw["adapters"])
    for env, key in _ENV_TO_MODEL.items():
        if environ.get(env):
            model_raw[key] = environ[env]
    generation = GenerationOptions.from_dict(dict(raw.get("generation", {})))
    for name in _GENERATION_NAMES:
        env_value = environ.get(f"IRIS_{name.upper()}")
        if env_value is not None:
            generation = generation.with_setting(name, env_value)
    backend_raw: dict[str, Any] = dict(raw.get("backend", {}))
    for env, key in _ENV_TO_BACKEND.items():
        if environ.get(env):
            backend_raw[key] = environ[env]
    top = {k: raw[k] for k in ("system_prompt", "max_image_bytes", "max_image_pixels", "kv_cache_mb",
                               "feature_cache_mb") if k in raw}
    if environ.get("IRIS_SYSTEM_PROMPT"):
        top["system_prompt"] = environ["IRIS_SYSTEM_PROMPT"]
    unknown = set(raw) - _KNOWN_CONFIG_KEYS
    if unknown:
        raise BadSetting(f"{paths.config_file}: unknown keys {', '.join(sorted(unknown))}")
    try:
        backend = BackendOptions(**backend_raw)
    except TypeError as exc:
        raise BadSetting(f"{paths.config_file}: [backend] {exc}") from None
    return Settings(model=ModelOptions(**model_raw), backend=backend, generation=generation, **top)
