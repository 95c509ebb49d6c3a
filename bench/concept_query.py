"""Benchmark: a free-text concept query (embed + index search + top images), median milliseconds.

Two vocabularies: the real general vocabulary (~37k phrases, MiniLM embeddings, exact flat index) and
a synthetic 1M-phrase vocabulary of random unit vectors (IVF index, nprobe 16). Targets: <= 30 ms and
<= 50 ms. Prints median and p95 of the whole query and of its two main parts (query embedding, phrase
search), with the machine's load average (the numbers depend on it). torch and FAISS use one thread.
Third, on the default bundle (when built): the Explainer's query as the dashboard runs it — lexicon, embedding,
evidence ranking, abstention and the colour path — beside the LaViSE-only query of the same bundle.
Run: ``.venv/bin/python bench/concept_query.py [--million N] [--bundle DIR]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch

from lavise_core.explain.lavise.index import ConceptIndex, load_general_vocabulary
from lavise_core.explain.lavise.query import query_concept
from lavise_core.models.text_encoder import TextEmbedder

QUERIES = [
    "red wing", "bird standing in shallow water", "glittering plumage", "striped tail feathers",
    "hooked yellow beak", "snowy background", "a small brown bird", "orange breast", "spotted wing",
    "dark forest", "bright blue crown", "long thin legs",
]  # fmt: skip


def _stats(ms: list[float]) -> str:
    return f"median {statistics.median(ms):.1f} ms, p95 {float(np.percentile(ms, 95)):.1f} ms"


def bench(
    index: ConceptIndex, salt: str, n_filters: int = 1280, n_images: int = 3000, repeats: int = 3
) -> str:
    """Whole query (fresh texts) plus the embedding and the phrase search alone; returns a summary line."""
    rng = np.random.default_rng(0)
    fe = rng.standard_normal((n_filters, index.dim)).astype(np.float32)
    fe /= np.linalg.norm(fe, axis=1, keepdims=True)
    top_index = rng.integers(0, n_images, (n_filters, 16))
    top_value = np.sort(rng.random((n_filters, 16)).astype(np.float32), axis=1)[:, ::-1]
    pooled = rng.random((n_images, n_filters)).astype(np.float32)
    times, times_blas, t_embed, t_search = [], [], [], []
    unlimited = query_concept.__wrapped__  # the same query without the one-BLAS-thread limit
    for r in range(repeats):
        for q in QUERIES:  # interleaved, fresh texts (the LRU cache does not help)
            t = time.perf_counter()
            query_concept(f"{q} {salt}{r}", index, fe, top_index, top_value, pooled=pooled)
            times.append((time.perf_counter() - t) * 1e3)
            t = time.perf_counter()
            unlimited(f"{q} {salt}{r}~", index, fe, top_index, top_value, pooled=pooled)
            times_blas.append((time.perf_counter() - t) * 1e3)
    for r in range(repeats):
        for q in QUERIES:
            t = time.perf_counter()
            v = index.embed_text([f"{q} ~{salt}{r}"])
            t_embed.append((time.perf_counter() - t) * 1e3)
            t = time.perf_counter()
            index.search(v, 10)
            t_search.append((time.perf_counter() - t) * 1e3)
    repeated = []
    for q in QUERIES:  # the same text again: its embedding comes from the LRU cache
        query_concept(q, index, fe, top_index, top_value, pooled=pooled)
        t = time.perf_counter()
        query_concept(q, index, fe, top_index, top_value, pooled=pooled)
        repeated.append((time.perf_counter() - t) * 1e3)
    return (
        f"query {_stats(times)} (numpy's BLAS threads not limited: {_stats(times_blas)}); "
        f"repeated query {_stats(repeated)}; "
        f"embedding {_stats(t_embed)}; search {_stats(t_search)}"
    )


def bench_bundle(bundle_dir: str, repeats: int = 3) -> str:
    """The full ``Explainer.query`` (abstention included) vs the LaViSE-only query, fresh texts, one bundle."""
    import lavise_core

    ex = lavise_core.open(bundle_dir)
    ex.query("warm-up")
    lv = ex.lavise()
    full, zero, again, confident = [], [], [], 0
    for r in range(repeats):
        for q in QUERIES:
            t = time.perf_counter()
            a = ex.query(f"{q} {'x' * (r + 1)}", n=5)
            full.append((time.perf_counter() - t) * 1e3)
            confident += a.confident
            t = time.perf_counter()
            lv.query(f"{q} {'y' * (r + 1)}", n_filters=5)
            zero.append((time.perf_counter() - t) * 1e3)
            t = time.perf_counter()
            ex.query(f"{q} {'x' * (r + 1)}", n=5)  # repeated: warm caches
            again.append((time.perf_counter() - t) * 1e3)
    return (
        f"Explainer.query (evidence + abstention): {_stats(full)}, repeated {_stats(again)}; "
        f"LaViSE query alone: {_stats(zero)}"
    )


def _load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--million", type=int, default=1_000_000, help="size of the synthetic vocabulary")
    ap.add_argument("--bundle", default=None, help="bundle folder (default: the newest under data/bundles)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import faiss

    faiss.omp_set_num_threads(1)
    print(_load())
    from lavise_core.pipeline.bundle import find_bundles

    bundles = [args.bundle] if args.bundle else [str(b.root) for b in find_bundles("data/bundles")][:1]
    if bundles:
        print(f"bundle {bundles[0]}: {bench_bundle(bundles[0])}")
        print(_load())
    emb = TextEmbedder()
    phrases, e = load_general_vocabulary(embedder=emb)
    idx = ConceptIndex(emb).build(phrases, e)
    idx.embed_text(["warm-up"])
    front = "8-bit front + exact re-scoring" if idx._fast is not None else "no 8-bit front"
    print(f"general vocabulary: {len(idx)} phrases, index {idx.kind} ({front}): {bench(idx, 'a')}")
    print(_load())

    n = args.million
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, idx.dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    t = time.perf_counter()
    big = ConceptIndex(emb).build([f"phrase {i}" for i in range(n)], x)
    build_s = time.perf_counter() - t
    ivf = f" (nlist {big.index.nlist}, nprobe {big.index.nprobe})" if hasattr(big.index, "nlist") else ""
    print(
        f"synthetic vocabulary: {n} phrases, index {big.kind}{ivf} built in {build_s:.1f} s: {bench(big, 'b')}"
    )
    print(_load())


if __name__ == "__main__":
    main()
