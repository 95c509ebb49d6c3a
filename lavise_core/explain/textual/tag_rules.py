"""spaCy's ``attribute_ruler`` (the rules that turn the tagger's fine tags into POS, morphology and some lemmas),
applied with its patterns looked up by a value their first token fixes instead of spaCy's general ``Matcher``.

Parsing the captions is most of the ``textual`` stage, and in ``en_core_web_sm`` the ruler's ``Matcher`` took
longer than the tagger itself: it tries each of its 179 patterns at every token. Here a token is only tried
against the patterns whose first token names its lower-case form, tag, dependency or spaceness (plus the few
that fix none of them),
with the same token tests (exact value, ``IN``, ``NOT_IN``, ``REGEX``) on the same attributes. The matches are
applied in spaCy's order (by rule, then position) with spaCy's own setter, so every token gets the same POS,
morphology and lemma: ``tests/explain/textual/test_tag_rules.py`` compares them with the pipeline's on every
SynthBirds caption and on sentences written to hit the rare rules. A ruler with anything else in its patterns
(operators, other attributes) is left to spaCy: :meth:`IndexedTagRules.from_ruler` returns ``None``.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable
from typing import Any

__all__ = ["IndexedTagRules"]

#: token attributes a rule may test, read off a spaCy ``Token`` as the ``Matcher`` reads them (in the order
#: :func:`_index_keys` prefers them)
_READERS: dict[str, Callable[[Any], Any]] = {
    "LOWER": lambda t: t.lower_,
    "TAG": lambda t: t.tag_,
    "DEP": lambda t: t.dep_,
    "IS_SPACE": lambda t: t.is_space,
}
_Test = Callable[[Any], bool]


def _value_test(read: Callable[[Any], Any], want: Any) -> _Test | None:
    """One attribute's test: an exact value, or ``{"IN": [...]}``, ``{"NOT_IN": [...]}``, ``{"REGEX": str}``."""
    if not isinstance(want, dict):
        return lambda t: read(t) == want
    if len(want) != 1:
        return None
    ((op, arg),) = want.items()
    if op == "IN":
        s = frozenset(arg)
        return lambda t: read(t) in s
    if op == "NOT_IN":
        s = frozenset(arg)
        return lambda t: read(t) not in s
    if op == "REGEX":
        rx = re.compile(arg)
        return lambda t: rx.search(read(t)) is not None
    return None


def _token_test(spec: dict) -> _Test | None:
    """All of one pattern token's attribute tests, or ``None`` for anything this module does not handle."""
    tests = []
    for attr, want in spec.items():
        if attr not in _READERS:
            return None
        test = _value_test(_READERS[attr], want)
        if test is None:
            return None
        tests.append(test)
    return lambda t: all(f(t) for f in tests)


def _index_keys(spec: dict) -> list[tuple[str, Any]]:
    """Where a pattern whose first token is ``spec`` is filed: under each value its first token can have for the
    most selective attribute it fixes (an exact value or an ``IN`` list; LOWER, then TAG, DEP, IS_SPACE), else
    nowhere (``[]``: tried at every token). A token can only match it if its value of that attribute is one of
    these, so each pattern is tried at most once per token."""
    for attr in _READERS:
        want = spec.get(attr)
        if isinstance(want, str | bool):
            return [(attr, want)]
        if isinstance(want, dict) and list(want) == ["IN"]:
            return [(attr, v) for v in dict.fromkeys(want["IN"])]
    return []


def _keys_of(tok: Any) -> tuple[tuple[str, Any], ...]:
    """The index keys a token can match (:func:`_index_keys`)."""
    return tuple((attr, read(tok)) for attr, read in _READERS.items())


class IndexedTagRules:
    """The rules of one spaCy ``AttributeRuler``, applied to a tagged ``Doc`` in place (``rules(doc) -> doc``).

    Each rule ``r`` (in the ruler's order) has one or more fixed-length token patterns, the attributes it sets
    and the index of the token it sets them on. Patterns are filed by :func:`_index_keys`; those it cannot file
    are tried everywhere.
    """

    def __init__(self, ruler: Any, rules: list[tuple[int, list[_Test]]], index: dict, anywhere: list) -> None:
        from spacy.tokens._retokenize import set_token_attrs

        self._ruler, self._set = ruler, set_token_attrs
        self._rules, self._index, self._anywhere = rules, index, anywhere

    @classmethod
    def from_ruler(cls, ruler: Any) -> IndexedTagRules | None:
        """From a loaded ``AttributeRuler``; ``None`` when a pattern uses an operator or attribute not handled."""
        rules: list[tuple[int, list[_Test]]] = []
        index: dict[tuple[str, str], list[int]] = defaultdict(list)
        anywhere: list[int] = []
        for rule, entry in enumerate(ruler.patterns):
            for pattern in entry["patterns"]:
                if not pattern or not all(isinstance(spec, dict) for spec in pattern):
                    return None
                tests = [_token_test(spec) for spec in pattern]
                if any(t is None for t in tests):
                    return None
                k = len(rules)
                rules.append((rule, tests))  # type: ignore[arg-type]
                keys = _index_keys(pattern[0])
                for key in keys:
                    index[key].append(k)
                if not keys:
                    anywhere.append(k)
        return cls(ruler, rules, dict(index), anywhere)

    def matches(self, doc: Any) -> list[tuple[int, int, int]]:
        """``(rule, start, end)`` of every match, sorted as spaCy applies them (by rule, then position)."""
        out = set()
        n = len(doc)
        for s, tok in enumerate(doc):
            cands = [k for key in _keys_of(tok) for k in self._index.get(key, ())] + self._anywhere
            for k in cands:
                rule, tests = self._rules[k]
                e = s + len(tests)
                if e <= n and all(test(doc[s + j]) for j, test in enumerate(tests)):
                    out.add((rule, s, e))
        return sorted(out)

    def __call__(self, doc: Any) -> Any:
        for rule, s, e in self.matches(doc):
            self._set(doc[s:e][self._ruler.indices[rule]], self._ruler.attrs[rule])
        return doc
