"""The search engine under every collection: FAISS inverted lists with O(1) updates.

One contract, two regimes chosen by size (the FAISS wiki's "Guidelines to choose an index"):

- below `IndexPlan.exact_limit` vectors: exact search. An `IndexIVFFlat` with a single list is a
  flat float32 scan like `IndexFlatIP`, but its hash-table direct map removes or replaces one id
  in O(1) (swap with the list's last entry) where `IndexIDMap2.remove_ids` scans all N;
- above it: an IVF index with 8-bit scalar-quantized codes (4x smaller than float32), trained
  on the collection's own vectors by `rebuild()` while searches and writes go on, then swapped
  in under the lock. Changes made during the rebuild are journaled and replayed before the swap.

Vectors are L2-normalised, so inner product is cosine similarity. Excluded ids (labeled tasks,
the query itself) are filtered inside the scan through an `IdBitmap`, never by over-fetching.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import faiss
import numpy as np

from lookalike.config import Settings

_COPY_CHUNK = 20_000  # vectors copied per lock hold during a rebuild


class IdBitmap:
    """A growable set of non-negative int64 ids, one bit each, readable by FAISS selectors."""

    def __init__(self) -> None:
        self.bits = np.zeros(1024, dtype=np.uint8)
        self.count = 0

    def _grow(self, max_id: int) -> None:
        needed = (max_id >> 3) + 1
        if needed > len(self.bits):
            grown = np.zeros(max(needed, 2 * len(self.bits)), dtype=np.uint8)
            grown[: len(self.bits)] = self.bits
            self.bits = grown

    def add(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return
        if ids.min() < 0:
            raise ValueError("ids must be non-negative")
        self._grow(int(ids.max()))
        fresh = np.unique(ids[~self.contains(ids)])
        np.bitwise_or.at(self.bits, fresh >> 3, (1 << (fresh & 7)).astype(np.uint8))
        self.count += len(fresh)

    def discard(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        held = np.unique(ids[self.contains(ids)])
        np.bitwise_and.at(self.bits, held >> 3, (~(1 << (held & 7))).astype(np.uint8))
        self.count -= len(held)

    def contains(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        inside = (ids >= 0) & ((ids >> 3) < len(self.bits))
        out = np.zeros(len(ids), dtype=bool)
        held = ids[inside]
        out[inside] = (self.bits[held >> 3] >> (held & 7)) & 1 == 1
        return out

    def __contains__(self, item: object) -> bool:
        return isinstance(item, int | np.integer) and bool(self.contains(np.array([item]))[0])

    def __len__(self) -> int:
        return self.count

    def copy(self) -> IdBitmap:
        other = IdBitmap()
        other.bits, other.count = self.bits.copy(), self.count
        return other

    def clear(self) -> None:
        self.bits[:] = 0
        self.count = 0


@dataclass(frozen=True)
class IndexPlan:
    """How the engine picks its index. Defaults were chosen with bench/bench_scale.py."""

    exact_limit: int = 100_000  # up to here search is exact (recall 1.0)
    codes: str = "SQ8"  # faiss factory name of the approximate index's codes
    probe_fraction: float = 1 / 48  # share of inverted lists scanned per search
    min_probes: int = 32
    max_probes: int = 256  # bounds the scan at tens of millions (16k+ lists)
    regrow: float = 4.0  # retrain when the collection has grown this much since training
    train_per_list: int = 40  # training vectors per inverted list (FAISS wants >= 39)
    hnsw_lists: int = 16_384  # from this many lists on, an HNSW graph finds the nearest lists

    @classmethod
    def from_settings(cls, settings: Settings) -> IndexPlan:
        return cls(exact_limit=settings.exact_limit, codes=settings.index_codes)

    def lists_for(self, n: int) -> int:
        """About 4 * sqrt(n) inverted lists, a power of two (FAISS wiki guideline)."""
        return 1 << max(6, round(math.log2(4 * math.sqrt(max(n, 1)))))

    def training_size(self, n: int) -> int:
        """Vectors to train the index for `n` vectors on (never more than there are)."""
        return min(n, self.train_per_list * self.lists_for(n))

    def probes_for(self, nlist: int) -> int:
        wanted = max(self.min_probes, round(nlist * self.probe_fraction))
        return min(nlist, self.max_probes, wanted)


def _exact_engine(dim: int) -> faiss.IndexIVF:
    quantizer = faiss.IndexFlatIP(dim)
    engine = faiss.IndexIVFFlat(quantizer, dim, 1, faiss.METRIC_INNER_PRODUCT)
    quantizer.add(np.zeros((1, dim), dtype=np.float32))
    engine.is_trained = True
    engine.own_fields = True
    quantizer.this.disown()
    engine.set_direct_map_type(faiss.DirectMap.Hashtable)
    engine.nprobe = 1
    return engine


def _approximate_engine(dim: int, nlist: int, plan: IndexPlan) -> faiss.IndexIVF:
    coarse = f"IVF{nlist}_HNSW32" if nlist >= plan.hnsw_lists else f"IVF{nlist}"
    engine = faiss.index_factory(dim, f"{coarse},{plan.codes}", faiss.METRIC_INNER_PRODUCT)
    if not isinstance(engine, faiss.IndexIVF):
        raise ValueError(f"{coarse},{plan.codes} is not an inverted-list index")
    return engine


def _is_exact(engine: faiss.IndexIVF) -> bool:
    return engine.nlist == 1 and isinstance(engine, faiss.IndexIVFFlat)


class VectorIndex:
    """Vectors keyed by non-negative int64 id; exact or approximate by size; thread-safe."""

    def __init__(self, dim: int, plan: IndexPlan | None = None) -> None:
        self.dim = int(dim)
        self.plan = plan or IndexPlan()
        self._engine = _exact_engine(self.dim)
        self._trained_at = 0  # collection size when the approximate engine was trained
        self.present = IdBitmap()
        self._lock = threading.RLock()
        self._journal: list[tuple[str, np.ndarray, np.ndarray | None]] | None = None
        self._rebuilding = threading.Lock()

    # ----------------------------------------------------------------- description
    def __len__(self) -> int:
        return int(self._engine.ntotal)

    @property
    def kind(self) -> str:
        engine = self._engine
        if _is_exact(engine):
            return "exact (IVF1,Flat)"
        return f"IVF{engine.nlist},{self.plan.codes} nprobe={self._probes()}"

    @property
    def exact(self) -> bool:
        return _is_exact(self._engine)

    def _probes(self) -> int:
        return 1 if _is_exact(self._engine) else self.plan.probes_for(self._engine.nlist)

    def needs_rebuild(self) -> bool:
        """Crossed the exact limit, or grew `regrow` times since the last training."""
        n = len(self)
        if self.exact:
            return n > self.plan.exact_limit
        return n > self.plan.regrow * self._trained_at or n < self.plan.exact_limit // 2

    # ----------------------------------------------------------------- writes
    def upsert(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Insert or replace: O(len(ids)) whatever the size. Ids must be unique in one call."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        with self._lock:
            self._remove_held(ids)
            self._engine.add_with_ids(vectors, ids)
            self.present.add(ids)
            if self._journal is not None:
                self._journal.append(("upsert", ids.copy(), vectors.copy()))

    def remove(self, ids: np.ndarray) -> int:
        ids = np.ascontiguousarray(np.unique(np.asarray(ids, dtype=np.int64)))
        with self._lock:
            removed = self._remove_held(ids)
            if self._journal is not None:
                self._journal.append(("remove", ids.copy(), None))
            return removed

    def _remove_held(self, ids: np.ndarray) -> int:
        held = ids[self.present.contains(ids)]
        if len(held) == 0:
            return 0
        # With the hash-table direct map FAISS removes each id in O(1): no scan of the lists.
        removed = int(self._engine.remove_ids(faiss.IDSelectorArray(held)))
        self.present.discard(held)
        return removed

    # ----------------------------------------------------------------- reads
    def __contains__(self, item: object) -> bool:
        return item in self.present

    def ids(self) -> np.ndarray:
        with self._lock:
            invlists = self._engine.invlists
            parts = []
            for list_no in range(self._engine.nlist):
                size = invlists.list_size(list_no)
                if size:
                    pointer = invlists.get_ids(list_no)
                    parts.append(faiss.rev_swig_ptr(pointer, size).copy())
            return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    def get_many(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors (decoded from their codes above the exact limit)."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        with self._lock:
            missing = ids[~self.present.contains(ids)]
            if len(missing):
                raise KeyError(int(missing[0]))
            if len(ids) == 0:
                return np.empty((0, self.dim), dtype=np.float32)
            return self._engine.reconstruct_batch(ids)

    def search(
        self,
        query: np.ndarray,
        k: int,
        excluded: IdBitmap | None = None,
        also_excluded: Iterable[int] = (),
    ) -> tuple[np.ndarray, np.ndarray]:
        """Scores and ids of the best k (ids -1 past the end), skipping excluded ids.

        `excluded` is a standing mask (e.g. every labeled task) kept by the caller;
        `also_excluded` a few ids for this query only. Both are tested inside FAISS's scan."""
        query = np.ascontiguousarray(query, dtype=np.float32).reshape(1, self.dim)
        extra = np.fromiter((int(i) for i in also_excluded), dtype=np.int64)
        selector = None
        keep_alive: list[object] = []
        if (excluded is not None and len(excluded)) or len(extra):
            mask = excluded.copy() if excluded is not None else IdBitmap()
            mask.add(extra)
            bitmap = faiss.IDSelectorBitmap(len(mask.bits), faiss.swig_ptr(mask.bits))
            selector = faiss.IDSelectorNot(bitmap)
            keep_alive += [mask, bitmap]
        with self._lock:
            total = len(self)
            if total == 0 or k <= 0:
                return np.empty(0, np.float32), np.empty(0, np.int64)
            probes = self._probes()
            while True:
                params = faiss.SearchParametersIVF(sel=selector, nprobe=probes)
                scores, labels = self._engine.search(query, min(k, total), params=params)
                found = int((labels[0] >= 0).sum())
                # Few unexcluded vectors near the query: widen the scan rather than return
                # short (the cost stays bounded by the number of lists, not of excluded ids).
                if found >= min(k, total) or probes >= self._engine.nlist:
                    break
                probes = min(self._engine.nlist, probes * 4)
        del keep_alive
        return scores[0], labels[0]

    # ----------------------------------------------------------------- training
    def rebuild(self, seed: int = 0) -> bool:
        """Re-choose the index for the current size: train, copy, replay, swap.

        Searches and writes continue meanwhile (the lock is held per chunk, not for the
        training). Returns False if the current index already fits the size."""
        if not self._rebuilding.acquire(blocking=False):
            return False  # one rebuild at a time; the running one will do
        try:
            with self._lock:
                if not self.needs_rebuild():
                    return False
                self._journal = []
                ids = self.ids()
            n = len(ids)
            rng = np.random.default_rng(seed)
            sample = np.sort(rng.choice(ids, self.plan.training_size(n), replace=False))
            fresh = self._engine_for(n, lambda: self._copy(sample)[1])
            in_fresh = IdBitmap()
            for start in range(0, n, _COPY_CHUNK):
                held, vectors = self._copy(ids[start : start + _COPY_CHUNK])
                fresh.add_with_ids(vectors, held)
                in_fresh.add(held)
            with self._lock:
                for op, op_ids, vectors in self._journal:
                    held = op_ids[in_fresh.contains(op_ids)]
                    if len(held):
                        fresh.remove_ids(faiss.IDSelectorArray(held))
                        in_fresh.discard(held)
                    if op == "upsert":
                        fresh.add_with_ids(vectors, op_ids)
                        in_fresh.add(op_ids)
                self._journal = None
                self._engine = fresh
                self._trained_at = 0 if _is_exact(fresh) else n
            return True
        finally:
            with self._lock:
                self._journal = None
            self._rebuilding.release()

    def train(self, sample: np.ndarray, expected: int) -> None:
        """Bulk load: make an empty index the one for `expected` vectors, trained on `sample`
        (`plan.training_size(expected)` vectors), so a large load goes
        straight into compressed codes instead of through a float32 copy."""
        with self._lock:
            if len(self):
                raise ValueError("train() prepares an empty index; rebuild() re-trains a full one")
        fresh = self._engine_for(expected, lambda: np.asarray(sample, dtype=np.float32))
        with self._lock:
            self._engine = fresh
            self._trained_at = 0 if _is_exact(fresh) else expected

    def _engine_for(self, n: int, sample: Callable[[], np.ndarray]) -> faiss.IndexIVF:
        if n <= self.plan.exact_limit:
            return _exact_engine(self.dim)
        engine = _approximate_engine(self.dim, self.plan.lists_for(n), self.plan)
        engine.train(np.ascontiguousarray(sample(), dtype=np.float32))
        engine.set_direct_map_type(faiss.DirectMap.Hashtable)
        return engine

    def _copy(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            held = ids[self.present.contains(ids)]
            return held, self._engine.reconstruct_batch(held)

    # ----------------------------------------------------------------- persistence
    def to_bytes(self) -> np.ndarray:
        with self._lock:
            return faiss.serialize_index(self._engine)

    def write(self, path: str) -> None:
        """Straight to a file, without the in-memory copy `to_bytes` makes (20M vectors)."""
        with self._lock:
            faiss.write_index(self._engine, str(path))

    @classmethod
    def read(cls, path: str, plan: IndexPlan | None = None) -> VectorIndex:
        return cls._wrap(faiss.read_index(str(path)), plan)

    @classmethod
    def from_bytes(cls, data: np.ndarray, plan: IndexPlan | None = None) -> VectorIndex:
        return cls._wrap(faiss.deserialize_index(data), plan)

    @classmethod
    def _wrap(cls, engine: faiss.Index, plan: IndexPlan | None) -> VectorIndex:
        if not isinstance(engine, faiss.IndexIVF):
            raise ValueError(f"not an inverted-list index: {type(engine).__name__}")
        index = cls(engine.d, plan)
        engine.set_direct_map_type(faiss.DirectMap.Hashtable)
        index._engine = engine
        index._trained_at = 0 if _is_exact(engine) else len(index)
        index.present.add(index.ids())
        return index

