"""The README's side-by-side block: notebooks 01-03's claims on both model families, each column computed by the
same finding functions as the findings table from that model's own results folder, with a column that says whether
the verdicts agree.

The fixtures copy the committed default-model results into a temporary repository and give the second family
modified copies, so that each test knows which verdicts agree and which numbers a cell must show.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from kvshare.experiments.reports import readme

ROOT = Path(__file__).resolve().parent.parent
DEFAULT, OTHER = readme.FAMILIES
# what observation_finding, search_finding and evaluation_finding read (results and link targets)
NEEDED = (
    "01_observation_ppl_curves.json",
    "01_observation_ppl_curves.png",
    "01_observation_conclusion.md",
    "02_search_strategy.json",
    "02_search_random.json",
    "02_search_threshold_sweep.png",
    "02_search_summary.md",
    "03_evaluation.json",
    "03_evaluation_scores.png",
    "03_evaluation_summary.md",
)


def copy_default(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in NEEDED:
        if name.endswith(".png"):  # only linked to; its bytes do not matter
            (folder / name).write_bytes(b"")
        else:
            shutil.copy(ROOT / "figures" / name, folder / name)


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def flip_every_verdict(folder: Path) -> None:
    """Turn the copied default results into an 18-layer model whose verdicts are the opposite of the default's:
    dissimilar beats similar and random, the threshold rejects candidates, the paper's claim holds."""

    def observation(d):
        d["num_layers"] = 18
        for x in d["distinct_comparisons"]:
            if x["versus"] == "similar":
                x.update(num_shared=4, ppl_ratio=0.5, z=-3.0)
        d["random_versus"] = [{"num_shared": 4, "strategies": 5, "ratio": 0.8, "ratio_lo": 0.7, "ratio_hi": 0.9}]

    def search(d):
        d["num_layers"] = 18
        d["metadata"].update(candidates_visited=11, num_shared=4)

    def evaluation(d):
        for s in d["strategies"].values():
            s["num_layers"] = 18
        for x in d["summary"]:
            if abs(x["rate"] - d["conclusion"]["rate"]) < 1e-9:
                x["num_shared"] = 5
        paper = d["conclusion"]["orders"]["dissimilar"]
        paper.update(kept_pct=93.2, holds=True)
        if "verdict" in paper:  # results with intervals (issue 14) state the verdict themselves
            paper.update(verdict="holds", kept_lo=91.0, kept_hi=95.4)

    edit_json(folder / "01_observation_ppl_curves.json", observation)
    edit_json(folder / "02_search_strategy.json", search)
    edit_json(folder / "03_evaluation.json", evaluation)


def table(text: str) -> dict[str, dict[str, str]]:
    """The block's rows by notebook, each {column: cell}."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]

    def split(line):
        return [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]

    head = split(lines[0])
    return {cells[0]: dict(zip(head, cells)) for cells in map(split, lines[2:])}


@pytest.fixture
def repo(tmp_path):
    copy_default(tmp_path / "figures")
    return tmp_path


def render(repo: Path) -> str:
    return readme.render_block("side-by-side", readme.Results(repo, "README.md"))


def test_one_column_per_model_and_numbers_from_each_models_files(repo):
    copy_default(repo / "figures" / OTHER)
    flip_every_verdict(repo / "figures" / OTHER)
    rows = table(render(repo))
    assert list(rows) == ["01", "02", "03"]
    assert list(rows["01"]) == ["notebook", "claim", DEFAULT, OTHER, "agree?"]

    default = readme.Results(repo, "README.md")
    findings = readme.render_block("findings", default)
    for number, _, finding in readme.SIDE_BY_SIDE:
        f = finding(default)
        # the default model's cell is what the findings table's function computed from figures/
        verdict = f.verdict.rstrip(".")  # the cell joins verdict and headline with "; "
        assert verdict in rows[number][DEFAULT].replace("\\|", "|") and f.verdict in findings
        assert f.headline in rows[number][DEFAULT]

    other = rows["01"][OTHER]
    assert "**holds**" in other and "×0.50 at C = 4/18 layers (22.2%)" in other and "0.70–0.90" in other
    assert "4 of 11 candidates accepted, C = 4/18 layers (22.2%)" in rows["02"][OTHER]
    assert "rejected 7 of 11" in rows["02"][OTHER]
    assert "**holds** for the paper's order at 5/18 layers (27.8%)" in rows["03"][OTHER]
    assert "93.2%" in rows["03"][OTHER]
    assert "8/30 layers" in rows["03"][DEFAULT]  # each model's C as a fraction of its own layers


def test_disagree_when_the_verdicts_differ(repo):
    copy_default(repo / "figures" / OTHER)
    flip_every_verdict(repo / "figures" / OTHER)
    rows = table(render(repo))
    for number in ("01", "02", "03"):
        assert rows[number]["agree?"].startswith("**disagree**"), rows[number]["agree?"]
    assert f"similar beats dissimilar on {DEFAULT}, dissimilar beats similar on {OTHER}" in rows["01"]["agree?"]
    assert f"dissimilar beats random on {OTHER}" in rows["01"]["agree?"]
    assert (
        f"does not hold for the paper's order on {DEFAULT}, holds for the paper's order on {OTHER}"
        in (rows["03"]["agree?"])
    )


def test_agree_when_the_verdicts_are_equal(repo):
    copy_default(repo / "figures" / OTHER)
    rows = table(render(repo))
    assert rows["01"]["agree?"].startswith("**agree**: similar beats dissimilar;")
    for number in ("01", "02", "03"):
        assert rows[number]["agree?"].startswith("**agree**") and rows[number]["agree?"].endswith("on both")


def test_one_aspect_differing_is_a_disagreement_that_names_what_both_share(repo):
    copy_default(repo / "figures" / OTHER)
    edit_json(
        repo / "figures" / OTHER / "01_observation_ppl_curves.json",
        lambda d: d.update(random_versus=[dict(x, ratio_lo=1.1, ratio_hi=1.9) for x in d["random_versus"]]),
    )
    agree = table(render(repo))["01"]["agree?"]
    assert agree.startswith("**disagree**: dissimilar and random not clearly apart on")
    assert f"random beats dissimilar on {OTHER}" in agree and "(on both: similar beats dissimilar)" in agree


def test_missing_results_say_which_run_writes_them_and_invent_nothing(repo):
    text = render(repo)  # no figures/gemma3-270m/ at all
    rows = table(text)
    for number in ("01", "02", "03"):
        assert rows[number][OTHER] == f"not run yet: `./run_all.sh --model {OTHER} --only {number}`"
        assert rows[number]["agree?"] == "cannot tell yet"
        assert re.search(r"\d+\.\d+|%|×", rows[number][DEFAULT])  # the default model's numbers are still shown
    assert f"`figures/{OTHER}/03_evaluation.json`" in text and "not committed" in text

    copy_default(repo / "figures" / OTHER)
    (repo / "figures" / OTHER / "02_search_strategy.json").unlink()
    rows = table(render(repo))
    assert rows["01"]["agree?"].startswith("**agree**") and rows["02"]["agree?"] == "cannot tell yet"


def test_the_run_command_names_the_model_folder():
    assert readme.run_command(f"figures/{OTHER}/02_search_summary.md") == f"./run_all.sh --model {OTHER} --only 02"
    assert readme.run_command("figures/03_evaluation.json") == "./run_all.sh --only 03"
    assert readme.run_command("figures/heldout_scores.json") is None
    assert readme.Results(ROOT).for_model(DEFAULT).folder == "figures"
    assert readme.Results(ROOT).for_model(OTHER).folder == f"figures/{OTHER}"


def test_the_readme_carries_the_block_and_the_gemma_baseline_and_passes_the_check(capsys):
    text = (ROOT / "README.md").read_text()
    block = text.index("<!-- kvshare:results side-by-side -->")
    assert text.index("<!-- /kvshare:results findings -->") < block < text.index("## How to choose")
    assert "<!-- kvshare:results gemma_baseline -->" in text
    assert readme.main(["--check"]) == 0, capsys.readouterr().out
