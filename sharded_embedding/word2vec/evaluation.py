"""Word-vector quality through gensim's standard evaluations, on the data files gensim ships."""

from __future__ import annotations

import logging


def evaluate_vectors(path: str) -> dict:
    """Load word2vec text from ``path`` with gensim and score it: WordSim-353 and SimLex-999
    Spearman correlations, and accuracy on the Google analogy questions."""
    from gensim.models import KeyedVectors
    from gensim.test.utils import datapath

    quiet = logging.getLogger("gensim")
    level, quiet.level = quiet.level, logging.ERROR
    try:
        kv = KeyedVectors.load_word2vec_format(path, binary=False)
        wordsim = kv.evaluate_word_pairs(datapath("wordsim353.tsv"))
        simlex = kv.evaluate_word_pairs(datapath("simlex999.txt"))
        analogy, _ = kv.evaluate_word_analogies(datapath("questions-words.txt"))
    finally:
        quiet.level = level
    return {
        "vocabulary": len(kv.index_to_key),
        "wordsim353_spearman": float(wordsim[1][0]),
        "wordsim353_oov_percent": float(wordsim[2]),
        "simlex999_spearman": float(simlex[1][0]),
        "simlex999_oov_percent": float(simlex[2]),
        "analogy_accuracy": float(analogy),
    }


def format_table(metrics: dict) -> str:
    rows = [
        ("WordSim-353 Spearman", f"{metrics['wordsim353_spearman']:.3f}", f"{metrics['wordsim353_oov_percent']:.1f}% pairs OOV"),
        ("SimLex-999 Spearman", f"{metrics['simlex999_spearman']:.3f}", f"{metrics['simlex999_oov_percent']:.1f}% pairs OOV"),
        ("Analogy accuracy", f"{metrics['analogy_accuracy']:.3f}", "questions-words, in-vocabulary"),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'evaluation':<{width}}  score   note", f"{'-' * width}  -----   ----"]
    lines += [f"{name:<{width}}  {score:>5}   {note}" for name, score, note in rows]
    return "\n".join(lines)
