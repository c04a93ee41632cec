"""Synthetic fine-grained bird datasets in exact NABirds format, for the embedded demo.

The demo must run anywhere in minutes, without downloading photos, and still show what the
real pipeline shows: that a backbone pretrained on *other* birds transfers to a
fine-grained target task. So this module draws small songbirds procedurally and writes
them with the NABirds annotation files (UUID image ids, ``images/<4-digit class>/<uuid hex>.jpg``,
integer ``x y w h`` boxes, a class hierarchy with non-contiguous ids).

What makes it *fine-grained*: species of one genus share body shape and plumage colours
and differ only in one or two small details drawn from a fixed visual vocabulary
(:data:`FEATURES`): wing-bar colour, eye ring, bill length, tail shape, crown colour. Those
details cover a few percent of the bird, which itself covers a varying part of a cluttered,
randomly lit photo, so the task is learnable but not trivial.

Two variants come from one code path: ``target`` (the demo's task) and ``source`` (other
genera and species drawn from the same vocabulary, with disjoint class ids and names, used
to pretrain a backbone). Everything is seeded: the same arguments give byte-identical files.

Rendering is split into :func:`sample_scene` (everything random about one photo:
size, pose, background, lighting; independent of the species) and :func:`render_image`
(species + scene -> pixels + true box), so two species can be drawn in the very same scene.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

VARIANTS = ("target", "source")
# Offsets of the class ids, so the two variants never share an id (0 = "Birds" is the common
# root). 4-digit class folders like NABirds hold ids up to 9999.
_ID_BASE = {"target": 0, "source": 1000}
_ID_SPAN = 999
# Entropy mixed into the seed, so target and source with the same seed still differ.
_VARIANT_CODE = {"target": 0, "source": 1}
DEFAULTS = {
    "target": {"num_classes": 10, "train_per_class": 40, "test_per_class": 20},
    "source": {"num_classes": 20, "train_per_class": 40, "test_per_class": 10},
}
MAX_CLASSES = 300
SPECIES_PER_GENUS = 4
SUPERSAMPLE = 3           # draw at 3x and box-downsample: cheap anti-aliasing
JPEG_QUALITY = 90

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
_FIRST = ["Ada", "Ben", "Chloe", "Dario", "Elif", "Femi", "Greta", "Hiro", "Ines", "Jonas",
          "Kavya", "Luis", "Mara", "Nils", "Oona", "Pavel", "Quinn", "Rosa", "Sami", "Tove"]
_LAST = ["Alder", "Birch", "Crane", "Dunlin", "Egret", "Fernsby", "Gull", "Heron", "Ibis",
         "Jay", "Kestrel", "Linnet", "Merlin", "Nightly", "Osprey", "Plover", "Rook", "Swift"]
_BILL_COLOURS = [(40, 38, 36), (222, 170, 52), (205, 145, 122), (118, 118, 124)]
_LEG_COLOURS = [(62, 52, 46), (192, 142, 122), (110, 110, 116)]
_CREAM = np.array([236, 228, 206], float)

# Extent of any bird in body lengths (bird frame, x forward, y down, before posture), for
# placement that does not depend on the species: the longest tail and bill fit inside.
_BIRD_EXTENT = np.array([[-1.02, -0.46], [0.98, -0.46], [0.98, 0.40], [-1.02, 0.40]])
_LEG_LENGTH = 0.17
_POSTURE_RANGE = (-28.0, -8.0)   # degrees of genus posture; negative = head up


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


def _rgb(a) -> tuple[int, int, int]:
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
        name=name, body=_rgb(body), belly=_rgb(belly), wing=_rgb(wing),
        bill_colour=_BILL_COLOURS[rng.integers(len(_BILL_COLOURS))],
        legs=_LEG_COLOURS[rng.integers(len(_LEG_COLOURS))],
        body_height=float(rng.uniform(0.25, 0.33)), head_radius=float(rng.uniform(0.17, 0.21)),
        tail_length=float(rng.uniform(0.32, 0.46)), bill_depth=float(rng.uniform(0.3, 0.55)),
        posture=float(rng.uniform(*_POSTURE_RANGE)))


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
    _check_variant(variant)
    if not 2 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must be in 2..{MAX_CLASSES}, got {num_classes}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, _VARIANT_CODE[variant], 0]))
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


# --- one photo ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scene:
    """Everything random about one photo except the species, so species can share a scene."""

    width: int
    height: int
    length: float             # body length in output pixels
    center: tuple[float, float]
    rotation: float           # degrees, on top of the genus posture
    mirror: bool              # True = bird faces left
    posture_jitter: float
    colour_jitter: tuple[float, float, float]
    shape_jitter: tuple[float, float, float, float]  # body height, head, tail, bill scales
    perch: bool
    perch_slope: float
    background_seed: int
    occluders: int
    brightness: float
    cast: tuple[float, float, float]
    light_gradient: tuple[float, float]
    noise: float


def sample_scene(rng: np.random.Generator, min_side: int, max_side: int) -> Scene:
    """Draw size, pose, placement, background seed and lighting of one photo."""
    width, height = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
    rotation = float(rng.uniform(-15, 15))
    mirror = bool(rng.uniform() < 0.5)
    posture_jitter = float(rng.uniform(-6, 6))
    # Scale so the extent of any genus's posture fits, then place it anywhere inside; the
    # placement must not depend on the species, so that species can share a scene.
    corners, hips = [], []
    for posture in (_POSTURE_RANGE[0], sum(_POSTURE_RANGE) / 2, _POSTURE_RANGE[1]):
        args = ((0.0, 0.0), 1.0, posture + posture_jitter, rotation, mirror)
        corners.append(_transform(_BIRD_EXTENT, *args))
        hips.append(_transform([[0.02, 0.3], [0.12, 0.3]], *args))
    corners = np.concatenate(corners)
    lo, hi = corners.min(0), corners.max(0)
    hi[1] = max(hi[1], np.concatenate(hips)[:, 1].max() + _LEG_LENGTH + 0.03)  # legs hang down
    fit = min((width - 4) / (hi[0] - lo[0]), (height - 4) / (hi[1] - lo[1]))
    length = float(fit * rng.uniform(0.6, 1.0))
    cx = rng.uniform(2 - lo[0] * length, width - 2 - hi[0] * length)
    cy = rng.uniform(2 - lo[1] * length, height - 2 - hi[1] * length)
    return Scene(
        width=width, height=height, length=length, center=(float(cx), float(cy)),
        rotation=rotation, mirror=mirror, posture_jitter=posture_jitter,
        colour_jitter=tuple(float(v) for v in rng.uniform(0.92, 1.08, 3)),
        shape_jitter=tuple(float(v) for v in rng.uniform(0.92, 1.08, 4)),
        perch=bool(rng.uniform() < 0.8), perch_slope=float(rng.uniform(-0.25, 0.25)),
        background_seed=int(rng.integers(2**32)),
        occluders=int(rng.choice(4, p=[.7, .15, .1, .05])),
        brightness=float(rng.uniform(0.7, 1.2)),
        cast=tuple(float(v) for v in rng.uniform(0.9, 1.1, 3)),
        light_gradient=tuple(float(v) for v in rng.uniform(-0.25, 0.25, 2)),
        noise=float(rng.uniform(1.0, 5.0)))


def _transform(points, center, scale, posture, rotation, mirror) -> np.ndarray:
    """Bird frame (body lengths, x forward, y down) -> image pixels."""
    pts = np.asarray(points, float)
    a = math.radians(posture)
    pts = pts @ np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
    if mirror:
        pts = pts * np.array([-1.0, 1.0])
    b = math.radians(rotation)
    pts = pts @ np.array([[math.cos(b), math.sin(b)], [-math.sin(b), math.cos(b)]])
    return pts * scale + np.asarray(center)


def _ellipse(cx, cy, rx, ry, angle=0.0, t0=0.0, t1=2 * math.pi, n=40) -> np.ndarray:
    t = np.linspace(t0, t1, n)
    a = math.radians(angle)
    x, y = rx * np.cos(t), ry * np.sin(t)
    return np.stack([cx + x * math.cos(a) - y * math.sin(a),
                     cy + x * math.sin(a) + y * math.cos(a)], 1)


def _shade(colour, factor) -> tuple[int, int, int]:
    return _rgb(np.asarray(colour, float) * factor)


class _Painter:
    """Draws bird-frame polygons onto the supersampled photo and the bird's silhouette mask."""

    def __init__(self, image: Image.Image, mask: Image.Image, scene: Scene, posture: float):
        self.draw, self.mask = ImageDraw.Draw(image), ImageDraw.Draw(mask)
        self.scene, self.posture = scene, posture

    def to_image(self, pts) -> np.ndarray:
        s = self.scene
        return _transform(pts, s.center, s.length, self.posture, s.rotation, s.mirror) * SUPERSAMPLE

    def polygon(self, pts, colour):
        # Every part goes into the mask, so the box is the exact extent of what was drawn.
        xy = [tuple(p) for p in self.to_image(pts)]
        self.draw.polygon(xy, fill=colour)
        self.mask.polygon(xy, fill=255)

    def line(self, xy, colour, width):
        xy = [tuple(p) for p in xy]
        self.draw.line(xy, fill=colour, width=max(1, int(round(width))))
        self.mask.line(xy, fill=255, width=max(1, int(round(width))))


def _tail_polygon(shape: str, length: float) -> np.ndarray:
    x0, x1 = -0.40, -0.40 - length
    if shape == "pointed":
        return np.array([[x0, -0.07], [x0 + 0.6 * (x1 - x0), -0.04], [x1, 0.06],
                         [x0 + 0.6 * (x1 - x0), 0.11], [x0, 0.10]])
    if shape == "rounded":
        arc = _ellipse(x1 + 0.09, 0.03, 0.12, 0.13, t0=math.pi / 2, t1=3 * math.pi / 2, n=14)
        return np.concatenate([[[x0, 0.10]], arc[::-1][::-1], [[x0, -0.07]]])
    if shape == "forked":
        return np.array([[x0, -0.07], [x1, -0.10], [x0 + 0.62 * (x1 - x0), 0.03],
                         [x1, 0.16], [x0, 0.10]])
    return np.array([[x0, -0.07], [x1, -0.09], [x1, 0.15], [x0, 0.10]])   # square


def _legs(paint: _Painter, body_h: float) -> tuple[np.ndarray, np.ndarray]:
    """Supersampled image positions of hips and feet: legs hang straight down in the image."""
    hips = paint.to_image([[0.02, body_h * 0.8], [0.12, body_h * 0.75]])
    return hips, hips + np.array([0.0, _LEG_LENGTH * paint.scene.length * SUPERSAMPLE])


def _posture(species: Species, scene: Scene) -> float:
    return species.genus.posture + scene.posture_jitter


def _draw_bird(image: Image.Image, mask: Image.Image, sp: Species, scene: Scene
               ) -> np.ndarray:
    """Draw the bird onto the supersampled ``image`` and its silhouette onto ``mask``."""
    g, f = sp.genus, sp.features
    jc = np.array(scene.colour_jitter)
    col = {k: _rgb(np.array(getattr(g, k), float) * jc) for k in ("body", "belly", "wing")}
    bh, head_s, tail_s, bill_s = scene.shape_jitter
    body_h, head_r = g.body_height * bh, g.head_radius * head_s
    paint = _Painter(image, mask, scene, _posture(sp, scene))
    px = scene.length * SUPERSAMPLE   # pixels per body length on the canvas

    # Legs hang straight down in the image whatever the posture; drawn first, under the body.
    hips, feet = _legs(paint, body_h)
    forward = -1.0 if scene.mirror else 1.0
    for hip, foot in zip(hips, feet):
        paint.line([hip, foot], g.legs, 0.025 * px)
        paint.line([foot - [0.03 * px * forward, 0], foot + [0.07 * px * forward, 0]],
                   g.legs, 0.02 * px)

    paint.polygon(_tail_polygon(FEATURES["tail"][f["tail"]], g.tail_length * tail_s),
                  _shade(col["wing"], 0.9))
    paint.polygon(_ellipse(0, 0, 0.5, body_h), col["body"])
    paint.polygon(_ellipse(0.03, 0.04, 0.45, body_h * 0.82, t0=0, t1=math.pi, n=24),
                  col["belly"])
    # Wing: covert ellipse plus a pointed primary tip reaching back over the tail.
    wx, wy, wa = -0.07, -0.03, 8.0
    paint.polygon(_ellipse(wx - 0.24, wy + 0.03, 0.2, 0.07, angle=wa), _shade(col["wing"], 0.8))
    paint.polygon(_ellipse(wx, wy, 0.3, 0.12, angle=wa), col["wing"])
    # Darker feather edges: generic texture shared by all species, not a class cue.
    for u in (-0.16, -0.22):
        paint.polygon(_ellipse(wx + u, wy + 0.04, 0.1, 0.012, angle=wa + 6),
                      _shade(col["wing"], 0.65))
    bar = FEATURES["wingbar"][f["wingbar"]]
    if bar is not None:
        for u in (0.06, -0.05):
            quad = np.array([[u - 0.02, -0.085], [u + 0.02, -0.085], [u - 0.005, 0.105],
                             [u - 0.045, 0.105]])
            a = math.radians(wa)
            rot = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
            paint.polygon(quad @ rot + [wx, wy], _rgb(np.array(bar) * jc))

    hx, hy = 0.40, -0.19
    paint.polygon(_ellipse(hx, hy, head_r, head_r), col["body"])
    crown = FEATURES["crown"][f["crown"]]
    if crown is not None:
        cap = _ellipse(hx, hy, head_r * 1.01, head_r * 1.01,
                       t0=math.radians(210), t1=math.radians(330), n=20)
        paint.polygon(cap, _rgb(np.array(crown) * jc))
    # Bill: a triangle from the front of the head; length is a species detail.
    bill_len = FEATURES["bill"][f["bill"]] * bill_s
    depth = g.bill_depth * head_r
    bx = hx + head_r * 0.8
    paint.polygon([[bx, hy - depth * 0.45], [bx + 0.04 + bill_len, hy + 0.15 * head_r],
                   [bx, hy + depth * 0.55]], g.bill_colour)
    ex, ey, er = hx + head_r * 0.38, hy - head_r * 0.12, head_r * 0.2
    ring = FEATURES["eyering"][f["eyering"]]
    if ring is not None:
        paint.polygon(_ellipse(ex, ey, er * 1.9, er * 1.9, n=24), _rgb(np.array(ring) * jc))
    paint.polygon(_ellipse(ex, ey, er, er, n=20), (18, 16, 16))


_HABITATS = {    # (top, bottom) base colours of the background gradient
    "foliage": ((70, 110, 60), (40, 70, 35)),
    "sky": ((170, 200, 225), (120, 150, 120)),
    "reeds": ((170, 160, 110), (95, 100, 60)),
    "earth": ((140, 120, 95), (85, 70, 55)),
    "shade": ((60, 65, 70), (30, 40, 30)),
}
_SPOT_COLOURS = [(210, 50, 40), (235, 205, 50), (240, 240, 235), (70, 110, 210)]


def _background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Blurred gradient + noise + out-of-focus blobs, then sharp leaves, twigs and berries."""
    top, bottom = (np.array(c, float) + rng.normal(0, 18, 3)
                   for c in _HABITATS[list(_HABITATS)[rng.integers(len(_HABITATS))]])
    gh, gw = max(3, h // 48), max(3, w // 48)
    t = np.linspace(0, 1, gh)[:, None, None]
    low = top * (1 - t) + bottom * t + rng.normal(0, rng.uniform(8, 30), (gh, gw, 3))
    # Blobs drawn at a coarse resolution and upsampled are out of focus, like a real backdrop.
    blur = int(rng.integers(3, 9)) * SUPERSAMPLE
    mid = Image.fromarray(_u8(low)).resize((max(4, w // blur), max(4, h // blur)),
                                           Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(mid)
    mw, mh = mid.size
    for _ in range(rng.integers(2, 9)):      # bokeh blobs and blurry stems
        cx, cy, r = rng.uniform(0, mw), rng.uniform(0, mh), rng.uniform(0.05, 0.3) * mw
        colour = _rgb((top + bottom) / 2 * rng.uniform(0.5, 1.5) + rng.normal(0, 15, 3))
        if rng.uniform() < 0.6:
            draw.ellipse([cx - r, cy - r * rng.uniform(0.5, 1.5), cx + r, cy + r], fill=colour)
        else:
            draw.line([(cx, cy), (cx + rng.normal(0, mw / 2), cy + rng.normal(0, mh / 2))],
                      fill=colour, width=max(1, int(r / 4)))
    # A small blur first, or the coarse pixels would show as steps on the blob edges.
    image = mid.filter(ImageFilter.GaussianBlur(1.0)).resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(0, 5)):      # twigs
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        draw.line([(x, y), (x + rng.normal(0, w / 3), y + rng.normal(0, h / 3))],
                  fill=_rgb(np.array([95, 75, 55]) * rng.uniform(0.5, 1.3)),
                  width=int(rng.integers(2, 2 + w // 60)))
    for _ in range(rng.integers(0, 14)):     # leaves
        _leaf(draw, rng, rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.03, 0.09) * w)
    for _ in range(rng.integers(0, 6)):      # berries and flowers in detail-like colours
        x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.006, 0.015) * w
        colour = _SPOT_COLOURS[rng.integers(len(_SPOT_COLOURS))]
        draw.ellipse([x - r, y - r, x + r, y + r],
                     fill=_rgb(np.array(colour) * rng.uniform(0.7, 1)))
    return image


def _leaf(draw: ImageDraw.ImageDraw, rng: np.random.Generator, x: float, y: float, size: float):
    colour = _rgb(np.array([60, 120, 50]) * rng.uniform(0.5, 1.4) + rng.normal(0, 12, 3))
    pts = _ellipse(x, y, size, size * rng.uniform(0.25, 0.45), angle=rng.uniform(0, 180), n=16)
    draw.polygon([tuple(p) for p in pts], fill=colour)


def _u8(a: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def render_image(species: Species, scene: Scene, *, draw_bird: bool = True
                 ) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Pixels (H, W, 3 uint8) of ``species`` in ``scene`` and the bird's true box ``(x, y, w, h)``.

    With ``draw_bird=False`` the same photo is drawn without the bird (the box is still the
    one the bird would have), which tests use to check that the box holds the bird.
    """
    w, h = scene.width * SUPERSAMPLE, scene.height * SUPERSAMPLE
    rng = np.random.default_rng(scene.background_seed)
    image = _background(rng, w, h)
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(image)
    if scene.perch:
        # A branch whose top edge passes under the feet; drawn before the bird so the toes
        # stay visible and the box is exactly what one sees.
        body_h = species.genus.body_height * scene.shape_jitter[0]
        _, feet = _legs(_Painter(image, mask, scene, _posture(species, scene)), body_h)
        thick = 0.06 * scene.length * SUPERSAMPLE
        y0 = feet[:, 1].mean() + thick * 0.4
        x_mid = feet[:, 0].mean()
        brown = _rgb(np.array([105, 80, 58]) * rng.uniform(0.6, 1.2))
        draw.line([(0, y0 - x_mid * scene.perch_slope), (w, y0 + (w - x_mid) * scene.perch_slope)],
                  fill=brown, width=max(2, int(thick)))
    # Without the bird, draw it on a scratch canvas anyway: the mask still gives its box.
    _draw_bird(image if draw_bird else Image.new("RGB", (w, h)), mask, species, scene)
    # Foreground leaves partly hiding the bird, placed from the scene (not the species).
    px, (cx, cy) = scene.length * SUPERSAMPLE, scene.center
    for _ in range(scene.occluders):
        _leaf(draw, rng, (cx + rng.uniform(-0.6, 0.6) * scene.length) * SUPERSAMPLE,
              (cy + rng.uniform(-0.35, 0.35) * scene.length) * SUPERSAMPLE,
              rng.uniform(0.1, 0.22) * px)

    small = np.asarray(image.reduce(SUPERSAMPLE), float)
    box = _bbox_xyxy(mask.reduce(SUPERSAMPLE))
    yy, xx = np.mgrid[0:scene.height, 0:scene.width]
    gx, gy = scene.light_gradient
    light = scene.brightness * (1 + gx * (xx / scene.width - 0.5) + gy * (yy / scene.height - 0.5))
    small = small * light[..., None] * np.array(scene.cast)
    small += rng.normal(0, scene.noise, small.shape)
    x0, y0, x1, y1 = box
    return _u8(small), (x0, y0, x1 - x0, y1 - y0)


def _bbox_xyxy(mask: Image.Image) -> tuple[int, int, int, int]:
    box = mask.getbbox()      # any coverage at all: the true extent of the bird
    if box is None:
        raise RuntimeError("the bird fell outside the image")  # placement prevents this
    return box


# --- the dataset ----------------------------------------------------------------------------
def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def _photographers(seed: int, variant: str) -> list[str]:
    rng = np.random.default_rng(np.random.SeedSequence([seed, _VARIANT_CODE[variant], 2]))
    pairs = rng.choice(len(_FIRST) * len(_LAST), size=24, replace=False)
    return [f"{_FIRST[p // len(_LAST)]} {_LAST[p % len(_LAST)]}" for p in pairs]


def _hex(c) -> str:
    return "#%02x%02x%02x" % tuple(c)


def _species_json(tax: Taxonomy, variant: str, seed: int) -> dict:
    genus_fields = ("body", "belly", "wing", "bill_colour", "legs")
    return {
        "variant": variant, "seed": seed,
        "feature_values": {f: list(v) for f, v in FEATURES.items()},
        "species": [{
            "class_id": s.class_id, "name": s.name,
            "genus": tax.names[tax.lineage[s.class_id]["genus"]],
            "family": tax.names[tax.lineage[s.class_id]["family"]],
            "order": tax.names[tax.lineage[s.class_id]["order"]],
            "lineage_ids": tax.lineage[s.class_id],
            "features": s.features, "distinguishing": list(s.varying),
            "genus_colours": {k: _hex(getattr(s.genus, k)) for k in genus_fields},
        } for s in tax.species],
    }


_README = """\
SYNTHETIC demo dataset ({variant}) -- not real birds.

Made by finegrained.data.demo.generate_demo_dataset(variant={variant!r}, num_classes={num_classes},
train_per_class={train_per_class}, test_per_class={test_per_class}, min_side={min_side},
max_side={max_side}, seed={seed}). The same arguments give byte-identical files.

Layout and file formats are exactly those of NABirds: images.txt, image_class_labels.txt,
train_test_split.txt (1 = train), bounding_boxes.txt (integer x y w h), sizes.txt (w h),
classes.txt, hierarchy.txt (child parent), photographers.txt (fictional names), and JPEG
photos under images/<4-digit class id>/<image uuid without dashes>.jpg.

Each photo is a procedurally drawn songbird on a random background (blurred gradient, blobs,
leaves, twigs, berries), with random size ({min_side}..{max_side} px per side), scale,
position, mirror, rotation, lighting and noise; the box is the exact extent of the drawn bird.
Taxonomy: 0 Birds -> orders -> families -> genera -> species; only species label images.
Species of one genus share colours and shape and differ only in one or two details: wing-bar
colour, eye ring, bill length, tail shape or crown colour. species.json lists every species'
details ("distinguishing" = the details that separate it from its congeners).
{num_images} images: {num_train} train, {num_test} test, {num_classes} species.
"""


def generate_demo_dataset(out_dir: str | os.PathLike, *, variant: str = "target",
                          num_classes: int | None = None, train_per_class: int | None = None,
                          test_per_class: int | None = None, min_side: int = 96,
                          max_side: int = 192, seed: int = 0) -> dict:
    """Write a synthetic NABirds-format dataset to ``out_dir``; return a summary dict.

    ``None`` counts take the variant's defaults (:data:`DEFAULTS`). The dataset is built in a
    temporary folder beside ``out_dir`` and renamed into place at the end, replacing any
    previous ``out_dir``, so a failure never leaves a partial dataset.
    """
    _check_variant(variant)
    args = {"num_classes": num_classes, "train_per_class": train_per_class,
            "test_per_class": test_per_class}
    args = {k: DEFAULTS[variant][k] if v is None else int(v) for k, v in args.items()}
    if args["train_per_class"] < 1 or args["test_per_class"] < 0:
        raise ValueError(f"need train_per_class >= 1 and test_per_class >= 0, got {args}")
    if not 32 <= min_side <= max_side:
        raise ValueError(f"need 32 <= min_side <= max_side, got {min_side}, {max_side}")
    start = time.perf_counter()
    tax = design_taxonomy(variant, args["num_classes"], seed)
    photographers = _photographers(seed, variant)

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        rows = []
        per_class = args["train_per_class"] + args["test_per_class"]
        for sp in tax.species:
            folder = tmp / "images" / f"{sp.class_id:04d}"
            folder.mkdir(parents=True)
            for k in range(per_class):
                # One seed per (class, index): a photo does not change when counts change.
                rng = np.random.default_rng(np.random.SeedSequence(
                    [seed, _VARIANT_CODE[variant], 1, sp.class_id, k]))
                image_id = uuid.UUID(bytes=rng.bytes(16), version=4)
                photographer = photographers[rng.integers(len(photographers))]
                scene = sample_scene(rng, min_side, max_side)
                pixels, box = render_image(sp, scene)
                Image.fromarray(pixels).save(folder / f"{image_id.hex}.jpg", quality=JPEG_QUALITY,
                                             subsampling=0)
                rows.append((str(image_id), sp.class_id, int(k < args["train_per_class"]), box,
                             (scene.width, scene.height), photographer))
        rows.sort()     # NABirds lists images in UUID order
        _write_annotations(tmp, rows, tax)
        species_info = _species_json(tax, variant, seed)
        (tmp / "species.json").write_text(json.dumps(species_info, indent=2) + "\n")
        summary = {
            "variant": variant, "seed": seed, "min_side": min_side, "max_side": max_side, **args,
            "num_images": len(rows), "num_train": sum(r[2] for r in rows),
            "num_test": sum(1 - r[2] for r in rows),
            "leaf_class_ids": [s.class_id for s in tax.species],
            "num_class_ids": len(tax.names),
        }
        (tmp / "README.txt").write_text(_README.format(**summary))
        os.chmod(tmp, 0o755)    # mkdtemp makes it private; a dataset should be readable
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary["out_dir"] = str(out_dir)
    summary["seconds"] = round(time.perf_counter() - start, 3)
    return summary


def _write_annotations(root: Path, rows: list, tax: Taxonomy) -> None:
    def write(name, lines):
        (root / name).write_text("".join(line + "\n" for line in lines))

    write("images.txt", (f"{i} {c:04d}/{i.replace('-', '')}.jpg" for i, c, *_ in rows))
    write("image_class_labels.txt", (f"{i} {c}" for i, c, *_ in rows))
    write("train_test_split.txt", (f"{i} {t}" for i, _, t, *_ in rows))
    write("bounding_boxes.txt", (f"{r[0]} {' '.join(map(str, r[3]))}" for r in rows))
    write("sizes.txt", (f"{r[0]} {r[4][0]} {r[4][1]}" for r in rows))
    write("photographers.txt", (f"{r[0]} {r[5]}" for r in rows))
    write("classes.txt", (f"{c} {n}" for c, n in tax.names.items()))
    write("hierarchy.txt", (f"{c} {p}" for c, p in tax.parents.items()))


def _replace_dir(new: Path, dest: Path) -> None:
    """Move ``new`` to ``dest``; an old ``dest`` is moved aside first and deleted after."""
    old = None
    if dest.exists() or dest.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
        os.replace(dest, old / dest.name)
    os.replace(new, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
