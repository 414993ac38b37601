"""What launch hands to lmdeploy: the engine config values and the equivalent command line.

This module never imports lmdeploy: ``plan`` must stay fast and work without a GPU. The values
are typed (``EngineConfig``, with lmdeploy's own field names) up to the hand-off: the spec file the
serving process reads, where ``engine_server`` turns them into the real ``TurbomindEngineConfig`` /
``PytorchEngineConfig``. The tests build the real classes from them and parse the command line
with lmdeploy's own CLI parser. Engine defaults, backends, quant policies and the engine flags'
ranges are defined here, once.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field

from launcher.rules import limits
from launcher.rules.kvcache import DEFAULT_CACHE_RATIO

# lmdeploy 0.18 lmdeploy/turbomind/supported_models.py SUPPORTED_ARCHS (a contract test checks it).
TURBOMIND_ARCHS = frozenset(
    {
        "Qwen2ForCausalLM", "Qwen2MoeForCausalLM", "Qwen2VLForConditionalGeneration",
        "Qwen2_5_VLForConditionalGeneration", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM",
        "Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration",
        "InternS2PreviewForConditionalGeneration", "InternS2MobiusForConditionalGeneration",
        "InternVLChatModel", "InternVLForConditionalGeneration", "InternS1ForConditionalGeneration",
        "LlamaForCausalLM", "InternLM2ForCausalLM", "InternLM3ForCausalLM", "Glm4MoeLiteForCausalLM",
        "GptOssForCausalLM", "MixtralForCausalLM",
    }
)
BACKENDS = ("turbomind", "pytorch")
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 23333
CHAT_TEMPLATE = "launch-chat-template.json"  # in the overlay: lmdeploy's ChatTemplateConfig, for --chat-template
PROVENANCE = "launch-patch.json"  # in the overlay: launch's record of the patch (what the engine must read)
# Ranges of the engine flags: the one table's (launcher/rules/limits.py), the same for flags and presets.
SESSION_LEN_MAX = limits.SESSION_LEN.high
TP_MAX = limits.TP.high
MAX_BATCH_SIZE_MAX = limits.MAX_BATCH_SIZE.high
GPU_MEMORY_MAX_GIB = limits.GPU_MEMORY.high


@dataclass(frozen=True)
class EngineSettings:
    """The knobs a user turns (flags over preset defaults). The defaults here are launch's (and
    lmdeploy's) defaults; a preset's ``engine`` section overrides them."""

    backend: str = "turbomind"
    tp: int = 1
    max_batch_size: int = 64
    cache_max_entry_count: float = DEFAULT_CACHE_RATIO
    quant_policy: int = 0
    cp: int = 1  # TurboMind's context parallelism: of the tp GPUs, cp split each sequence (attention)
    enable_prefix_caching: bool = False


DEFAULTS = EngineSettings()


@dataclass(frozen=True)
class EngineConfig:
    """The fields of lmdeploy's ``TurbomindEngineConfig`` / ``PytorchEngineConfig`` launch sets,
    typed. ``session_len`` is always explicit: lmdeploy never derives it from the RoPE factor (its
    default is the config's max_position_embeddings)."""

    tp: int
    session_len: int
    max_batch_size: int
    cache_max_entry_count: float
    quant_policy: int
    dtype: str = "auto"
    cp: int = 1  # TurbomindEngineConfig only (PytorchEngineConfig has no cp)
    enable_prefix_caching: bool = False

    def kwargs(self, backend: str = "turbomind") -> dict:
        """The keyword arguments of ``backend``'s lmdeploy class (the hand-off to lmdeploy, and the spec
        file); ``cp`` is TurboMind's only (the PyTorch engine's class has no such field)."""
        return {
            "dtype": self.dtype,
            "tp": self.tp,
            "session_len": self.session_len,
            "max_batch_size": self.max_batch_size,
            "cache_max_entry_count": self.cache_max_entry_count,
            "quant_policy": self.quant_policy,
            "enable_prefix_caching": self.enable_prefix_caching,
            **({"cp": self.cp} if backend == "turbomind" else {}),
        }


@dataclass(frozen=True)
class EngineSpec:
    backend: str
    config: EngineConfig
    model_name: str
    trust_remote_code: bool
    chat_template: dict | None = None
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    api_keys: tuple[str, ...] = field(default_factory=tuple)

    def config_kwargs(self) -> dict:
        """The keyword arguments of this backend's lmdeploy engine config class."""
        return self.config.kwargs(self.backend)

    @property
    def config_class(self) -> str:
        return "TurbomindEngineConfig" if self.backend == "turbomind" else "PytorchEngineConfig"


def engine_config(settings: EngineSettings, session_len: int) -> EngineConfig:
    return EngineConfig(
        tp=settings.tp,
        session_len=session_len,
        max_batch_size=settings.max_batch_size,
        cache_max_entry_count=settings.cache_max_entry_count,
        quant_policy=settings.quant_policy,
        cp=settings.cp,
        enable_prefix_caching=settings.enable_prefix_caching,
    )


def architecture_of(config: dict) -> str | None:
    """The first of ``architectures`` (None when it is not a list of names)."""
    archs = config.get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        return archs[0]
    return None


def turbomind_supports(config: dict) -> bool:
    return architecture_of(config) in TURBOMIND_ARCHS


def api_server_argv(model_path: str, spec: EngineSpec) -> list[str]:
    """The ``lmdeploy serve api_server`` command line equivalent to what launch runs."""
    cfg = spec.config
    argv = [
        "lmdeploy", "serve", "api_server", str(model_path),
        "--backend", spec.backend,
        "--model-name", spec.model_name,
        "--server-name", spec.host,
        "--server-port", str(spec.port),
        "--session-len", str(cfg.session_len),
        "--tp", str(cfg.tp),
        "--max-batch-size", str(cfg.max_batch_size),
        "--cache-max-entry-count", str(cfg.cache_max_entry_count),
        "--quant-policy", str(cfg.quant_policy),
    ]
    if cfg.cp != 1:
        argv += ["--cp", str(cfg.cp)]
    if cfg.enable_prefix_caching:
        argv.append("--enable-prefix-caching")
    if spec.trust_remote_code:
        argv.append("--trust-remote-code")
    if spec.chat_template:  # a file in the overlay: lmdeploy cannot take a long template inline
        argv += ["--chat-template", os.path.join(str(model_path), CHAT_TEMPLATE)]
    return argv


def command_line(argv: list[str]) -> str:
    return shlex.join(argv)


# --- the serving process's side (imports lmdeploy; never called by plan) ------------------------


def spec_to_json(spec: EngineSpec, model_path: str) -> dict:
    """What the serving process needs, as written to its spec file."""
    return {
        "model_path": str(model_path),
        "backend": spec.backend,
        "engine_config": spec.config.kwargs(spec.backend),
        "model_name": spec.model_name,
        "trust_remote_code": spec.trust_remote_code,
        "chat_template": spec.chat_template,
        "server_name": spec.host,
        "server_port": spec.port,
        "api_keys": list(spec.api_keys),
    }


def backend_config(data: dict):
    """The real lmdeploy engine config object for a spec (imports lmdeploy)."""
    from lmdeploy.messages import PytorchEngineConfig, TurbomindEngineConfig

    klass = TurbomindEngineConfig if data["backend"] == "turbomind" else PytorchEngineConfig
    return klass(**data["engine_config"])


def chat_template_config(data: dict):
    """lmdeploy's ChatTemplateConfig from the template file launch wrote into the overlay (the same
    file the equivalent command line names)."""
    if not data.get("chat_template"):
        return None
    from lmdeploy.model import ChatTemplateConfig

    return ChatTemplateConfig.from_json(os.path.join(data["model_path"], CHAT_TEMPLATE))


def serve_kwargs(data: dict) -> dict:
    """Keyword arguments of ``lmdeploy.serve.openai.api_server.serve`` for a spec. ``api_keys`` is
    always a list or None: lmdeploy iterates a string character by character."""
    keys = list(data.get("api_keys") or [])
    return {
        "model_path": data["model_path"],
        "model_name": data["model_name"],
        "backend": data["backend"],
        "backend_config": backend_config(data),
        "chat_template_config": chat_template_config(data),
        "server_name": data["server_name"],
        "server_port": int(data["server_port"]),
        "api_keys": keys or None,
        "trust_remote_code": bool(data["trust_remote_code"]),
        "log_level": "INFO",
    }


def _import_turbomind():
    """``lmdeploy.turbomind``, imported without a trace in the user's home: the import pulls in yapf,
    which writes its grammar cache under ``~/.cache/YAPF`` (XDG_CACHE_HOME), and this check may still
    refuse the command, which then must have written nothing. The cache goes to a temporary
    directory for the import only."""
    import tempfile

    saved = os.environ.get("XDG_CACHE_HOME")
    with tempfile.TemporaryDirectory(prefix="launch-import-") as scratch:
        os.environ["XDG_CACHE_HOME"] = scratch
        try:
            from lmdeploy import turbomind
        finally:
            if saved is None:
                os.environ.pop("XDG_CACHE_HOME", None)
            else:
                os.environ["XDG_CACHE_HOME"] = saved
    return turbomind


def turbomind_problem(model_path: str | None = None, trust_remote_code: bool = False) -> str | None:
    """Why TurboMind cannot serve here (None when it can). Imports lmdeploy.turbomind, and so torch."""
    try:
        turbomind = _import_turbomind()
    except Exception as err:  # noqa: BLE001 - any failure to import means: not available
        return f"lmdeploy.turbomind does not import ({type(err).__name__}: {err})"
    if not turbomind.is_available():
        reason = getattr(turbomind, "_import_error", None)
        detail = f": {reason}" if reason else ""
        return f"TurboMind's CUDA extension is not available on this machine{detail}"
    if model_path is not None:
        from lmdeploy.turbomind.supported_models import is_supported

        if not is_supported(str(model_path), trust_remote_code=trust_remote_code):
            return f"TurboMind does not support the architecture of {model_path}"
    return None
