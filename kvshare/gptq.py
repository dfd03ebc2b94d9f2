"""GPTQ weights: quantize the embedded default once with GPTQModel, load any GPTQ checkpoint through
transformers' own integration.

- `kvshare.load_model("smollm2-135m-gptq")` (CLI: `--model smollm2-135m-gptq`): the first call
  quantizes the embedded SmolLM2-135M-Instruct with GPTQ (4 bits, group size 128, calibrated on
  kvshare's calibration texts) through GPTQModel, on the GPU when there is one and on the CPU
  otherwise, and saves the checkpoint under `<kvshare home>/models/smollm2-135m-gptq`; every later
  call only loads it (a few seconds).
- Loading, for that checkpoint and for any GPTQ checkpoint from the hub (e.g.
  `TheBloke/Llama-2-7B-Chat-GPTQ`), is transformers' `from_pretrained` with the `quantization_config`
  stored in the checkpoint (transformers -> optimum -> GPTQModel's kernels). On the CPU the kernel is
  pinned to GPTQModel's pure-torch `gptq_torch`: its automatic choice on CPU, the ATen int4pack
  kernel, fails when a layer's input width is not a multiple of the group size (SmolLM2's 576 is not
  a multiple of 128).

Needs `gptqmodel` and `optimum` (`pip install -e ".[gptq]"`; see scripts/setup.sh for the pins that
keep torch and numpy as they are). `gptq_status()` says whether the backend is usable here and why not.

Note the embedded model's own weights are already 4-bit (GGUF Q4_1, group size 32, dequantized by
kvshare to float32): the "full-precision" rows are Q4_1 weights held in float32, and the GPTQ rows
re-quantize those to 4 bits with group size 128.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from .pypi_files import kvshare_home

# name -> how it is made from an embedded model
GPTQ_MODELS = {
    "smollm2-135m-gptq": {
        "base": "smollm2-135m",
        "bits": 4,
        "group_size": 128,
        "calibration_samples": 128,  # texts of the news calibration pool (the first 128; disjoint from the eval text)
        "calibration_source": "offline",
        "description": "SmolLM2-135M-Instruct re-quantized with GPTQ (4-bit, group size 128) by GPTQModel",
    },
}
CPU_KERNEL = "gptq_torch"
PROVENANCE_FILE = "kvshare_gptq.json"


def gptq_status() -> tuple[bool, str]:
    """(usable, reason): whether GPTQ checkpoints can be made and loaded in this environment."""
    missing = [m for m in ("gptqmodel", "optimum") if importlib.util.find_spec(m) is None]
    if missing:
        return False, (
            f"{' and '.join(missing)} not installed (pip install -e '.[gptq]', or see scripts/setup.sh "
            "for the pins that keep torch and numpy)"
        )
    return True, "gptqmodel and optimum are installed"


def _require():
    ok, reason = gptq_status()
    if not ok:
        raise RuntimeError(f"GPTQ weights need GPTQModel: {reason}")
    # GPTQModel sizes its CPU thread pools from the core count and on a 2-core machine asks its model
    # loader for more workers than the pool it derives it from ("Virtual pool 'model_loader:cpu'
    # requests 2 workers but parent 'cpu' only has 1"); its documented override avoids that.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, ((os.cpu_count() or 1) + 1) // 2)))


def quantized_dir(name: str) -> Path:
    return kvshare_home() / "models" / name


def is_ready(name: str) -> bool:
    out = quantized_dir(name)
    return (out / "config.json").is_file() and any(out.glob("*.safetensors")) and (out / PROVENANCE_FILE).is_file()


def ensure_quantized(name: str, base_dir=None, device=None) -> Path:
    """The GPTQ checkpoint of `name` (a key of GPTQ_MODELS), quantized now (from the unquantized checkpoint in
    `base_dir`: kvshare.models passes it) if it was never made."""
    if name not in GPTQ_MODELS:
        raise ValueError(f"unknown GPTQ model {name!r}; known: {', '.join(GPTQ_MODELS)}")
    out = quantized_dir(name)
    if is_ready(name):
        return out
    _require()
    from gptqmodel import GPTQModel, QuantizeConfig

    from .data import calibration_texts

    spec = GPTQ_MODELS[name]
    if base_dir is None:
        raise ValueError(f"quantizing {name} needs the checkpoint of {spec['base']}: load it with kvshare.load_model")
    base = Path(base_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    texts = calibration_texts(spec["calibration_samples"], source=spec["calibration_source"], set_index=0)
    print(
        f"kvshare: quantizing {spec['base']} with GPTQ ({spec['bits']}-bit, group size {spec['group_size']}, "
        f"{len(texts)} calibration texts) on {device}, once; this takes minutes on a CPU ...",
        file=sys.stderr,
        flush=True,
    )
    t0 = time.perf_counter()
    tmp = out.with_name(out.name + ".part")
    work = out.with_name(out.name + ".work")
    for d in (tmp, work):
        shutil.rmtree(d, ignore_errors=True)
    work.mkdir(parents=True)
    cwd = os.getcwd()
    os.chdir(work)  # GPTQModel writes its per-layer quantization log to ./logs: keep it out of the caller's folder
    try:
        config = QuantizeConfig(bits=spec["bits"], group_size=spec["group_size"])
        model = GPTQModel.load(str(base), config, device=device, dtype=torch.float32)
        model.quantize(texts, batch_size=1)
        seconds = time.perf_counter() - t0
        model.save(str(tmp))
    finally:
        os.chdir(cwd)
    if (work / "logs").is_dir():
        shutil.move(str(work / "logs"), str(tmp / "gptq_logs"))
    shutil.rmtree(work, ignore_errors=True)
    from importlib.metadata import version

    provenance = {
        "name": name,
        "base": spec["base"],
        "bits": spec["bits"],
        "group_size": spec["group_size"],
        "calibration": {"source": spec["calibration_source"], "set_index": 0, "samples": len(texts)},
        "device": str(device),
        "quantize_seconds": round(seconds, 1),
        "gptqmodel": version("gptqmodel"),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "note": "the base weights are GGUF Q4_1 (dequantized to float32) before GPTQ re-quantizes them",
    }
    (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    del model
    return out


def gptq_config_of(path) -> dict | None:
    """The GPTQ `quantization_config` of a local checkpoint folder (None if it is not a GPTQ checkpoint)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    qc = json.loads(config.read_text()).get("quantization_config")
    if isinstance(qc, dict) and str(qc.get("quant_method", "")).lower() == "gptq":
        return qc
    return None


def is_gptq_model(model) -> bool:
    qc = getattr(model.config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return str(getattr(method, "value", method) or "").lower() == "gptq"


def load_kwargs(path: str, device: torch.device) -> dict:
    """Extra `from_pretrained` arguments for a local GPTQ checkpoint: on the CPU, GPTQModel's pure-torch kernel.

    A hub id is left to transformers, which reads the checkpoint's `quantization_config` itself."""
    qc = gptq_config_of(path) if Path(path).is_dir() else None
    if qc is None:
        return {}  # not a local GPTQ checkpoint: a hub checkpoint's own quantization_config applies as is
    _require()
    if device.type != "cpu":
        return {"device_map": {"": str(device)}}
    from transformers import GPTQConfig

    return {"quantization_config": GPTQConfig(bits=int(qc.get("bits", 4)), backend=CPU_KERNEL), "device_map": "cpu"}


def finish_loading(model) -> None:
    """After loading: run GPTQModel's torch kernel eagerly on the CPU.

    The kernel wraps each layer's dequantization in torch.compile, whose guards make every layer
    recompile until dynamo gives up (hundreds of warnings); the eager function is the same code."""
    if not is_gptq_model(model):
        return
    for module in model.modules():
        if "dequantize_weight" in module.__dict__ and hasattr(type(module), "dequantize_weight"):
            if next(module.buffers()).device.type == "cpu":
                del module.__dict__["dequantize_weight"]


def weight_bytes(model) -> int:
    """Bytes of the model's parameters and buffers as stored (packed GPTQ codes count as stored)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


__all__ = [
    "GPTQ_MODELS",
    "ensure_quantized",
    "finish_loading",
    "gptq_config_of",
    "gptq_status",
    "is_gptq_model",
    "load_kwargs",
    "quantized_dir",
    "weight_bytes",
]
