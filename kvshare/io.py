"""Atomic result files (a crash never leaves half a JSON or CSV behind), and the software and machine every
results file records (`environment_info`)."""

from __future__ import annotations

import csv
import importlib.metadata
import io
import json
import os
import platform
import tempfile
from pathlib import Path


def atomic_write_text(path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; results are for everyone to read
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json(path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def write_csv(path, rows: list[dict]) -> Path:
    """Rows of dicts to CSV; the header is the union of keys in first-seen order."""
    fields: list[str] = []
    for row in rows:
        fields.extend(k for k in row if k not in fields)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buf.getvalue())


def environment_info() -> dict:
    """The versions and the machine a result was measured with (saved beside every notebook's settings)."""
    import torch
    import transformers

    try:
        kvshare_version = importlib.metadata.version("kvshare")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never pip-installed
        kvshare_version = "not installed"
    return {
        "kvshare": kvshare_version,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }


def _jsonable(x):
    if hasattr(x, "tolist"):
        return x.tolist()
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"cannot write {type(x).__name__} to JSON")
