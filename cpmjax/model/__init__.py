"""The MiniCPM4 network as pure functions of (params, inputs)."""

from cpmjax.model.cache import KVCache, init_cache
from cpmjax.model.params import (ParamSpec, abstract_params, count_params, init_params, param_axes,
                                 param_specs)
from cpmjax.model.transformer import ModelOutput, embed_tokens, forward, lm_head

__all__ = ["KVCache", "ModelOutput", "ParamSpec", "abstract_params", "count_params", "embed_tokens",
           "forward", "init_cache", "init_params", "lm_head", "param_axes", "param_specs"]
