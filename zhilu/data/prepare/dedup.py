"""Exact duplicates by content hash; near duplicates by MinHash and locality-sensitive hashing (datasketch).

A document's shingles are its word n-grams (words split at white space; a document of fewer
than n words is one shingle). Its MinHash signature is computed where it is read (any
worker); the decisions are taken in document order in one process, so the first of a group
of duplicates is kept, whatever the number of workers. A candidate the LSH index returns is
a near duplicate when the signatures' estimated Jaccard similarity reaches the threshold; the
index is tuned to miss few true pairs (false negatives weigh 0.95, false positives 0.05, since
each candidate is checked), so with 256 permutations a pair of similarity 0.85 is found with
probability above 0.98 at the default threshold 0.8.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from zhilu.errors import ZhiluError


@dataclass(frozen=True)
class DedupSettings:
    near_threshold: float = 0.8  # Jaccard similarity of shingle sets; 1: exact duplicates only
    num_perm: int = 256  # MinHash permutations
    shingle_words: int = 5

    def validate(self) -> None:
        if not 0 < self.near_threshold <= 1:
            raise ZhiluError("--near-threshold", f"must be above 0 and at most 1 (exact duplicates only), got "
                                                 f"{self.near_threshold}")
        if not 16 <= self.num_perm <= 1024:
            raise ZhiluError("--num-perm", f"must be 16 to 1024, got {self.num_perm}")
        if self.shingle_words < 1:
            raise ZhiluError("--shingle-words", f"must be at least 1, got {self.shingle_words}")

    @property
    def near(self) -> bool:
        return self.near_threshold < 1

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _datasketch():  # type: ignore[no-untyped-def]
    try:
        import datasketch
    except ImportError:
        raise ZhiluError("--near-threshold", "near-duplicate removal needs datasketch: pip install 'zhilu[data]' "
                                             "(or --near-threshold 1 for exact duplicates only)") from None
    return datasketch


def _scheme_name() -> str:
    return str(_datasketch().MinHash(num_perm=16).scheme)


def shingles(text: str, n: int) -> set[bytes]:
    words = text.split()
    if len(words) <= n:
        return {" ".join(words).encode()}
    return {" ".join(words[i:i + n]).encode() for i in range(len(words) - n + 1)}


class Signer:
    """MinHash signatures of documents, the same in every process (datasketch's seeded permutations)."""

    def __init__(self, settings: DedupSettings) -> None:
        self.settings = settings
        first = _datasketch().MinHash(num_perm=settings.num_perm)
        self._permutations, self._scheme = first.permutations, first.scheme

    def __call__(self, text: str) -> np.ndarray:
        from datasketch import MinHash

        m = MinHash(num_perm=self.settings.num_perm, permutations=self._permutations, scheme=self._scheme)
        m.update_batch(list(shingles(text, self.settings.shingle_words)))
        return np.asarray(m.hashvalues, dtype=np.uint32)


class Deduplicator:
    """Decides, document by document in order, whether each is a duplicate of one kept before it."""

    def __init__(self, settings: DedupSettings) -> None:
        self.settings = settings
        self._seen: set[bytes] = set()
        self._lsh = None
        if settings.near:
            self._lsh = _datasketch().MinHashLSH(threshold=settings.near_threshold, num_perm=settings.num_perm,
                                                 weights=(0.05, 0.95))
            self._kept: dict[int, object] = {}
            self._scheme = _scheme_name()

    def check(self, key: int, digest: bytes, signature: np.ndarray | None) -> str | None:
        """``exact_duplicate``, ``near_duplicate`` or None (kept, and remembered)."""
        if digest in self._seen:
            return "exact_duplicate"
        if self._lsh is not None and signature is not None:
            from datasketch import MinHash

            m = MinHash(num_perm=self.settings.num_perm, hashvalues=signature, scheme=self._scheme)
            for other in self._lsh.query(m):
                if m.jaccard(self._kept[other]) >= self.settings.near_threshold:
                    return "near_duplicate"
            self._lsh.insert(key, m)
            self._kept[key] = m
        self._seen.add(digest)
        return None
