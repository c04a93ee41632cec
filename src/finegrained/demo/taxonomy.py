"""The taxonomy of the synthetic demo species: orders, families, genera, species.

Species of one genus share body shape and plumage colours and differ only in one or two
small details drawn from a fixed visual vocabulary (:data:`FEATURES`): wing-bar colour, eye
ring, bill length, tail shape, crown colour. Two variants come from one code path:
``target`` (the demo's task) and ``source`` (other genera and species drawn from the same
vocabulary, with disjoint class ids and names, used to pretrain a backbone). Seeded: the
same arguments give the same tree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

VARIANTS = ("target", "source")
# Offsets of the class ids, so the two variants never share an id (0 = "Birds" is the common
# root). 4-digit class folders like NABirds hold ids up to 9999.
_ID_BASE = {"target": 0, "source": 1000}
_ID_SPAN = 999
# Entropy mixed into the seed, so target and source with the same seed still differ.
VARIANT_CODE = {"target": 0, "source": 1}
DEFAULTS = {
    "target": {"num_classes": 10, "train_per_class": 40, "test_per_class": 20},
    "source": {"num_classes": 20, "train_per_class": 40, "test_per_class": 10},
}
MAX_CLASSES = 300
SPECIES_PER_GENUS = 4

# --- visual vocabulary ----------------------------------------------------------------------
# The species-level details. Colours are RGB; None = the detail is absent.
FEATURES: dict[str, dict[str, object]] = {
    "wingbar": {"none": None, "white": (242, 240, 230), "yellow": (238, 204, 48),
                "rufous": (200, 90, 40)},
    "eyering": {"none": None, "white": (248, 248, 244), "yellow": (245, 212, 40),
                "red": (215, 45, 40)},
    "bill": {"short": 0.09, "medium": 0.17, "long": 0.28},      # length, body lengths
    "tail": {"forked": "forked", "rounded": "rounded", "pointed": "pointed",
             "square": "square"},
    "crown": {"none": None, "black": (30, 28, 32), "red": (205, 42, 44),
              "yellow": (238, 202, 46), "blue": (60, 105, 205)},
}
# Adjectives for species names, one per (feature, value); "" = not named.
_ADJECTIVES = {
    "wingbar": {"none": "Plain-winged", "white": "White-barred", "yellow": "Yellow-barred",
                "rufous": "Rufous-barred"},
    "eyering": {"none": "Bare-eyed", "white": "White-eyed", "yellow": "Yellow-eyed",
                "red": "Red-eyed"},
    "bill": {"short": "Short-billed", "medium": "Mid-billed", "long": "Long-billed"},
    "tail": {"forked": "Fork-tailed", "rounded": "Round-tailed", "pointed": "Sharp-tailed",
             "square": "Square-tailed"},
    "crown": {"none": "Plain-crowned", "black": "Black-capped", "red": "Red-capped",
              "yellow": "Yellow-capped", "blue": "Blue-capped"},
}
# Which genus colour a colour detail is drawn on: a detail close to it would be invisible.
_DRAWN_ON = {"wingbar": "wing", "eyering": "body", "crown": "body"}
_MIN_CONTRAST = 110.0     # RGB distance below which a detail is not offered to a genus

# Disjoint name pools per variant, so class names never overlap.
_NAMES = {
    "target": {
        "orders": ["Woodland Songbirds", "Marsh Songbirds", "Scrub Songbirds"],
        "families": ["Leafgleaners", "Seedcrackers", "Thicketbirds", "Reedlings",
                     "Canopy Warblers", "Bushchats"],
        "genera": ["Warbler", "Finch", "Vireo", "Sparrow", "Tanager", "Wren", "Bunting",
                   "Flycatcher", "Chickadee", "Kinglet", "Siskin", "Gnatcatcher"],
    },
    "source": {
        "orders": ["Field Songbirds", "Upland Songbirds", "Coastal Songbirds"],
        "families": ["Groundfeeders", "Larklets", "Shrikelets", "Meadowbirds",
                     "Stonechats", "Hedgebirds"],
        "genera": ["Thrush", "Pipit", "Lark", "Shrike", "Oriole", "Grosbeak", "Chat",
                   "Longspur", "Towhee", "Junco", "Bluebird", "Waxwing"],
    },
}
_BILL_COLOURS = [(40, 38, 36), (222, 170, 52), (205, 145, 122), (118, 118, 124)]
_LEG_COLOURS = [(62, 52, 46), (192, 142, 122), (110, 110, 116)]
_CREAM = np.array([236, 228, 206], float)

#: Degrees of genus posture; negative = head up (the drawing places any of them).
POSTURE_RANGE = (-28.0, -8.0)


# --- species design -------------------------------------------------------------------------
@dataclass(frozen=True)
class Genus:
    """Traits shared by every species of a genus: colours and body shape."""

    name: str
    body: tuple[int, int, int]
    belly: tuple[int, int, int]
    wing: tuple[int, int, int]
    bill_colour: tuple[int, int, int]
    legs: tuple[int, int, int]
    body_height: float        # half-height of the body ellipse, body lengths
    head_radius: float
    tail_length: float
    bill_depth: float         # bill base depth as a fraction of the head radius
    posture: float            # degrees; negative = head up


@dataclass(frozen=True)
class Species:
    """One leaf class: its genus traits plus one value for every detail in :data:`FEATURES`."""

    class_id: int
    name: str
    genus: Genus
    features: dict[str, str]
    varying: tuple[str, ...]   # details in which this genus's species differ


@dataclass(frozen=True)
class Taxonomy:
    """All class ids of one variant: ``names`` (id -> name), ``parents`` (child -> parent)."""

    names: dict[int, str]
    parents: dict[int, int]
    species: list[Species]
    lineage: dict[int, dict[str, int]]   # leaf id -> {"genus", "family", "order"} ids


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - math.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb) * 255


def rgb(a) -> tuple[int, int, int]:
    """An RGB triple of ints in 0..255."""
    return tuple(int(round(x)) for x in np.clip(a, 0, 255))


def _named(pool: list[str], i: int, form=lambda name: name) -> str:
    # Past the end of a pool, repeat it with a number: names stay unique.
    return form(pool[i % len(pool)]) + ("" if i < len(pool) else f" {i // len(pool) + 1}")


def _plural(name: str) -> str:
    if name.endswith(("ch", "sh", "s", "x")):
        return name + "es"
    return name + "s"


def _design_genus(rng: np.random.Generator, name: str) -> Genus:
    body = _hsv_to_rgb(rng.uniform(), rng.uniform(0.2, 0.7), rng.uniform(0.35, 0.8))
    belly = body + (_CREAM - body) * rng.uniform(0.4, 0.85)
    # Wings a darker, greyer version of the body, as in most small songbirds.
    wing = body * rng.uniform(0.5, 0.75) + rng.uniform(0, 30)
    return Genus(
        name=name, body=rgb(body), belly=rgb(belly), wing=rgb(wing),
        bill_colour=_BILL_COLOURS[rng.integers(len(_BILL_COLOURS))],
        legs=_LEG_COLOURS[rng.integers(len(_LEG_COLOURS))],
        body_height=float(rng.uniform(0.25, 0.33)), head_radius=float(rng.uniform(0.17, 0.21)),
        tail_length=float(rng.uniform(0.32, 0.46)), bill_depth=float(rng.uniform(0.3, 0.55)),
        posture=float(rng.uniform(*POSTURE_RANGE)))


def _visible_values(genus: Genus, feature: str) -> list[str]:
    """Values of ``feature`` that contrast with the genus colour they are drawn on."""
    values = list(FEATURES[feature])
    if feature not in _DRAWN_ON:
        return values
    ground = np.array(getattr(genus, _DRAWN_ON[feature]), float)
    return [v for v in values if FEATURES[feature][v] is None
            or np.linalg.norm(np.array(FEATURES[feature][v]) - ground) >= _MIN_CONTRAST]


def _design_species(rng: np.random.Generator, genus: Genus, count: int
                    ) -> list[tuple[dict[str, str], tuple[str, ...]]]:
    """``count`` distinct detail combinations that differ along one or two features (three
    only when two cannot separate ``count`` species), with the genus's values elsewhere."""
    options = {f: _visible_values(genus, f) for f in FEATURES}
    order = [str(f) for f in rng.permutation(list(FEATURES))]
    axes = order[:1] if count <= len(options[order[0]]) and rng.uniform() < 0.3 else order[:2]
    while math.prod(len(options[a]) for a in axes) < count:
        axes = order[:len(axes) + 1]
    base = {f: options[f][rng.integers(len(options[f]))] for f in FEATURES}
    combos = [()]
    for axis in axes:
        combos = [c + (v,) for c in combos for v in options[axis]]
    chosen = [combos[i] for i in sorted(rng.choice(len(combos), size=count, replace=False))]
    varying = tuple(a for k, a in enumerate(axes) if len({c[k] for c in chosen}) > 1)
    return [({**base, **dict(zip(axes, c))}, varying) for c in chosen]


def design_taxonomy(variant: str, num_classes: int, seed: int) -> Taxonomy:
    """The class tree of one variant: root 0 -> orders -> families -> genera -> species.

    Like NABirds, order ids come first and the other nodes get interleaved, non-contiguous
    ids; leaf labels are the species ids. Source ids are offset by 1000 from target ids.
    """
    check_variant(variant)
    if not 2 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must be in 2..{MAX_CLASSES}, got {num_classes}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, VARIANT_CODE[variant], 0]))
    pools = _NAMES[variant]
    n_genera = math.ceil(num_classes / SPECIES_PER_GENUS)
    n_families = math.ceil(n_genera / 2)
    n_orders = min(len(pools["orders"]), n_families)
    sizes = [num_classes // n_genera + (g < num_classes % n_genera) for g in range(n_genera)]

    # Nodes as (kind, name, parent node index); ids are assigned afterwards.
    nodes: list[tuple[str, str, int | None]] = []
    order_idx = [len(nodes) + i for i in range(n_orders)]
    nodes += [("order", _named(pools["orders"], i), None) for i in range(n_orders)]
    family_idx = []
    for f in range(n_families):
        family_idx.append(len(nodes))
        nodes.append(("family", _named(pools["families"], f), order_idx[f % n_orders]))
    species_defs = []
    for g in range(n_genera):
        genus = _design_genus(rng, _named(pools["genera"], g))
        genus_node = len(nodes)
        nodes.append(("genus", _named(pools["genera"], g, _plural), family_idx[g % n_families]))
        for features, varying in _design_species(rng, genus, sizes[g]):
            name = " ".join(_ADJECTIVES[a][features[a]] for a in varying) + f" {genus.name}"
            species_defs.append((len(nodes), genus, features, varying))
            nodes.append(("species", name.strip(), genus_node))

    # NABirds numbers orders 1..n and scatters the rest: mimic that with gaps.
    rest = [i for i in range(len(nodes)) if nodes[i][0] != "order"]
    span = min(2 * len(rest), _ID_SPAN - n_orders)
    rest_ids = np.sort(rng.choice(np.arange(n_orders + 1, n_orders + 1 + span), len(rest),
                                  replace=False))
    ids = {i: _ID_BASE[variant] + 1 + i for i in order_idx}
    for node, cid in zip(rng.permutation(rest), rest_ids):
        ids[int(node)] = _ID_BASE[variant] + int(cid)

    names = {0: "Birds"} | {ids[i]: nodes[i][1] for i in range(len(nodes))}
    parents = {ids[i]: (0 if p is None else ids[p]) for i, (_, _, p) in enumerate(nodes)}
    species, lineage = [], {}
    for node, genus, features, varying in species_defs:
        cid = ids[node]
        species.append(Species(cid, nodes[node][1], genus, features, varying))
        g = parents[cid]
        lineage[cid] = {"genus": g, "family": parents[g], "order": parents[parents[g]]}
    species.sort(key=lambda s: s.class_id)
    return Taxonomy(names=dict(sorted(names.items())), parents=dict(sorted(parents.items())),
                    species=species, lineage=lineage)


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
