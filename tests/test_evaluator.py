"""The committed toy-world evaluator still recognises fresh procedural images (regression check with a margin)."""

from __future__ import annotations

import json
import random

import torch

from gralora_diffusion.evaluator import WEIGHTS, judge, load_evaluator
from gralora_diffusion.world import ALL_COLORS, ALL_SHAPES, render, sample_scene


def fresh_scenes(count: int, seed: int = 12345):
    rng = random.Random(f"evaluator-test:{seed}")
    return [sample_scene(rng, shape=rng.choice(ALL_SHAPES), color=rng.choice(list(ALL_COLORS))) for _ in range(count)]


def test_accuracy_on_fresh_images_stays_above_the_reported_figure():
    reported = json.loads(WEIGHTS.with_suffix(".json").read_text())
    model = load_evaluator()
    scenes = fresh_scenes(400)
    verdict = judge(model, [render(s) for s in scenes])
    shape_acc = sum(p == s.shape for p, s in zip(verdict["shape"], scenes)) / len(scenes)
    color_acc = sum(p == s.color for p, s in zip(verdict["color"], scenes)) / len(scenes)
    assert shape_acc >= reported["held_out_shape_accuracy"] - 0.04, shape_acc
    assert color_acc >= reported["held_out_color_accuracy"] - 0.02, color_acc


def test_embeddings_group_the_same_shape():
    model = load_evaluator()
    rng = random.Random(7)
    moons = [render(sample_scene(rng, shape="moon", color="teal")) for _ in range(8)]
    circles = [render(sample_scene(rng, shape="circle", color="teal")) for _ in range(8)]
    e_moon, e_circle = judge(model, moons)["embedding"], judge(model, circles)["embedding"]
    within = (e_moon @ e_moon.T).mean()
    across = (e_moon @ e_circle.T).mean()
    assert torch.allclose(e_moon.norm(dim=1), torch.ones(8), atol=1e-5)
    assert within > across + 0.1
