"""Network Dissection (Bau et al., CVPR 2017; METHODS.md §5): filter labels measured against annotated pixels.

labels.py (IoU of each filter with each concept, the stage and :class:`DissectionTables`), layers.py (the same
across layers), circuits.py (which lower filters drive a filter, in the words of the layers stage), search.py
(concept search by that evidence, with abstention), lexicon.py and colour.py (how a free-text query is grounded in
the annotated words and pixel colours).
"""

from lavise_core.explain.dissection.labels import IOU_MIN, DissectionTables, build_dissection_stage
from lavise_core.explain.dissection.layers import LayerDissection, build_layers_stage
from lavise_core.explain.dissection.lexicon import Lexicon, build_lexicon, rewrite_query
from lavise_core.explain.dissection.search import QueryAnswer, answer_query, build_query_index

__all__ = [
    "IOU_MIN",
    "DissectionTables",
    "LayerDissection",
    "Lexicon",
    "QueryAnswer",
    "answer_query",
    "build_dissection_stage",
    "build_layers_stage",
    "build_lexicon",
    "build_query_index",
    "rewrite_query",
]
