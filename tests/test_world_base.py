"""The committed pretrained toy base draws what it is asked, and a short GraLoRA run teaches it the held-out subject.

Both checks judge generated pictures with the evaluator (trained on procedural images only, independently of the
base), at fixed seeds, so they are deterministic on one machine; the margins leave room for other CPUs' rounding.
"""

from __future__ import annotations

import json

import pytest
import torch

from gralora_diffusion.evaluator import judge, load_evaluator
from gralora_diffusion.toy import WORLD_BASE_DIR, toy_world_base_dir
from gralora_diffusion.world import seen_prompts


@pytest.fixture(scope="module")
def world_pipe():
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(toy_world_base_dir())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_base_is_committed_with_its_report():
    report = json.loads((WORLD_BASE_DIR / "pretrain_report.json").read_text())
    assert report["images"] >= 100 and 0.8 <= report["shape_and_color_correct"] <= 1, "below the 80% acceptance"
    assert report["train_seconds"] <= 45 * 60, "pretraining took more than 45 minutes"  # VAE, decoder and UNet
    total = sum(f.stat().st_size for f in WORLD_BASE_DIR.rglob("*") if f.is_file())
    assert total <= 20 * 2**20, f"the committed base takes {total / 2**20:.1f} MB, more than the 20 MB budget"


def test_base_draws_the_asked_shape_and_colour(world_pipe):
    """One image for each of the 40 seen shape x colour prompts, judged by the evaluator (fixed seeds, other than
    the pretraining report's)."""
    prompts = seen_prompts()
    images = []
    for start in range(0, len(prompts), 10):
        images += world_pipe(
            prompts[start : start + 10], num_inference_steps=20, guidance_scale=3.0, height=64, width=64,
            generator=[torch.Generator().manual_seed(500 + i) for i in range(start, start + 10)],
        ).images  # fmt: skip
    verdict = judge(load_evaluator(), images)
    asked = [p.split()[1:3] for p in prompts]
    colour_right = sum(c == color for c, (color, _) in zip(verdict["color"], asked)) / len(prompts)
    shape_right = sum(s == shape for s, (_, shape) in zip(verdict["shape"], asked)) / len(prompts)
    both = sum(c == color and s == shape for c, s, (color, shape) in zip(verdict["color"], verdict["shape"], asked))
    print(f"colour right {colour_right:.0%}, shape right {shape_right:.0%}, both {both / len(prompts):.0%}")
    # Measured on the committed base: colour 100%, shape 95%, both 95% (85.6% over 320 images at other seeds).
    assert colour_right >= 0.85, f"colour right in {colour_right:.0%} of images: {verdict['color']}"
    assert shape_right >= 0.75, f"shape right in {shape_right:.0%} of images: {verdict['shape']}"
    assert both / len(prompts) >= 0.7, f"shape and colour right in {both / len(prompts):.0%} of images"


def test_demo_teaches_the_subject_and_keeps_the_rest(tmp_path, capsys):
    """The README's main job at its defaults, judged on fresh seeds. Measured on the shipped base: similarity 0.162
    (base) -> 0.648 at 1.0, 75% of 16 trigger images recognised as the teal moon (the base: 0%), drift 0.057; the
    blend keeps the subject in 56% of its images and shows the stripes in 12% (the style alone on 16 fresh images of
    the styled unrelated prompts: 6%). The thresholds guard what holds at the default training seed 0, with room for
    other CPUs' rounding; they are not what the settings reach at any seed (seeds 1-3 recognise 31%, README)."""
    from gralora_diffusion.demo import main

    main(["--out", str(tmp_path / "demo")])  # the README's main job, as its command runs it
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "demo" / "demo.json").read_text())
    scores, style = report["scores"], report["style"]
    base, tuned = scores["base"], scores["sks x 1.0"]
    blend = scores[report["columns"][-1]]
    print(json.dumps({"scores": scores, "style": style}, indent=1))
    assert base["recognised"] == 0, scores  # the base has never seen a teal moon
    assert tuned["recognised"] >= 0.6, scores  # measured 0.75 (the goal: 0.8)
    misses = tuned["misses"]  # what the evaluator saw instead: every miss, none of them the subject
    assert sum(misses.values()) == round((1 - tuned["recognised"]) * len(report["eval_seeds"])), misses
    assert "teal moon" not in misses
    if misses:
        assert ("judged instead of the subject: " + ", ".join(f"{n} {w}" for w, n in misses.items())) in printed
    assert tuned["similarity"] >= base["similarity"] + 0.35, scores
    assert tuned["drift"] <= 0.08, scores
    assert blend["recognised"] >= 0.4, scores  # the style does not wipe the subject out
    assert style["present_in_base_images_of_the_styled_trigger"] <= 0.2, style  # the base never drew the stripes
    assert style["present_in_subject_images_at_1.0"] <= 0.2, style  # nor does the subject adapter alone
    assert report["max_abs_pixel_diff_fused_vs_unfused"] <= 2
    assert report["training"]["eval_loss_after"] < report["training"]["eval_loss_before"]
    assert report["style_training"]["eval_loss_after"] < report["style_training"]["eval_loss_before"]
    check_adapter_names_its_base(tmp_path / "demo" / "sks-shape")


def check_adapter_names_its_base(folder):
    """A toy-world adapter records the base by its registry name (not this machine's path to it); the exporter
    reads that base's own layout from the name, and its model card's loading code runs as written (on the CPU)."""
    from gralora_diffusion.export import resolve_base_layout
    from gralora_diffusion.io import read_adapter

    adapter_file = next(folder.glob("*.safetensors"))
    adapter = read_adapter(adapter_file)
    assert adapter.base_model == "toy-world"
    layout = resolve_base_layout(adapter)
    assert layout.source == "the recorded base toy-world" and list(layout.unet_config["block_out_channels"]) == [48, 96]
    card = (folder / "README.md").read_text()
    code = card.split("```python\n")[1].split("```")[0]
    code = code.replace('"cuda"', '"cpu"').replace("torch.float16", "torch.float32")
    code = code.replace(f'"{adapter_file.name}"', f'"{adapter_file}"')
    code = code.replace('pipe("a photo of sks shape")', 'pipe("a photo of sks shape", num_inference_steps=2)')
    namespace = {}
    exec(compile(code, "model card", "exec"), namespace)  # noqa: S102 - the card's own snippet, ours
    assert namespace["image"].size == (64, 64)


def test_demo_command_line_reaches_run_demo_by_name(monkeypatch, tmp_path):
    """Each flag lands on its own parameter (a positional slip once passed the sampling steps as a learning rate)."""
    from gralora_diffusion import demo

    seen = {}

    def fake_run_demo(out, base, **kwargs):
        seen.update(kwargs, out=out, base=base)
        raise SystemExit(0)

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    with pytest.raises(SystemExit):
        demo.main(["--out", str(tmp_path), "--train_steps", "7", "--style_steps", "8", "--sampling_steps", "9",
                   "--guidance", "2.5", "--eval_images", "3", "--seed", "5",
                   "--unet_target", "attention-conv"])  # fmt: skip
    defaults = {"rank": demo.DEFAULTS["rank"], "learning_rate": demo.DEFAULTS["learning_rate"],
                "style_learning_rate": demo.DEFAULTS["style_learning_rate"],
                "text_encoder_lr": demo.DEFAULTS["text_encoder_lr"],
                "style_unet_target": demo.DEFAULTS["style_unet_target"]}  # fmt: skip
    assert seen == {
        "out": tmp_path, "base": None, "train_steps": 7, "style_steps": 8, "sampling_steps": 9, "guidance": 2.5,
        "eval_images": 3, "seed": 5, "unet_target": "attention-conv", **defaults,
    }  # fmt: skip
