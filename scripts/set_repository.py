#!/usr/bin/env python3
"""Point the one-click links at a repository: the README's Binder and "Open in Colab" badges, the
notebooks' Colab install cell (KVSHARE_REPO default) and pyproject's [project.urls].

    python scripts/set_repository.py https://github.com/OWNER/REPO [--branch main]

Run it in a fork so that its badges open the fork. It rewrites the badge block between the
`<!-- badges -->` markers of README.md (one Binder badge, one Colab badge per notebook in
notebooks/) and leaves every other line alone. Notebooks are edited as JSON, outputs untouched.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- badges -->", "<!-- /badges -->"
DEFAULT_RE = re.compile(r'os\.environ\.get\("KVSHARE_REPO", "[^"]*"\)')


def badge_block(owner: str, repo: str, branch: str, notebooks: list[Path]) -> str:
    binder = f"https://mybinder.org/v2/gh/{owner}/{repo}/{branch}?urlpath=lab/tree/notebooks"
    lines = [START, f"[![Binder](https://mybinder.org/badge_logo.svg)]({binder})"]
    for nb in notebooks:
        colab = f"https://colab.research.google.com/github/{owner}/{repo}/blob/{branch}/notebooks/{nb.name}"
        lines.append(f"[![Open {nb.stem} in Colab](https://colab.research.google.com/assets/colab-badge.svg)]({colab})")
    lines.append(END)
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="https://github.com/OWNER/REPO")
    parser.add_argument("--branch", default="main")
    args = parser.parse_args(argv)
    m = re.fullmatch(r"https://github\.com/([\w.-]+)/([\w.-]+?)(?:\.git)?/?", args.url)
    if not m:
        print(f"set_repository: expected https://github.com/OWNER/REPO, got {args.url!r}", file=sys.stderr)
        return 2
    owner, repo = m.groups()
    url = f"https://github.com/{owner}/{repo}"
    notebooks = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))

    readme = ROOT / "README.md"
    text = readme.read_text()
    block = badge_block(owner, repo, args.branch, notebooks)
    if START in text and END in text:
        text = text[: text.index(START)] + block + text[text.index(END) + len(END) :]
    else:  # first time: right under the title
        title, _, rest = text.partition("\n")
        text = f"{title}\n\n{block}\n{rest}"
    readme.write_text(text)

    for nb in notebooks:
        data = json.loads(nb.read_text())
        first = data["cells"][0]
        source = "".join(first["source"])
        if not DEFAULT_RE.search(source):
            print(f"set_repository: {nb.name}: first cell has no KVSHARE_REPO default; left alone", file=sys.stderr)
            continue
        source = DEFAULT_RE.sub(f'os.environ.get("KVSHARE_REPO", "{url}")', source)
        first["source"] = source.splitlines(keepends=True)
        nb.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")

    pyproject = ROOT / "pyproject.toml"
    toml = pyproject.read_text()
    urls = f'[project.urls]\nRepository = "{url}"\n'
    if "[project.urls]" in toml:
        toml = re.sub(r"\[project\.urls\]\n(?:[^\[\n][^\n]*\n)*", urls, toml)
    else:
        toml = toml.replace("\n[project.optional-dependencies]", f"\n{urls}\n[project.optional-dependencies]", 1)
    pyproject.write_text(toml)
    print(
        f"set_repository: README badges, {len(notebooks)} notebooks "
        f"and pyproject.toml now point at {url} ({args.branch})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
