"""ModelConfig: the one truth about a MiniCPM4 model's shape.

Field names are exactly those of a MiniCPM HF ``config.json`` so that import and export are a
dict mapping (``from_hf_config`` / ``to_hf_config``). Validation runs at construction and names the
field and the rule that failed. Keys of a config.json that this class does not model are kept in
``extra`` so a round trip loses nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Mapping

import numpy as np

SPARSE_FIELDS = ("kernel_size", "kernel_stride", "init_blocks", "block_size", "window_size", "topk",
                 "use_nope", "dense_len")
SUPPORTED_ROPE_TYPES = ("longrope", "default")
_DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A config field breaks a rule; the message names the field and the rule."""


def _fail(field: str, rule: str, value: Any) -> None:
    raise ConfigError(f"config field {field!r}: {rule} (got {value!r})")


@dataclasses.dataclass(frozen=True)
class SparseConfig:
    """InfLLM v2 settings (MiniCPM4 README / config.json ``sparse_config``). ``topk`` excludes the local window, as in config.json."""

    kernel_size: int = 32
    kernel_stride: int = 16
    init_blocks: int = 1
    block_size: int = 64
    window_size: int = 2048
    topk: int = 64
    use_nope: bool = False
    dense_len: int = 8192

    @property
    def local_blocks(self) -> int:
        """Blocks of the local window; HF forces q_block-local_blocks..q_block (HF modeling_minicpm.py)."""
        return self.window_size // self.block_size

    @property
    def total_topk(self) -> int:
        """Blocks attended per query and KV head: HF's ``topk + window_size // block_size`` (96)."""
        return self.topk + self.local_blocks

    def validate(self) -> None:
        for name in ("kernel_size", "kernel_stride", "block_size", "window_size", "topk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                _fail(f"sparse_config.{name}", "must be a positive integer", value)
        if not isinstance(self.init_blocks, int) or self.init_blocks < 0:
            _fail("sparse_config.init_blocks", "must be a non-negative integer", self.init_blocks)
        if not isinstance(self.dense_len, int) or (self.dense_len < 0 and self.dense_len != -1):
            _fail("sparse_config.dense_len", "must be >= 0, or -1 for always sparse", self.dense_len)
        if not isinstance(self.use_nope, bool):
            _fail("sparse_config.use_nope", "must be a boolean", self.use_nope)
        if self.kernel_stride > self.kernel_size:
            _fail("sparse_config.kernel_stride", "must not exceed kernel_size", self.kernel_stride)
        if self.kernel_size % self.kernel_stride:
            _fail("sparse_config.kernel_size", "must be a multiple of kernel_stride", self.kernel_size)
        if self.block_size % self.kernel_stride:
            _fail("sparse_config.block_size", "must be a multiple of kernel_stride", self.block_size)
        if self.window_size % self.block_size:
            _fail("sparse_config.window_size", "must be a multiple of block_size", self.window_size)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Every field of a MiniCPM4 HF config.json, under the same names (openbmb/MiniCPM4-8B)."""

    vocab_size: int = 73448
    hidden_size: int = 4096
    intermediate_size: int = 16384
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 2
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Mapping[str, Any] | None = None
    scale_emb: float = 12.0
    dim_model_base: int = 256
    scale_depth: float = 1.4
    tie_word_embeddings: bool = False
    initializer_range: float = 0.1
    bos_token_id: int = 1
    eos_token_id: int | tuple[int, ...] = (2, 73440)
    pad_token_id: int | None = 2
    hidden_act: str = "silu"
    attention_bias: bool = False
    sparse_config: SparseConfig | None = None
    torch_dtype: str = "bfloat16"
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # Modelled keys present in the source config.json; export writes only those (plus any field
    # changed from its default), so an imported config round-trips field for field.
    source_keys: tuple[str, ...] | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.sparse_config, Mapping):
            object.__setattr__(self, "sparse_config", _sparse_from_dict(self.sparse_config))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.rope_scaling is not None:
            object.__setattr__(self, "rope_scaling", _freeze_rope(self.rope_scaling))
        object.__setattr__(self, "extra", _FrozenDict(copy.deepcopy(dict(self.extra))))
        self.validate()

    # ---- derived quantities -------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_groups(self) -> int:
        """Query heads per KV head (G)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def residual_scale(self) -> float:
        """muP depth scaling of every residual branch: scale_depth / sqrt(L) (HF modeling_minicpm.py)."""
        return self.scale_depth / math.sqrt(self.num_hidden_layers)

    @property
    def width_multiplier(self) -> float:
        """muP width multiplier m = hidden_size / dim_model_base; logits are divided by it."""
        return self.hidden_size / self.dim_model_base

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = self.eos_token_id
        return tuple(eos) if isinstance(eos, tuple) else (eos,)

    # ---- validation ---------------------------------------------------------------------
    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                     "dim_model_base"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
                _fail(name, "must be a positive integer", value)
        for name in ("rms_norm_eps", "rope_theta", "scale_emb", "scale_depth", "initializer_range"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                _fail(name, "must be a positive number", value)
        if self.hidden_size % self.num_attention_heads:
            _fail("hidden_size", "must be divisible by num_attention_heads "
                  f"({self.num_attention_heads})", self.hidden_size)
        if self.num_attention_heads % self.num_key_value_heads:
            _fail("num_attention_heads", "must be divisible by num_key_value_heads "
                  f"({self.num_key_value_heads})", self.num_attention_heads)
        if self.head_dim % 2:
            _fail("hidden_size", "head_dim (hidden_size // num_attention_heads) must be even for "
                  "RoPE", self.hidden_size)
        if self.hidden_act != "silu":
            _fail("hidden_act", "only 'silu' (SwiGLU) is supported", self.hidden_act)
        if self.attention_bias:
            _fail("attention_bias", "MiniCPM4 attention has no bias; true is not supported",
                  self.attention_bias)
        if self.torch_dtype not in _DTYPES:
            _fail("torch_dtype", f"must be one of {_DTYPES}", self.torch_dtype)
        for tok in ("bos_token_id",) + (("pad_token_id",) if self.pad_token_id is not None else ()):
            value = getattr(self, tok)
            if not isinstance(value, int) or not 0 <= value < self.vocab_size:
                _fail(tok, f"must be a token id in [0, vocab_size={self.vocab_size})", value)
        for value in self.eos_token_ids:
            if not isinstance(value, int) or not 0 <= value < self.vocab_size:
                _fail("eos_token_id", f"every id must be in [0, vocab_size={self.vocab_size})",
                      self.eos_token_id)
        self._validate_rope()
        if self.sparse_config is not None:
            self.sparse_config.validate()

    def _validate_rope(self) -> None:
        rs = self.rope_scaling
        if rs is None:
            return
        rope_type = rs.get("rope_type", rs.get("type"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            _fail("rope_scaling.rope_type", f"must be one of {SUPPORTED_ROPE_TYPES}", rope_type)
        if rope_type == "default":
            return
        half = self.head_dim // 2
        for key in ("short_factor", "long_factor"):
            factors = rs.get(key)
            if factors is None or len(factors) != half:
                _fail(f"rope_scaling.{key}", f"must list head_dim/2 = {half} factors",
                      None if factors is None else f"{len(factors)} factors")
            if any((not isinstance(f, (int, float))) or f <= 0 for f in factors):
                _fail(f"rope_scaling.{key}", "factors must be positive numbers", factors)
        orig = rs.get("original_max_position_embeddings")
        if not isinstance(orig, int) or orig <= 0:
            _fail("rope_scaling.original_max_position_embeddings", "must be a positive integer",
                  orig)
        factor = rs.get("attention_factor", 1.0)
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
            _fail("rope_scaling.attention_factor", "must be a positive number", factor)

    # ---- HF mapping ---------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> "ModelConfig":
        """Build from a config.json dict; unknown keys go to ``extra`` and come back on export."""
        if not isinstance(hf, Mapping):
            raise ConfigError(f"an HF config must be a JSON object, got {type(hf).__name__}")
        model_type = hf.get("model_type", "minicpm")
        if model_type not in ("minicpm", "llama"):
            raise ConfigError(f"config field 'model_type': unsupported model type {model_type!r} "
                              "(expected 'minicpm')")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "source_keys"}
        kwargs = {k: v for k, v in hf.items() if k in names}
        extra = {k: v for k, v in hf.items() if k not in names}
        if "head_dim" in extra and extra["head_dim"] is not None:
            head_dim = hf["hidden_size"] // hf["num_attention_heads"]
            if extra["head_dim"] != head_dim:
                _fail("head_dim", f"must equal hidden_size // num_attention_heads = {head_dim}",
                      extra["head_dim"])
        return cls(**kwargs, extra=extra, source_keys=tuple(kwargs))

    def to_hf_config(self) -> dict[str, Any]:
        """The config.json dict: every modelled field, then the preserved extra keys."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in ("extra", "source_keys"):
                continue
            value = getattr(self, f.name)
            if (self.source_keys is not None and f.name not in self.source_keys
                    and value == _default(f)):
                continue
            if f.name == "sparse_config":
                if value is None:
                    continue
                value = dataclasses.asdict(value)
            elif f.name == "rope_scaling" and value is not None:
                value = _thaw_rope(value)
            elif f.name == "eos_token_id" and isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        for k, v in self.extra.items():
            out.setdefault(k, copy.deepcopy(v))
        return out

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return f.default


def _sparse_from_dict(d: Mapping[str, Any]) -> SparseConfig:
    unknown = set(d) - set(SPARSE_FIELDS)
    if unknown:
        raise ConfigError(f"config field 'sparse_config': unknown keys {sorted(unknown)} "
                          f"(known: {list(SPARSE_FIELDS)})")
    return SparseConfig(**d)


class _FrozenDict(dict):
    """A read-only, hashable dict so ModelConfig can be a static jit argument."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted((k, _hashable(v)) for k, v in self.items())))

    def _immutable(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("ModelConfig is immutable; use ModelConfig.replace")

    __setitem__ = __delitem__ = update = pop = clear = setdefault = _immutable  # type: ignore


def _hashable(v: Any) -> Any:
    if isinstance(v, Mapping):
        return tuple(sorted((k, _hashable(x)) for k, x in v.items()))
    if isinstance(v, (list, tuple)):
        return tuple(_hashable(x) for x in v)
    return v


def _freeze_rope(rs: Mapping[str, Any]) -> _FrozenDict:
    return _FrozenDict({k: tuple(v) if isinstance(v, list) else v for k, v in rs.items()})


def _thaw_rope(rs: Mapping[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in rs.items()}
