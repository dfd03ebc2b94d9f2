"""What several notebooks' reports share: colours per search order, `save_figure`, and the Markdown table of
generations (notebooks 02 and 03)."""

from __future__ import annotations

from ..scaffold import save_figure  # noqa: F401 (the reports' and notebooks' name for it)

COLORS = {"dissimilar": "#d62728", "similar": "#1f77b4", "random": "#7f7f7f"}
MARKERS = {"dissimilar": "o", "similar": "s", "random": "^"}


def generations_markdown(rows: list[dict]) -> str:
    """One row per prompt, one column per setting (rows from `kvshare.experiments.common.generations`)."""
    prompts = list(dict.fromkeys(r["prompt"] for r in rows))
    settings_ = list(dict.fromkeys(r["setting"] for r in rows))
    esc = lambda s: " ".join(s.split()).replace("|", "\\|")
    lines = ["| prompt | " + " | ".join(settings_) + " |", "|---" * (len(settings_) + 1) + "|"]
    for p in prompts:
        cells = [esc(next(r["completion"] for r in rows if r["prompt"] == p and r["setting"] == s)) for s in settings_]
        lines.append(f"| {esc(p)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
