"""vLLM general plugin: registers the kvshare architectures, so `vllm serve DIR` and `LLM(DIR)` load an export.

The entry point (`vllm.general_plugins` in pyproject.toml) names `register`; vLLM calls it in every process it
starts, possibly more than once. Registration is lazy (a "module:Class" string): the model classes, in
kvshare.serving.vllm_models, are imported only in the process that builds the model.
"""

from __future__ import annotations

from .mapping import ARCHITECTURES, read_entry

MODELS_MODULE = "kvshare.serving.vllm_models"


def check_config(vllm_config) -> None:
    """Validate an export's strategy when vLLM builds its configuration, before any engine process starts,
    so a strategy vLLM cannot serve fails at once with one line rather than deep inside a worker."""
    model_config = vllm_config.model_config
    architecture = model_config.architecture
    try:
        read_entry(model_config.hf_config.get_text_config(), architecture)
    except ValueError as e:
        raise ValueError(f"kvshare: {e}") from None


def register() -> None:
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP, VerifyAndUpdateConfig

    class KVShareConfigCheck(VerifyAndUpdateConfig):
        @staticmethod
        def verify_and_update_config(vllm_config) -> None:
            check_config(vllm_config)

    for architecture in ARCHITECTURES.values():
        if architecture not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(architecture, f"{MODELS_MODULE}:{architecture}")
        # vLLM's per-architecture config hooks: called once the config is read, in the process that reads it
        MODELS_CONFIG_MAP.setdefault(architecture, KVShareConfigCheck)
