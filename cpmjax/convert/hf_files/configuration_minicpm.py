"""MiniCPM4 configuration for transformers (trust_remote_code), written by the cpmjax project.

Field names follow the MiniCPM config.json (openbmb/MiniCPM4-8B).
"""

from transformers import PretrainedConfig


class MiniCPMConfig(PretrainedConfig):
    model_type = "minicpm"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size=73448, hidden_size=4096, intermediate_size=16384,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=2,
                 max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=10000.0,
                 rope_scaling=None, scale_emb=12.0, dim_model_base=256, scale_depth=1.4,
                 tie_word_embeddings=False, initializer_range=0.1, hidden_act="silu",
                 attention_bias=False, sparse_config=None, use_cache=True, bos_token_id=1,
                 eos_token_id=2, pad_token_id=2, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.scale_emb = scale_emb
        self.dim_model_base = dim_model_base
        self.scale_depth = scale_depth
        self.initializer_range = initializer_range
        self.hidden_act = hidden_act
        self.attention_bias = attention_bias
        self.sparse_config = sparse_config
        self.use_cache = use_cache
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         pad_token_id=pad_token_id, tie_word_embeddings=tie_word_embeddings,
                         **kwargs)
