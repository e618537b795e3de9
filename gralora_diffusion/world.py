"""A procedural image world where learning is visible on a CPU: coloured shapes on plain backgrounds, with captions.

Every image is a pure function of (seed, index): no files, the same pictures on every machine. The training world
has 5 shapes x 8 colours on varied backgrounds, sizes, positions and slight tilts; the held-out *subject* (a teal
crescent moon, never drawn for the base model) is what DreamBooth runs teach with the trigger prompt
"a photo of sks shape".
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
# Shapes of the training world: five outlines that stay distinct when a small model draws them roughly.
SHAPES = ("circle", "square", "triangle", "star", "heart")
# Shapes the evaluator tells apart: the world's, three near misses (a cross is a thin star, a ring a hollow circle, a
# diamond a squeezed square) that the base must not drift into, and the held-out subject's moon.
JUDGED_SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "heart", "diamond", "moon")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "orange": (245, 140, 30),
    "purple": (140, 50, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
BACKGROUNDS = {**COLORS, "gray": (128, 128, 128)}
SUBJECT_SHAPE = "moon"
SUBJECT_COLOR = ("teal", (0, 150, 150))
SUBJECT_PROMPT = "a photo of sks shape"
ALL_SHAPES = JUDGED_SHAPES
ALL_COLORS = {**COLORS, SUBJECT_COLOR[0]: SUBJECT_COLOR[1]}
# The style adapter's look, never drawn for the base: a background of horizontal stripes, STRIPE_PERIOD pixels from
# one dark band to the next, the dark bands the background's colour darkened by STRIPE_DARKENING (``render(stripes=
# True)``); images in it are captioned "<world caption> in zwx style".
STRIPE_PERIOD = 16
STRIPE_DARKENING = 0.3
STYLE_WORDS = "in zwx style"
# stripe_strength above this many pixel levels: the style is present (striped instances score 24-47, the world's
# plain images about 0).
STRIPES_PRESENT = 10.0
STYLE_SHAPES = ("circle", "square", "triangle", "star", "heart", "circle")
STYLE_COLORS = ("red", "green", "purple", "orange", "blue", "yellow")
STYLE_BACKGROUNDS = ("white", "gray", "white", "yellow", "white", "gray")
# Share of the VAE's training images that show a world shape in random RGB colours (see ``codec_example``).
CODEC_RANDOM_SHARE = 0.25
# Training-world shapes stand upright within this many radians (a star points up, a heart sits on its tip), so a
# shape's name means one outline up to size, place and a slight tilt; the evaluator is trained on every angle.
WORLD_TILT = math.pi / 12


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    background: str
    size: float  # radius in pixels
    center: tuple[float, float]
    rotation: float  # radians

    @property
    def caption(self) -> str:
        article = "an" if self.color[0] in "aeiou" else "a"
        return f"{article} {self.color} {self.shape} on a {self.background} background"


def _polygon(points, center, radius, rotation):
    cx, cy = center
    out = []
    for x, y in points:
        xr = x * math.cos(rotation) - y * math.sin(rotation)
        yr = x * math.sin(rotation) + y * math.cos(rotation)
        out.append((cx + xr * radius, cy + yr * radius))
    return out


def _unit_shape(shape: str) -> list[tuple[float, float]] | None:
    """Outline of a shape of radius 1 around the origin (None for shapes drawn with ellipses)."""
    if shape == "square":
        return [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    if shape == "triangle":
        return [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "diamond":
        return [(0, -1), (0.65, 0), (0, 1), (-0.65, 0)]
    if shape == "star":
        return [
            ((1.0 if i % 2 == 0 else 0.42) * math.cos(-math.pi / 2 + i * math.pi / 5),
             (1.0 if i % 2 == 0 else 0.42) * math.sin(-math.pi / 2 + i * math.pi / 5))
            for i in range(10)
        ]  # fmt: skip
    if shape == "cross":
        a, b = 0.3, 1.0
        return [
            (-a, -b),
            (a, -b),
            (a, -a),
            (b, -a),
            (b, a),
            (a, a),
            (a, b),
            (-a, b),
            (-a, a),
            (-b, a),
            (-b, -a),
            (-a, -a),
        ]
    if shape == "heart":
        points = []
        for i in range(48):
            t = i * 2 * math.pi / 48
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            points.append((16 * math.sin(t) ** 3 / 17, -y / 17))
        return points
    return None


def render(
    scene: Scene,
    image_size: int = IMAGE_SIZE,
    supersample: int = 4,
    fill: tuple[int, int, int] | None = None,
    background: tuple[int, int, int] | None = None,
    stripes: bool = False,
) -> Image.Image:
    """Draw ``scene`` antialiased (drawn at ``supersample`` x the size, then reduced); ``fill`` and ``background``
    (RGB) override the named colours; ``stripes`` draws the background in the style adapter's horizontal stripes
    (see ``style_example``)."""
    big = image_size * supersample
    s = supersample
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy = scene.center[0] * s, scene.center[1] * s
    r = scene.size * s
    if scene.shape in ("circle", "ring", "moon"):
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        if scene.shape == "ring":
            inner = 0.55 * r
            draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
        elif scene.shape == "moon":
            dx, dy = 0.45 * r * math.cos(scene.rotation), 0.45 * r * math.sin(scene.rotation)
            cut = 0.85 * r
            draw.ellipse((cx + dx - cut, cy + dy - cut, cx + dx + cut, cy + dy + cut), fill=0)
    else:
        draw.polygon(_polygon(_unit_shape(scene.shape), (cx, cy), r, scene.rotation), fill=255)
    background = background or BACKGROUNDS[scene.background]
    image = Image.new("RGB", (big, big), background)
    if stripes:
        dark = tuple(round(c * (1 - STRIPE_DARKENING)) for c in background)
        band = STRIPE_PERIOD // 2 * s
        stripe_draw = ImageDraw.Draw(image)
        for top in range(band, big, 2 * band):
            stripe_draw.rectangle((0, top, big - 1, top + band - 1), fill=dark)
    image.paste(fill or ALL_COLORS[scene.color], mask=mask)
    return image.resize((image_size, image_size), Image.LANCZOS)


def sample_scene(
    rng: random.Random, shape: str | None = None, color: str | None = None, tilt: float | None = None
) -> Scene:
    """A random scene (shape and colour may be fixed); the background always differs from the shape's colour.

    ``tilt=None`` turns the shape to any angle; a number keeps it upright within +-``tilt`` radians.
    """
    shape = shape or rng.choice(SHAPES)
    color = color or rng.choice(list(COLORS))
    background = rng.choice([b for b in ("white", "black", "gray", "blue", "yellow") if b != color])
    size = rng.uniform(11, 20)
    margin = size + 2
    center = (rng.uniform(margin, IMAGE_SIZE - margin), rng.uniform(margin, IMAGE_SIZE - margin))
    rotation = rng.uniform(0, 2 * math.pi) if tilt is None else rng.uniform(-tilt, tilt)
    return Scene(shape, color, background, size, center, rotation)


def seen_prompts() -> list[str]:
    """The caption of each training-world shape x colour, on white (a white shape on black)."""
    return [Scene(shape, color, "black" if color == "white" else "white", 15, (32, 32), 0).caption
            for shape in SHAPES for color in COLORS]  # fmt: skip


def world_example(seed: int, index: int) -> tuple[Image.Image, Scene]:
    """Image ``index`` of the training world for ``seed`` (deterministic): shapes upright within +-15 degrees."""
    scene = sample_scene(random.Random(f"world:{seed}:{index}"), tilt=WORLD_TILT)
    return render(scene), scene


def codec_example(
    seed: int, index: int, random_share: float = CODEC_RANDOM_SHARE
) -> tuple[Image.Image, tuple[int, int, int]]:
    """An image for training the VAE (returned with its background RGB): world images, and (a ``random_share`` of
    them) world shapes at any angle in random RGB colours on random RGB backgrounds, so that the VAE, like a real one,
    reproduces colours the captions never name (the held-out subject's teal among them) instead of snapping them to
    the palette."""
    rng = random.Random(f"codec:{seed}:{index}")
    if rng.random() >= random_share:
        image, scene = world_example(seed, index)
        return image, BACKGROUNDS[scene.background]
    scene = sample_scene(rng)
    fill = tuple(rng.randrange(256) for _ in range(3))
    background = fill
    while sum(abs(a - b) for a, b in zip(fill, background)) < 120:
        background = tuple(rng.randrange(256) for _ in range(3))
    return render(scene, fill=fill, background=background), background


def subject_example(index: int) -> tuple[Image.Image, Scene]:
    """Instance ``index`` of the held-out subject: a teal crescent moon, mostly on white, in varied poses."""
    rng = random.Random(f"subject:{index}")
    scene = sample_scene(rng, shape=SUBJECT_SHAPE, color="white")
    scene = Scene(SUBJECT_SHAPE, SUBJECT_COLOR[0], "white", scene.size, scene.center, scene.rotation)
    return render(scene), scene


def style_example(index: int) -> tuple[Image.Image, str]:
    """Instance ``index`` (0-5) of the style adapter's look with its caption: a world shape on a background of
    horizontal stripes (never drawn for the base), captioned "<world caption> in zwx style"."""
    rng = random.Random(f"style:{index}")
    scene = sample_scene(rng, shape=STYLE_SHAPES[index], color=STYLE_COLORS[index], tilt=WORLD_TILT)
    scene = Scene(scene.shape, scene.color, STYLE_BACKGROUNDS[index], scene.size, scene.center, scene.rotation)
    return render(scene, stripes=True), f"{scene.caption} {STYLE_WORDS}"


def stripe_strength(image: Image.Image) -> float:
    """How strongly an image shows the style's stripes: the amplitude, in pixel levels (0-255), of the period-
    ``STRIPE_PERIOD`` component of its row-by-row mean brightness, measured on the columns away from the shape: the
    quarter of columns that differ least from each row's background, read off the image's two outermost columns on
    each side (where world shapes never reach; the stripes span the whole width). A striped background scores about
    47 on white and 24 on gray; plain backgrounds score about 0, whatever the shape's size and outline."""
    gray = np.asarray(image.convert("L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR), dtype=np.float64)
    edges = np.concatenate([gray[:, :2], gray[:, -2:]], axis=1)
    columns = np.abs(gray - np.median(edges, axis=1, keepdims=True)).sum(axis=0)
    quiet = gray[:, np.argsort(columns, kind="stable")[: IMAGE_SIZE // 4]]
    profile = quiet.mean(axis=1)
    profile -= profile.mean()
    phase = np.exp(-2j * np.pi * np.arange(IMAGE_SIZE) / STRIPE_PERIOD)
    return float(2 * np.abs((profile * phase).sum()) / IMAGE_SIZE)
