"""Serving on vLLM: the export (main environment, no vLLM), the strategy checks, and a tiny random Llama served
by vLLM on CPU with and without sharing, against kvshare's own transformers path.

The vLLM tests need the serving environment .venv-vllm (scripts/setup_vllm.sh) and take minutes (each vLLM engine
starts in about a minute on 2 cores), so the suite skips them; scripts/test_vllm.sh runs them (CI does)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import NUM_LAYERS, VOCAB, make_tiny_model

from kvshare import Strategy
from kvshare.cli import main as cli_main
from kvshare.serving import export as export_mod
from kvshare.serving.export import export_vllm
from kvshare.serving.mapping import (
    CONFIG_KEY,
    attention_name,
    layer_index,
    read_entry,
    servable_mapping,
    sharing_targets,
)

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
skip_without_vllm = pytest.mark.skipif(
    not (VLLM_PYTHON.exists() and os.environ.get("KVSHARE_VLLM_TESTS") == "1"),
    reason="vLLM tests: run scripts/test_vllm.sh (needs .venv-vllm from scripts/setup_vllm.sh)",
)


def needs_vllm(test):
    """A vLLM test: slow (vLLM runs in a subprocess) and skipped unless scripts/test_vllm.sh runs it."""
    return pytest.mark.slow(skip_without_vllm(test))


STRATEGY = Strategy({3: 2, 5: 1}, NUM_LAYERS, {"model": "tiny-llama"})


def _tokenizer(out: Path):
    """A word-level tokenizer over the tiny model's vocabulary: enough for vLLM and transformers to load."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<pad>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(out)


def _checkpoint(path: Path, arch: str = "llama", **overrides) -> Path:
    make_tiny_model(arch, **overrides).save_pretrained(path)
    _tokenizer(path)
    return path


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("tiny") / "llama")


# -- the mapping vLLM gets -------------------------------------------------------------------------------------
def test_mapping_names_and_chains():
    assert attention_name(4) == "model.layers.4.self_attn.attn"
    assert layer_index("model.layers.17.self_attn.attn") == 17
    with pytest.raises(ValueError, match="no decoder layer index"):
        layer_index("lm_head")
    # a chain 5 -> 3 -> 1 reads layer 1's cache: every target owns one, as vLLM requires
    assert servable_mapping({"5": 3, "3": 1}, 6) == {3: 1, 5: 1}
    assert sharing_targets({5: 1, 3: 1}) == {3: "model.layers.1.self_attn.attn", 5: "model.layers.1.self_attn.attn"}


@pytest.mark.parametrize(
    "mapping, message",
    [
        ({2: 4}, "must come before"),
        ({3: 3}, "cannot share with itself"),
        ({9: 1}, "out of range"),
        ({"x": 1}, "layer indices"),
    ],
)
def test_mapping_refuses_what_vllm_cannot_serve(mapping, message):
    with pytest.raises(ValueError, match=message):
        servable_mapping(mapping, 6)


def test_mapping_refuses_cross_type_pairs():
    types = ["sliding_attention", "full_attention"] * 3
    assert servable_mapping({2: 0, 3: 1}, 6, types) == {2: 0, 3: 1}
    with pytest.raises(ValueError, match=r"layer 3 \(full_attention\) would read layer 2's cache") as e:
        servable_mapping({3: 2}, 6, types)
    assert "\n" not in str(e.value)


def test_read_entry_checks_the_config():
    config = {
        "num_hidden_layers": 6,
        CONFIG_KEY: {"mapping": {"4": 1}, "num_layers": 6, "base_architecture": "LlamaForCausalLM"},
    }
    assert read_entry(config, "KVShareLlamaForCausalLM") == ({4: 1}, 6)
    with pytest.raises(ValueError, match="is for LlamaForCausalLM, not KVShareQwen2ForCausalLM"):
        read_entry(config, "KVShareQwen2ForCausalLM")
    with pytest.raises(ValueError, match="export-vllm"):
        read_entry({"num_hidden_layers": 6}, "KVShareLlamaForCausalLM")
    with pytest.raises(ValueError, match="for 6 layers but the model has 8"):
        read_entry(dict(config, num_hidden_layers=8), "KVShareLlamaForCausalLM")


# -- the export ------------------------------------------------------------------------------------------------
def test_export_round_trips_the_strategy(tiny_checkpoint, tmp_path):
    out = tmp_path / "shared"
    summary = export_vllm(str(tiny_checkpoint), out, STRATEGY)
    assert summary["architecture"] == "KVShareLlamaForCausalLM" and summary["num_shared"] == 2
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["KVShareLlamaForCausalLM"]
    entry = config[CONFIG_KEY]
    assert Strategy(entry["mapping"], entry["num_layers"]).mapping == STRATEGY.mapping
    assert entry["metadata"]["model"] == "tiny-llama" and entry["base_architecture"] == "LlamaForCausalLM"
    assert read_entry(config, "KVShareLlamaForCausalLM") == (STRATEGY.mapping, NUM_LAYERS)
    # weights are links to the checkpoint, never copies; the tokenizer travels with them
    weights = out / "model.safetensors"
    assert weights.is_symlink() and weights.resolve() == (tiny_checkpoint / "model.safetensors").resolve()
    assert summary["weights"] == {"symlink": 1}
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    # the source is untouched, and transformers still reads the export (its model_type is unchanged)
    assert json.loads((tiny_checkpoint / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    from transformers import AutoConfig, AutoTokenizer

    assert AutoConfig.from_pretrained(out).num_hidden_layers == NUM_LAYERS
    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("w7") == 7

    # an export of an export keeps its base architecture and links the original weights
    again = export_vllm(str(out), tmp_path / "again", None)
    assert again["num_shared"] == 0 and again["architecture"] == "KVShareLlamaForCausalLM"
    assert (tmp_path / "again" / "model.safetensors").resolve() == (tiny_checkpoint / "model.safetensors").resolve()
    # exporting again into the same place replaces the earlier export, never a directory of something else
    export_vllm(str(tiny_checkpoint), out, None)
    assert json.loads((out / "config.json").read_text())[CONFIG_KEY]["mapping"] == {}
    assert not list(tmp_path.glob(".*.part"))
    with pytest.raises(ValueError, match="is the checkpoint being exported"):
        export_vllm(str(out), out, None)


def test_export_falls_back_to_hard_links_then_copies(tiny_checkpoint, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("not on this filesystem")

    monkeypatch.setattr(export_mod.os, "symlink", refuse)
    summary = export_vllm(str(tiny_checkpoint), tmp_path / "hard", STRATEGY)
    weights = tmp_path / "hard" / "model.safetensors"
    assert summary["weights"] == {"hardlink": 1} and not weights.is_symlink()
    assert weights.stat().st_ino == (tiny_checkpoint / "model.safetensors").stat().st_ino
    monkeypatch.setattr(export_mod.os, "link", refuse)
    summary = export_vllm(str(tiny_checkpoint), tmp_path / "copy", STRATEGY)
    assert summary["weights"] == {"copy": 1}
    copied = tmp_path / "copy" / "model.safetensors"
    assert not copied.is_symlink() and copied.read_bytes() == (tiny_checkpoint / "model.safetensors").read_bytes()


def test_export_refuses_bad_input(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="strategy is for a model with 4 layers"):
        export_vllm(str(tiny_checkpoint), tmp_path / "a", Strategy({3: 1}, 4))
    mistral = _checkpoint(tmp_path / "mistral", "mistral")
    with pytest.raises(ValueError, match="supports LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, not Mistral"):
        export_vllm(str(mistral), tmp_path / "b", STRATEGY)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is not a kvshare export"):
        export_vllm(str(tiny_checkpoint), tmp_path / "taken", STRATEGY)
    with pytest.raises(FileNotFoundError, match="neither an embedded model"):
        export_vllm(str(tmp_path / "missing"), tmp_path / "c", None)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_export_qwen2_with_layer_types(tmp_path):
    ckpt = _checkpoint(tmp_path / "qwen2", "qwen2")
    summary = export_vllm(str(ckpt), tmp_path / "out", Strategy({4: 2}, NUM_LAYERS))
    assert summary["architecture"] == "KVShareQwen2ForCausalLM"
    config = json.loads((ckpt / "config.json").read_text())
    config["layer_types"] = ["full_attention", "sliding_attention"] * 3
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="same attention type"):
        export_vllm(str(ckpt), tmp_path / "out2", Strategy({3: 2}, NUM_LAYERS))


def test_cli_export(tiny_checkpoint, tmp_path, capsys):
    path = STRATEGY.save(tmp_path / "s.json")
    assert (
        cli_main(
            [
                "export-vllm",
                "--model",
                str(tiny_checkpoint),
                "--strategy",
                str(path),
                "--force",
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    line = json.loads(capsys.readouterr().out.splitlines()[0])
    assert line["mapping"] == {"3": 2, "5": 1}
    # a strategy searched on another model needs --force; the error is one line
    assert (
        cli_main(
            ["export-vllm", "--model", str(tiny_checkpoint), "--strategy", str(path), "--out", str(tmp_path / "out")]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "searched on 'tiny-llama'" in err and len(err.splitlines()) == 1


# -- vLLM itself (the serving environment) ---------------------------------------------------------------------
def _transformers_greedy(checkpoint: Path, strategy, prompts, max_tokens):
    from transformers import AutoModelForCausalLM

    import kvshare

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    out = []
    with kvshare.sharing(model, strategy), torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )
            out.append(gen[0, len(p) :].tolist())
    return out


@needs_vllm
def test_vllm_serves_the_strategy(tmp_path):
    """vLLM on CPU: the shared layers hold no cache and compute no k/v; greedy tokens equal kvshare's."""
    # vLLM's CPU attention kernel takes head sizes from 32 up: 4 heads of 32 (2 KV heads)
    checkpoint = _checkpoint(tmp_path / "llama", hidden_size=128, intermediate_size=256)
    plain, shared = tmp_path / "plain", tmp_path / "shared"
    export_vllm(str(checkpoint), plain, None)
    export_vllm(str(checkpoint), shared, STRATEGY)
    prompts = [[1, *[(7 * i + 3 * j) % (VOCAB - 3) + 3 for j in range(5 + i)]] for i in range(6)]
    spec = {
        "models": [str(plain), str(shared)],
        "prompts": prompts,
        "max_tokens": 12,
        "engine": {"dtype": "float32", "max_model_len": 64, "enforce_eager": True, "seed": 0, "max_num_seqs": 8},
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [str(VLLM_PYTHON), "-m", "kvshare.serving.vllm_run", str(tmp_path / "spec.json"), str(tmp_path / "out.json")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-12000:]
    result = json.loads((tmp_path / "out.json").read_text())
    p, s = result[str(plain)], result[str(shared)]

    # layer construction: replaced layers read their source's cache and project queries only
    q_size, qkv_size = 4 * 32, (4 + 2 * 2) * 32
    for i, layer in enumerate(s["layers"]):
        if i in STRATEGY.mapping:
            assert layer["kv_sharing_target"] == attention_name(STRATEGY.mapping[i])
            assert layer["projection_outputs"] == q_size and layer["module"] == "SharedQueryAttention"
        else:
            assert layer["kv_sharing_target"] is None and layer["projection_outputs"] == qkv_size
    assert all(layer["kv_sharing_target"] is None for layer in p["layers"])

    # the same KV budget holds L/(L-C) times the tokens, up to one block of rounding
    ratio = NUM_LAYERS / (NUM_LAYERS - STRATEGY.num_shared)
    assert abs(s["num_blocks"] - p["num_blocks"] * ratio) <= 1, (p, s)

    # greedy generations: vLLM equals kvshare's transformers path, shared and plain
    assert p["generations"] == _transformers_greedy(checkpoint, None, prompts, 12)
    assert s["generations"] == _transformers_greedy(checkpoint, STRATEGY, prompts, 12)
    assert s["generations"] != p["generations"]  # sharing changed what the model says: the check has teeth


@needs_vllm
def test_vllm_refuses_a_cross_type_strategy_at_load(tmp_path):
    ckpt = _checkpoint(tmp_path / "qwen2", "qwen2", hidden_size=128, intermediate_size=256)
    out = tmp_path / "out"
    export_vllm(str(ckpt), out, Strategy({4: 2}, NUM_LAYERS))
    config = json.loads((out / "config.json").read_text())
    config[CONFIG_KEY]["mapping"] = {"4": 3}  # hand-edited: 3 is a sliding layer, 4 a full one
    config["layer_types"] = [
        "full_attention",
        "full_attention",
        "full_attention",
        "sliding_attention",
        "full_attention",
        "full_attention",
    ]
    (out / "config.json").write_text(json.dumps(config))
    code = (
        "from vllm import LLM\n"
        "if __name__ == '__main__':\n"
        f"    LLM({str(out)!r}, dtype='float32', max_model_len=64, enforce_eager=True)\n"
    )
    proc = subprocess.run(
        [str(VLLM_PYTHON), "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1"),
    )
    assert proc.returncode != 0
    line = "kvshare: vLLM cannot serve this strategy: layer 4 (full_attention) would read layer 3's cache"
    assert line in proc.stderr, proc.stderr[-3000:]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


@needs_vllm
def test_vllm_command_starts():
    """`.venv-vllm/bin/vllm` (vllm-cpu's command, replaced by setup_vllm.sh with kvshare's launcher) reports the CPU
    build's version instead of stopping on the missing "vllm" distribution."""
    proc = subprocess.run(
        [str(VLLM_PYTHON.parent / "vllm"), "--version"], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("0.32.0")


def test_notebook_10_names_another_models_results(tiny_checkpoint, tmp_path):
    """Notebook 10 on a model other than the one measured: one line whose results they are, and whether the plugin
    can serve this model at all (a Mistral layout cannot; a Llama one can, with the proof script's MODEL changed)."""
    from kvshare.serving import report

    r = {"model": "smollm2-135m"}
    assert report.other_model_note(r, "smollm2-135m") is None
    mistral = _checkpoint(tmp_path / "mistral", "mistral")
    note = report.other_model_note(r, str(mistral))
    assert "smollm2-135m's, not" in note and "MistralForCausalLM" in note and "no serving result" in note
    note = report.other_model_note(r, str(tiny_checkpoint))
    assert "set it to" in note and "no serving result" not in note
