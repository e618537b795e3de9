"""The DreamBooth trainer end to end on the toy SDXL: each feature group runs for a few steps, then the adapter is
loaded into a fresh pipeline. Runs go through the real command line (a subprocess per run)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import load_file

import gralora_diffusion as gd
from gralora_diffusion.toy import save_toy_sdxl_pipeline
from gralora_diffusion.training.data import bucket_for_size, make_buckets
from gralora_diffusion.training.dreambooth import main as train_main

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "train_scripts" / "train_dreambooth_gralora_sdxl.py"


@pytest.fixture(scope="module")
def toy_base(tmp_path_factory):
    return save_toy_sdxl_pipeline(tmp_path_factory.mktemp("base") / "toy-sdxl", seed=0)


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory):
    """Four pictures of the 'subject': a red disc on white, in varied places (one wide image)."""
    folder = tmp_path_factory.mktemp("instances")
    for i, size in enumerate([(64, 64), (64, 64), (96, 64), (64, 64)]):
        image = Image.new("RGB", size, (255, 255, 255))
        ImageDraw.Draw(image).ellipse((8 + 4 * i, 10, 48 + 4 * i, 50), fill=(220, 30, 40))
        image.save(folder / f"subject{i}.png")
    (folder / "subject0.txt").write_text("a photo of sks shape, close up")
    return folder


def train(toy_base, instance_dir, output_dir, *extra, check=True, launcher=None, env=None):
    args = [
        f"--pretrained_model_name_or_path={toy_base}",
        f"--instance_data_dir={instance_dir}",
        "--instance_prompt=a photo of sks shape",
        f"--output_dir={output_dir}",
        "--resolution=64",
        "--train_batch_size=2",
        "--rank=8",
        "--learning_rate=5e-3",
        "--lr_warmup_steps=0",
        "--report_to=none",
        *extra,
    ]
    command = (launcher or [sys.executable]) + [str(SCRIPT)] + args
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def metrics(output_dir) -> dict:
    return json.loads((Path(output_dir) / "train_metrics.json").read_text())


@torch.no_grad()
def image(pipe, prompt="a photo of sks shape"):
    g = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=2, height=64, width=64, generator=g, output_type="pt").images


def test_end_to_end_run_learns_and_saves_everything(toy_base, instance_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "sks-shape"
    train(
        toy_base, instance_dir, out, "--max_train_steps=12", "--random_flip", "--caption_dropout_rate=0.2",
        "--snr_gamma=5", "--noise_offset=0.05", "--cache_latents", "--checkpointing_steps=4",
        "--checkpoints_total_limit=2", "--validation_prompt=a photo of sks shape|a blue square",
        "--num_validation_images=1", "--validation_steps=6", "--validation_inference_steps=2",
    )  # fmt: skip
    m = metrics(out)
    assert m["steps"] == 12 and len(m["losses"]) == 12
    assert m["final_eval_loss"] < 0.97 * m["initial_eval_loss"], m  # the training loss on the instances fell
    assert m["latents_encoded"] <= 3 * 4 * 2 + 4  # cached: each (image, flip) variant once, plus the eval pass
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-8"]
    for step in (6, 12):
        assert sorted(p.name for p in (out / "validation" / f"step-{step}").iterdir()) == [
            "prompt0-0.png",
            "prompt1-0.png",
        ]
    card = (out / "README.md").read_text()
    assert "a photo of sks shape" in card and "| rank r | 8 |" in card and "validation/step-12/prompt0-0.png" in card
    preview = out / "sks-shape.preview.png"  # beside the adapter, for the app and A1111
    assert preview.read_bytes() == (out / "validation" / "step-12" / "prompt0-0.png").read_bytes()
    adapter_file = out / "sks-shape.safetensors"
    with safe_open(str(adapter_file), "pt") as f:
        meta = f.metadata()
    assert meta["trigger_prompt"] == "a photo of sks shape" and meta["steps"] == "12"

    pipe = StableDiffusionXLPipeline.from_pretrained(toy_base)
    pipe.set_progress_bar_config(disable=True)
    base_image = image(pipe)
    assert gd.load_gralora_weights(pipe, adapter_file) == "sks-shape"
    assert gd.get_gralora_adapters(pipe) == {"unet": ["sks-shape"]}
    assert (image(pipe) - base_image).abs().mean() > 1e-3


def test_text_encoders_buckets_wide_target_hybrid_bf16(toy_base, instance_dir, tmp_path):
    out = tmp_path / "te"
    result = train(
        toy_base, instance_dir, out, "--max_train_steps=3", "--train_text_encoder", "--text_encoder_lr=1e-3",
        "--resolution=128", "--enable_bucket", "--bucket_reso_steps=32", "--unet_target=wide", "--hybrid_r=4",
        "--gradient_checkpointing",
        "--mixed_precision=bf16", "--output_name=te_adapter", "--use_8bit_adam",
    )  # fmt: skip
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        assert "bitsandbytes is not installed; using torch's AdamW" in result.stderr
    m = metrics(out)
    assert m["mixed_precision"] == "bf16" and m["unet_dtype"] == "bfloat16"  # the frozen UNet ran in bf16
    # each image trained in the bucket closest to its aspect ratio: the 96x64 one in a wide bucket, not 128x128
    sizes = [Image.open(p).size for p in sorted(instance_dir.glob("*.png"))]
    expected = {bucket_for_size(size, make_buckets(128, 32)) for size in sizes}
    assert {tuple(s) for s in m["pixel_sizes"]} == expected and len(expected) == 2
    adapter = gd.read_adapter(out / "te_adapter.safetensors")
    assert set(adapter.components) == {"unet", "text_encoder", "text_encoder_2"}
    unet_modules = adapter.module_names("unet")
    assert any(m.endswith("ff.net.2") for m in unet_modules) and any(m.endswith("proj_in") for m in unet_modules)
    assert adapter.configs["unet"].hybrid_r == 4
    # SDXL never reads the last layer of text encoder 1 (penultimate states only), so it carries no adapter.
    assert not [m for m in adapter.module_names("text_encoder") if ".layers.1." in m]
    assert [m for m in adapter.module_names("text_encoder") if ".layers.0." in m]
    assert [m for m in adapter.module_names("text_encoder_2") if ".layers.1." in m]
    for component, sd in adapter.state_dicts.items():
        assert all(t.dtype == torch.float32 for t in sd.values()), component  # trainable params kept in fp32
        b = [t for k, t in sd.items() if k.endswith("gralora_B")]
        assert any(t.abs().sum() > 0 for t in b), f"{component} was not trained"


def test_prior_preservation_generates_missing_class_images_resumably(toy_base, instance_dir, tmp_path):
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    Image.new("RGB", (64, 64), (0, 128, 0)).save(class_dir / "mine.png")  # one the user already had
    out = tmp_path / "prior"
    common = [
        "--with_prior_preservation", "--class_prompt=a photo of a shape", f"--class_data_dir={class_dir}",
        "--num_class_images=3", "--class_inference_steps=2", "--prior_loss_weight=0.5",
    ]  # fmt: skip
    train(toy_base, instance_dir, out, "--max_train_steps=2", *common)
    names = sorted(p.name for p in class_dir.iterdir())
    assert names == ["class-00000.png", "class-00001.png", "mine.png"]
    stamps = {n: (class_dir / n).stat().st_mtime_ns for n in names}
    assert len(metrics(out)["prior_losses"]) == 2
    train(toy_base, instance_dir, tmp_path / "prior2", "--max_train_steps=1", *common)
    assert {n: (class_dir / n).stat().st_mtime_ns for n in names} == stamps  # nothing regenerated


def test_sigkill_and_resume_gives_the_uninterrupted_weights(toy_base, instance_dir, tmp_path):
    # One thread in all three runs: bit-equal weights need the same reduction order, and with two threads on a
    # machine under outside load the straight and the resumed run differed in the last bits in 2 of 7 runs.
    one_thread = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MKL_DYNAMIC": "FALSE"}
    common = [
        "--max_train_steps=16", "--checkpointing_steps=4", "--random_flip", "--caption_dropout_rate=0.3",
        "--lr_scheduler=cosine", "--lr_warmup_steps=3", "--gradient_accumulation_steps=2", "--noise_offset=0.1",
    ]  # fmt: skip
    train(toy_base, instance_dir, tmp_path / "straight", *common, "--output_name=final", env=one_thread)
    reference = load_file(str(tmp_path / "straight" / "final.safetensors"))

    out = tmp_path / "killed"
    args = [
        sys.executable, str(SCRIPT), f"--pretrained_model_name_or_path={toy_base}",
        f"--instance_data_dir={instance_dir}", "--instance_prompt=a photo of sks shape", f"--output_dir={out}",
        "--resolution=64", "--train_batch_size=2", "--rank=8", "--learning_rate=5e-3", "--report_to=none",
        "--output_name=final", *[a for a in common if not a.startswith("--lr_warmup")], "--lr_warmup_steps=3",
    ]  # fmt: skip
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    process = subprocess.Popen(args, env={**os.environ, **one_thread}, **quiet)
    deadline = time.time() + 300
    while not (out / "checkpoint-4").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "final.safetensors").exists(), "the run finished before it could be killed"
    for folder in out.glob("checkpoint-*"):  # whatever exists looks complete only if it is
        assert (folder / "state.json").exists() and (folder / "adapter.safetensors").exists()
        gd.read_adapter(folder / "adapter.safetensors")

    stale = out / ".final.safetensors.k2j4_x9a.tmp"  # what a kill inside the final adapter write leaves
    stale.write_bytes(b"")
    resume = ["--output_name=final", "--resume_from_checkpoint=latest"]
    train(toy_base, instance_dir, out, *common, *resume, env=one_thread)
    assert not stale.exists() and not list(out.glob(".*.tmp"))
    resumed = load_file(str(out / "final.safetensors"))
    assert resumed.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(resumed[key], value), key
    # the loss history from before the kill survives the resume (it travels in the checkpoints)
    straight, killed = metrics(tmp_path / "straight"), metrics(out)
    assert killed["losses"] == straight["losses"] and len(killed["losses"]) == 16  # one per optimiser step
    assert killed["initial_eval_loss"] == straight["initial_eval_loss"] is not None


def test_two_process_ddp_saves_once_and_loads(toy_base, instance_dir, tmp_path):
    out = tmp_path / "ddp"
    launcher = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2", "--num_machines=1",
        "--mixed_precision=no", "--dynamo_backend=no", "--main_process_port=29571",
    ]  # fmt: skip
    train(
        toy_base, instance_dir, out, "--max_train_steps=3", "--train_batch_size=1", "--checkpointing_steps=2",
        "--train_text_encoder",
        launcher=launcher, env={"ACCELERATE_USE_CPU": "1"},
    )  # fmt: skip
    m = metrics(out)
    assert m["num_processes"] == 2 and m["steps"] == 3
    # the two processes trained on different data yet hold identical weights: their gradients were synchronised
    assert m["replica_data_sums"][0] != m["replica_data_sums"][1]
    assert m["replica_param_sums"][0] == m["replica_param_sums"][1]
    assert [p.name for p in out.glob("*.safetensors")] == ["ddp.safetensors"]
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]
    adapter = gd.read_adapter(out / "ddp.safetensors")
    assert any(t.abs().sum() > 0 for k, t in adapter.state_dicts["unet"].items() if k.endswith("gralora_B"))


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--instance_data_dir=/nonexistent/folder"], "does not exist"),
        (["--rank=6", "--gralora_k=4"], "rank 6 is not divisible by k=4"),
        (["--resume_from_checkpoint=checkpoint-99"], "not a complete checkpoint"),
        (["--dataloader_num_workers=-1"], "must be 0 or more"),
        (["--learning_rate=nan"], "--learning_rate must be a positive finite number, got nan"),
        (["--learning_rate=-1e-4"], "--learning_rate must be a positive finite number"),
        (["--alpha=-8"], "--alpha must be a positive finite number"),
        (["--max_train_steps=0"], "--max_train_steps must be at least 1"),
        (["--max_train_steps=-5"], "--max_train_steps must be at least 1"),
        (["--repeats=0"], "--repeats must be at least 1"),
        (["--resolution=0"], "--resolution must be a positive multiple of 8"),
        (["--checkpointing_steps=0"], "--checkpointing_steps must be at least 1"),
        (["--caption_dropout_rate=2"], "--caption_dropout_rate must be a number from 0 to 1"),
        (["--pretrained_model_name_or_path=/nonexistent/model.safetensors"], "does not exist"),
        (["--pretrained_model_name_or_path=model.ckpt"], "is a pickle checkpoint"),
        (["--no_upscale", "--resolution=128"], "4 images are smaller than their training size"),
    ],
)
def test_bad_input_fails_with_one_line_before_loading(toy_base, instance_dir, tmp_path, capsys, extra, match):
    args = [
        f"--pretrained_model_name_or_path={toy_base}", f"--instance_data_dir={instance_dir}",
        "--instance_prompt=sks", f"--output_dir={tmp_path / 'out'}", *extra,
    ]  # fmt: skip
    assert train_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0]
    assert not (tmp_path / "out").exists()


def test_empty_folder_and_finished_output_are_refused(toy_base, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    base = [f"--pretrained_model_name_or_path={toy_base}", "--instance_prompt=sks"]
    assert train_main([*base, f"--instance_data_dir={empty}", f"--output_dir={tmp_path / 'o'}"]) == 2
    assert "contains no images" in capsys.readouterr().err
    done = tmp_path / "done"
    done.mkdir()
    (done / "done.safetensors").write_bytes(b"x")
    Image.new("RGB", (64, 64)).save(empty / "x.png")
    assert train_main([*base, f"--instance_data_dir={empty}", f"--output_dir={done}"]) == 2
    assert "already holds a finished adapter; pass --overwrite_output_dir" in capsys.readouterr().err


def test_hf_dataset_captions_and_tensorboard_logging(toy_base, instance_dir, tmp_path):
    pytest.importorskip("datasets")
    pytest.importorskip("tensorboard")
    folder = tmp_path / "hf"
    folder.mkdir()
    rows = []
    for i, source in enumerate(sorted(instance_dir.glob("*.png"))):
        Image.open(source).save(folder / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"sks shape number {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    out = tmp_path / "tb"
    result = subprocess.run(
        [
            sys.executable, str(SCRIPT), f"--pretrained_model_name_or_path={toy_base}", f"--dataset_name={folder}",
            "--caption_column=text", "--instance_prompt=unused", f"--output_dir={out}", "--resolution=64",
            "--train_batch_size=2", "--max_train_steps=2", "--report_to=tensorboard", "--validation_prompt=sks",
            "--num_validation_images=1", "--validation_steps=2", "--validation_inference_steps=2",
        ],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_DATASETS_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((out / "logs").rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent), size_guidance={"images": 0})
    acc.Reload()
    assert len(acc.Scalars("loss")) == 2
    assert acc.Tags()["images"]


def test_the_attention_conv_target_trains_every_resnet_convolution_under_bf16(toy_base, instance_dir, tmp_path):
    """Also with --gralora_recompute (linear and conv layers recompute their intermediate in backward): the same
    adapter, up to float rounding."""
    out = tmp_path / "conv"
    logs = {}
    flags = ["--max_train_steps=2", "--unet_target=attention-conv", "--mixed_precision=bf16", "--learning_rate=1e-3"]
    for name, extra in (("conv", []), ("lean", ["--gralora_recompute"])):
        logs[name] = train(toy_base, instance_dir, out, *flags, f"--output_name={name}", *extra).stderr
    lean = gd.read_adapter(out / "lean.safetensors").state_dicts["unet"]
    adapter = gd.read_adapter(out / "conv.safetensors")
    assert lean.keys() == adapter.state_dicts["unet"].keys()
    for key, value in adapter.state_dicts["unet"].items():
        torch.testing.assert_close(lean[key], value, atol=1e-5, rtol=1e-4)
    names = adapter.module_names("unet")
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(toy_base, subfolder="unet")
    convs = [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Conv2d) and n.endswith((".conv1", ".conv2"))]
    assert convs and set(convs) <= set(names) and any(n.endswith("to_q") for n in names)
    sd = adapter.state_dicts["unet"]
    assert all(sd[f"{n}.gralora_B"].abs().max() > 0 for n in convs)  # B starts at zero: every conv was trained
    # the lean run really recomputed, in every adapted layer, convolutions included (the other run: none)
    conv_count = len(adapter.conv_modules())
    lean_line = f"--gralora_recompute: {len(names)} of {len(names)} adapted layers ({conv_count} convolutions)"
    assert lean_line in logs["lean"] and "--gralora_recompute:" not in logs["conv"], logs["lean"][-2000:]


def test_a_diverging_run_stops_with_one_line_naming_the_step_and_saves_nothing(toy_base, instance_dir, tmp_path):
    """AdamW moves every weight by about the learning rate per step: at 1e30 the adapter overflows after step 1."""
    out = tmp_path / "diverged"
    result = train(
        toy_base, instance_dir, out, "--max_train_steps=4", "--learning_rate=1e30", "--checkpointing_steps=1",
        check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stderr.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("error: The loss became") and "at step 2" in last and "Traceback" not in result.stderr
    assert not (out / "diverged.safetensors").exists()  # no non-finite adapter is written
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-1"]  # the last finite state is kept
    gd.read_adapter(out / "checkpoint-1" / "adapter.safetensors")  # and it passes validation (finite)


def test_resuming_with_other_settings_is_one_sentence_before_loading(toy_base, instance_dir, tmp_path, capsys):
    out = tmp_path / "run"
    train(toy_base, instance_dir, out, "--max_train_steps=2", "--checkpointing_steps=2")
    base = [
        f"--pretrained_model_name_or_path={toy_base}", f"--instance_data_dir={instance_dir}",
        "--instance_prompt=a photo of sks shape", f"--output_dir={out}", "--resolution=64", "--report_to=none",
        "--resume_from_checkpoint=latest", "--max_train_steps=4",
    ]  # fmt: skip
    for extra, expected in (
        (["--rank=16"], "checkpoint-2 was trained with rank 8 but this run asks for 16"),
        (["--rank=8", "--alpha=4"], "checkpoint-2 was trained with alpha 16 but this run asks for 4"),
        (["--rank=8", "--train_text_encoder"], "checkpoint-2 was trained without --train_text_encoder"),
        (["--rank=8", "--unet_target=wide"], "checkpoint-2 was trained with --unet_target attention but this run"),
        (["--rank=8", "--unet_target=attention-conv"], "--unet_target attention but this run asks for attention-conv"),
    ):
        capsys.readouterr()
        assert train_main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert expected in err[-1] and err[-1].startswith("error: ")
    # the base is compared as a folder, not as text: the same base by another path resumes, another base does not
    from gralora_diffusion.training.args import build_parser
    from gralora_diffusion.training.data import TrainingDataError
    from gralora_diffusion.training.dreambooth import read_instances

    alias = tmp_path / "same-base"
    alias.symlink_to(toy_base, target_is_directory=True)
    other = save_toy_sdxl_pipeline(tmp_path / "other-base", seed=1)
    for given, refused in ((alias, False), (other, True)):
        args = build_parser().parse_args([*base[1:], f"--pretrained_model_name_or_path={given}", "--rank=8"])
        if refused:
            with pytest.raises(TrainingDataError, match=re.escape(f"trained on {toy_base}, not {other};")):
                read_instances(args)
        else:
            assert len(read_instances(args)) == 4


def test_an_output_dir_that_is_a_file_is_refused_before_loading(toy_base, instance_dir, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    args = [f"--pretrained_model_name_or_path={toy_base}", f"--instance_data_dir={instance_dir}",
            "--instance_prompt=a photo of sks shape", f"--output_dir={taken}"]  # fmt: skip
    assert train_main(args) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert taken.read_text() == "not a folder"
