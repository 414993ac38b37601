"""InternLM3Config for launch's tests: the published RoPE handling of InternLM3's own
``configuration_internlm3.py`` (``type`` copied into ``rope_type``, then transformers'
``rope_config_validation``), written for these tests."""

from transformers import PretrainedConfig
from transformers.modeling_rope_utils import rope_config_validation


class InternLM3Config(PretrainedConfig):
    model_type = "internlm3"

    def __init__(self, vocab_size=128512, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, hidden_act="silu",
                 max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None,
                 qkv_bias=False, bias=False, head_dim=None, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.qkv_bias = qkv_bias
        self.bias = bias
        self.head_dim = head_dim or hidden_size // num_attention_heads
        if self.rope_scaling is not None and "type" in self.rope_scaling:
            self.rope_scaling["rope_type"] = self.rope_scaling["type"]
        rope_config_validation(self)
        super().__init__(**kwargs)
