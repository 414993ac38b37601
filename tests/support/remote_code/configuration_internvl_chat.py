"""InternVLChatConfig for launch's tests: like InternVL's own ``configuration_internvl_chat.py``, it
builds ``llm_config`` with the class its architecture names (InternLM2Config for InternLM2, transformers'
Qwen2Config for Qwen2 and LlamaConfig for Llama; any other is refused), so that class's rules apply to the
language model's settings."""

from transformers import LlamaConfig, PretrainedConfig, Qwen2Config

from .configuration_internlm2 import InternLM2Config

_LLM_CLASSES = {"InternLM2ForCausalLM": InternLM2Config, "Qwen2ForCausalLM": Qwen2Config,
                "LlamaForCausalLM": LlamaConfig}


class InternVLChatConfig(PretrainedConfig):
    model_type = "internvl_chat"
    is_composition = True

    def __init__(self, vision_config=None, llm_config=None, downsample_ratio=0.5, **kwargs):
        super().__init__(**kwargs)
        self.vision_config = PretrainedConfig(**(vision_config or {}))
        llm_config = dict(llm_config or {"architectures": ["InternLM2ForCausalLM"]})
        arch = llm_config.get("architectures", [None])[0]
        if arch not in _LLM_CLASSES:
            raise ValueError(f"Unsupported architecture: {arch}")
        self.llm_config = _LLM_CLASSES[arch](**llm_config)
        self.downsample_ratio = downsample_ratio

    def to_dict(self):
        out = super().to_dict()
        out["vision_config"] = self.vision_config.to_dict()
        out["llm_config"] = self.llm_config.to_dict()
        return out
