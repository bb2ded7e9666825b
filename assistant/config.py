"""Options as frozen dataclasses, the user's directories, and the one validated settings loader.

Precedence, lowest first: built-in defaults < ``config.toml`` in the config dir
< ``IRIS_*`` environment variables < command-line flags.

Every option has a rule (its type and range) and every value is parsed by it, whatever it came
from: the file, a variable, a flag, ``/set`` or code constructing an options object. A wrong type
or value is a one-line ``BadSetting`` naming where it came from (file and key, variable, or flag)
and what was given; nothing else escapes. Other option tables (the Discord bot's) use these rules.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from assistant.errors import BadSetting, IrisError, one_line
from assistant.files import read_user_text, shown_name

QUANT_CHOICES = ("4bit", "8bit", "int4", "fp16", "int8", "none", "auto")
BACKEND_CHOICES = ("local", "openai")
DEVICE_FORMS = "auto, cpu, cuda, cuda:N or mps"
CONFIG_MAX_BYTES = 1_000_000

# A rule turns a value (a TOML value, an environment string, a flag) into the option's value,
# or raises ValueError saying what the value must be.
Rule = Callable[[Any], Any]


def integer(low: int, high: int) -> Rule:
    """Whole numbers in [low, high]; text is parsed, booleans and fractions are refused."""
    def rule(value: Any) -> int:
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise ValueError("needs an integer") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("needs an integer")
        return _within(value, low, high)
    return rule


def number(low: float, high: float, *, above: bool = False) -> Rule:
    """Finite numbers in [low, high] (``above``: greater than ``low``); text is parsed, nan and inf refused."""
    def rule(value: Any) -> float:
        try:
            if isinstance(value, bool) or not isinstance(value, int | float | str):
                raise TypeError
            parsed = float(value.strip() if isinstance(value, str) else value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError("needs a number") from None
        if not math.isfinite(parsed):
            raise ValueError("must be a finite number")
        if above and parsed <= low:
            raise ValueError(f"must be > {bound(low)}")
        return _within(parsed, low, high)
    return rule


def _within(value: Any, low: float, high: float) -> Any:
    if value < low:
        raise ValueError(f"must be >= {bound(low)}")
    if value > high:
        raise ValueError(f"must be <= {bound(high)}")
    return value


def bound(limit: float) -> str:
    """A limit as people write it: 1000000, not 1e+06."""
    return str(int(limit)) if float(limit).is_integer() else f"{limit:g}"


def choice(*options: str) -> Rule:
    def rule(value: Any) -> str:
        if value not in options or not isinstance(value, str):
            raise ValueError(f"must be one of {', '.join(options)}")
        return value
    return rule


def text(*, allow_empty: bool = True) -> Rule:
    """A string without NUL characters (which no path or prompt can hold)."""
    def rule(value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError("must be text")
        if "\x00" in value:
            raise ValueError("must not contain a NUL character")
        if not allow_empty and not value.strip():
            raise ValueError("must not be empty")
        return value
    return rule


def flag() -> Rule:
    """A boolean; text may say 1/0, true/false, yes/no or on/off."""
    words = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}

    def rule(value: Any) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in words:
            return words[value.strip().lower()]
        raise ValueError("needs true or false")
    return rule


def text_list() -> Rule:
    """A list of non-empty strings (one string is a list of one), as a tuple."""
    item = text(allow_empty=False)

    def rule(value: Any) -> tuple[str, ...]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            raise ValueError("must be a list of text")
        return tuple(item(entry) for entry in items)
    return rule


def id_set() -> Rule:
    """Discord ids (unsigned 64-bit): a list of numbers, or text with comma-separated numbers."""
    one = integer(0, 2**64 - 1)

    def rule(value: Any) -> frozenset[int]:
        items = [part for part in value.split(",") if part.strip()] if isinstance(value, str) else value
        if not isinstance(items, list | tuple | set | frozenset):
            raise ValueError("must be a list of ids")
        try:
            return frozenset(one(entry) for entry in items)
        except ValueError:
            raise ValueError("must be a list of ids (whole numbers)") from None
    return rule


def optional(rule: Rule, none_words: tuple[str, ...] = ("",)) -> Rule:
    """``rule``, or None for None (or one of ``none_words`` in text)."""
    def wrapped(value: Any) -> Any:
        if value is None or (isinstance(value, str) and value.strip().lower() in none_words):
            return None
        return rule(value)
    return wrapped


def device() -> Rule:
    """Where the model runs; whether that device exists is checked when the model loads."""
    def rule(value: Any) -> str:
        if not isinstance(value, str) or not re.fullmatch(r"auto|cpu|mps|cuda(:\d{1,3})?", value.strip()):
            raise ValueError(f"must be {DEVICE_FORMS}")
        return value.strip()
    return rule


def parse(rule: Rule, value: Any, label: str, error: type[IrisError] = BadSetting) -> Any:
    """``rule(value)``, or ``error`` saying that ``label`` (what the user wrote) is wrong and what was given."""
    try:
        return rule(value)
    except ValueError as reason:
        raise error(f"{label} {reason}, got {shown(value)}") from None


def shown(value: Any) -> str:
    """A value as it goes into an error line: its repr, short."""
    text_value = repr(value)
    return text_value if len(text_value) <= 60 else text_value[:57] + "..."


def check_fields(instance: Any, rules: Mapping[str, Rule], label: Callable[[str], str]) -> None:
    """Parse every field of a frozen dataclass with its rule, in place (the last check, for any constructor)."""
    for name, rule in rules.items():
        object.__setattr__(instance, name, parse(rule, getattr(instance, name), label(name)))


def parse_table(table: Any, rules: Mapping[str, Rule], source: str, section: str = "") -> dict[str, Any]:
    """A config table's values, each parsed by its rule; ``BadSetting`` naming ``source`` and the key otherwise."""
    where = f"[{section}] " if section else ""
    if not isinstance(table, dict):
        raise BadSetting(f"{source}: {section} must be a table ([{section}]), got {shown(table)}")
    unknown = sorted(set(table) - set(rules))
    if unknown:
        raise BadSetting(f"{source}: unknown {where}keys {', '.join(map(shown_name, unknown))} "
                         f"(known: {', '.join(rules)})")
    return {key: parse(rules[key], value, f"{source}: {where}{key}") for key, value in table.items()}


def parse_environ(environ: Mapping[str, str], names: Mapping[str, str], rules: Mapping[str, Rule], *,
                  keep_empty: bool = False) -> dict[str, Any]:
    """The options set by environment variables (``names``: variable → option); empty ones count as unset
    unless ``keep_empty`` (where an empty value means something, like an empty list)."""
    return {key: parse(rules[key], environ[variable], f"{variable}: {key}") for variable, key in names.items()
            if variable in environ and (keep_empty or environ[variable].strip())}


def read_config_file(paths: Paths) -> dict[str, Any]:
    """The parsed ``config.toml`` ({} when there is none); a special file, a huge one or bad TOML is ``BadSetting``."""
    path = paths.config_file
    if not os.path.lexists(path):
        return {}
    content = read_user_text(path, max_bytes=CONFIG_MAX_BYTES, what="config file", error=BadSetting)
    try:
        return tomllib.loads(content)
    except ValueError as exc:  # TOMLDecodeError, or an integer too long to convert
        raise BadSetting(f"{shown_name(path)}: {one_line(exc)}") from None
    except RecursionError:
        raise BadSetting(f"{shown_name(path)}: values nested too deeply") from None


GENERATION_RULES: dict[str, Rule] = {
    "temperature": number(0, 100),
    "top_p": number(0, 1, above=True),
    "top_k": integer(0, 1_000_000),
    "max_new_tokens": integer(1, 1_000_000),
    "repetition_penalty": number(0, 100, above=True),
    "seed": optional(integer(0, 2**32 - 1), ("", "none", "off")),
}


@dataclass(frozen=True)
class GenerationOptions:
    """Sampling settings, kept per conversation. ``temperature == 0`` means greedy."""

    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    max_new_tokens: int = 512
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        check_fields(self, GENERATION_RULES, lambda name: name)

    def with_setting(self, name: str, value: str) -> GenerationOptions:
        """Return a copy with one option parsed from text; ``BadSetting`` if invalid."""
        if name not in GENERATION_RULES:
            raise BadSetting(f"unknown setting {shown(name)}; known: {', '.join(GENERATION_RULES)}")
        return dataclasses.replace(self, **{name: parse(GENERATION_RULES[name], value, name)})

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GenerationOptions:
        options = cls()
        for key, value in values.items():
            options = options.with_setting(key, str(value))
        return options


MODEL_RULES: dict[str, Rule] = {
    "model": optional(text(allow_empty=False)),
    "name": optional(text()),
    "quant": choice(*QUANT_CHOICES),
    "adapters": text_list(),
    "device": device(),
    "trust_pickle": flag(),
}
_MODEL_FLAGS = {"model": "--model", "quant": "--quant", "adapters": "--adapter", "device": "--device",
                "trust_pickle": "--trust-pickle"}


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
        check_fields(self, MODEL_RULES, lambda name: _MODEL_FLAGS.get(name, name))


BACKEND_RULES: dict[str, Rule] = {
    "kind": choice(*BACKEND_CHOICES),
    "base_url": optional(text(allow_empty=False)),
    "api_key_env": optional(text(allow_empty=False)),
    "context_length": optional(integer(1, 100_000_000)),
    "timeout": number(0, 86_400, above=True),
}
_BACKEND_FLAGS = {"kind": "--backend", "base_url": "--base-url", "api_key_env": "--api-key-env"}


@dataclass(frozen=True)
class BackendOptions:
    """Where answers come from: this process (``local``) or an OpenAI-compatible server."""

    kind: str = "local"
    base_url: str | None = None
    api_key_env: str | None = None
    context_length: int | None = None
    timeout: float = 60.0

    def __post_init__(self) -> None:
        check_fields(self, BACKEND_RULES, lambda name: _BACKEND_FLAGS.get(name, name))
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


SETTINGS_RULES: dict[str, Rule] = {
    "kv_cache_mb": integer(0, 1 << 20),
    "feature_cache_mb": integer(0, 1 << 20),
    "system_prompt": text(),
    "max_image_bytes": integer(1, 1 << 30),
    "max_image_pixels": integer(1, 1_000_000_000),
}


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

    def __post_init__(self) -> None:
        check_fields(self, SETTINGS_RULES, lambda name: name)


_MODEL_KEYS = ("model", "quant", "device", "adapters")  # the top-level keys of config.toml that go to ModelOptions
_TABLES = ("generation", "backend", "discord")  # discord: read by integrations.discord_bot.settings
_ENV_TO_MODEL = {"IRIS_MODEL": "model", "IRIS_QUANT": "quant", "IRIS_DEVICE": "device"}
_ENV_TO_GENERATION = {f"IRIS_{name.upper()}": name for name in GENERATION_RULES}
_ENV_TO_BACKEND = {"IRIS_BACKEND": "kind", "IRIS_BASE_URL": "base_url", "IRIS_API_KEY_ENV": "api_key_env"}
_ENV_TO_TOP = {"IRIS_SYSTEM_PROMPT": "system_prompt"}


def load_settings(paths: Paths, environ: Mapping[str, str] | None = None) -> Settings:
    """Read ``config.toml`` then ``IRIS_*`` variables; flags are applied by the caller."""
    environ = os.environ if environ is None else environ
    raw = read_config_file(paths)
    source = shown_name(paths.config_file)
    top_rules: dict[str, Rule] = {**{key: MODEL_RULES[key] for key in _MODEL_KEYS}, **SETTINGS_RULES}
    known = {**top_rules, **{table: _is_table for table in _TABLES}}
    top = parse_table(raw, known, source)
    tables = {name: top.pop(name, {}) for name in _TABLES}
    model = {key: top.pop(key) for key in _MODEL_KEYS if key in top}
    model |= parse_environ(environ, _ENV_TO_MODEL, MODEL_RULES)
    generation = parse_table(tables["generation"], GENERATION_RULES, source, "generation")
    generation |= parse_environ(environ, _ENV_TO_GENERATION, GENERATION_RULES)
    backend = parse_table(tables["backend"], BACKEND_RULES, source, "backend")
    backend |= parse_environ(environ, _ENV_TO_BACKEND, BACKEND_RULES)
    top |= parse_environ(environ, _ENV_TO_TOP, SETTINGS_RULES)
    return Settings(model=ModelOptions(**model), backend=BackendOptions(**backend),
                    generation=GenerationOptions(**generation), **top)


def _is_table(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError("must be a table")
    return value
