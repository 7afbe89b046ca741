"""MiniCPM4 in PyTorch for transformers (trust_remote_code), written by the cpmjax project.

Implements the dense forward pass of HF modeling_minicpm.py: embedding x scale_emb; pre-norm
blocks whose outputs are scaled by scale_depth/sqrt(L) before the residual add; RMSNorm and RoPE in
float32; LongRoPE with the factor list fixed by max_position_embeddings vs
original_max_position_embeddings; final norm; hidden / (hidden_size/dim_model_base) before the head;
float32 logits. InfLLM v2 sparse attention is not implemented here: a ``sparse_config`` is accepted
and the model runs dense (cpmjax runs the sparse path).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import logging

try:
    from .configuration_minicpm import MiniCPMConfig
except ImportError:  # loaded as a plain module
    from configuration_minicpm import MiniCPMConfig

logger = logging.get_logger(__name__)


class MiniCPMRMSNorm(nn.Module):
    def __init__(self, size, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight


class MiniCPMRotaryEmbedding(nn.Module):
    """cos/sin in float32 for given positions, with MiniCPM's LongRoPE factors and scaling.

    The frequencies are recomputed per call rather than kept in a buffer: transformers builds
    models on the meta device and would leave a non-persistent buffer uninitialised.
    """

    def __init__(self, config):
        super().__init__()
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.base = config.rope_theta
        self.factors = None
        self.scaling = 1.0
        rs = config.rope_scaling
        if rs is not None and rs.get("rope_type", rs.get("type")) == "longrope":
            orig = rs["original_max_position_embeddings"]
            use_long = config.max_position_embeddings > orig
            self.factors = list(rs["long_factor"] if use_long else rs["short_factor"])
            scale = config.max_position_embeddings / orig
            self.scaling = rs.get("attention_factor",
                                  math.sqrt(1 + math.log(scale) / math.log(orig)))

    def forward(self, position_ids):
        device = position_ids.device
        exponent = torch.arange(0, self.head_dim, 2, device=device).float() / self.head_dim
        inv_freq = 1.0 / (self.base ** exponent)
        if self.factors is not None:
            inv_freq = inv_freq / torch.tensor(self.factors, dtype=torch.float32, device=device)
        freqs = position_ids.float()[..., None] * inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos() * self.scaling, emb.sin() * self.scaling


def _rotate(x, cos, sin):
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


class MiniCPMAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=False)

    def forward(self, x, cos, sin, mask, cache):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        groups = self.num_heads // self.num_kv_heads
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(self.head_dim)
        scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
        probs = F.softmax(scores, dim=-1).to(v.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(out)


class MiniCPMMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        d, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, i, bias=False)
        self.up_proj = nn.Linear(d, i, bias=False)
        self.down_proj = nn.Linear(i, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MiniCPMDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.self_attn = MiniCPMAttention(config, layer_idx)
        self.mlp = MiniCPMMLP(config)
        self.input_layernorm = MiniCPMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = MiniCPMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.residual_scale = config.scale_depth / math.sqrt(config.num_hidden_layers)

    def forward(self, h, cos, sin, mask, cache):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, cache) * self.residual_scale
        return h + self.mlp(self.post_attention_layernorm(h)) * self.residual_scale


class MiniCPMPreTrainedModel(PreTrainedModel):
    config_class = MiniCPMConfig
    base_model_prefix = "model"
    _no_split_modules = ["MiniCPMDecoderLayer"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, MiniCPMRMSNorm):
            nn.init.ones_(module.weight)


class MiniCPMModel(MiniCPMPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        if getattr(config, "sparse_config", None):
            logger.warning("sparse_config is set: this PyTorch model runs dense attention "
                           "(InfLLM v2 runs in cpmjax)")
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MiniCPMDecoderLayer(config, i)
                                    for i in range(config.num_hidden_layers))
        self.norm = MiniCPMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = MiniCPMRotaryEmbedding(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, use_cache=None, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        h = inputs_embeds * self.config.scale_emb
        B, T = h.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        key_pos = torch.arange(past + T, device=h.device)
        query_pos = key_pos[past:]
        if position_ids is None:
            position_ids = query_pos[None].expand(B, T)
        # cache slots are consecutive, so causality is by slot index
        mask = (key_pos[None, :] <= query_pos[:, None])[None, None].expand(B, 1, T, past + T)
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, : past + T].bool()
        cos, sin = self.rotary_emb(position_ids)
        for layer in self.layers:
            h = layer(h, cos, sin, mask, past_key_values if use_cache else None)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(h),
                                       past_key_values=past_key_values if use_cache else None)


class MiniCPMForCausalLM(MiniCPMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = MiniCPMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, labels=None, use_cache=None,
                logits_to_keep=0, **kwargs):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, past_key_values=past_key_values,
                         inputs_embeds=inputs_embeds, use_cache=use_cache)
        h = out.last_hidden_state
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h / (self.config.hidden_size / self.config.dim_model_base)).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits,
                                      past_key_values=out.past_key_values)
