"""Drawing one synthetic photo: a songbird of a given species in a random scene.

Rendering is split into :func:`sample_scene` (everything random about one photo: size, pose,
background, lighting; independent of the species) and :func:`render_image` (species + scene
-> pixels + true box), so two species can be drawn in the very same scene. The bird's
details cover a few percent of the bird, which itself covers a varying part of a cluttered,
randomly lit photo, so the task is learnable but not trivial.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from finegrained.demo.taxonomy import FEATURES, POSTURE_RANGE, Species, rgb

SUPERSAMPLE = 3           # draw at 3x and box-downsample: cheap anti-aliasing

# Extent of any bird in body lengths (bird frame, x forward, y down, before posture), for
# placement that does not depend on the species: the longest tail and bill fit inside.
_BIRD_EXTENT = np.array([[-1.02, -0.46], [0.98, -0.46], [0.98, 0.40], [-1.02, 0.40]])
_LEG_LENGTH = 0.17


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
    for posture in (POSTURE_RANGE[0], sum(POSTURE_RANGE) / 2, POSTURE_RANGE[1]):
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
    return rgb(np.asarray(colour, float) * factor)


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
    col = {k: rgb(np.array(getattr(g, k), float) * jc) for k in ("body", "belly", "wing")}
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
            paint.polygon(quad @ rot + [wx, wy], rgb(np.array(bar) * jc))

    hx, hy = 0.40, -0.19
    paint.polygon(_ellipse(hx, hy, head_r, head_r), col["body"])
    crown = FEATURES["crown"][f["crown"]]
    if crown is not None:
        cap = _ellipse(hx, hy, head_r * 1.01, head_r * 1.01,
                       t0=math.radians(210), t1=math.radians(330), n=20)
        paint.polygon(cap, rgb(np.array(crown) * jc))
    # Bill: a triangle from the front of the head; length is a species detail.
    bill_len = FEATURES["bill"][f["bill"]] * bill_s
    depth = g.bill_depth * head_r
    bx = hx + head_r * 0.8
    paint.polygon([[bx, hy - depth * 0.45], [bx + 0.04 + bill_len, hy + 0.15 * head_r],
                   [bx, hy + depth * 0.55]], g.bill_colour)
    ex, ey, er = hx + head_r * 0.38, hy - head_r * 0.12, head_r * 0.2
    ring = FEATURES["eyering"][f["eyering"]]
    if ring is not None:
        paint.polygon(_ellipse(ex, ey, er * 1.9, er * 1.9, n=24), rgb(np.array(ring) * jc))
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
        colour = rgb((top + bottom) / 2 * rng.uniform(0.5, 1.5) + rng.normal(0, 15, 3))
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
                  fill=rgb(np.array([95, 75, 55]) * rng.uniform(0.5, 1.3)),
                  width=int(rng.integers(2, 2 + w // 60)))
    for _ in range(rng.integers(0, 14)):     # leaves
        _leaf(draw, rng, rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.03, 0.09) * w)
    for _ in range(rng.integers(0, 6)):      # berries and flowers in detail-like colours
        x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.006, 0.015) * w
        colour = _SPOT_COLOURS[rng.integers(len(_SPOT_COLOURS))]
        draw.ellipse([x - r, y - r, x + r, y + r],
                     fill=rgb(np.array(colour) * rng.uniform(0.7, 1)))
    return image


def _leaf(draw: ImageDraw.ImageDraw, rng: np.random.Generator, x: float, y: float, size: float):
    colour = rgb(np.array([60, 120, 50]) * rng.uniform(0.5, 1.4) + rng.normal(0, 12, 3))
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
        brown = rgb(np.array([105, 80, 58]) * rng.uniform(0.6, 1.2))
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
