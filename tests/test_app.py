"""The Gradio app served for real on 127.0.0.1: the API through gradio_client, and the page in a real browser."""

from __future__ import annotations

import os
import shutil
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from helpers import make_adapter_file
from PIL import Image

pytest.importorskip("gradio")
from gralora_diffusion import ui  # noqa: E402
from gralora_diffusion.studio import AdapterChoice, GenerationRequest  # noqa: E402

ROWS = 3
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    make_adapter_file(
        folder / "dog.safetensors", seed=1, b_scale=0.2, metadata={"trigger_prompt": "a photo of sks dog"}
    )
    make_adapter_file(folder / "style.safetensors", seed=2, rank=16, gralora_k=4, text_encoders=(), b_scale=0.2)
    Image.new("RGB", (64, 64), (27, 159, 159)).save(folder / "style.preview.png")  # the row's preview picture
    outputs = tmp_path_factory.mktemp("outputs")
    port = free_port()
    args = ui.parse_args(
        ["--adapters", str(folder), "--port", str(port), "--rows", str(ROWS), "--outputs", str(outputs)]
    )
    demo, studio = ui.launch(args, block=False)
    studio.limits.min_size = 32
    yield {"url": f"http://127.0.0.1:{port}/", "studio": studio, "outputs": outputs, "demo": demo}
    demo.close()


def inputs(seed: int, weight: float = 0.8, size: int = 64):
    settings = ["a photo of sks dog", "", 2, 5.0, size, size, "Euler", seed, False, 1]
    rows = [True, "dog", weight, False, 1.0, 1.0, True, "style", -0.5, False, 1.0, 1.0]
    rows += [False, None, 1.0, False, 1.0, 1.0] * (ROWS - 2)
    return settings + rows


def gallery_paths(result) -> list[str]:
    gallery = result[0]
    return [item["image"] if isinstance(item, dict) else item[0] for item in gallery]


def test_binds_to_loopback_only(server):
    assert server["url"].startswith("http://127.0.0.1:")
    assert server["demo"].server_name == "127.0.0.1"


def test_ten_concurrent_api_requests_complete_and_reproduce(server):
    from gradio_client import Client

    client = Client(server["url"], verbose=False)
    seeds = [i % 5 for i in range(10)]
    with ThreadPoolExecutor(max_workers=10) as pool:
        jobs = [pool.submit(lambda s: client.predict(*inputs(s), api_name="/generate"), s) for s in seeds]
        results = [job.result(timeout=600) for job in jobs]
    images = []
    for seed, result in zip(seeds, results):
        paths = gallery_paths(result)
        assert len(paths) == 1 and result[1] == str(seed)
        images.append(np.asarray(Image.open(paths[0]).convert("RGB"), dtype=np.int16))
    for i in range(5):
        assert np.array_equal(images[i], images[i + 5])  # same seed, same image
        assert np.abs(images[i] - images[(i + 1) % 5]).mean() > 1  # other seed, other image
    direct = server["studio"].generate(
        GenerationRequest(
            prompt="a photo of sks dog",
            steps=2,
            width=64,
            height=64,
            seed=3,
            adapters=[AdapterChoice("dog", 0.8), AdapterChoice("style", -0.5)],
        )  # fmt: skip
    )
    assert np.array_equal(np.asarray(direct.images[0], dtype=np.int16), images[3])


def test_bad_size_is_a_clear_error_not_a_crash(server):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(server["url"], verbose=False)
    with pytest.raises(AppError, match="Width 70 is not allowed"):
        client.predict(*inputs(1, size=70), api_name="/generate")
    assert gallery_paths(client.predict(*inputs(1), api_name="/generate"))  # the app still works


@pytest.mark.skipif(not os.path.exists(CHROMIUM) and not os.environ.get("CI"), reason="Debian's chromium not installed")
def test_browser_generates_with_two_adapters(server, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"],
        )  # fmt: skip
        page = browser.new_page(viewport={"width": 1400, "height": 1200})
        page.goto(server["url"])
        page.wait_for_selector("#generate")
        assert "trigger: 'a photo of sks dog'" in page.locator("#row0-info").inner_text()
        assert page.locator("#row1-preview img").count() == 1 and page.locator("#row0-preview img").count() == 0
        page.locator("#row2-name input").fill("style")  # picking an adapter shows its preview
        page.keyboard.press("Enter")
        page.wait_for_selector("#row2-preview img", timeout=30_000)
        assert page.locator("#width input").input_value() == "64"  # the toy base's own size, not 1024
        page.locator("#row0-enable input[type=checkbox]").check()
        page.locator("#row1-enable input[type=checkbox]").check()
        weight = page.locator("#row1-weight input[type=number]")
        weight.fill("-0.5")
        weight.press("Enter")
        page.locator("#prompt textarea").fill("a photo of sks dog")
        page.locator("#width input").fill("64")
        page.locator("#height input").fill("64")
        page.locator("#random-seed input[type=checkbox]").uncheck()
        page.locator("#seed input").fill("4242")
        page.locator("#generate").click()
        page.wait_for_selector("#gallery img", timeout=120_000)
        page.wait_for_function("document.querySelector('#used-seed textarea, #used-seed input').value !== ''")
        shown_seed = page.locator("#used-seed textarea, #used-seed input").first.input_value()
        page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
        browser.close()
    assert shown_seed == "4242"
    assert (tmp_path / "app.png").stat().st_size > 10_000
    saved = sorted(Path(server["outputs"]).glob("*-4242-0.png"), key=lambda p: p.stat().st_mtime)
    assert saved, "the generated PNG was not written"
    params = Image.open(saved[-1]).info["parameters"]
    assert "Seed: 4242, Size: 64x64" in params
    assert "dog:unet=1/text_encoder=1/text_encoder_2=1" in params and "style:unet=-0.5" in params


@pytest.mark.parametrize(
    "flags,expected,notice",
    [
        ([], {"server_name": "127.0.0.1", "share": False, "auth": None}, None),
        (["--listen"], {"server_name": "0.0.0.0", "share": False}, "accepts connections from other machines"),
        (["--share"], {"server_name": "127.0.0.1", "share": True}, "reachable by anyone with the public link"),
        (["--auth", "ann:s3:cret"], {"auth": ("ann", "s3:cret")}, None),
    ],
)
def test_network_flags_reach_gradio_with_a_notice(flags, expected, notice, monkeypatch, tmp_path, capsys):
    """--listen / --share / --auth as Gradio receives them (its launch is replaced: no server, no tunnel)."""
    import gradio as gr

    from gralora_diffusion.studio import AdapterLibrary, Studio
    from gralora_diffusion.toy import build_toy_sdxl_pipeline

    captured = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: captured.update(kwargs))
    monkeypatch.setattr(
        ui, "load_studio", lambda base, adapters, *rest: Studio(build_toy_sdxl_pipeline(0), AdapterLibrary(adapters))
    )
    args = ui.parse_args(["--adapters", str(tmp_path), "--outputs", str(tmp_path / "out"), *flags])
    ui.launch(args, block=False)
    assert {k: captured[k] for k in expected} == expected
    printed = capsys.readouterr().out
    if notice:
        assert notice in printed
    else:
        assert "--listen" not in printed and "--share" not in printed


def test_auth_without_a_colon_is_refused_before_anything_loads(monkeypatch, tmp_path):
    def must_not_load(*args):
        raise AssertionError("the pipeline was loaded before the flags were checked")

    monkeypatch.setattr(ui, "load_studio", must_not_load)
    args = ui.parse_args(["--adapters", str(tmp_path), "--auth", "anna"])
    with pytest.raises(SystemExit, match="--auth must be user:password"):
        ui.launch(args, block=False)
