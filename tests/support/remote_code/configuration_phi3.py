"""Phi3Config for launch's tests: the published rule of Phi-3's own ``configuration_phi3.py``
(microsoft/Phi-3-*): ``_rope_scaling_adjustment`` renames a ``type`` of ``su`` or ``yarn`` to ``longrope``,
then ``_rope_scaling_validation`` takes ``rope_scaling`` only as None or a dict of exactly three fields,
``type`` ``longrope``, and ``short_factor`` / ``long_factor``, lists of head_dim / 2 numbers. Written for these
tests."""

from transformers import PretrainedConfig


class Phi3Config(PretrainedConfig):
    model_type = "phi3"

    def __init__(self, vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=None, hidden_act="silu", max_position_embeddings=4096,
                 original_max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None,
                 **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.original_max_position_embeddings = original_max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self._rope_scaling_adjustment()
        self._rope_scaling_validation()
        super().__init__(**kwargs)

    def _rope_scaling_adjustment(self):
        if isinstance(self.rope_scaling, dict) and self.rope_scaling.get("type") in ("su", "yarn"):
            self.rope_scaling["type"] = "longrope"

    def _rope_scaling_validation(self):
        scaling = self.rope_scaling
        if scaling is None:
            return
        if not isinstance(scaling, dict) or len(scaling) != 3:
            raise ValueError("`rope_scaling` must be a dictionary with three fields, `type`, `short_factor` and "
                             f"`long_factor`, got {scaling}")
        kind = scaling.get("type")
        if kind not in ("longrope",):
            raise ValueError(f"`rope_scaling`'s type field must be one of ['longrope'], got {kind}")
        half = self.hidden_size // self.num_attention_heads // 2
        for field in ("short_factor", "long_factor"):
            value = scaling.get(field)
            if not (isinstance(value, list) and all(isinstance(x, (int, float)) for x in value)):
                raise ValueError(f"`rope_scaling`'s {field} field must be a list of numbers, got {value}")
            if len(value) != half:
                raise ValueError(f"`rope_scaling`'s {field} field must have length {half}, got {len(value)}")
