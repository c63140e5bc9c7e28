"""The model's shape, read from a Hugging Face `config.json` into one typed dataclass."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .quant.files import read_json
from .quant.formats import QuantError

SUPPORTED_MODEL_TYPES = ("mixtral", "mistral")
# The config.json of Mixtral-8x7B (v0.1, base and Instruct): what plans and benchmarks for the
# real model are made from, without its weights.
MIXTRAL_8X7B = {
    "model_type": "mixtral",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "rope_theta": 1e6,
    "max_position_embeddings": 32768,
    "sliding_window": None,
    "rms_norm_eps": 1e-5,
    "torch_dtype": "bfloat16",
}


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Mixtral (sparse MoE) or Mistral (dense) model.

    `num_local_experts` is 0 for a dense `mistral` model, whose every layer has one MLP.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    sliding_window: int | None = None
    num_local_experts: int = 0
    num_experts_per_tok: int = 0
    tie_word_embeddings: bool = False
    torch_dtype: str = "bfloat16"
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.is_moe and not 0 < self.num_experts_per_tok <= self.num_local_experts:
            raise ConfigError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be between 1 and "
                f"num_local_experts ({self.num_local_experts})"
            )

    @property
    def is_moe(self) -> bool:
        return self.model_type == "mixtral"

    @property
    def n_rep(self) -> int:
        """How many query heads share one key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    def param_counts(self) -> dict[str, int]:
        """Parameters in total, in the experts, and used per token (embeddings counted once)."""
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = d * self.head_dim * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        mlp = 3 * d * f
        experts_per_layer = mlp * max(self.num_local_experts, 1)
        router = d * self.num_local_experts
        per_layer_fixed = attn + router + 2 * d
        head = 0 if self.tie_word_embeddings else d * v
        fixed = self.num_hidden_layers * per_layer_fixed + d * v + head + d
        experts = self.num_hidden_layers * experts_per_layer
        active_mlp = mlp * (self.num_experts_per_tok if self.is_moe else 1)
        return {
            "total": fixed + experts,
            "experts": experts,
            "active": fixed + self.num_hidden_layers * active_mlp,
        }

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**self.extra, **out}

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """The gate for a parsed config: every field typed and in range, or a ConfigError that
        names the field and `source` (the file)."""
        model_type = raw.get("model_type")
        if model_type is None:
            raise ConfigError(f"{source}: missing field 'model_type'")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: unknown model_type '{model_type}'; localmix runs "
                + " and ".join(SUPPORTED_MODEL_TYPES)
            )
        field_ = Fields(raw, source, model_type)
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"{source}: field 'rope_parameters' must be an object")
        rope_theta = raw.get("rope_theta")
        if rope_theta is None and rope.get("rope_theta") is not None:
            rope_theta = field_.number("rope_theta", value=rope["rope_theta"])
        elif rope_theta is None:
            raise ConfigError(
                f"{source}: missing field 'rope_theta' (nor 'rope_parameters.rope_theta')"
            )
        else:
            rope_theta = field_.number("rope_theta")
        if rope.get("rope_type") not in (None, "default"):
            raise ConfigError(
                f"{source}: field 'rope_type' = '{rope['rope_type']}' is not supported"
            )

        hidden = field_.count("hidden_size")
        heads = field_.count("num_attention_heads")
        if raw.get("head_dim") is None and hidden % heads:
            raise ConfigError(f"{source}: hidden_size is not a multiple of num_attention_heads")
        head_dim = field_.count("head_dim", default=hidden // heads)
        window = raw.get("sliding_window")
        if window is not None and (
            not isinstance(window, int) or isinstance(window, bool) or window <= 0
        ):
            raise ConfigError(f"{source}: field 'sliding_window' must be null or a positive int")
        moe = {}
        if model_type == "mixtral":
            moe = {
                "num_local_experts": field_.count("num_local_experts"),
                "num_experts_per_tok": field_.count("num_experts_per_tok"),
            }
        vocab = field_.count("vocab_size")
        # BOS and EOS are the tokenizer's (tokenizer.model); the config's are checked, as a
        # damaged file's would be, and kept among `extra`
        eos = raw.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        field_.token_id("bos_token_id", raw.get("bos_token_id"), vocab)
        field_.token_id("eos_token_id", eos, vocab)
        known = {f.name for f in fields(cls)} | {"rope_parameters", "rope_scaling"}
        return cls(
            model_type=model_type,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=field_.count("intermediate_size"),
            num_hidden_layers=field_.count("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=field_.count("num_key_value_heads", default=heads),
            head_dim=head_dim,
            rms_norm_eps=field_.number("rms_norm_eps", default=1e-5),
            rope_theta=rope_theta,
            max_position_embeddings=field_.count("max_position_embeddings", default=32768),
            sliding_window=window,
            tie_word_embeddings=field_.flag("tie_word_embeddings"),
            torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"),
            extra={k: v for k, v in raw.items() if k not in known},
            **moe,
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        """Read `config.json` (or the directory holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ConfigError(f"{path}: no config.json here; is this a model directory?")
        try:
            raw = read_json(path)
        except QuantError as e:
            raise ConfigError(str(e)) from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(raw, source=str(path))


class Fields:
    """Reads typed fields of a raw config; every refusal names the field and the file."""

    def __init__(self, raw: dict[str, Any], source: str, model_type: str) -> None:
        self.raw, self.source, self.model_type = raw, source, model_type

    def _get(self, name: str, default: Any) -> Any:
        value = self.raw.get(name)
        if value is None:
            if default is None:
                raise ConfigError(
                    f"{self.source}: missing field '{name}' (needed for {self.model_type})"
                )
            return default
        return value

    def count(self, name: str, default: int | None = None) -> int:
        """A positive whole number (`64` or `64.0`, not `"64"`, `true` or `0`)."""
        value = self._get(name, default)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(
                f"{self.source}: field '{name}' must be a positive integer, not {value!r}"
            )
        return value

    def number(self, name: str, default: float | None = None, value: Any = None) -> float:
        """A positive finite number."""
        value = self._get(name, default) if value is None else value
        try:
            number = float(value) if type(value) in (int, float) else math.nan
        except OverflowError:  # an int past float's range
            number = math.inf
        if not math.isfinite(number) or number <= 0:
            raise ConfigError(
                f"{self.source}: field '{name}' must be a positive number, not {value!r}"
            )
        return number

    def flag(self, name: str) -> bool:
        value = self.raw.get(name, False)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.source}: field '{name}' must be true or false, not {value!r}")
        return value

    def token_id(self, name: str, value: Any, vocab: int) -> None:
        """Check that `value` is a token id inside the vocabulary, or None."""
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < vocab
        ):
            raise ConfigError(
                f"{self.source}: field '{name}' must be a token id below vocab_size ({vocab}), "
                f"not {value!r}"
            )
