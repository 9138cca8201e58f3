"""Okapi BM25 over ``text.split(" ")`` tokens, identical in value to ``rank_bm25.BM25Okapi`` (k1 1.5, b 0.75,
eps 0.25) given the same tokens.

docs/method.md section 4: documents and queries are split on single spaces exactly, as the published code did: the newline that ends
a ``retrieval_history`` line stays in its last token ("sci-fi\n" is not "sci-fi"), and two spaces give an empty
token "" (a term like any other).

Written out with numpy because training data needs BM25 over every *prefix* of a history (the past of item i
is ``profile[:i]``): rebuilding a BM25Okapi per prefix is quadratic Python work. The term counts are kept sparse
(memory proportional to the non-zero counts, not documents x vocabulary: a 2,000-item user with a 30,000-word
vocabulary would need ~1 GB dense): a document-major pattern to update the prefix's document frequencies, and
term-major counts (posting lists sorted by document) to score the query's terms only.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse


def tokenize(text: str) -> list:
    """docs/method.md section 4's BM25 tokens: a split on single spaces, nothing else (no lower-casing, newlines kept)."""
    return text.split(" ")


class PrefixBM25:
    """BM25 scores of a query against the first ``n`` documents, for any ``n``."""

    def __init__(self, documents: list, k1: float = 1.5, b: float = 0.75, epsilon: float = 0.25):
        self.k1, self.b, self.epsilon = k1, b, epsilon
        self.vocab: dict = {}   # term ids in order of first occurrence: the first n documents hold ids < seen[n]
        doc_ptr, term_ids, counts, doc_len, seen = [0], [], [], [], [0]
        for doc in documents:
            tokens = tokenize(doc)
            row: dict = {}
            for token in tokens:
                tid = self.vocab.setdefault(token, len(self.vocab))
                row[tid] = row.get(tid, 0) + 1
            term_ids.extend(row)
            counts.extend(row.values())
            doc_ptr.append(len(term_ids))
            doc_len.append(len(tokens))
            seen.append(len(self.vocab))
        self.n_docs = len(documents)
        self.doc_ptr = np.asarray(doc_ptr, dtype=np.int64)      # document d's terms: doc_terms[doc_ptr[d]:doc_ptr[d+1]]
        self.doc_terms = np.asarray(term_ids, dtype=np.int32)
        self.doc_len = np.asarray(doc_len, dtype=np.float64)
        self.seen = np.asarray(seen, dtype=np.int64)            # seen[n]: distinct terms among the first n documents
        # term-major counts; csc keeps each column's row indices sorted (a posting list in document order)
        self.postings = scipy.sparse.csr_matrix(
            (np.asarray(counts, dtype=np.float64), self.doc_terms, self.doc_ptr),
            shape=(self.n_docs, max(len(self.vocab), 1))).tocsc()
        self.postings.sort_indices()
        # document frequencies of the first _df_n documents, moved to the n asked for (history examples ask for
        # n = 1, 2, 3, ... in turn: each step adds one document's terms)
        self._df = np.zeros(max(len(self.vocab), 1), dtype=np.float64)
        self._df_n = 0

    def nbytes(self) -> int:
        """Bytes held by the index's arrays (the vocabulary dict aside)."""
        p = self.postings
        arrays = (self.doc_ptr, self.doc_terms, self.doc_len, self.seen, self._df, p.data, p.indices, p.indptr)
        return sum(a.nbytes for a in arrays)

    def _document_frequencies(self, n: int) -> np.ndarray:
        lo, hi = sorted((self._df_n, n))
        moved = np.bincount(self.doc_terms[self.doc_ptr[lo]:self.doc_ptr[hi]], minlength=len(self._df))
        if n > self._df_n:
            self._df += moved
        else:
            self._df -= moved
        self._df_n = n
        return self._df[:self.seen[n]]

    def scores(self, query: str, n: int | None = None) -> np.ndarray:
        """Scores of the first n documents (all by default); equals
        BM25Okapi([tokenize(d) for d in docs[:n]]).get_scores(tokenize(query))."""
        n = self.n_docs if n is None else n
        if n == 0:
            return np.zeros(0)
        df = self._document_frequencies(n)   # every term present in the first n documents, in id order
        idf = np.log(n - df + 0.5) - np.log(df + 0.5)
        average_idf = idf.sum() / len(idf)
        idf[idf < 0] = self.epsilon * average_idf
        avgdl = self.doc_len[:n].sum() / n
        # query terms with repetition, as rank_bm25 iterates over them; terms not in the first n documents add 0
        term_ids = [tid for tid in (self.vocab.get(t) for t in tokenize(query)) if tid is not None and tid < len(idf)]
        if not term_ids:
            return np.zeros(n)
        ids, counts = np.unique(term_ids, return_counts=True)
        tf = self.postings[:, ids].toarray()[:n]
        norm = self.k1 * (1 - self.b + self.b * self.doc_len[:n, None] / avgdl)
        return (tf * (self.k1 + 1) / (tf + norm) * (idf[ids] * counts)).sum(axis=1)

    def top_k(self, query: str, k: int, n: int | None = None) -> list:
        """Indices of the k best of the first n documents, best first; ties go to the earlier document.

        The authors' rank_bm25 get_top_n reverses numpy's default argsort, whose order among equal scores is
        unspecified (not even stable for small arrays on AVX-512 machines): no tie rule reproduces it."""
        scores = self.scores(query, n)
        order = np.argsort(-scores, kind="stable")
        return order[:k].tolist()
