"""The search-cost sweep (notebook 08): layer-forwards follow kvshare's count, below the official cost model."""

from kvshare.accounting import num_shared_for
from kvshare.experiments.search_cost import CostSettings, cost_rows, plan, scaling_exponents


def test_plan_is_distinct_and_covers_every_sweep():
    cfg = CostSettings(layers=[8, 16, 24], texts=[2, 4], rates=[0.25, 0.5], base_texts=2, base_rate=0.25)
    points = plan(cfg)
    assert len(points) == len(set(points))
    assert {p[0] for p in points} == {8, 16, 24}
    assert {(16, 4, 0.25), (16, 2, 0.5)} <= set(points)


def test_cost_rows_count_layer_forwards_exactly(byte_tokenizer):
    cfg = CostSettings(layers=[4, 8], texts=[2, 3], rates=[0.25, 0.5], base_texts=2, tokens=8, orders=["dissimilar"])
    rows = cost_rows(byte_tokenizer, cfg, progress=False)
    assert len(rows) == len(plan(cfg))
    for r, (layers, texts, rate) in zip(rows, plan(cfg)):
        L, n, c = r["layers"], r["texts"], r["num_shared"]
        assert (L, n, c) == (layers, texts, num_shared_for(rate, layers))
        assert r["candidates_visited"] == c  # threshold -1 accepts every candidate
        # the reference once, then layers r..L-1 per candidate: at least L*n + c*n, at most L*n*(1+c)
        assert L * n + c * n <= r["layer_forwards"] <= L * n * (1 + c)
        assert r["official_layer_forwards"] == 2 * L * n * c
        assert r["layer_forwards"] < r["official_layer_forwards"] or c == 0


def test_scaling_exponents_read_the_depth_sweep():
    cfg = CostSettings(layers=[10, 20, 40], texts=[5], rates=[0.25], base_texts=5, orders=["dissimilar"])
    rows = [
        {
            "layers": L,
            "texts": 5,
            "num_shared": num_shared_for(0.25, L),
            "order": "dissimilar",
            "seconds": 0.01 * L**2,
            "layer_forwards": L**2,
            "official_layer_forwards": 2 * L**2,
        }
        for L in cfg.layers
    ]
    slopes = scaling_exponents(rows, cfg)["dissimilar"]
    assert abs(slopes["layer_forwards"] - 2) < 1e-6 and abs(slopes["seconds"] - 2) < 1e-6


def test_depth_sentences_state_the_slope_and_the_saving():
    from kvshare.experiments.search_cost import depth_sentences

    cfg = CostSettings(layers=[10, 20, 40], texts=[5], rates=[0.25], base_texts=5, orders=["dissimilar"])
    rows = [
        {
            "layers": L,
            "texts": 5,
            "num_shared": num_shared_for(0.25, L),
            "order": "dissimilar",
            "seconds": 0.01 * L**2,
            "layer_forwards": L**2,
            "official_layer_forwards": 4 * L**2,
        }
        for L in cfg.layers
    ]
    (line,) = depth_sentences(rows, cfg)
    assert "L^2.00" in line and "4.0x fewer" in line and "1,600 layer-forwards" in line
