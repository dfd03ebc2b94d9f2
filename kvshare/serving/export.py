"""Export a model, with or without a sharing strategy, as a directory vLLM loads with kvshare's plugin.

The directory holds the checkpoint's weights as links (symlink, else hard link, else a copy), its tokenizer and
other small files as copies, and a config.json whose `architectures` names a kvshare architecture
(`KVShareLlamaForCausalLM`, ...) and whose `kvshare` entry carries the strategy. With the plugin installed
(`pip install kvshare[vllm]`, or scripts/setup_vllm.sh here) `vllm serve DIR` and `LLM(DIR)` serve it as is.

This module must not import vLLM: it runs in the main environment, whose transformers vLLM does not accept.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from .mapping import ARCHITECTURES, CONFIG_KEY, servable_mapping, strategy_entry

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")  # linked, never copied
WEIGHT_INDEXES = (".safetensors.index.json", ".bin.index.json")  # small, but they belong with the weights
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")  # any one of these will do
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]  # what a hub export fetches


def resolve_checkpoint(model: str) -> Path:
    """The local checkpoint directory of `model`: an embedded name, a local directory or a hub id."""
    from ..models import EMBEDDED, checkpoint_dir

    if model in EMBEDDED:
        return checkpoint_dir(model)  # converted to safetensors once, under ~/.cache/kvshare/models
    if model.endswith("-gptq"):
        raise ValueError(
            f"'{model}' holds GPTQ weights quantized by kvshare: export the unquantized model "
            f"('{model.removesuffix('-gptq')}') and let vLLM quantize it (--quantization)"
        )
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: pass a Hugging Face checkpoint directory")
        return path
    if path.exists() or model.count("/") != 1:
        raise FileNotFoundError(
            f"model '{model}' is neither an embedded model ({', '.join(EMBEDDED)}), "
            "a checkpoint directory nor a hub id (owner/name)"
        )
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, allow_patterns=HUB_FILES))
    except Exception as e:  # network, auth, missing repository: all end the same way for the user
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise OSError(f"could not fetch '{model}' from the hub ({first}); a hub id needs network access once") from None


def _read_strategy(strategy) -> tuple[dict[int, int], dict[str, Any], int | None]:
    """(mapping, metadata, num_layers) from a Strategy, a strategy dict, a JSON path or None."""
    from ..strategy import Strategy

    if strategy is None:
        return {}, {}, None
    if isinstance(strategy, (str, os.PathLike)):
        strategy = Strategy.load(strategy)
    elif isinstance(strategy, dict):
        strategy = Strategy.from_dict(strategy)
    return dict(strategy.mapping), dict(strategy.metadata), strategy.num_layers


def _link(src: Path, dst: Path) -> str:
    """Link `dst` to `src`: a symlink where the filesystem allows it, else a hard link, else a copy."""
    try:
        os.symlink(src.resolve(), dst)
        return "symlink"
    except OSError:
        pass
    try:
        os.link(src.resolve(), dst)
        return "hardlink"
    except OSError:
        shutil.copy2(src, dst)
        return "copy"


def _is_weight(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES) or name.endswith(WEIGHT_INDEXES)


def _is_export(path: Path) -> bool:
    try:
        return CONFIG_KEY in json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False


def export_vllm(model_name_or_path: str, out_dir, strategy=None) -> dict[str, Any]:
    """Write a vLLM-loadable directory for `model_name_or_path`, sharing KV caches as `strategy` says.

    `strategy` is a kvshare Strategy, its dict, a strategy JSON path, or None (the plain model, an empty
    mapping: vLLM then serves it exactly as the base architecture). An existing `out_dir` is replaced only
    when it is an earlier export. Returns a summary: the directory, its architecture and how weights were linked.
    """
    src = resolve_checkpoint(str(model_name_or_path))
    out = Path(out_dir).expanduser()
    if out.resolve() == src.resolve():
        raise ValueError(f"{out} is the checkpoint being exported: choose another output directory")
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or _is_export(out))):
        raise FileExistsError(f"{out} exists and is not a kvshare export: choose another output directory")
    config = json.loads((src / "config.json").read_text())
    archs = config.get("architectures") or []
    base = archs[0] if archs else None
    if base not in ARCHITECTURES and isinstance(config.get(CONFIG_KEY), dict):
        base = config[CONFIG_KEY].get("base_architecture")  # re-exporting an export with another strategy
    if base not in ARCHITECTURES:
        raise ValueError(
            f"vLLM serving with kvshare supports {', '.join(ARCHITECTURES)}, not "
            f"{base or 'a config without architectures'}: export a model of one of these layouts"
        )
    num_layers = config.get("num_hidden_layers")
    mapping, metadata, strategy_layers = _read_strategy(strategy)
    if strategy_layers is not None and strategy_layers != num_layers:
        made_for = metadata.get("model", "another model")
        raise ValueError(
            f"this strategy is for a model with {strategy_layers} layers ({made_for}), but "
            f"{model_name_or_path} has {num_layers}: search a strategy for this model"
        )
    mapping = servable_mapping(mapping, num_layers, config.get("layer_types"))
    files = sorted(p for p in src.iterdir() if p.is_file() and not p.name.startswith("."))
    if not any(p.name.endswith(WEIGHT_SUFFIXES) for p in files):
        raise FileNotFoundError(f"{src} holds no weights (*.safetensors or *.bin): pass a full checkpoint")
    if not any(p.name in TOKENIZER_FILES for p in files):
        raise FileNotFoundError(
            f"{src} holds no tokenizer ({', '.join(TOKENIZER_FILES)}): vLLM needs one beside the weights"
        )

    config["architectures"] = [ARCHITECTURES[base]]
    metadata = dict(metadata, exported_from=str(model_name_or_path))
    config[CONFIG_KEY] = strategy_entry(mapping, num_layers, base, metadata)
    # build beside the target and swap it in whole, so an interrupted export never leaves half a directory
    tmp = out.with_name(f".{out.name}.part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    links: dict[str, int] = {}
    try:
        for p in files:
            if p.name == "config.json":
                continue
            if _is_weight(p.name):
                how = _link(p, tmp / p.name)
                links[how] = links.get(how, 0) + 1
            else:
                shutil.copy2(p, tmp / p.name)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.replace(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "out": str(out),
        "source": str(src),
        "architecture": ARCHITECTURES[base],
        "num_layers": num_layers,
        "num_shared": len(mapping),
        "mapping": {str(r): s for r, s in mapping.items()},
        "weights": links,
    }


# -- command line: wired into kvshare.cli ---------------------------------------------------------------------
def add_export_parser(sub) -> None:
    """The `export-vllm` subcommand."""
    p = sub.add_parser("export-vllm", help="write a model directory that vLLM serves with a sharing strategy")
    p.add_argument("--model", default="smollm2-135m", help="embedded name, checkpoint directory or hub id")
    p.add_argument("--strategy", default=None, help="strategy JSON written by `kvshare search` (default: no sharing)")
    p.add_argument("--force", action="store_true", help="export with a strategy searched on a differently named model")
    p.add_argument("--out", required=True, help="output directory (an earlier export there is replaced)")


def cmd_export_vllm(args) -> None:
    from ..strategy import Strategy

    strategy = Strategy.load(args.strategy) if args.strategy else None
    made_for = strategy.metadata.get("model") if strategy else None
    if made_for and made_for != args.model and not args.force:
        raise ValueError(
            f"{args.strategy} was searched on '{made_for}', not '{args.model}': search one for this "
            "model, or pass --force to export it anyway"
        )
    summary = export_vllm(args.model, args.out, strategy)
    print(json.dumps(summary))
    print(
        f"serve it with: vllm serve {summary['out']}   (or LLM('{summary['out']}') in Python; "
        "needs kvshare installed beside vLLM: pip install 'kvshare[vllm]')"
    )
