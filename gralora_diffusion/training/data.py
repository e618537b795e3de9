"""Training data: image folders with captions, aspect-ratio buckets, per-epoch augmentation, SDXL size conditioning.

Every random choice (crop offset, flip, caption dropout, shuffling) is a pure function of (seed, epoch, item), so a
run resumed from a checkpoint sees exactly the data the uninterrupted run would have seen, on any number of
processes, and flips and crops are redrawn every epoch (diffusers' script draws them once per run).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class TrainingDataError(ValueError):
    """The training data cannot be used; the message says what to fix."""


# --- reading images and captions ---------------------------------------------------------------------------------


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image as 8-bit RGB: EXIF orientation applied, alpha on white, gray/16-bit/palette converted."""
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened)
        image.load()
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


@dataclass(frozen=True)
class ImageRecord:
    """One training image before any transform: where it is and what it shows."""

    path: Path | None
    caption: str
    size: tuple[int, int]  # (width, height) after EXIF orientation
    image: Image.Image | None = None  # in-memory images (from a `datasets` dataset)
    is_class: bool = False

    def open(self) -> Image.Image:
        return self.image.convert("RGB") if self.image is not None else load_rgb(self.path)


def read_caption_text(path: Path) -> str:
    """A caption file's text: UTF-8 (with or without a byte-order mark), else one sentence naming the file."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise TrainingDataError(
            f"{path} is not UTF-8 text (byte {err.start} is 0x{err.object[err.start]:02x}); save it as UTF-8."
        ) from None


def _read_metadata_jsonl(folder: Path) -> dict[str, str]:
    path = folder / "metadata.jsonl"
    if not path.exists():
        return {}
    captions = {}
    for number, line in enumerate(read_caption_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise TrainingDataError(
                f"{path}, line {number}, is not valid JSON ({err.msg}); fix or remove it."
            ) from None
        name = row.get("file_name")
        caption = row.get("text", row.get("caption", row.get("prompt")))
        if name is None or caption is None:
            raise TrainingDataError(f"{path}, line {number}, needs 'file_name' and 'text' fields.")
        captions[str(name)] = str(caption)
    return captions


def read_image_folder(folder: str | Path, default_caption: str, is_class: bool = False) -> list[ImageRecord]:
    """The images of ``folder`` (sorted by name) with their captions.

    A caption comes from ``<image stem>.txt`` beside the image, else from ``metadata.jsonl`` (``file_name`` and
    ``text`` per line, as the Hugging Face imagefolder format), else ``default_caption``. Unreadable files are
    skipped with a warning that names them; no readable image at all is an error.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise TrainingDataError(f"Image folder {folder} does not exist; check --instance_data_dir / --class_data_dir.")
    candidates = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not candidates:
        raise TrainingDataError(f"{folder} contains no images ({', '.join(IMAGE_SUFFIXES)}); add some or fix the path.")
    jsonl = _read_metadata_jsonl(folder)
    records, unreadable = [], []
    for path in candidates:
        try:
            with Image.open(path) as image:
                image = ImageOps.exif_transpose(image)
                size = image.size
        except (UnidentifiedImageError, OSError):
            unreadable.append(path.name)
            continue
        txt = path.with_suffix(".txt")
        if txt.exists():
            caption = read_caption_text(txt).strip()
        else:
            caption = jsonl.get(path.name, default_caption)
        records.append(ImageRecord(path=path, caption=caption, size=size, is_class=is_class))
    if not records:
        raise TrainingDataError(f"No image in {folder} could be read ({', '.join(unreadable)}); the files are damaged.")
    if unreadable:
        warnings.warn(f"Skipping unreadable images in {folder}: {', '.join(unreadable)}.", stacklevel=2)
    return records


def read_hf_dataset(
    name: str,
    image_column: str | None,
    caption_column: str | None,
    default_caption: str,
    config_name=None,
    cache_dir=None,
) -> list[ImageRecord]:
    """Images and captions from a ``datasets`` dataset (train split), for ``--dataset_name``."""
    try:
        import datasets
    except ImportError:
        raise TrainingDataError("--dataset_name needs the `datasets` package: pip install datasets.") from None
    dataset = datasets.load_dataset(name, config_name, cache_dir=cache_dir, split="train")
    columns = dataset.column_names
    image_column = image_column or columns[0]
    if image_column not in columns:
        raise TrainingDataError(f"--image_column {image_column!r} is not in the dataset's columns {columns}.")
    if caption_column is not None and caption_column not in columns:
        raise TrainingDataError(f"--caption_column {caption_column!r} is not in the dataset's columns {columns}.")
    records = []
    for row in dataset:
        image = ImageOps.exif_transpose(row[image_column])
        caption = str(row[caption_column]) if caption_column else default_caption
        records.append(ImageRecord(path=None, caption=caption, size=image.size, image=image))
    if not records:
        raise TrainingDataError(f"Dataset {name} has no rows in its train split.")
    return records


# --- buckets -----------------------------------------------------------------------------------------------------


def make_buckets(resolution: int, step: int = 64, min_side: int | None = None, max_side: int | None = None):
    """Bucket sizes (width, height): multiples of ``step``, area at most resolution^2, sides in [min_side, max_side].

    For each width the tallest height that keeps the area within resolution^2 is taken, so every bucket holds about
    as many pixels as the square training resolution (kohya's scheme; SDXL uses step 64).
    """
    min_side = min_side or max(step, (resolution // 2) // step * step)
    max_side = max_side or resolution * 2
    area = resolution * resolution
    buckets = set()
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, (area // width) // step * step)
        if height >= min_side:
            buckets.add((width, height))
            buckets.add((height, width))
    square = (resolution // step * step,) * 2
    buckets.add(square)
    return sorted(buckets)


def bucket_for_size(size: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest (in log space) to ``size``; ties go to the larger area."""
    aspect = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


# --- deterministic per-epoch randomness --------------------------------------------------------------------------


def item_random(seed: int, epoch: int, index: int, purpose: str) -> random.Random:
    """A random generator that depends only on (seed, epoch, item, purpose): resumable and process-independent."""
    digest = hashlib.sha256(f"{seed}:{epoch}:{index}:{purpose}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


# --- transforms --------------------------------------------------------------------------------------------------


@dataclass
class TrainExample:
    """One prepared image with its SDXL size conditioning."""

    pixel_values: torch.Tensor  # [3, H, W] in [-1, 1]
    caption: str
    original_size: tuple[int, int]  # (height, width), as SDXL's time ids order it
    crop_top_left: tuple[int, int]  # (top, left)
    target_size: tuple[int, int]  # (height, width)
    index: int
    flipped: bool
    is_class: bool
    cache_key: tuple = ()  # everything that determines the pixels: the latent cache's key


def prepare_image(
    image: Image.Image,
    target: tuple[int, int],
    *,
    center_crop: bool,
    flip: bool,
    rng: random.Random,
    interpolation: int = Image.BILINEAR,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Resize ``image`` to cover ``target`` (width, height), crop to it, maybe flip; return pixels and (top, left).

    The crop offset is reported in the coordinates of the resized image, as SDXL's ``crops_coords_top_left``
    expects; a horizontal flip mirrors the left offset, so the conditioning describes the pixels actually used.
    """
    tw, th = target
    w, h = image.size
    scale = max(tw / w, th / h)
    rw, rh = max(tw, round(w * scale)), max(th, round(h * scale))
    image = image.resize((rw, rh), interpolation)
    if center_crop:
        top, left = (rh - th) // 2, (rw - tw) // 2
    else:
        top, left = rng.randint(0, rh - th), rng.randint(0, rw - tw)
    image = image.crop((left, top, left + tw, top + th))
    if flip:
        image = ImageOps.mirror(image)
        left = rw - tw - left
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous(), (top, left)


def training_buckets(
    resolution: int, enable_bucket: bool, steps: int = 64, min_reso: int | None = None, max_reso: int | None = None
) -> list[tuple[int, int]]:
    """The (width, height) sizes images train at: aspect-ratio buckets, or the one square size."""
    return make_buckets(resolution, steps, min_reso, max_reso) if enable_bucket else [(resolution, resolution)]


def smaller_than_their_bucket(records: list[ImageRecord], buckets, no_upscale: bool = False) -> list[str]:
    """The names of the images smaller than the size they would train at; with ``no_upscale`` any such image is a
    ``TrainingDataError`` (raised before a model loads, from ``read_instances``)."""
    small = []
    for i, record in enumerate(records):
        width, height = bucket_for_size(record.size, buckets)
        if record.size[0] < width or record.size[1] < height:
            small.append(record.path.name if record.path else f"row {i}")
    if small and no_upscale:
        raise TrainingDataError(
            f"{len(small)} images are smaller than their training size ({', '.join(small[:5])}); "
            "lower --resolution or drop --no_upscale to let them be upscaled."
        )
    return small


class DreamBoothDataset:
    """Instance (and optional class) images, repeated, bucketed and augmented per epoch.

    ``example(index, epoch)`` is deterministic in (seed, epoch, index). Indices ``[0, len(instances) * repeats)``
    are instance images; class images (prior preservation) are addressed separately via ``class_example``.
    """

    def __init__(
        self,
        instances: list[ImageRecord],
        *,
        resolution: int,
        seed: int,
        repeats: int = 1,
        center_crop: bool = False,
        random_flip: bool = False,
        caption_dropout_rate: float = 0.0,
        enable_bucket: bool = False,
        bucket_reso_steps: int = 64,
        min_bucket_reso: int | None = None,
        max_bucket_reso: int | None = None,
        no_upscale: bool = False,
        class_images: list[ImageRecord] | None = None,
        interpolation: int = Image.BILINEAR,
    ):
        if repeats < 1:
            raise TrainingDataError(f"--repeats must be at least 1, got {repeats}.")
        if not 0.0 <= caption_dropout_rate <= 1.0:
            raise TrainingDataError(f"--caption_dropout_rate must be in [0, 1], got {caption_dropout_rate}.")
        self.instances = instances
        self.class_images = class_images or []
        self.resolution, self.seed, self.repeats = resolution, seed, repeats
        self.center_crop, self.random_flip = center_crop, random_flip
        self.caption_dropout_rate = caption_dropout_rate
        self.interpolation = interpolation
        self.buckets = training_buckets(resolution, enable_bucket, bucket_reso_steps, min_bucket_reso, max_bucket_reso)
        self.instance_buckets = [bucket_for_size(r.size, self.buckets) for r in instances]
        small = smaller_than_their_bucket(instances, self.buckets, no_upscale)
        if small:
            warnings.warn(
                f"{len(small)} images are smaller than their training size and will be upscaled: "
                f"{', '.join(small[:5])}.",
                stacklevel=2,
            )

    def __len__(self) -> int:
        return len(self.instances) * self.repeats

    def record(self, index: int) -> ImageRecord:
        return self.instances[index % len(self.instances)]

    def bucket(self, index: int) -> tuple[int, int]:
        return self.instance_buckets[index % len(self.instances)]

    def flip_for(self, index: int, epoch: int) -> bool:
        return self.random_flip and item_random(self.seed, epoch, index, "flip").random() < 0.5

    def _make(self, record: ImageRecord, bucket, index: int, epoch: int, flip: bool, is_class: bool) -> TrainExample:
        record_index = index % (len(self.class_images) if is_class else len(self.instances))
        rng = item_random(self.seed, epoch, index, "crop" + ("-class" if is_class else ""))
        pixels, crop = prepare_image(
            record.open(), bucket, center_crop=self.center_crop, flip=flip, rng=rng, interpolation=self.interpolation
        )
        caption = record.caption
        if not is_class and self.caption_dropout_rate > 0:
            if item_random(self.seed, epoch, index, "caption").random() < self.caption_dropout_rate:
                caption = ""
        w, h = record.size
        return TrainExample(
            pixel_values=pixels,
            caption=caption,
            original_size=(h, w),
            crop_top_left=crop,
            target_size=(bucket[1], bucket[0]),
            index=index,
            flipped=flip,
            is_class=is_class,
            cache_key=(is_class, record_index, flip, crop, tuple(bucket)),
        )

    def example(self, index: int, epoch: int) -> TrainExample:
        """Instance example ``index`` as seen in ``epoch``."""
        flip = self.flip_for(index, epoch)
        return self._make(self.record(index), self.bucket(index), index, epoch, flip, is_class=False)

    def class_example(self, index: int, epoch: int, bucket: tuple[int, int]) -> TrainExample:
        """Class (prior-preservation) example ``index % len(class_images)`` in ``epoch``, sized to ``bucket``.

        Class images are paired with the batch's instance images, so they take the instance bucket's size.
        """
        i = index % len(self.class_images)
        flip = self.random_flip and item_random(self.seed, epoch, i, "flip-class").random() < 0.5
        return self._make(self.class_images[i], bucket, i, epoch, flip, is_class=True)


# --- batching ----------------------------------------------------------------------------------------------------


def _indices_by_bucket(dataset: DreamBoothDataset) -> dict[tuple[int, int], list[int]]:
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for index in range(len(dataset)):
        by_bucket.setdefault(dataset.bucket(index), []).append(index)
    return by_bucket


def epoch_batches(
    dataset: DreamBoothDataset, batch_size: int, epoch: int, seed: int, shuffle: bool = True
) -> list[list[int]]:
    """All batches of one epoch, each within a single bucket; the order depends only on (seed, epoch).

    Items are shuffled within their bucket, cut into batches (a bucket's last batch may be smaller), and the batches
    shuffled, so the same bucket does not run in one long streak.
    """
    by_bucket = _indices_by_bucket(dataset)
    rng = random.Random(f"{seed}:{epoch}:batches")
    batches = []
    for bucket in sorted(by_bucket):
        indices = by_bucket[bucket]
        if shuffle:
            rng.shuffle(indices)
        batches.extend(indices[i : i + batch_size] for i in range(0, len(indices), batch_size))
    if shuffle:
        rng.shuffle(batches)
    return batches


def short_batches_message(dataset: DreamBoothDataset, batch_size: int) -> str | None:
    """A sentence when no batch can be as large as ``batch_size`` (batches never mix buckets), else None."""
    by_bucket = _indices_by_bucket(dataset)
    largest = max(map(len, by_bucket.values()), default=0)
    if largest == 0 or largest >= batch_size:
        return None
    where = "images" if len(by_bucket) == 1 else f"images in the largest of {len(by_bucket)} buckets"
    return (
        f"--train_batch_size {batch_size} is larger than the {largest} {where}, so every batch holds at most "
        f"{largest}: add images, use --repeats {math.ceil(batch_size / largest)}, or lower --train_batch_size."
    )


def shard_batches(batches: list[list[int]], process_index: int, num_processes: int) -> list[list[int]]:
    """This process's share of an epoch: every ``num_processes``-th batch, cut so all processes run equally long."""
    usable = len(batches) // num_processes * num_processes or len(batches)
    return batches[process_index:usable:num_processes] if num_processes > 1 else batches


def collate(examples: list[TrainExample]) -> dict:
    """Stack examples of one bucket into a batch, with SDXL's time ids (original, crop top-left, target)."""
    time_ids = [list(e.original_size) + list(e.crop_top_left) + list(e.target_size) for e in examples]
    return {
        "pixel_values": torch.stack([e.pixel_values for e in examples]),
        "captions": [e.caption for e in examples],
        "time_ids": torch.tensor(time_ids, dtype=torch.float32),
        "indices": [e.index for e in examples],
        "flipped": [e.flipped for e in examples],
        "is_class": [e.is_class for e in examples],
        "cache_keys": [e.cache_key for e in examples],
    }


class EpochBatches(torch.utils.data.Dataset):
    """One epoch's batches as a map-style dataset: item i is the collated batch ``batches[skip + i]`` (instance
    examples, then as many class examples when ``with_prior``). Every example is a function of (seed, epoch, index),
    so ``DataLoader`` workers produce exactly what the main process would."""

    def __init__(
        self, dataset: DreamBoothDataset, batches: list[list[int]], epoch: int, with_prior: bool, skip: int = 0
    ):
        self.dataset, self.batches, self.epoch, self.with_prior = dataset, batches[skip:], epoch, with_prior

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        batch = self.batches[i]
        examples = [self.dataset.example(j, self.epoch) for j in batch]
        if self.with_prior:
            examples += [self.dataset.class_example(j, self.epoch, self.dataset.bucket(j)) for j in batch]
        return collate(examples)


def _as_is(batch: dict) -> dict:
    return batch


def epoch_loader(batches: EpochBatches, num_workers: int = 0) -> torch.utils.data.DataLoader:
    """A ``DataLoader`` over already-formed batches, in order, with ``num_workers`` worker processes (0: in this
    process). Batching and shuffling stay in ``epoch_batches`` so that resuming mid-epoch stays exact."""
    return torch.utils.data.DataLoader(
        batches, batch_size=None, shuffle=False, num_workers=num_workers, collate_fn=_as_is,
        persistent_workers=False,
    )  # fmt: skip
