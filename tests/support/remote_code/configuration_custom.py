"""CustomConfig for launch's tests: a checkpoint's own config class that launch has not read. It applies the
rule many such classes copied from transformers' LlamaConfig of 4.31 to 4.41 (``_rope_scaling_validation``:
None, or a dict of exactly two fields, ``type`` in {linear, dynamic} and a float ``factor`` > 1). Written for
these tests; launch's rules do not name it."""

from transformers import PretrainedConfig


class CustomConfig(PretrainedConfig):
    model_type = "custom"

    def __init__(self, vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=None, hidden_act="silu", max_position_embeddings=2048,
                 rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self._rope_scaling_validation()
        super().__init__(**kwargs)

    def _rope_scaling_validation(self):
        scaling = self.rope_scaling
        if scaling is None:
            return
        if not isinstance(scaling, dict) or len(scaling) != 2:
            raise ValueError(f"`rope_scaling` must be a dictionary with two fields, `type` and `factor`, got {scaling}")
        kind, factor = scaling.get("type"), scaling.get("factor")
        if kind not in ("linear", "dynamic"):
            raise ValueError(f"`rope_scaling`'s type field must be one of ['linear', 'dynamic'], got {kind}")
        if not isinstance(factor, float) or factor <= 1.0:
            raise ValueError(f"`rope_scaling`'s factor field must be a float > 1, got {factor!r}")
