"""Notebook 11's figures (damage-map heatmaps, distance versus damage, perplexity versus C with `best` highlighted)
and its conclusion, written from the numbers of `kvshare.experiments.best_search`. Each figure function returns a
Figure; the conclusion is Markdown built from the results, never typed."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.ticker import ScalarFormatter

from ...metrics import clearly_lower
from ..best_search import lower_everywhere
from .common import COLORS, MARKERS

BEST_COLOR = "#2ca02c"
LABELS = {"best": "best-first (KL)", "dissimilar": "dissimilar (KVSharer)", "similar": "similar", "random": "random"}


def ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 4th, ..., 11th, 12th, 13th, ..., 21st, 22nd, ..."""
    n = int(n)
    suffix = "th" if n % 100 in (11, 12, 13) else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _pair_matrix(dm, column: str) -> np.ndarray:
    return dm.matrix(column)


def damage_heatmaps(dm, title: str = "", picks: dict | None = None):
    """Two lower-triangle heatmaps over (replaced layer r, source s): 1 - hidden cosine and KL, log colour scales.

    `picks` maps a label to a list of (r, s) pairs to outline (e.g. the dissimilar order's first picks).
    """
    panels = [
        ("1 − hidden cosine (the paper's score)", 1 - _pair_matrix(dm, "hidden_cosine")),
        ("KL(full ‖ shared), nats per token", _pair_matrix(dm, "kl")),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 5.6), constrained_layout=True)
    for ax, (label, m) in zip(axes, panels):
        finite = m[np.isfinite(m)]
        positive = finite[finite > 0]
        lo = max(positive.min(), positive.max() * 1e-6) if positive.size else 1e-6
        hi = positive.max() if positive.size else 1.0
        shown = np.ma.masked_invalid(np.where(np.isnan(m), np.nan, np.maximum(m, lo)))  # unscored cells stay grey
        cmap = plt.get_cmap("magma_r").copy()
        cmap.set_bad("#f2f2f2")
        im = ax.imshow(shown, cmap=cmap, norm=LogNorm(vmin=lo, vmax=hi), origin="lower", aspect="equal")
        ax.set_xlabel("source layer s (whose K/V is read)")
        ax.set_ylabel("replaced layer r")
        ax.set_title(label, fontsize=10)
        fig.colorbar(im, ax=ax, shrink=0.85)
        for (name, pairs), marker, color in zip((picks or {}).items(), ("s", "o"), (COLORS["dissimilar"], BEST_COLOR)):
            ax.scatter(
                [s for _, s in pairs],
                [r for r, _ in pairs],
                s=60,
                facecolors="none",
                edgecolors=color,
                lw=1.8,
                marker=marker,
                label=name,
            )
        if picks:
            ax.legend(fontsize=8, loc="upper left")
    if title:
        fig.suptitle(title)
    return fig


def distance_scatter(dm, correlations: list[dict], title: str = "", picks: dict | None = None):
    """Calibration distance (x) against single-pair KL damage (y, log) for every pair, one panel per metric,
    with Spearman's rho in each panel's title (the paper assumes: the more distant, the less harmful)."""
    n = len(correlations)
    fig, axes = plt.subplots(1, n, figsize=(5.6 * n, 4.4), sharey=True, constrained_layout=True)
    axes = np.atleast_1d(axes)
    kl = np.array([max(r["kl"], 1e-8) for r in dm])
    for ax, corr in zip(axes, correlations):
        metric = corr["metric"]
        d = np.array([r[f"distance_{metric}"] for r in dm])
        ax.scatter(d, kl, s=10, alpha=0.55, color="#7f7f7f", label=f"all {len(dm)} pairs")
        for (name, pairs), color in zip((picks or {}).items(), (COLORS["dissimilar"], BEST_COLOR, COLORS["similar"])):
            rows = {(r["replaced"], r["source"]): r for r in dm}
            sel = [rows[p] for p in pairs if p in rows]
            ax.scatter(
                [r[f"distance_{metric}"] for r in sel],
                [max(r["kl"], 1e-8) for r in sel],
                s=40,
                facecolors="none",
                edgecolors=color,
                lw=1.5,
                label=name,
            )
        ax.set_yscale("log")
        ax.set_xlabel(f"{metric} distance of the pair's mean K/V (calibration)")
        ax.set_title(
            f"{metric}: Spearman ρ = {corr['spearman_vs_kl']:+.2f} with KL, "
            f"{corr['spearman_vs_hidden_damage']:+.2f} with 1 − cosine",
            fontsize=9,
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel("single-pair damage: KL(full ‖ shared), nats per token")
    if title:
        fig.suptitle(title)
    return fig


def ppl_curves(rows: list[dict], full_ppl: float, target_ratio: float = 1.5, title: str = ""):
    """Held-out perplexity against C, one panel per calibration set: the fixed orders (random: mean over seeds
    with a min-max band and the seeds as dots), `best` drawn thick; the full model and target_ratio x it dashed."""
    sets = sorted({r["set"] for r in rows})
    fig, axes = plt.subplots(1, len(sets), figsize=(5.2 * len(sets), 4.6), sharey=True, constrained_layout=True)
    axes = np.atleast_1d(axes)
    for ax, i in zip(axes, sets):
        mine = [r for r in rows if r["set"] == i]
        for order in ("dissimilar", "similar", "random", "best"):
            sel = [r for r in mine if r["order"] == order]
            if not sel:
                continue
            cs = sorted({r["C"] for r in sel})
            if order == "random":
                by_c = {c: [r["ppl"] for r in sel if r["C"] == c] for c in cs}
                mean = [math.exp(np.mean(np.log(by_c[c]))) for c in cs]
                ax.fill_between(
                    cs, [min(by_c[c]) for c in cs], [max(by_c[c]) for c in cs], color=COLORS[order], alpha=0.15, lw=0
                )
                for c in cs:
                    ax.scatter([c] * len(by_c[c]), by_c[c], s=9, color=COLORS[order], alpha=0.6)
                seeds = len({r["seed"] for r in sel})
                ax.plot(
                    cs,
                    mean,
                    marker=MARKERS[order],
                    color=COLORS[order],
                    lw=1.2,
                    label=f"random ({seeds} seeds: geometric mean, min-max band)",
                )
                continue
            sel = sorted(sel, key=lambda r: r["C"])
            ppl = [r["ppl"] for r in sel]
            err = [r["ppl_se"] for r in sel]
            if order == "best":
                ax.errorbar(
                    cs,
                    ppl,
                    yerr=err,
                    color=BEST_COLOR,
                    marker="*",
                    ms=11,
                    lw=3,
                    capsize=3,
                    zorder=5,
                    label=LABELS[order],
                )
            else:
                ax.errorbar(
                    cs,
                    ppl,
                    yerr=err,
                    color=COLORS[order],
                    marker=MARKERS[order],
                    lw=1.2,
                    capsize=2,
                    label=LABELS[order],
                )
        ax.axhline(full_ppl, color="k", lw=1, ls="--", label=f"full model ({full_ppl:.2f})")
        ax.axhline(full_ppl * target_ratio, color="k", lw=0.8, ls=":", label=f"{target_ratio}x the full model")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_xticks(sorted({r["C"] for r in mine}))
        ax.set_xlabel("C: layers reading an earlier layer's K/V")
        ax.set_title(f"calibration set {i}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("held-out perplexity (log scale; error bars: ±1 SE over windows)")
    axes[-1].legend(fontsize=7, loc="upper left")
    if title:
        fig.suptitle(title)
    return fig


# ------------------------------------------------------------------------------------------------
# the conclusion
# ------------------------------------------------------------------------------------------------
def suite_lines(suite: dict) -> list[str]:
    """The suite claim: `best`'s average above every fixed order's at C = suite_c, paired per example."""
    C, L = suite["C"], suite["num_layers"]
    rows = {r["label"]: r for r in suite["rows"]}
    verdict = "HOLDS" if suite["clear"] else "HOLDS, not clearly" if suite["higher_than_all"] else "DOES NOT HOLD"
    best = rows.get("best")
    out = [
        f"**Claim 3 — on the offline benchmark suite at C = {C} of {L} ({C / L:.1%} of the layers; calibration "
        f"set {suite['set']}), `best`'s average above every fixed order's (paired 95% interval above 0): {verdict}**"
        + (f" (`best` {best['average']:.3f}, {best['kept_pct']:.1f}% of the full model's " if best else " (")
        + f"{rows['full']['average']:.3f}; tasks' default sizes"
        + (f", limit {suite['limit']}" if suite.get("limit") else "")
        + ").",
        "",
        "| strategy | average | % of full | best − this | paired se | z |",
        "|---|---|---|---|---|---|",
    ]
    for r in suite["rows"]:
        if "best_minus_this" in r:
            tail = f"{r['best_minus_this']:+.3f} | {r['best_minus_this_se']:.3f} | {_fmt_z(r['best_vs_this_z'])}"
        else:
            tail = "— | — | —"
        out.append(f"| {r['label']} | {r['average']:.3f} | {r['kept_pct']:.1f} | {tail} |")
    out.append("")
    return out


def _fmt_z(z: float) -> str:
    return "∞" if math.isinf(z) else f"{z:+.1f}"


def conclusion(
    model: str,
    num_layers: int,
    cfg: dict,
    verdict: dict,
    rows: list[dict],
    costs: list[dict],
    damage_meta: dict,
    correlations: list[dict],
    picks: dict,
    checks: dict,
    evidence: dict | None,
    protocol: str,
    c8_cost: list[dict] | None = None,
    full_map_forwards: int | None = None,
    suite: dict | None = None,
) -> str:
    """Markdown computed from the results: the verdict on each claim, where it falls short, and why."""
    lines = [
        f"**Computed from this run** ({model}, {num_layers} layers, {cfg['calibration_sets']} calibration sets "
        f"of {cfg['samples']} texts × {cfg['max_tokens']} tokens; perplexity on {protocol}).",
        "",
    ]
    lines += _lower_everywhere_claim(verdict, rows, cfg)
    lines += _target_claim(verdict, rows, cfg, num_layers)
    if suite:
        lines += suite_lines(suite)
    lines += _cost_section(costs, c8_cost, damage_meta, checks, full_map_forwards, cfg)
    lines += _shortcuts_section(checks)
    lines += _distance_section(correlations)
    for label, picked in picks.items():
        if picked:
            lines += _picks_section(label, picked, damage_meta["pairs"])
    if evidence:
        lines += _criterion_section(evidence, cfg)
    return "\n".join(lines)


def _set_names(sets: list[int]) -> str:
    """Calibration sets by their labels, so that "set 2" never reads as a count of sets."""
    if not sets:
        return "no calibration set"
    return ("set " if len(sets) == 1 else "sets ") + ", ".join(map(str, sets))


def _lower_everywhere_claim(verdict: dict, rows: list[dict], cfg: dict) -> list[str]:
    """Claim 1: `best` below every fixed order at every C, one table row per (set, C), and where it falls short."""
    per = verdict["per_point"]
    sets = sorted({p["set"] for p in per})
    n_sets = len(sets)
    claim = lower_everywhere(per, sets)  # read by the one rule, whichever rule wrote a committed verdict file
    clear_sets, holds = claim["sets_where_clear_at_every_C"], claim["holds"]
    lines = [
        f"**Claim 1 — `best` below every fixed order at every C (the ratio's paired 95% interval below 1) on at "
        f"least {min(2, n_sets)} of {n_sets} calibration sets: {'HOLDS' if holds else 'DOES NOT HOLD'}** "
        f"(it holds at every C on {_set_names(clear_sets)}).",
        "",
        "| set | C | rivals scored | clear wins | lower than all | closest rival | its ratio best/rival | z |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in per:
        lower = "yes" if p["lower_than_all"] else "no"
        lines.append(
            f"| {p['set']} | {p['C']} | {p['rivals']} | {p['clear_wins']} | {lower} "
            f"| {p['closest_rival']} | {p['closest_ratio']:.3f} | {_fmt_z(p['closest_z'])} |"
        )
    lines.append("")
    short = [p for p in per if not clearly_lower(p["closest_z"])]
    if short:
        falls_short = "; ".join(
            f"set {p['set']}, C = {p['C']}: {p['closest_rival']} (best/rival {p['closest_ratio']:.3f}, "
            f"z {_fmt_z(p['closest_z'])})"
            for p in short
        )
        lines += [f"Where it falls short: {falls_short}.", ""]
    random_cs = sorted({r["C"] for r in rows if r["order"] == "random"})
    lines += [
        f"Random seeds ({cfg['random_seeds']} per set, drawn per set) are scored at C = "
        f"{', '.join(map(str, random_cs))} only (the time budget); at the other C values `best` is compared with "
        "dissimilar and similar.",
        "",
    ]
    return lines


def _target_claim(verdict: dict, rows: list[dict], cfg: dict, num_layers: int) -> list[str]:
    """Claim 2: held-out perplexity within target_ratio x the full model's at C = target_c, on every set."""
    ok = verdict["claim_within_target_on_every_set"]
    per_set = "; ".join(
        f"set {t['set']}: {t['ppl']:.2f} = {t['ratio_to_full']:.3f}× "
        f"(95% CI {t['ratio_ci95'][0]:.3f}–{t['ratio_ci95'][1]:.3f})"
        for t in verdict["target"]
    )
    lines = [
        f"**Claim 2 — at C = {cfg['target_c']} of {num_layers}, held-out perplexity within "
        f"{verdict['target_ratio']}× the full model's ({verdict['full_ppl']:.2f}): "
        f"{'HOLDS on every set' if ok else 'DOES NOT HOLD on every set'}** — {per_set}."
    ]
    fixed_at_target = [r for r in rows if r["C"] == cfg["target_c"] and r["order"] in ("dissimilar", "similar")]
    if fixed_at_target:
        lines.append(
            "For comparison at the same C: "
            + "; ".join(f"{r['order']} set {r['set']} {r['ratio_to_full']:.2f}×" for r in fixed_at_target)
            + "."
        )
    lines.append("")
    return lines


def _cost_section(
    costs: list[dict],
    c8_cost: list[dict] | None,
    damage_meta: dict,
    checks: dict,
    full_map_forwards: int | None,
    cfg: dict,
) -> list[str]:
    """What the searches, the figures' damage map and (extrapolated) the full map on the wide batch cost."""
    searches = "; ".join(
        f"set {c['set']}: the search to C = {c['C']} took {c['search_seconds']:.0f} s, {c['layer_forwards']:,} "
        f"layer-forwards ({c['screen_layer_forwards']:,} for the damage map on the first {cfg['screen_texts']} "
        f"texts, {c['rescore_layer_forwards']:,} re-scoring {c['candidates_rescored']} candidates) against "
        f"{c['exhaustive_layer_forwards']:,} for the exhaustive best-first greedy "
        f"({c['fraction_of_exhaustive']:.1%})"
        for c in costs
    )
    lines = [f"**Cost.** {searches}."]
    if c8_cost:
        prefixes = "; ".join(
            f"set {c['set']}: {c['layer_forwards']:,} layer-forwards, ~{c['seconds_estimate']:.0f} s" for c in c8_cost
        )
        lines.append(f"Up to C = {c8_cost[0]['C']}: {prefixes} (seconds apportioned by layer-forwards).")
    cal = damage_meta["calibration"]
    lines.append(
        f"The damage map of the figures (the set-0 screen: {damage_meta['pairs']} pairs, "
        f"{cal['texts']} texts × {cal['tokens_per_text']} tokens, KL at every {damage_meta['kl_stride']}th "
        "position) took "
        f"{damage_meta['seconds']:.0f} s and {damage_meta['layer_forwards']:,} layer-forwards with "
        f"{damage_meta['threads']} thread(s)."
    )
    wide = checks.get("screen", {}).get("reference")
    if wide and full_map_forwards:
        rate = wide["seconds"] / wide["layer_forwards"]
        lines.append(
            f"On {wide['texts']} texts × {wide['tokens_per_text']} tokens (the search's calibration batch), "
            f"{checks['screen']['pairs']} pairs took {wide['seconds']:.0f} s for {wide['layer_forwards']:,} "
            f"layer-forwards ({1000 * rate:.1f} ms each): the map of all {damage_meta['pairs']} pairs there "
            "is "
            f"{full_map_forwards:,} layer-forwards, ≈ {rate * full_map_forwards / 60:.1f} min at that rate "
            "(extrapolated, not run)."
        )
    lines.append("")
    return lines


def _shortcuts_section(checks: dict) -> list[str]:
    """Cheap damage maps (a KL stride, fewer texts) rank the pairs like the expensive ones: the checks' numbers."""
    parts = []
    for name, what in (
        ("stride", "KL at every {k}th position against KL at every position"),
        ("screen", "the search's screen on {n} texts against the same pairs on {N} texts"),
    ):
        c = checks.get(name)
        if not c:
            continue
        label = what.format(k=c["cheap"]["kl_stride"], n=c["cheap"]["texts"], N=c["reference"]["texts"])
        parts.append(
            f"{label}: Spearman {c['spearman_kl']:.3f} over {c['pairs']} pairs, {c['top_overlap']} of the "
            f"{c['top']} least harmful pairs in common"
        )
    return ["**Shortcuts, checked.** " + "; ".join(parts) + ".", ""] if parts else []


def _distance_section(correlations: list[dict]) -> list[str]:
    """The paper's premise: the more distant a pair on calibration, the less sharing it harms."""
    per_metric = "; ".join(
        f"{c['metric']}: {c['spearman_vs_kl']:+.2f} with KL, {c['spearman_vs_hidden_damage']:+.2f} with "
        "1 − hidden cosine"
        for c in correlations
    )
    return [
        "**Does dissimilarity predict low damage?** Spearman correlation over all pairs of the calibration "
        f"distance with the single-pair damage (the paper's premise needs it negative): {per_metric}.",
        "",
    ]


def _picks_section(label: str, picked: list[dict], pairs: int) -> list[str]:
    """Where an order's first picks sit on the damage map: each pick's KL and rank, and their median percentile."""
    ranked = ", ".join(
        f"{p['replaced']}→{p['source']} (KL {p['kl']:.3f}, rank {p['kl_rank'] + 1} of {pairs})" for p in picked
    )
    median = float(np.median([p["kl_percentile"] for p in picked]))
    return [
        f"**{label}**: {ranked}.",
        f"Median position of these picks on the damage map: the {ordinal(round(median))} percentile of harm "
        "(0 = the least harmful pair).",
        "",
    ]


def _criterion_section(evidence: dict, cfg: dict) -> list[str]:
    """How well each calibration criterion ranks strategies as their held-out damage does."""
    return [
        f"**Criterion.** Over the {evidence['strategies']} distinct strategies of calibration set 0 "
        f"scored here, the calibration KL ranks them as their held-out NLL increase does with Spearman "
        f"{evidence['spearman_kl']:.3f}; 1 − hidden cosine with {evidence['spearman_hidden_damage']:.3f}. "
        f"`best` selects by {cfg['criterion']}."
    ]
