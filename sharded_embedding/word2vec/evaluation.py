"""Word-vector quality through gensim's standard evaluations, on the data files gensim ships."""

from __future__ import annotations

import logging


MIN_PAIRS = 10  # word pairs in vocabulary below which a Spearman correlation is not reported


def evaluate_vectors(kv) -> dict:
    """Score gensim ``KeyedVectors`` (load only the most frequent words of a large vocabulary:
    `vectors.load_vectors`): WordSim-353 and SimLex-999 Spearman correlations over the pairs
    both of whose words are in ``kv``, and accuracy on the Google analogy questions likewise.
    A score with too few questions covered is None (a Spearman correlation needs `MIN_PAIRS`
    pairs: over 2 or 3 it came out as 1.000), never a made-up number."""
    from gensim.test.utils import datapath

    quiet = logging.getLogger("gensim")
    level, quiet.level = quiet.level, logging.ERROR
    result = {"vocabulary": len(kv.index_to_key)}
    try:
        for name, data in (("wordsim353", "wordsim353.tsv"), ("simlex999", "simlex999.txt")):
            pairs = sum(1 for line in open(datapath(data), encoding="utf-8") if line.strip() and line[0] != "#")
            try:
                _, (rho, _), oov = kv.evaluate_word_pairs(datapath(data))
                covered = round(pairs * (100.0 - float(oov)) / 100.0)
                result[f"{name}_spearman"] = float(rho) if covered >= MIN_PAIRS else None
                result[f"{name}_oov_percent"], result[f"{name}_pairs"] = float(oov), covered
            except ValueError:  # gensim: "No valid similarity judgements found" (every pair out of vocabulary)
                result[f"{name}_spearman"], result[f"{name}_oov_percent"], result[f"{name}_pairs"] = None, 100.0, 0
        score, sections = kv.evaluate_word_analogies(datapath("questions-words.txt"))
        total = next((s for s in sections if s["section"] == "Total accuracy"), None)
        covered = len(total["correct"]) + len(total["incorrect"]) if total else 0
        result["analogy_accuracy"] = float(score) if covered else None
        result["analogy_questions"] = covered
    finally:
        quiet.level = level
    return result


def format_table(metrics: dict) -> str:
    def score(v):
        return "n/a" if v is None else f"{v:.3f}"

    rows = [
        ("WordSim-353 Spearman", score(metrics["wordsim353_spearman"]),
         f"{metrics['wordsim353_oov_percent']:.1f}% pairs OOV"),
        ("SimLex-999 Spearman", score(metrics["simlex999_spearman"]), f"{metrics['simlex999_oov_percent']:.1f}% pairs OOV"),
        ("Analogy accuracy", score(metrics["analogy_accuracy"]),
         f"{metrics['analogy_questions']:,} questions in vocabulary"),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'evaluation':<{width}}  score   note", f"{'-' * width}  -----   ----"]
    lines += [f"{name:<{width}}  {value:>5}   {note}" for name, value, note in rows]
    return "\n".join(lines)
