"""`bench --profile`: the per-operation breakdown runs on a tiny model, counts exactly what sharing removes, and its
cost model agrees with a hand computation (timings are never asserted)."""

from __future__ import annotations

import json

import pytest
from transformers import LlamaConfig

from kvshare import bench as B
from kvshare import profile as P
from kvshare.cli import main

# tests/conftest.py's tiny_dir: L = 8, hidden 32, 4 heads, 2 KV heads (head_dim 8), MLP 64, vocabulary 100
TINY = dict(
    vocab_size=100,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def test_cost_model_matches_a_hand_computation():
    """C = 2 of 8 layers, batch 1, prompt 4, 2 decoded tokens, dynamic cache, fp32, counted by hand."""
    cfg = LlamaConfig(**TINY)
    plain = P.cost_model(cfg, 0, 1, 4, 2, "dynamic", 4)
    shared = P.cost_model(cfg, 2, 1, 4, 2, "dynamic", 4)
    # prefill FLOPs, 4 positions: q+o 4*8*2*(2*32*32) = 131072; k+v 4*L*2*(2*32*16) = 65536 (L=8) / 49152 (6 kept);
    # attention: causal 1+2+3+4 = 10 positions * 8 layers * 4*4 heads*8 = 10240; MLP 4*8*2*(3*32*64) = 393216;
    # LM head on the last position 2*32*100 = 6400
    assert plain["prefill"]["kv_proj"]["flops"] == 65536 and shared["prefill"]["kv_proj"]["flops"] == 49152
    assert plain["prefill"]["attention"]["flops"] == shared["prefill"]["attention"]["flops"] == 10240
    assert plain["prefill"]["total"]["flops"] == 131072 + 65536 + 10240 + 393216 + 6400 == 606464
    assert shared["prefill"]["total"]["flops"] == 606464 - 16384
    # decode bytes, 2 steps with 4 then 5 tokens cached; K+V of a token in a layer 2*2*8*4 = 128 bytes:
    # weights q+o 2*8*2048*4 = 131072, k+v 2*8*1024*4 = 65536 / 49152, MLP 2*8*6144*4 = 393216, head 2*3200*4 = 25600;
    # attention reads (4+1)+(5+1) = 11 tokens in every layer: 11*8*128 = 11264;
    # torch.cat reads the old cache and writes old + new: (2*4+1)+(2*5+1) = 20 tokens per kept layer: 20*8*128 = 20480
    assert plain["decode"]["cache_write"]["bytes"] == 20480 and shared["decode"]["cache_write"]["bytes"] == 15360
    assert plain["decode"]["total"]["bytes"] == 131072 + 65536 + 11264 + 20480 + 393216 + 25600 == 647168
    assert shared["decode"]["total"]["bytes"] == 131072 + 49152 + 11264 + 15360 + 393216 + 25600 == 625664
    ratios = P.predicted_ratios(plain, shared)
    assert ratios["prefill"]["total"]["flops"] == pytest.approx(590080 / 606464)
    assert ratios["decode"]["total"]["bytes"] == pytest.approx(625664 / 647168)
    assert ratios["decode"]["kv_proj"]["bytes"] == ratios["decode"]["cache_write"]["bytes"] == pytest.approx(6 / 8)
    assert ratios["decode"]["attention"] == {"flops": 1.0, "bytes": 1.0}  # every layer still attends
    # a static cache writes one token per step in place and attention reads the preallocated 6 positions
    static = P.cost_model(cfg, 0, 1, 4, 2, "static", 4)
    assert static["decode"]["cache_write"]["bytes"] == 2 * 8 * 128
    assert static["decode"]["attention"]["bytes"] == 2 * 6 * 8 * 128


def test_profile_counts_what_the_replaced_layers_skip(tiny_dir):
    model = B.build_model(tiny_dir, random_weights=True, device="cpu")
    res = P.profile_pair(model, num_shared=2, batch=2, prompt_len=6, new_tokens=2, rounds=1)
    L, C = 8, 2
    forwards = {"prefill": 1, "decode": 2}
    for ph, n in forwards.items():
        plain, shared = res["modes"]["plain"][ph], res["modes"]["shared"][ph]
        # the Python-level view: k_proj and v_proj run in kept layers only, and so do cache writes
        assert plain["modules"]["k/v projections"]["calls"] == 2 * L * n
        assert shared["modules"]["k/v projections"]["calls"] == 2 * (L - C) * n
        assert plain["modules"]["q/o projections"]["calls"] == shared["modules"]["q/o projections"]["calls"]
        assert plain["modules"]["cache writes/copies (slot update)"]["calls"] == L * n
        assert shared["modules"]["cache writes/copies (slot update)"]["calls"] == (L - C) * n
        assert plain["modules"]["mlp"]["calls"] == shared["modules"]["mlp"]["calls"] == 3 * L * n
        # torch.profiler: exactly 2 C fewer linear layers per forward, and as many attention kernels
        assert plain["op_calls"]["aten::linear"] - shared["op_calls"]["aten::linear"] == 2 * C * n
        sdpa = "aten::scaled_dot_product_attention"
        assert plain["op_calls"][sdpa] == shared["op_calls"][sdpa] == L * n
    rows = {(r["phase"], r["part"]): r for r in res["comparison"]}
    assert rows[("decode", "k/v projections")]["predicted_bytes_ratio"] == pytest.approx(6 / 8)
    assert rows[("prefill", "k/v projections")]["predicted_flops_ratio"] == pytest.approx(6 / 8)
    assert rows[("decode", "wall (clean runs)")]["measured_ratio"] > 0
    assert set(res) >= {"settings", "cost_model", "predicted", "comparison", "under_load", "other_busy_cores"}
    text = P.format_profile([res])
    assert "k/v projections" in text and "pred bytes" in text and "16/12" in text


def test_cli_bench_profile_writes_json_and_a_table(tiny_dir, tmp_path, capsys):
    out = tmp_path / "profile.json"
    args = ["bench", "--model", tiny_dir, "--random-weights", "--rates", "0,0.25", "--batch", "1"]
    args += ["--prompt-len", "5", "--new-tokens", "2", "--rounds", "1", "--cache", "static", "--profile"]
    assert main([*args, "--out", str(out)]) == 0
    data = json.loads(out.read_text())["profile"]
    assert len(data) == 1 and data[0]["settings"]["num_shared"] == 2 and data[0]["settings"]["cache"] == "static"
    assert "sharing hooks" in capsys.readouterr().out
    assert main([*args, "--compile", "--out", str(out)]) == 2
    assert "--profile" in capsys.readouterr().err
