"""Model configs: MiMo-V2 target (Hugging Face field names) and the DFlash draft.

`from_dict` validates a parsed config.json and raises ConfigError naming the
source file and the field (missing, misspelled, wrong type or bad value).
Unknown fields that are not close to a known one are kept in `extra` so a
real Hugging Face config.json round-trips.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field

from tilecomp.errors import ConfigError


@dataclass(frozen=True)
class AttnSpec:
    """The attention geometry of one layer."""
    n_heads: int
    n_kv_heads: int
    head_dim: int          # q/k head dim
    v_head_dim: int
    rope_dim: int          # leading dims of each q/k head that RoPE rotates (even)
    rope_theta: float
    window: int | None     # SWA: a query sees the `window` previous keys plus itself; None = full
    has_sink: bool         # learned per-head sink logit in the softmax denominator


def rope_dims(head_dim: int, partial_rotary_factor: float) -> int:
    """int(head_dim * factor) rounded down to an even number."""
    return int(head_dim * partial_rotary_factor) // 2 * 2


# --- validation helpers shared by both configs -------------------------------

def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _check_value(name: str, value, tp):
    """Check `value` against a field annotation; return it (ints widen to float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_value(name, value, inner[0])
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"field '{name}': expected a list, found {type(value).__name__} {value!r}")
        return [_check_value(f"{name}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"field '{name}': expected an object, found {type(value).__name__} {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"field '{name}': expected true/false, found {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"field '{name}': expected an integer, found {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"field '{name}': expected a number, found {type(value).__name__} {value!r}")
        return float(value)
    raise TypeError(f"unsupported annotation {_type_name(tp)} for field {name}")


def _parse(cls, d: dict, source: str, ignored: frozenset, **extra_kwargs):
    """Shared from_dict: known fields, misspellings, missing fields, types."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a JSON object, found {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and f.name != "extra"}
    kwargs, extra = {}, {}
    for key, value in d.items():
        if key in fields:
            try:
                kwargs[key] = _check_value(key, value, hints[key])
            except ConfigError as e:
                raise ConfigError(f"{source}: {e}") from None
        elif key in ignored:
            extra[key] = value
        else:
            close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.8)
            if close:
                raise ConfigError(f"{source}: unknown field '{key}' (did you mean '{close[0]}'?)")
            extra[key] = value
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and name not in kwargs:
            close = difflib.get_close_matches(name, list(d), n=1, cutoff=0.8)
            hint = f" (found '{close[0]}': misspelled?)" if close else ""
            raise ConfigError(f"{source}: missing field '{name}' ({_type_name(hints[name])}){hint}")
    try:
        return cls(**kwargs, extra=extra, **extra_kwargs)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _to_dict(obj) -> dict:
    out = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.name != "extra"}
    out = {k: (list(v) if isinstance(v, list) else v) for k, v in out.items()}
    return {**obj.extra, **out}


def _positive(obj, names):
    for n in names:
        v = getattr(obj, n)
        if v <= 0:
            raise ConfigError(f"field '{n}': expected a positive value, found {v}")


# Fields of real Hugging Face configs that this reference does not use.
_HF_IGNORED = frozenset({
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "auto_map",
    "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act", "initializer_range",
    "use_cache", "attention_dropout", "attention_bias", "n_group", "topk_group", "scoring_func",
    "topk_method", "n_shared_experts", "sliding_window", "layer_types", "mlp_layer_types",
    "rope_parameters", "rope_scaling", "rms_norm_eps", "num_nextn_predict_layers",
})


# Ignored HF fields whose other values would change the model: value must be one of these.
_UNSUPPORTED = {"n_shared_experts": (0, None), "n_group": (1, None), "topk_group": (1, None),
                "hidden_act": ("silu",), "scoring_func": ("sigmoid",), "attention_bias": (False,)}


@dataclass
class MiMoConfig:
    """MiMo-V2 target; field names are the Hugging Face config.json keys."""
    hidden_size: int
    num_hidden_layers: int
    vocab_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    v_head_dim: int
    swa_num_attention_heads: int
    swa_num_key_value_heads: int
    swa_head_dim: int
    swa_v_head_dim: int
    sliding_window_size: int
    hybrid_layer_pattern: list[int]     # 1 = sliding-window attention, 0 = full
    moe_layer_freq: list[int]           # 1 = MoE MLP, 0 = dense MLP
    intermediate_size: int
    moe_intermediate_size: int
    n_routed_experts: int
    num_experts_per_tok: int
    add_swa_attention_sink_bias: bool = True
    add_full_attention_sink_bias: bool = False
    rope_theta: float = 5_000_000.0
    swa_rope_theta: float = 10_000.0
    partial_rotary_factor: float = 0.334
    attention_value_scale: float | None = 0.707
    layernorm_epsilon: float = 1e-5
    norm_topk_prob: bool = True
    routed_scaling_factor: float | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 131072
    quantization_config: dict | None = None
    extra: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        _positive(self, ["hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads",
                         "num_key_value_heads", "head_dim", "v_head_dim", "swa_num_attention_heads",
                         "swa_num_key_value_heads", "swa_head_dim", "swa_v_head_dim",
                         "sliding_window_size", "intermediate_size", "max_position_embeddings",
                         "layernorm_epsilon"])
        for name in ("hybrid_layer_pattern", "moe_layer_freq"):
            pattern = getattr(self, name)
            if len(pattern) != self.num_hidden_layers:
                raise ConfigError(f"field '{name}': expected {self.num_hidden_layers} entries "
                                  f"(num_hidden_layers), found {len(pattern)}")
            bad = [v for v in pattern if v not in (0, 1)]
            if bad:
                raise ConfigError(f"field '{name}': expected entries 0 or 1, found {bad[0]!r}")
        for heads, kv, what in ((self.num_attention_heads, self.num_key_value_heads, ""),
                                (self.swa_num_attention_heads, self.swa_num_key_value_heads, "swa_")):
            if heads % kv:
                raise ConfigError(f"field '{what}num_key_value_heads': expected a divisor of "
                                  f"{what}num_attention_heads={heads}, found {kv}")
        if any(self.moe_layer_freq):
            _positive(self, ["moe_intermediate_size", "n_routed_experts", "num_experts_per_tok"])
            if self.num_experts_per_tok > self.n_routed_experts:
                raise ConfigError(f"field 'num_experts_per_tok': expected <= n_routed_experts="
                                  f"{self.n_routed_experts}, found {self.num_experts_per_tok}")
        if not 0.0 <= self.partial_rotary_factor <= 1.0:
            raise ConfigError(f"field 'partial_rotary_factor': expected a value in [0, 1], "
                              f"found {self.partial_rotary_factor}")
        for key, allowed in _UNSUPPORTED.items():
            if key in self.extra and self.extra[key] not in allowed:
                raise ConfigError(f"field '{key}': this reference supports only {allowed[0]!r}, "
                                  f"found {self.extra[key]!r}")
        q = self.quantization_config
        if q is not None and not isinstance(q.get("quant_method"), str):
            raise ConfigError(f"field 'quantization_config': expected an object with a string "
                              f"'quant_method', found {q!r}")

    # --- derived per-layer facts ---
    def is_swa(self, i: int) -> bool:
        return self.hybrid_layer_pattern[i] == 1

    def is_moe(self, i: int) -> bool:
        return self.moe_layer_freq[i] == 1

    def attn(self, i: int) -> AttnSpec:
        if self.is_swa(i):
            return AttnSpec(self.swa_num_attention_heads, self.swa_num_key_value_heads,
                            self.swa_head_dim, self.swa_v_head_dim,
                            rope_dims(self.swa_head_dim, self.partial_rotary_factor),
                            self.swa_rope_theta, self.sliding_window_size,
                            self.add_swa_attention_sink_bias)
        return AttnSpec(self.num_attention_heads, self.num_key_value_heads, self.head_dim,
                        self.v_head_dim, rope_dims(self.head_dim, self.partial_rotary_factor),
                        self.rope_theta, None, self.add_full_attention_sink_bias)

    @property
    def quant_method(self) -> str | None:
        return None if self.quantization_config is None else self.quantization_config["quant_method"]

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "MiMoConfig":
        return _parse(cls, d, source, _HF_IGNORED)

    def to_dict(self) -> dict:
        return _to_dict(self)


@dataclass
class DFlashConfig:
    """DFlash block draft (stored as dflash/config.json)."""
    mask_token_id: int
    target_layer_ids: list[int]
    sliding_window: int
    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    block_size: int = 8
    rope_theta: float = 10_000.0
    layernorm_epsilon: float = 1e-5
    extra: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        _positive(self, ["sliding_window", "num_hidden_layers", "hidden_size", "num_attention_heads",
                         "num_key_value_heads", "head_dim", "intermediate_size", "block_size",
                         "layernorm_epsilon"])
        if not self.target_layer_ids:
            raise ConfigError("field 'target_layer_ids': expected at least one layer, found []")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"field 'num_key_value_heads': expected a divisor of num_attention_heads="
                              f"{self.num_attention_heads}, found {self.num_key_value_heads}")
        if self.mask_token_id < 0:
            raise ConfigError(f"field 'mask_token_id': expected >= 0, found {self.mask_token_id}")

    def check_target(self, target: MiMoConfig):
        """Checks that need the target: mask token in vocab, taps in range, same hidden size."""
        if self.mask_token_id >= target.vocab_size:
            raise ConfigError(f"field 'mask_token_id': expected a token id below the target's "
                              f"vocab_size={target.vocab_size}, found {self.mask_token_id}")
        for t in self.target_layer_ids:
            if not 0 <= t < target.num_hidden_layers:
                raise ConfigError(f"field 'target_layer_ids': expected layer ids in [0, "
                                  f"{target.num_hidden_layers}), found {t}")
        if self.hidden_size != target.hidden_size:
            raise ConfigError(f"field 'hidden_size': expected the target's hidden_size="
                              f"{target.hidden_size}, found {self.hidden_size}")

    @classmethod
    def from_dict(cls, d: dict, source: str = "dflash/config.json",
                  target: MiMoConfig | None = None) -> "DFlashConfig":
        cfg = _parse(cls, d, source, frozenset({"architectures", "model_type", "torch_dtype", "dtype"}))
        if target is not None:
            try:
                cfg.check_target(target)
            except ConfigError as e:
                raise ConfigError(f"{source}: {e}") from None
        return cfg

    def to_dict(self) -> dict:
        return _to_dict(self)
