"""Unit tests of the trainer modules: images, captions, buckets, time ids, augmentation, losses, caches, checkpoints."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from gralora_diffusion.training import checkpoint as ckpt
from gralora_diffusion.training.data import (
    DreamBoothDataset,
    EpochBatches,
    TrainingDataError,
    bucket_for_size,
    collate,
    epoch_batches,
    epoch_loader,
    load_rgb,
    make_buckets,
    prepare_image,
    read_image_folder,
    shard_batches,
    short_batches_message,
)
from gralora_diffusion.training.latents import LatentEncoder
from gralora_diffusion.training.loss import diffusion_loss, min_snr_weights, sample_noise, snr
from gralora_diffusion.training.model_card import model_card

# --- images ------------------------------------------------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 10, 20))  # blue strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image.save(tmp_path / "rot.jpg", exif=exif, quality=100)
    loaded = load_rgb(tmp_path / "rot.jpg")
    assert loaded.size == (20, 40)
    top = np.asarray(loaded)[2, 10]
    assert top[2] > 200 and top[0] < 60  # the blue strip is now on top


def test_rgba_grayscale_16bit_and_palette_become_rgb(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgba.save(tmp_path / "a.png")
    Image.new("L", (8, 8), 77).save(tmp_path / "g.png")
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(tmp_path / "w16.png")
    Image.new("P", (8, 8), 3).save(tmp_path / "p.png")
    assert np.asarray(load_rgb(tmp_path / "a.png")).tolist()[0][0] == [255, 255, 255]  # transparent -> white
    assert np.asarray(load_rgb(tmp_path / "g.png")).tolist()[0][0] == [77, 77, 77]
    assert np.asarray(load_rgb(tmp_path / "w16.png")).tolist()[0][0] == [255, 255, 255]  # 16-bit white stays white
    assert load_rgb(tmp_path / "p.png").mode == "RGB"


def test_captions_from_txt_then_jsonl_then_instance_prompt(tmp_path):
    for name in ("a.png", "b.webp", "c.jpg"):
        Image.new("RGB", (16, 16)).save(tmp_path / name)
    (tmp_path / "a.txt").write_text("a photo of sks dog on grass\n")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "b.webp", "text": "sks dog, watercolor"}) + "\n")
    records = read_image_folder(tmp_path, "a photo of sks dog")
    assert [(r.path.name, r.caption) for r in records] == [
        ("a.png", "a photo of sks dog on grass"),
        ("b.webp", "sks dog, watercolor"),
        ("c.jpg", "a photo of sks dog"),
    ]


def test_a_caption_file_that_is_not_utf8_is_named_in_one_sentence(tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    Image.new("RGB", (64, 64)).save(tmp_path / "b.png")
    (tmp_path / "a.txt").write_bytes("\ufeffa photo of sks café".encode("utf-8"))  # UTF-8 with a BOM: read
    (tmp_path / "b.txt").write_bytes("a photo of sks café".encode("latin-1"))
    with pytest.raises(TrainingDataError, match=r"b\.txt is not UTF-8 text .*save it as UTF-8") as err:
        read_image_folder(tmp_path, "x")
    assert "\n" not in str(err.value)
    (tmp_path / "b.txt").unlink()
    records = read_image_folder(tmp_path, "x")
    assert sorted(r.caption for r in records) == ["a photo of sks café", "x"]


def test_unreadable_images_are_named_and_skipped(tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "good.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="broken.jpg"):
        records = read_image_folder(tmp_path, "x")
    assert [r.path.name for r in records] == ["good.png"]
    (tmp_path / "good.png").unlink()
    with pytest.raises(TrainingDataError, match="No image .* could be read .*broken.jpg"):
        read_image_folder(tmp_path, "x")


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(TrainingDataError, match="contains no images"):
        read_image_folder(tmp_path, "x")
    with pytest.raises(TrainingDataError, match="does not exist"):
        read_image_folder(tmp_path / "nope", "x")


# --- buckets and size conditioning -------------------------------------------------------------------------------


@pytest.mark.parametrize("resolution", [512, 1024])
def test_buckets_are_multiples_of_64_around_the_area(resolution):
    buckets = make_buckets(resolution)
    assert (resolution, resolution) in buckets
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0
        assert w * h <= resolution * resolution
        assert w * h >= 0.75 * resolution * resolution  # no tiny buckets: about the training area
    assert any(w > h for w, h in buckets) and any(h > w for w, h in buckets)


def test_bucket_for_size_picks_the_closest_aspect():
    buckets = make_buckets(1024)
    assert bucket_for_size((1024, 1024), buckets) == (1024, 1024)
    w, h = bucket_for_size((1920, 1080), buckets)
    assert abs(math.log(w / h) - math.log(1920 / 1080)) <= min(
        abs(math.log(a / b) - math.log(16 / 9)) for a, b in buckets
    )
    assert w > h
    assert bucket_for_size((600, 1200), buckets)[1] > bucket_for_size((600, 1200), buckets)[0]


def test_crop_offsets_and_flip_match_the_pixels():
    """A marker pixel lands where the reported crop offset says it must."""
    image = Image.new("RGB", (200, 100), (0, 0, 0))
    image.paste((255, 255, 255), (85, 56, 95, 66))  # a 10x10 white square centred on (90, 61)
    import random

    # resized by 0.64 -> 128 x 64, so the square's centre is at (57.6, 39.0) in the resized image
    ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    checked = 0
    for seed in range(12):
        pixels, (top, left) = prepare_image(image, (64, 64), center_crop=False, flip=False, rng=random.Random(seed))
        assert top == 0 and 0 <= left <= 64
        if not 8 <= 57.6 - left <= 56:
            continue  # the square is (partly) cropped away
        weight = pixels[0] + 1.0
        y, x = (weight * ys).sum() / weight.sum(), (weight * xs).sum() / weight.sum()
        assert abs(y - 39.0) <= 1.0 and abs(x - (57.6 - left)) <= 1.0
        checked += 1
    assert checked >= 3
    pixels, (top, left) = prepare_image(image, (64, 64), center_crop=False, flip=False, rng=random.Random(3))
    flipped, (top_f, left_f) = prepare_image(image, (64, 64), center_crop=False, flip=True, rng=random.Random(3))
    assert top_f == top and left_f == 128 - 64 - left
    torch.testing.assert_close(flipped, pixels.flip(-1))
    _, center = prepare_image(image, (64, 64), center_crop=True, flip=False, rng=random.Random(0))
    assert center == (0, 32)


def _dataset(tmp_path, sizes, **kwargs):
    for i, size in enumerate(sizes):
        Image.new("RGB", size, (i * 40, 100, 200)).save(tmp_path / f"img{i}.png")
    records = read_image_folder(tmp_path, "a photo of sks dog")
    return DreamBoothDataset(records, seed=kwargs.pop("seed", 0), **kwargs)


def test_time_ids_use_original_size_crop_and_target(tmp_path):
    dataset = _dataset(tmp_path, [(300, 200)], resolution=128, center_crop=True)
    batch = collate([dataset.example(0, epoch=0)])
    # original (h, w) = (200, 300); resized to 192 x 128 -> center crop left = 32; target (128, 128)
    assert batch["time_ids"].tolist() == [[200.0, 300.0, 0.0, 32.0, 128.0, 128.0]]


def test_bucketing_sends_wide_images_to_wide_buckets(tmp_path):
    dataset = _dataset(tmp_path, [(256, 128), (128, 256), (128, 128)], resolution=128, enable_bucket=True)
    sizes = [tuple(dataset.example(i, 0).pixel_values.shape[1:]) for i in range(3)]
    assert sizes[0][1] > sizes[0][0] and sizes[1][0] > sizes[1][1] and sizes[2] == (128, 128)
    for batch in epoch_batches(dataset, batch_size=2, epoch=0, seed=0):
        assert len({dataset.bucket(i) for i in batch}) == 1


def test_flips_are_redrawn_every_epoch_and_reproducible(tmp_path):
    dataset = _dataset(tmp_path, [(64, 64)] * 4, resolution=64, random_flip=True)
    per_epoch = [[dataset.example(i, e).flipped for i in range(4)] for e in range(8)]
    assert len({tuple(f) for f in per_epoch}) > 1  # not fixed once per run
    assert all(any(per_epoch[e][i] for e in range(8)) and not all(per_epoch[e][i] for e in range(8)) for i in range(4))
    again = _dataset(tmp_path, [(64, 64)] * 4, resolution=64, random_flip=True)
    assert per_epoch == [[again.example(i, e).flipped for i in range(4)] for e in range(8)]


def test_caption_dropout_rate(tmp_path):
    dataset = _dataset(tmp_path, [(32, 32)], resolution=32, repeats=400, caption_dropout_rate=0.25)
    dropped = sum(dataset.example(i, 0).caption == "" for i in range(len(dataset)))
    assert 60 <= dropped <= 140  # 100 expected
    assert dataset.example(0, 0).caption in ("", "a photo of sks dog")


def test_repeats_and_shards_cover_every_item_once(tmp_path):
    dataset = _dataset(tmp_path, [(32, 32)] * 3, resolution=32, repeats=4)
    assert len(dataset) == 12
    batches = epoch_batches(dataset, batch_size=2, epoch=1, seed=5)
    assert sorted(i for b in batches for i in b) == list(range(12))
    assert batches != epoch_batches(dataset, batch_size=2, epoch=2, seed=5)  # reshuffled per epoch
    shards = [shard_batches(batches, p, 2) for p in range(2)]
    assert len(shards[0]) == len(shards[1]) == 3
    assert sorted(i for s in shards for b in s for i in b) == list(range(12))


def test_a_batch_size_above_the_images_is_named(tmp_path):
    dataset = _dataset(tmp_path, [(32, 32)] * 5, resolution=32)
    assert max(len(b) for b in epoch_batches(dataset, batch_size=8, epoch=0, seed=0)) == 5  # what the sentence says
    message = short_batches_message(dataset, 8)
    assert message is not None and "at most 5" in message and "--repeats 2" in message
    assert short_batches_message(dataset, 5) is None
    repeated = _dataset(tmp_path, [(32, 32)] * 5, resolution=32, repeats=2)
    assert short_batches_message(repeated, 8) is None
    assert max(len(b) for b in epoch_batches(repeated, batch_size=8, epoch=0, seed=0)) == 8


def test_small_images_upscale_with_warning_or_refuse(tmp_path):
    with pytest.warns(UserWarning, match="upscaled"):
        _dataset(tmp_path, [(32, 32)], resolution=64)
    with pytest.raises(TrainingDataError, match="smaller than their training size.*--no_upscale"):
        _dataset(tmp_path, [(32, 32)], resolution=64, no_upscale=True)


# --- latents -----------------------------------------------------------------------------------------------------


def test_latent_cache_never_mispairs_under_shuffling(tmp_path, sdxl):
    sizes = [(64, 64)] * 5
    for i, size in enumerate(sizes):  # five clearly different images
        Image.new("RGB", size, (i * 60, 255 - i * 50, (i * 97) % 255)).save(tmp_path / f"img{i}.png")
    dataset = DreamBoothDataset(read_image_folder(tmp_path, "x"), resolution=64, seed=0, random_flip=True)
    cached, fresh = LatentEncoder(sdxl.vae, cache=True), LatentEncoder(sdxl.vae, cache=False)
    for epoch in range(3):
        for batch_indices in epoch_batches(dataset, batch_size=2, epoch=epoch, seed=0):
            batch = collate([dataset.example(i, epoch) for i in batch_indices])
            a = cached(batch, torch.Generator().manual_seed(epoch))
            b = fresh(batch, torch.Generator().manual_seed(epoch))
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert cached.encoded == len(cached) <= 10  # each (image, flip) variant encoded once
    assert fresh.encoded == 15


# --- loss --------------------------------------------------------------------------------------------------------


def test_snr_and_min_snr_weights_match_the_formula():
    alphas = torch.linspace(0.999, 0.01, 1000)
    t = torch.tensor([0, 500, 999])
    s = snr(alphas, t)
    torch.testing.assert_close(s, alphas[t] / (1 - alphas[t]))
    w = min_snr_weights(s, 5.0, "epsilon")
    expected = torch.tensor([min(v, 5.0) / v for v in s.tolist()])
    torch.testing.assert_close(w, expected)
    wv = min_snr_weights(s, 5.0, "v_prediction")
    torch.testing.assert_close(wv, torch.tensor([min(v, 5.0) / (v + 1) for v in s.tolist()]))


def test_prior_preservation_loss_split():
    pred = torch.zeros(4, 4, 8, 8)
    target = torch.cat([torch.full((2, 4, 8, 8), 1.0), torch.full((2, 4, 8, 8), 2.0)])
    is_class = torch.tensor([False, False, True, True])
    loss, parts = diffusion_loss(
        pred, target, torch.zeros(4, dtype=torch.long), is_class, alphas_cumprod=torch.ones(10) * 0.5,
        prediction_type="epsilon", prior_loss_weight=0.5,
    )  # fmt: skip
    assert parts == {"instance_loss": 1.0, "prior_loss": 4.0}
    assert loss.item() == pytest.approx(1.0 + 0.5 * 4.0)


def test_noise_offset_shifts_channel_means():
    latents = torch.zeros(64, 4, 16, 16)
    plain = sample_noise(latents, torch.Generator().manual_seed(0))
    offset = sample_noise(latents, torch.Generator().manual_seed(0), noise_offset=1.0)
    channel_means = offset.mean(dim=(2, 3))
    assert plain.mean(dim=(2, 3)).std() < 0.1 < channel_means.std()


# --- checkpoints -------------------------------------------------------------------------------------------------


def _optimizer():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    opt = torch.optim.AdamW(params, lr=0.1)
    for _ in range(2):
        sum(p.square().sum() for p in params).backward()
        opt.step()
    return opt


STATE = {"epoch": 0, "batches_done_in_epoch": 0, "lr_scheduler": {}}


def _write_adapter(path):
    """A tiny valid GraLoRA adapter file (one 8 x 8 layer, r 4, k 2), as a checkpoint holds."""
    from gralora_diffusion.io import adapter_from_tensors, save_adapter_file

    g = torch.Generator().manual_seed(0)
    tensors = {"unet.proj.gralora_A": torch.randn(2, 4, 4, generator=g), "unet.proj.gralora_B": torch.zeros(2, 4, 4)}
    config = '{"unet": {"r": 4, "alpha": 8, "gralora_k": 2, "hybrid_r": 0}}'
    save_adapter_file(path, adapter_from_tensors(tensors, {"gralora_config": config}, source=str(path)))


def test_optimizer_state_round_trips_without_pickle(tmp_path):
    opt = _optimizer()
    path = ckpt.save_checkpoint(tmp_path, 7, _write_adapter, opt, {**STATE, "epoch": 1, "batches_done_in_epoch": 2})
    state, restored = ckpt.load_checkpoint(path)
    assert state["step"] == 7 and state["epoch"] == 1
    original = opt.state_dict()
    for pid, values in original["state"].items():
        for key, value in values.items():
            assert torch.equal(restored["state"][pid][key], value)
    fresh = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(4))], lr=0.1)
    fresh.load_state_dict(restored)
    assert sorted(p.name for p in path.iterdir()) == [
        "adapter.safetensors",
        "optimizer.json",
        "optimizer.safetensors",
        "state.json",
    ]


def test_dataloader_workers_give_exactly_the_batches_of_the_training_process(tmp_path):
    """--dataloader_num_workers: two worker processes produce the same batches, in the same order, as none (flips,
    crops and caption dropout are functions of (seed, epoch, item)), also when resuming mid-epoch."""
    dataset = _dataset(
        tmp_path, [(80, 64), (64, 64), (96, 64), (64, 80), (72, 72)], resolution=64, random_flip=True,
        caption_dropout_rate=0.5, enable_bucket=True, bucket_reso_steps=32,
    )  # fmt: skip
    batches = epoch_batches(dataset, 2, epoch=3, seed=0)
    for skip in (0, 1):
        here = list(epoch_loader(EpochBatches(dataset, batches, 3, with_prior=False, skip=skip), num_workers=0))
        workers = list(epoch_loader(EpochBatches(dataset, batches, 3, with_prior=False, skip=skip), num_workers=2))
        assert len(here) == len(workers) == len(batches) - skip
        for a, b in zip(here, workers):
            assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["time_ids"], b["time_ids"])
            assert a["captions"] == b["captions"] and a["indices"] == b["indices"] and a["flipped"] == b["flipped"]
        direct = [collate([dataset.example(i, 3) for i in batch]) for batch in batches[skip:]]
        assert all(torch.equal(a["pixel_values"], d["pixel_values"]) for a, d in zip(here, direct))


def test_a_crash_while_writing_leaves_no_checkpoint(tmp_path):
    def crash(path):
        path.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 5, crash, _optimizer(), {})
    assert list(tmp_path.iterdir()) == []


def test_latest_skips_incomplete_and_prune_keeps_the_newest(tmp_path):
    opt = _optimizer()
    for step in (2, 4, 6):
        ckpt.save_checkpoint(tmp_path, step, _write_adapter, opt, STATE)
    (tmp_path / "checkpoint-8").mkdir()  # incomplete: no state.json
    (tmp_path / ".checkpoint-10.abc_1234.tmp").mkdir()  # a killed write
    assert ckpt.latest_checkpoint(tmp_path).name == "checkpoint-6"
    assert ckpt.resolve_resume(tmp_path, "latest").name == "checkpoint-6"
    removed = ckpt.prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in removed] == ["checkpoint-2"]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-6"]
    assert not (tmp_path / ".checkpoint-10.abc_1234.tmp").exists()
    with pytest.raises(ckpt.CheckpointError, match="not a complete checkpoint"):
        ckpt.resolve_resume(tmp_path, "checkpoint-8")
    assert ckpt.resolve_resume(tmp_path / "empty", "latest") is None


def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path):
    opt = _optimizer()
    for step in (2, 4, 6):
        ckpt.save_checkpoint(tmp_path, step, _write_adapter, opt, STATE)
    adapter = tmp_path / "checkpoint-6" / ckpt.ADAPTER_NAME
    adapter.write_bytes(adapter.read_bytes()[:100])  # truncated after it was written (disk error, full disk)
    (tmp_path / "checkpoint-4" / "state.json").write_text("{")  # not JSON
    with pytest.warns(UserWarning, match=r"checkpoint-6 is damaged .*Resuming from checkpoint-2"):
        assert ckpt.resolve_resume(tmp_path, "latest").name == "checkpoint-2"
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint-6 is damaged and cannot be resumed from") as err:
        ckpt.resolve_resume(tmp_path, "checkpoint-6")  # named explicitly: refused, one sentence
    assert "\n" not in str(err.value)
    (tmp_path / "checkpoint-2" / "optimizer.json").write_text("[]")
    with pytest.raises(ckpt.CheckpointError, match="No checkpoint .* is intact"):
        ckpt.resolve_resume(tmp_path, "latest")


def test_model_card_has_settings_gallery_and_loading_code():
    card = model_card(
        adapter_file="sks-dog.safetensors", base_model="stabilityai/stable-diffusion-xl-base-1.0",
        instance_prompt="a photo of sks dog", rank=32, gralora_k=2, alpha=64, hybrid_r=0, steps=500,
        train_text_encoder=True, unet_target="attention", learning_rate=1e-4, resolution=1024,
        validation_images=[("validation/step-500/prompt0-0.png", "a photo of sks dog")],
    )  # fmt: skip
    assert card.startswith("---\nbase_model: stabilityai/stable-diffusion-xl-base-1.0")
    assert "| rank r | 32 |" in card and "| blocks k (k x k) | 2 |" in card and "| steps | 500 |" in card
    assert "![a photo of sks dog](validation/step-500/prompt0-0.png)" in card
    assert 'load_gralora_weights(pipe, "sks-dog.safetensors"' in card and "<gralora:sks-dog:0.8>" in card


def test_model_card_front_matter_reads_back_and_names_only_hub_models(tmp_path, monkeypatch):
    """The Hub's own parser reads the front matter: a prompt with YAML's special characters survives, and
    ``base_model`` appears only for a Hub model id (a toy base, a folder or a single file is not one). The card's
    Python snippet passes the same prompt and base, whatever characters they hold."""
    import ast

    from huggingface_hub import ModelCard

    from gralora_diffusion.bases import is_registered

    fields = dict(
        adapter_file="a.safetensors", rank=4, gralora_k=2, alpha=8, hybrid_r=0, steps=1, train_text_encoder=False,
        unet_target="attention", learning_rate=1e-4, resolution=64, validation_images=[],
    )  # fmt: skip
    prompt = 'a photo of sks dog: "fluffy" # 1 \\ 😀 \x85 done'
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "sdxl").mkdir(parents=True)
    for base, expected in [
        ("stabilityai/stable-diffusion-xl-base-1.0", "stabilityai/stable-diffusion-xl-base-1.0"),
        ("toy-world", None),
        ("gralora-diffusion/toy-sdxl", None),  # a toy adapter's recorded id, not a Hub model
        ("models/sdxl", None),  # shaped like a Hub id, but a folder here, which diffusers would read
        (str(tmp_path / "models" / "sdxl"), None),
        ("models/sdxl.safetensors", None),
        ("C:\\models\\sdxl.safetensors", None),
    ]:
        card = model_card(base_model=base, instance_prompt=prompt, **fields)
        data = ModelCard(card).data.to_dict()
        assert data.get("base_model") == expected, base
        assert data["instance_prompt"] == prompt and "gralora" in data["tags"]
        code = card.split("```python\n")[1].split("```")[0]
        calls = {node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id: node
                 for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Call)}  # fmt: skip
        assert ast.literal_eval(calls["pipe"].args[0]) == prompt
        if not is_registered(base):  # a registered toy base is read through resolve_base(name)
            loader = calls["from_single_file" if base.endswith(".safetensors") else "from_pretrained"]
            assert ast.literal_eval(loader.args[0]) == base


def test_hf_dataset_rows_become_records_with_their_captions(tmp_path):
    pytest.importorskip("datasets")
    from gralora_diffusion.training.data import read_hf_dataset

    for i in range(3):
        Image.new("RGB", (32 + 8 * i, 32), (i * 50, 0, 0)).save(tmp_path / f"{i}.png")
    rows = [json.dumps({"file_name": f"{i}.png", "text": f"sks dog {i}"}) for i in range(3)]
    (tmp_path / "metadata.jsonl").write_text("\n".join(rows))
    records = read_hf_dataset(str(tmp_path), "image", "text", "fallback")
    assert sorted((r.caption, r.size) for r in records) == [
        ("sks dog 0", (32, 32)),
        ("sks dog 1", (40, 32)),
        ("sks dog 2", (48, 32)),
    ]
    assert all(r.caption == "fallback" for r in read_hf_dataset(str(tmp_path), "image", None, "fallback"))
    with pytest.raises(TrainingDataError, match="--caption_column 'caption' is not in the dataset's columns"):
        read_hf_dataset(str(tmp_path), "image", "caption", "fallback")


def test_prompt_cache_encodes_each_prompt_once_and_matches_direct_encoding(sdxl):
    from gralora_diffusion.training.text import PromptCache, encode_prompts

    encoders, tokenizers = [sdxl.text_encoder, sdxl.text_encoder_2], [sdxl.tokenizer, sdxl.tokenizer_2]
    calls = []
    hook = sdxl.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    cache = PromptCache(encoders, tokenizers)
    prompts = ["a photo of sks dog", "", "a photo of sks dog", "a red circle"]
    embeds, pooled = cache(prompts)
    cache(list(reversed(prompts)))
    hook.remove()
    assert len(cache) == 3 and len(calls) == 3
    with torch.no_grad():
        direct_embeds, direct_pooled = encode_prompts(encoders, tokenizers, prompts)
    assert embeds.shape == (4, 77, 64) and pooled.shape == (4, 32)  # SDXL: both encoders side by side, pooled of #2
    torch.testing.assert_close(embeds, direct_embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, direct_pooled, atol=1e-5, rtol=1e-5)
    reference = sdxl.encode_prompt(prompts, do_classifier_free_guidance=False)[0]
    torch.testing.assert_close(embeds, reference, atol=1e-5, rtol=1e-5)  # same conditioning as the pipeline's own


@pytest.mark.parametrize(
    "flags, lean", [([], False), (["--gralora_recompute"], True), (["--no_gralora_recompute"], False)]
)
def test_memory_lean_forward_is_opt_in(sdxl, flags, lean):
    from gralora_diffusion.layers import GraloraLinear, gralora_layers
    from gralora_diffusion.training.args import build_parser
    from gralora_diffusion.training.dreambooth import add_adapters

    args = build_parser().parse_args(["--pretrained_model_name_or_path=x", "--instance_prompt=sks", "--rank=4", *flags])
    add_adapters(args, sdxl.unet, [sdxl.text_encoder, sdxl.text_encoder_2])
    layers = [layer for _, layer in gralora_layers(sdxl.unet)]
    assert layers and all(isinstance(layer, GraloraLinear) for layer in layers)
    assert all(layer.recompute_intermediate == lean for layer in layers)


def test_make_config_equals_the_command_line_and_refuses_unknown_settings():
    from gralora_diffusion.training.args import build_parser, make_config

    flags = ["--pretrained_model_name_or_path=base", "--instance_prompt=a photo of sks dog", "--rank=16",
             "--train_text_encoder", "--learning_rate=0.001", "--output_dir=out"]  # fmt: skip
    from_python = make_config(
        pretrained_model_name_or_path="base", instance_prompt="a photo of sks dog", rank=16, train_text_encoder=True,
        learning_rate=1e-3, output_dir="out",
    )  # fmt: skip
    assert vars(from_python) == vars(build_parser().parse_args(flags))
    with pytest.raises(TrainingDataError, match="Unknown training setting 'learnig_rate'"):
        make_config(pretrained_model_name_or_path="base", instance_prompt="x", learnig_rate=1e-3)
    with pytest.raises(TrainingDataError, match="'instance_prompt' is required"):
        make_config(pretrained_model_name_or_path="base")
