"""What every notebook's module shares: its settings with a quick mode, a resumable results cache, and saving a
run's numbers beside its figures.

    class Settings(RunSettings):          # a notebook's settings: its fields with their full-run defaults,
        samples: int = 30                 # QUICK the values a quick run puts over them
        QUICK = dict(samples=4)

    cfg = Settings.for_run("smollm2-135m", quick=True, seed=0, samples=None)   # None: the default
    cache = ResultCache(out / "11_best_search_results.json")                     # a unit computed once, then read
    save_settings(out, "04_memory_speed", cfg, estimated_s=...)                  # + the environment it ran in
    save_rows(out, "04_memory_speed_rates", rows, figure=fig)                    # .json, .csv, .png and .pdf
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from ..io import environment_info, write_csv, write_json


@dataclass
class RunSettings:
    """Everything a notebook's numbers depend on (saved beside its figures): the model, quick mode and the seed here,
    the notebook's own fields, with their full-run defaults, in its subclass.

    A subclass sets `QUICK`, the values a quick run puts over the defaults (minutes on 2 cores, every code path),
    and, where a model's full run must differ from the default model's, `MODEL_FULL` ({model: (values, why)}); it
    checks its values in `__post_init__`."""

    QUICK: ClassVar[Mapping[str, Any]] = {}
    MODEL_FULL: ClassVar[Mapping[str, tuple[Mapping[str, Any], str]]] = {}

    model: str
    quick: bool
    seed: int

    @classmethod
    def for_run(cls, model: str, quick: bool, seed: int = 0, **overrides):
        """The settings of one run: the full-run defaults (with `MODEL_FULL[model]`'s values over them, and why in
        `model_plan` where the settings have that field), or `QUICK` over them in quick mode; then `overrides`,
        where None means the default."""
        names = [f.name for f in fields(cls)]
        values = dict(cls.QUICK) if quick else {}
        if not quick and model in cls.MODEL_FULL:
            plan, why = cls.MODEL_FULL[model]
            values.update(plan)
            if "model_plan" in names:
                values["model_plan"] = why
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = [k for k in values if k not in names]
        if unknown:
            raise ValueError(f"unknown setting {unknown[0]!r} of {cls.__name__}; use one of {', '.join(names[3:])}")
        return cls(model=model, quick=bool(quick), seed=int(seed), **values)

    def to_dict(self) -> dict:
        return asdict(self)


class ResultCache:
    """A JSON file of named results, each stored with a key of what it depends on; written after every put, so an
    interrupted run recomputes only what is missing."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {}

    @staticmethod
    def key(*parts) -> str:
        return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def get(self, name: str, key: str):
        item = self.data.get(name)
        return item["value"] if item is not None and item.get("key") == key else None

    def put(self, name: str, key: str, value):
        self.data[name] = {"key": key, "value": value}
        write_json(self.path, self.data)
        return value


def save_settings(out: Path, name: str, settings: RunSettings | Mapping, **extra) -> Path:
    """`<out>/<name>_settings.json`: the run's settings, what it derived from them (`extra`) and the environment it
    ran in (`kvshare.io.environment_info`)."""
    values = settings.to_dict() if isinstance(settings, RunSettings) else dict(settings)
    return write_json(Path(out) / f"{name}_settings.json", {**values, **extra, "environment": environment_info()})


def save_rows(out: Path, name: str, rows: list[dict], figure=None) -> list[dict]:
    """A run's numbers and its figure in one call: `rows` as `<out>/<name>.json` and `<out>/<name>.csv`, and, when
    given, the `figure` drawn from them as `<out>/<name>.png` and `.pdf` (`save_figure`); returns the rows."""
    write_json(Path(out) / f"{name}.json", rows)
    write_csv(Path(out) / f"{name}.csv", rows)
    if figure is not None:
        save_figure(figure, out, name)
    return rows


def save_figure(fig, out_dir, name: str, formats=("png", "pdf")) -> list[Path]:
    """Write `name.png` and `name.pdf` into `out_dir` (metadata fixed, so reruns give the same bytes). Takes the
    figure object as drawn (matplotlib's `savefig`), so this module never imports matplotlib."""
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
