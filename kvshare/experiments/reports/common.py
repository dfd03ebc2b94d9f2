"""What several notebooks' reports share: colours per search order, `save_figure`, and the Markdown table of
generations (notebooks 02 and 03)."""

from __future__ import annotations

from pathlib import Path

COLORS = {"dissimilar": "#d62728", "similar": "#1f77b4", "random": "#7f7f7f"}
MARKERS = {"dissimilar": "o", "similar": "s", "random": "^"}


def save_figure(fig, out_dir, name: str, formats=("png", "pdf")) -> list[Path]:
    """Write `name.png` and `name.pdf` into `out_dir` (PDF metadata fixed, so reruns give the same bytes)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in formats:
        path = out_dir / f"{name}.{ext}"
        kwargs = {"dpi": 150} if ext == "png" else {}
        if ext == "pdf":
            kwargs["metadata"] = {"CreationDate": None, "Producer": "kvshare"}
        if ext == "png":
            kwargs["metadata"] = {"Software": "kvshare"}
        fig.savefig(path, bbox_inches="tight", **kwargs)
        paths.append(path)
    return paths


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
