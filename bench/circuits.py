"""Do a filter's strongest inputs speak of the same thing? For every labelled filter ``k`` of the explained layer,
its ``n`` strongest inputs (``ex.filters[k].inputs``: gradient × activation over its top images) are checked for a
part or colour word shared with filter ``k``'s label, against random filters of the same layers (same count).

Filter ``k``'s label is the one the bundle shows (``ex.shown_labels()``: the dissection stage); an input's label is
the ``layers`` stage's (``None`` below IoU 0.04 counts as sharing nothing, on both sides). Two rankings: the top
``n`` over every lower recorded layer, and the top ``n`` of the layer just below (where the exact linear
contribution is also checked against gradient × activation). The random side: one seeded draw (the printed
count), and ``--draws`` draws for the spread and a one-sided p-value.

    python bench/circuits.py [BUNDLE_DIR] [--n 5] [--draws 1000] [--seed 0]

The bundle is opened read-only (nothing is written to it).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

DEMO = "data/bundles/synthbirds-synthbirds-features-3a8d15e0be5c8184"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", nargs="?", default=DEMO)
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--draws", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import lavise_core
    from lavise_core.explain.dissection.circuits import layer_labels
    from lavise_core.explain.dissection.layers import COLOUR_WORDS

    ex = lavise_core.open(args.bundle)
    shown = ex.shown_labels()
    labels = layer_labels(ex.bundle)
    concepts = ex.bundle.read_json("layers/concepts")
    kinds = ex.bundle.read_json("layers/kinds")
    vocab = {c for c, kd in zip(concepts, kinds, strict=True) if kd == "part"} | set(COLOUR_WORDS)

    def words(label: str | None) -> set[str]:
        return set(label.split()) & vocab if label else set()

    ks = [k for k in range(ex.channels) if shown.confident[k] and words(shown.labels[k])]
    print(f"load average {os.getloadavg()[0]:.2f}; {args.bundle}")
    print(
        f"{len(ks)} of {ex.channels} filters of {ex.layer} labelled ({shown.where}); input labels: layers stage"
    )

    t = time.perf_counter()
    picks: dict[str, list[tuple[int, str, int]]] = {"all lower layers": [], "layer just below": []}
    gap = 0.0
    for k in ks:
        rows = ex.filters[k].inputs(n=10**9)  # every lower filter, ranked
        below = max({r.layer for r in rows}, key=list(labels).index)  # the nearest recorded layer
        picks["all lower layers"] += [(k, r.layer, r.filter) for r in rows[: args.n]]
        near = [r for r in rows if r.layer == below][: args.n]
        picks["layer just below"] += [(k, r.layer, r.filter) for r in near]
        gap = max([gap, *(abs(r.exact - r.contribution) for r in near if r.exact is not None)])
    secs = time.perf_counter() - t
    print(
        f"{secs:.1f} s for {len(ks)} filters ({secs / max(len(ks), 1):.2f} s each, one pass of its top images)"
    )
    print(f"layer just below: {below}; max |exact - gradient x activation| over its inputs shown: {gap:.2e}")

    rng = np.random.default_rng(args.seed)
    for name, rows in picks.items():
        share = [bool(words(shown.labels[k]) & words(labels[layer].label(j)[0])) for k, layer, j in rows]
        labelled = sum(labels[layer].label(j)[0] is not None for _, layer, j in rows)
        sizes = {layer: len(labels[layer].concepts) for _, layer, _ in rows}

        def draw(g: np.random.Generator, rows=rows, sizes=sizes) -> tuple[int, int]:
            hits = lab = 0
            for k, layer, _ in rows:
                lbl = labels[layer].label(int(g.integers(sizes[layer])))[0]
                lab += lbl is not None
                hits += bool(words(shown.labels[k]) & words(lbl))
            return hits, lab

        hits0, lab0 = draw(rng)
        spread = np.array([draw(rng)[0] for _ in range(args.draws)])
        m = len(rows)
        p = (1 + int((spread >= sum(share)).sum())) / (1 + args.draws)
        print(f"\n{name}: top {args.n} inputs of {len(ks)} filters = {m} inputs")
        print(f"  strongest inputs: {sum(share)} / {m} share a part or colour word ({sum(share) / m:.1%}); "
              f"{labelled} labelled")  # fmt: skip
        print(f"  among labelled inputs only: {sum(share)} / {labelled} ({sum(share) / max(labelled, 1):.1%}) against "
              f"random {hits0} / {lab0} ({hits0 / max(lab0, 1):.1%})")  # fmt: skip
        print(f"  random filters:   {hits0} / {m} ({hits0 / m:.1%}); {lab0} labelled  "
              f"[{args.draws} draws: mean {spread.mean() / m:.1%}, 95% {np.percentile(spread, 2.5) / m:.1%}-"
              f"{np.percentile(spread, 97.5) / m:.1%}; one-sided p = {p:.3g}]")  # fmt: skip


if __name__ == "__main__":
    main()
