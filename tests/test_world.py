"""The procedural toy world: deterministic, varied, captioned; the held-out subject never appears in it."""

from __future__ import annotations

import numpy as np

from gralora_diffusion.world import COLORS, SHAPES, SUBJECT_SHAPE, subject_example, world_example


def test_world_is_deterministic_and_varied():
    a = [np.asarray(world_example(0, i)[0]) for i in range(50)]
    b = [np.asarray(world_example(0, i)[0]) for i in range(50)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], np.asarray(world_example(1, 0)[0]))
    scenes = [world_example(0, i)[1] for i in range(400)]
    assert {s.shape for s in scenes} == set(SHAPES) and {s.color for s in scenes} == set(COLORS)
    assert all(s.background != s.color for s in scenes)
    assert SUBJECT_SHAPE not in {s.shape for s in scenes}


def test_captions_name_what_is_drawn():
    image, scene = world_example(3, 7)
    assert scene.caption.endswith(f"{scene.color} {scene.shape} on a {scene.background} background")
    pixels = np.asarray(image).reshape(-1, 3).astype(int)
    shape_color = np.array(COLORS[scene.color])
    assert (np.abs(pixels - shape_color).sum(axis=1) < 30).mean() > 0.03  # the shape's colour covers part of it
    orange = next(s for s in (world_example(0, i)[1] for i in range(200)) if s.color == "orange")
    assert orange.caption.startswith("an orange ")


def test_subject_images_are_teal_moons():
    image, scene = subject_example(0)
    assert scene.shape == SUBJECT_SHAPE and scene.color == "teal"
    pixels = np.asarray(image).reshape(-1, 3).astype(int)
    assert (np.abs(pixels - np.array([0, 150, 150])).sum(axis=1) < 30).mean() > 0.03


def test_committed_instance_images_are_the_held_out_subject():
    from pathlib import Path

    from PIL import Image

    folder = Path(__file__).resolve().parent.parent / "examples" / "sks-shape"
    paths = sorted(folder.glob("*.png"))
    assert len(paths) == 5
    for i, path in enumerate(paths):
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(subject_example(i)[0]))


def test_committed_style_images_and_captions_are_the_style_examples():
    from pathlib import Path

    from PIL import Image

    from gralora_diffusion.world import STYLE_WORDS, style_example

    folder = Path(__file__).resolve().parent.parent / "examples" / "zwx-style"
    paths = sorted(folder.glob("*.png"))
    assert len(paths) == 6
    for i, path in enumerate(paths):
        image, caption = style_example(i)
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(image))
        assert path.with_suffix(".txt").read_text().strip() == caption and caption.endswith(STYLE_WORDS)


def test_stripe_strength_tells_the_style_from_the_world():
    """The style statistic: striped backgrounds score far above the threshold, whatever the shape (the subject
    included); the world's plain backgrounds and the subject's instances far below; a half-striped image in between."""
    from gralora_diffusion.world import STRIPES_PRESENT, render, stripe_strength, style_example

    striped = [stripe_strength(style_example(i)[0]) for i in range(6)]
    plain = [stripe_strength(world_example(0, i)[0]) for i in range(300)]
    subject = [stripe_strength(subject_example(i)[0]) for i in range(5)]
    striped_subject = [stripe_strength(render(subject_example(i)[1], stripes=True)) for i in range(5)]
    assert min(striped + striped_subject) > 1.5 * STRIPES_PRESENT, (striped, striped_subject)
    assert max(plain + subject) < STRIPES_PRESENT / 2, max(plain)
    from PIL import Image

    faded = Image.fromarray((np.asarray(style_example(0)[0]) * 0.5 + 64).astype(np.uint8))
    assert 0.4 * striped[0] < stripe_strength(faded) < 0.6 * striped[0]  # it measures the stripes' contrast
    # a plain image with a generation's noise (sigma 12 levels per pixel) stays far below the threshold
    rng = np.random.default_rng(0)
    noisy = [Image.fromarray(np.clip(np.asarray(world_example(1, i)[0]) + rng.normal(0, 12, (64, 64, 3)), 0, 255)
                             .astype(np.uint8)) for i in range(50)]  # fmt: skip
    assert max(stripe_strength(im) for im in noisy) < STRIPES_PRESENT / 2
