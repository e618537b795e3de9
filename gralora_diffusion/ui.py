"""The Gradio app: adapter rows with weight sliders, prompt tags, generation settings, a gallery, an X/Y grid.

    gralora-app --base stabilityai/stable-diffusion-xl-base-1.0 --adapters ./adapters --port 7860
    python app/app.py --adapters ./adapters          # the offline toy base, no download

Layout only: every decision about adapters and generation is made by ``gralora_diffusion.studio``, which the
functions here call (and which the tests call directly too).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from PIL import Image

from .studio import SEED_RANGE, AdapterChoice, AdapterLibrary, GenerationRequest, Studio, StudioError

ROW_FIELDS = 6  # enabled, name, weight, separate, unet weight, text-encoder weight
HELP = """Pick adapters in the rows (or write `<gralora:NAME:WEIGHT>` in the prompt: the tag is removed from the text
and merged with the rows; a tag for an adapter that also has a row sets its weight). Weights go from -{w:g} to {w:g}
(tags too); negative weights push away from what the adapter learned. Width and height: multiples of 8 from {min} to
{max}; an X/Y grid has at most {cells} cells. The preview beside an adapter is `NAME.preview.png` (or `NAME.png`)
next to its file, or the latest validation image of its training folder."""


def rows_to_choices(values: list) -> list[AdapterChoice]:
    """Flat row values (ROW_FIELDS per row) from the UI into adapter choices."""
    choices = []
    for i in range(0, len(values), ROW_FIELDS):
        enabled, name, weight, separate, unet_w, te_w = values[i : i + ROW_FIELDS]
        if not enabled or not name:
            continue
        choices.append(
            AdapterChoice(
                name=name,
                weight=float(weight),
                unet_weight=float(unet_w) if separate else None,
                text_encoder_weight=float(te_w) if separate else None,
            )
        )
    return choices


def make_generate_fn(studio: Studio, outputs: Path):
    """The function behind the Generate button (and the ``/generate`` API)."""
    import gradio as gr

    def generate(
        prompt, negative_prompt, steps, guidance, width, height, scheduler, seed, random_seed, num_images, *rows,
        progress=gr.Progress(),  # noqa: B008 (Gradio injects progress through this default)
    ):  # fmt: skip
        request = GenerationRequest(
            prompt=prompt or "",
            negative_prompt=negative_prompt or "",
            steps=int(steps),
            guidance_scale=float(guidance),
            width=int(width),
            height=int(height),
            scheduler=scheduler,
            seed=int(seed),
            random_seed=bool(random_seed),
            num_images=int(num_images),
            adapters=rows_to_choices(list(rows)),
        )
        try:
            result = studio.generate(request, progress=lambda f: progress(f, desc="denoising"))
        except StudioError as err:
            raise gr.Error(str(err)) from None
        status = [f"Adapter switch: {result.switch_ms:.0f} ms." if result.switch_ms else "Adapters unchanged."]
        status += [f"**{name}** skipped: {why}" for name, why in result.errors.items()]
        if result.cancelled:
            return [], str(result.seed), "Cancelled."
        outputs.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        gallery = []
        for i, image in enumerate(result.images):
            seed = (result.seed + i) % SEED_RANGE
            path = studio.save_png(image, outputs / f"{stamp}-{seed}-{i}.png", result, i)
            gallery.append((str(path), f"seed {seed}"))
        return gallery, str(result.seed), "\n\n".join(status)

    return generate


def build_ui(studio: Studio, outputs: Path, rows: int = 5):
    import gradio as gr

    library = studio.library
    names = library.names()

    def describe(name):
        if not name:
            return ""
        try:
            return library.info(name).describe()
        except (StudioError, ValueError) as err:
            return f"cannot use this adapter: {err}"

    def preview_of(name):
        """The row's preview as pixels (Gradio serves files only from allowed folders; the adapter folder is not one
        and should not become one)."""
        if not name:
            return None
        try:
            path = library.preview(name)
            if path is None:
                return None
            with Image.open(path) as image:
                image.thumbnail((192, 192))
                return image.convert("RGB")
        except (StudioError, ValueError, OSError):
            return None

    w_max = studio.limits.max_weight
    defaults = studio.defaults
    with gr.Blocks(title="GraLoRA studio") as demo:
        gr.Markdown(
            "# GraLoRA studio\n"
            + HELP.format(
                min=studio.limits.min_size, max=studio.limits.max_size, w=w_max, cells=studio.limits.max_grid_cells
            )
        )
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column(scale=3):
                    prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt")
                    negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="negative-prompt")
                    row_inputs, dropdowns, infos, previews = [], [], [], []
                    for i in range(rows):
                        with gr.Group():
                            with gr.Row():
                                default = names[i] if i < len(names) else None
                                preview = gr.Image(
                                    preview_of(default), label="Preview", type="pil", height=96, width=96,
                                    interactive=False, show_label=False, container=False, scale=0, min_width=96,
                                    elem_id=f"row{i}-preview",
                                )  # fmt: skip
                                with gr.Column(scale=4):
                                    with gr.Row():
                                        enabled = gr.Checkbox(
                                            label=f"Adapter {i + 1}", value=False, elem_id=f"row{i}-enable"
                                        )
                                        name = gr.Dropdown(
                                            names, value=default, label="Adapter", elem_id=f"row{i}-name"
                                        )
                                        weight = gr.Slider(
                                            -w_max, w_max, value=1.0, step=0.05, label="Weight",
                                            elem_id=f"row{i}-weight",
                                        )  # fmt: skip
                                    info = gr.Markdown(describe(default), elem_id=f"row{i}-info")
                            with gr.Accordion("Separate UNet / text-encoder weights", open=False):
                                separate = gr.Checkbox(label="Use separate weights", value=False)
                                unet_w = gr.Slider(-w_max, w_max, value=1.0, step=0.05, label="UNet weight")
                                te_w = gr.Slider(-w_max, w_max, value=1.0, step=0.05, label="Text-encoder weight")
                        name.change(describe, name, info)
                        name.change(preview_of, name, preview)
                        previews.append(preview)
                        row_inputs += [enabled, name, weight, separate, unet_w, te_w]
                        dropdowns.append(name)
                        infos.append(info)
                    refresh = gr.Button("Refresh adapter list", size="sm")
                with gr.Column(scale=2):
                    with gr.Row():
                        steps = gr.Slider(1, studio.limits.max_steps, value=defaults["steps"], step=1, label="Steps")
                        guidance = gr.Slider(
                            0, studio.limits.max_guidance, value=defaults["guidance_scale"], step=0.5,
                            label="Guidance scale",
                            elem_id="guidance",
                        )  # fmt: skip
                    with gr.Row():
                        width = gr.Number(value=defaults["width"], precision=0, label="Width", elem_id="width")
                        height = gr.Number(value=defaults["height"], precision=0, label="Height", elem_id="height")
                    scheduler = gr.Dropdown(list(studio.schedulers), value="Euler", label="Scheduler")
                    with gr.Row():
                        seed = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
                        random_seed = gr.Checkbox(value=True, label="Random seed", elem_id="random-seed")
                        num_images = gr.Slider(1, studio.limits.max_images, value=1, step=1, label="Images")
                    with gr.Row():
                        go = gr.Button("Generate", variant="primary", elem_id="generate")
                        stop = gr.Button("Cancel", elem_id="cancel")
                    gallery = gr.Gallery(label="Results", format="png", columns=2, elem_id="gallery")
                    used_seed = gr.Textbox(label="Seed used", interactive=False, elem_id="used-seed")
                    status = gr.Markdown(elem_id="status")
            inputs = [prompt, negative, steps, guidance, width, height, scheduler, seed, random_seed, num_images]
            event = go.click(
                make_generate_fn(studio, outputs),
                inputs + row_inputs,
                [gallery, used_seed, status],
                api_name="generate",
            )
            stop.click(studio.cancel, None, None, cancels=[event], api_name="cancel")

        with gr.Tab("X/Y grid"):
            gr.Markdown("The prompt, seed and settings of the Generate tab, over weights of one or two adapters.")
            with gr.Row():
                x_name = gr.Dropdown(names, value=names[0] if names else None, label="X adapter")
                x_weights = gr.Textbox(value="0, 0.5, 1, 1.5", label="X weights")
                y_name = gr.Dropdown([""] + names, value="", label="Y adapter (optional)")
                y_weights = gr.Textbox(value="0, 1", label="Y weights")
            grid_button = gr.Button("Render grid", variant="primary")
            grid_image = gr.Image(label="Grid", type="pil", format="png")

            def render_grid(x_adapter, x_values, y_adapter, y_values, *values):
                try:
                    request = GenerationRequest(
                        prompt=values[0] or "", negative_prompt=values[1] or "", steps=int(values[2]),
                        guidance_scale=float(values[3]), width=int(values[4]), height=int(values[5]),
                        scheduler=values[6], seed=int(values[7]), adapters=rows_to_choices(list(values[10:])),
                    )  # fmt: skip
                    xs = [float(v) for v in x_values.replace(";", ",").split(",") if v.strip()]
                    ys = [float(v) for v in y_values.replace(";", ",").split(",") if v.strip()] if y_adapter else None
                    grid, _ = studio.xy_grid(request, x_adapter, xs, y_adapter or None, ys)
                except ValueError as err:
                    raise gr.Error(str(err)) from None
                return grid

            grid_button.click(render_grid, [x_name, x_weights, y_name, y_weights, *inputs, *row_inputs], grid_image)

        def refresh_lists(*selected):
            fresh = library.names()
            return (
                [gr.update(choices=fresh) for _ in dropdowns]
                + [gr.update(choices=fresh), gr.update(choices=[""] + fresh)]
                + [preview_of(name if name in fresh else None) for name in selected]  # pictures may have changed
            )

        refresh.click(refresh_lists, dropdowns, [*dropdowns, x_name, y_name, *previews])
    demo.queue(default_concurrency_limit=1, max_size=64)
    return demo


def load_studio(
    base: str | None,
    adapters: str | Path,
    device: str | None = None,
    dtype: str | None = None,
    single_file_config: str | None = None,
) -> Studio:
    """Load the pipeline once (the offline toy base when ``base`` is None; a folder, hub id or single ``.safetensors``
    checkpoint otherwise) and wrap it with the adapter folder."""
    import torch

    from .bases import base_defaults, load_pipeline, resolve_base

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = getattr(torch, dtype) if dtype else (torch.float16 if device == "cuda" else torch.float32)
    source = resolve_base(base)
    pipe = load_pipeline(source, single_file_config=single_file_config, torch_dtype=torch_dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    return Studio(pipe, AdapterLibrary(adapters), base_name=base or "toy-sdxl", defaults=base_defaults(base))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="GraLoRA studio: blend GraLoRA adapters and generate.")
    p.add_argument(
        "--base",
        default=None,
        help="SDXL folder, hub id or one .safetensors checkpoint; toy, toy-world: offline toy bases (default: toy)",
    )
    p.add_argument(
        "--single_file_config",
        default=None,
        help="for a single-file --base: a diffusers folder or hub id with its architecture's configs "
        "(default: stabilityai/stable-diffusion-xl-base-1.0)",
    )
    p.add_argument("--adapters", default="adapters", help="folder of GraLoRA .safetensors adapters")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--rows", type=int, default=5, help="number of adapter rows")
    p.add_argument("--outputs", default="outputs/app", help="where generated PNGs are written")
    p.add_argument("--listen", action="store_true", help="listen on all interfaces (default: 127.0.0.1 only)")
    p.add_argument("--share", action="store_true", help="open a public Gradio share link")
    p.add_argument("--auth", default=None, help="user:password required to use the app")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, help="float16 / bfloat16 / float32")
    return p.parse_args(argv)


def launch(args: argparse.Namespace, block: bool = True):
    auth = None
    if args.auth:
        if ":" not in args.auth:
            sys.exit("error: --auth must be user:password")
        auth = tuple(args.auth.split(":", 1))
    studio = load_studio(args.base, args.adapters, args.device, args.dtype, args.single_file_config)
    outputs = Path(args.outputs).resolve()
    outputs.mkdir(parents=True, exist_ok=True)
    demo = build_ui(studio, outputs, rows=args.rows)
    host = "0.0.0.0" if args.listen else "127.0.0.1"
    if args.listen:
        print("--listen: the app accepts connections from other machines on this network.", flush=True)
    if args.share:
        print("--share: the app is reachable by anyone with the public link Gradio prints.", flush=True)
    demo.launch(
        server_name=host, server_port=args.port, share=args.share, auth=auth, allowed_paths=[str(outputs)],
        prevent_thread_lock=not block, show_error=True,
    )  # fmt: skip
    return demo, studio


def main(argv=None) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)  # entry point only
    launch(parse_args(argv))


if __name__ == "__main__":
    main()
