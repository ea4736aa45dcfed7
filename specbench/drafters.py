"""Drafter kinds: each kind's typed config and the factory that builds its engine drafter.

A draft set's YAML lists drafters by name, each with a `kind` (default `model`):

    drafters:
      qwen_int8: {fetch: qwen2.5-coder-0.5b-instruct, quantize: int8_dynamic}
      lookup: {kind: prompt_lookup, max_ngram: 3}

Adding a drafter kind means writing its config dataclass (with a `kind` field), a class
with the engine's `Drafter` methods (`reset`, `prefill`, `propose`), and one call to
`register_drafter`. A config class that extends `ModelConfig` gets its model loaded
and handed to the factory as a `CachedModel`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from specbench.config import ModelConfig
from specbench.engine import CachedModel, Drafter, ModelDrafter, PromptLookupDrafter
from specbench.engine.oracle import OracleDrafter
from specbench.errors import ConfigError


@dataclass
class ModelDrafterConfig(ModelConfig):
    """A small causal LM that shares the verifier's tokenizer."""

    kind: str = "model"


@dataclass
class PromptLookupConfig:
    """No model: propose what followed the latest earlier match of the last n tokens."""

    kind: str = "prompt_lookup"
    max_ngram: int = 3

    def check(self, key: str) -> None:
        """Raise ConfigError for values the type allows but the drafter does not."""
        if self.max_ngram < 1:
            raise ConfigError(f"{key}.max_ngram={self.max_ngram} is invalid: set it to 1 or more.")


@dataclass
class OracleDrafterConfig(ModelConfig):
    """A synthetic draft of chosen acceptance (`specbench.engine.oracle`): the model named here only sets its cost.

    Greedy only. Its proposals come from the verifier's own greedy output, so any cost model will do,
    whatever its tokenizer.
    """

    kind: str = "oracle"
    acceptance: float = 0.7
    shares_tokenizer: ClassVar[bool] = False  # its tokens never reach the verifier

    def check(self, key: str) -> None:
        """Raise ConfigError for an acceptance outside [0, 1]."""
        if not 0 <= self.acceptance <= 1:
            raise ConfigError(f"oracle.acceptance={self.acceptance} is invalid: use a probability in [0, 1].")


@dataclass(frozen=True)
class DrafterKind:
    """A registered drafter kind: its config class and how to build it (name, config, model or None)."""

    config: type
    build: Callable[[str, Any, CachedModel | None], Drafter]


DRAFTER_KINDS: dict[str, DrafterKind] = {}


def register_drafter(kind: str, config: type, build: Callable[[str, Any, CachedModel | None], Drafter]) -> None:
    """Make `kind` usable in draft configs: `config` types its YAML entry, `build` makes the drafter."""
    DRAFTER_KINDS[kind] = DrafterKind(config, build)


register_drafter("model", ModelDrafterConfig, lambda name, config, model: ModelDrafter(name, model))
register_drafter(
    "prompt_lookup", PromptLookupConfig, lambda name, config, model: PromptLookupDrafter(name, config.max_ngram)
)
register_drafter(
    "oracle",
    OracleDrafterConfig,
    lambda name, config, model: OracleDrafter(name, config.acceptance, ModelDrafter(name, model), model.vocab_size),
)


def needs_model(config: Any) -> bool:
    """True for drafter configs that name a model to load."""
    return isinstance(config, ModelConfig)


def shares_tokenizer(config: Any) -> bool:
    """True for drafters whose tokens the verifier reads (their tokenizer must be the verifier's)."""
    return getattr(config, "shares_tokenizer", True)


def typed_drafter(key: str, entry: Any) -> Any:
    """The drafter entry at config path `key` as its kind's dataclass; ConfigError names what is wrong."""
    if not isinstance(entry, dict):
        raise ConfigError(f"{key} must be a mapping of drafter settings, e.g. {{name_or_path: distilgpt2}}.")
    kind = entry.get("kind", "model")
    if kind not in DRAFTER_KINDS:
        raise ConfigError(f"{key}.kind={kind} is unknown: use one of {', '.join(sorted(DRAFTER_KINDS))}.")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(DRAFTER_KINDS[kind].config), entry)
    except OmegaConfBaseException as error:
        problem = str(getattr(error, "msg", error)).splitlines()[0].rstrip(".")
        raise ConfigError(f"{key}: {problem}; see the {kind} drafter's settings in specbench.drafters.") from error
    config = OmegaConf.to_object(merged)
    if hasattr(config, "check"):
        config.check(key)
    return config


def build_drafter(name: str, config: Any, model: CachedModel | None) -> Drafter:
    """The engine drafter for a typed drafter config."""
    return DRAFTER_KINDS[config.kind].build(name, config, model)
