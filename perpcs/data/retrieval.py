"""Okapi BM25 over ``text.split(" ")`` tokens, identical in value to ``rank_bm25.BM25Okapi`` (k1 1.5, b 0.75,
eps 0.25) given the same tokens.

SPEC 4: documents and queries are split on single spaces exactly, as the published code did: the newline that ends
a ``retrieval_history`` line stays in its last token ("sci-fi\n" is not "sci-fi"), and two spaces give an empty
token "" (a term like any other).

Written out with numpy because training data needs BM25 over every *prefix* of a history (the past of item i
is ``profile[:i]``): rebuilding a BM25Okapi per prefix is quadratic Python work; here the term counts are
computed once and each prefix only re-derives the idf vector and one dense score slice.
"""
from __future__ import annotations

import numpy as np


def tokenize(text: str) -> list:
    """SPEC 4's BM25 tokens: a split on single spaces, nothing else (no lower-casing, newlines kept)."""
    return text.split(" ")


class PrefixBM25:
    """BM25 scores of a query against the first ``n`` documents, for any ``n``."""

    def __init__(self, documents: list, k1: float = 1.5, b: float = 0.75, epsilon: float = 0.25):
        self.k1, self.b, self.epsilon = k1, b, epsilon
        self.vocab: dict = {}
        rows = []
        for doc in documents:
            counts: dict = {}
            for token in tokenize(doc):
                tid = self.vocab.setdefault(token, len(self.vocab))
                counts[tid] = counts.get(tid, 0) + 1
            rows.append(counts)
        self.n_docs = len(rows)
        self.tf = np.zeros((self.n_docs, max(len(self.vocab), 1)), dtype=np.float64)
        for d, counts in enumerate(rows):
            for tid, c in counts.items():
                self.tf[d, tid] = c
        self.doc_len = self.tf.sum(axis=1)
        # df_prefix[n] = document frequency of each term among the first n documents
        self.df_prefix = np.vstack([np.zeros((1, self.tf.shape[1])), np.cumsum(self.tf > 0, axis=0)])

    def scores(self, query: str, n: int | None = None) -> np.ndarray:
        """Scores of the first n documents (all by default); equals
        BM25Okapi([tokenize(d) for d in docs[:n]]).get_scores(tokenize(query))."""
        n = self.n_docs if n is None else n
        if n == 0:
            return np.zeros(0)
        df = self.df_prefix[n]
        present = df > 0
        idf = np.zeros_like(df)
        idf[present] = np.log(n - df[present] + 0.5) - np.log(df[present] + 0.5)
        average_idf = idf[present].sum() / present.sum()
        idf[present & (idf < 0)] = self.epsilon * average_idf
        avgdl = self.doc_len[:n].sum() / n
        # query terms with repetition, as rank_bm25 iterates over them; unknown terms add 0
        term_ids = [self.vocab[t] for t in tokenize(query) if t in self.vocab]
        if not term_ids:
            return np.zeros(n)
        ids, counts = np.unique(term_ids, return_counts=True)
        tf = self.tf[:n, ids]
        norm = self.k1 * (1 - self.b + self.b * self.doc_len[:n, None] / avgdl)
        return (tf * (self.k1 + 1) / (tf + norm) * (idf[ids] * counts)).sum(axis=1)

    def top_k(self, query: str, k: int, n: int | None = None) -> list:
        """Indices of the k best of the first n documents, best first; ties go to the earlier document.

        The authors' rank_bm25 get_top_n reverses numpy's default argsort, whose order among equal scores is
        unspecified (not even stable for small arrays on AVX-512 machines): no tie rule reproduces it."""
        scores = self.scores(query, n)
        order = np.argsort(-scores, kind="stable")
        return order[:k].tolist()
