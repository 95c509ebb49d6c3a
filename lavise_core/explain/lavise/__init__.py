"""LaViSE (Yang, Kim & Joo, CVPR 2022; METHODS.md §2): zero-shot filter labels from an open vocabulary.

settings.py (settings, errors) → index.py (vocabulary, embeddings, FAISS) → head.py (region features, the
explainer head) → labels.py (filter attention, labels) → abstention.py (when a query is answered) → query.py
(free-text concept queries), bias.py (data-set bias) → explainer.py (the stage and :class:`LaviseExplainer`, its
reader).
"""

from lavise_core.explain.lavise.abstention import AbstentionRule, calibrate_abstention
from lavise_core.explain.lavise.explainer import LaviseExplainer, build_lavise_stage
from lavise_core.explain.lavise.index import ConceptError, ConceptIndex, VocabularySettings, dataset_concepts
from lavise_core.explain.lavise.query import QueryResult, query_concept
from lavise_core.explain.lavise.settings import LaviseError, LaviseSettings

__all__ = [
    "AbstentionRule",
    "ConceptError",
    "ConceptIndex",
    "LaviseError",
    "LaviseExplainer",
    "LaviseSettings",
    "QueryResult",
    "VocabularySettings",
    "build_lavise_stage",
    "calibrate_abstention",
    "dataset_concepts",
    "query_concept",
]
