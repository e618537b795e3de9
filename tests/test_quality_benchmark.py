"""benchmarks/quality.py (v2) end to end at a tiny budget, and its statistics against independent computations: the
lr is picked on seeds that are not reported, paired differences are the per-seed differences of the runs, the
bootstrap interval behaves as a 95% interval of the mean, and the real-model path (DINOv2 through transformers) scores
with the same embeddings as ``image_metrics``."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import quality  # noqa: E402


def tiny_run(out: Path, *extra: str) -> dict:
    command = [sys.executable, str(REPO / "benchmarks" / "quality.py"), "--batch", "1", "--images", "2",
               "--sampling_steps", "2", "--out", str(out), *extra]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_tiny_toy_run_picks_lrs_on_unreported_seeds_and_pairs_seed_by_seed(tmp_path):
    out = tmp_path / "quality.json"
    report = tiny_run(out, "--methods", "lora-8", "gralora-8", "hybrid-8", "--seeds", "0", "1", "2",
                      "--tune_seeds", "7", "--lrs", "1e-4", "3e-3", "--budgets", "2", "3",
                      "--long_methods", "lora-8", "gralora-8")  # fmt: skip
    assert report["attention_width"] == 96 and report["metric"] == "evaluator"
    rows = {(row["steps"], row["method"]): row for row in report["table"]}
    assert set(rows) == {(2, "lora-8"), (2, "gralora-8"), (2, "hybrid-8"), (3, "lora-8"), (3, "gralora-8")}
    assert rows[(2, "lora-8")]["params"] == rows[(2, "gralora-8")]["params"] == rows[(2, "hybrid-8")]["params"] > 0
    assert rows[(2, "gralora-8")]["r_over_d"] == pytest.approx(8 / 96)
    for (steps, method), row in rows.items():
        runs = [r for r in report["runs"] if (r["steps"], r["method"]) == (steps, method)]
        tuning = [r for r in runs if r["seed"] == 7]
        assert sorted(r["lr"] for r in tuning) == [1e-4, 3e-3]
        assert row["lr"] == max(tuning, key=lambda r: r["similarity"] - r["drift"])["lr"]
        reported = sorted((r for r in runs if r["seed"] != 7), key=lambda r: r["seed"])
        assert [r["seed"] for r in reported] == row["seeds"] == [0, 1, 2]
        assert all(r["lr"] == row["lr"] for r in reported)
        values = [r["similarity"] for r in reported]
        assert row["similarity"]["mean"] == pytest.approx(statistics.fmean(values))
        assert row["similarity"]["ci95"][0] <= row["similarity"]["mean"] <= row["similarity"]["ci95"][1]
    pairs = {(p["steps"], p["method"]): p for p in report["pairs"]}
    assert set(pairs) == {(2, "gralora-8"), (2, "hybrid-8"), (3, "gralora-8")}
    for (steps, method), pair in pairs.items():
        mine = {r["seed"]: r for r in report["runs"] if (r["steps"], r["method"], r["lr"]) == (steps, method,
                rows[(steps, method)]["lr"])}  # fmt: skip
        theirs = {r["seed"]: r for r in report["runs"] if (r["steps"], r["method"], r["lr"]) == (steps, "lora-8",
                  rows[(steps, "lora-8")]["lr"])}  # fmt: skip
        gaps = [mine[s]["drift"] - theirs[s]["drift"] for s in (0, 1, 2)]
        assert pair["drift"]["mean"] == pytest.approx(statistics.fmean(gaps))
        assert pair["drift"]["wins"] == sum(g > 0 for g in gaps)
    markdown = out.with_suffix(".md").read_text()
    assert "**2 steps**" in markdown and "**3 steps**" in markdown and "| gralora-8 | 1/12 |" in markdown
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_depends_on_its_method_lr_and_seed_only(tmp_path):
    """Adapter init once drew from the shared generator, so changing what ran before changed a run's result."""
    first = tiny_run(tmp_path / "a.json", "--methods", "lora-4", "gralora-4", "--seeds", "0", "--tune_seeds", "5",
                     "--lrs", "1e-3", "--budgets", "2")  # fmt: skip
    alone = tiny_run(tmp_path / "b.json", "--methods", "gralora-4", "--seeds", "0", "--tune_seeds", "5",
                     "--lrs", "1e-3", "--budgets", "2")  # fmt: skip
    keys = ("similarity", "recognised", "drift")
    pick = [r for r in first["runs"] if (r["method"], r["seed"]) == ("gralora-4", 0)][0]
    assert {k: pick[k] for k in keys} == {k: alone["runs"][-1][k] for k in keys}


def test_bootstrap_interval_is_a_95_percent_interval_of_the_mean():
    assert quality.bootstrap_interval([0.25] * 10) == (0.25, 0.25)
    rng = np.random.default_rng(1)
    values = rng.normal(0.3, 0.1, size=40)
    low, high = quality.bootstrap_interval(values)
    half = 1.96 * values.std(ddof=1) / np.sqrt(len(values))  # the normal-theory interval, computed independently
    assert low < values.mean() < high
    assert abs((high - low) / 2 - half) < 0.15 * half
    # coverage: over many samples from a known mean, about 95% of the intervals contain it
    covered = sum(lo <= 0.0 <= hi for lo, hi in (quality.bootstrap_interval(rng.normal(0, 1, 20), samples=2000,
                                                                          seed=i) for i in range(200)))  # fmt: skip
    assert 0.88 <= covered / 200 <= 0.99


def test_bad_method_and_overlapping_seeds_are_one_sentence():
    with pytest.raises(SystemExit, match="unknown method 'dora-8'"):
        quality.parse_args(["--methods", "dora-8"])
    with pytest.raises(SystemExit, match="multiple of 4"):
        quality.parse_args(["--methods", "hybrid-6"])
    with pytest.raises(SystemExit, match="tune_seeds must differ"):
        quality.parse_args(["--seeds", "0", "1", "--tune_seeds", "1"])


def test_real_model_path_scores_with_dinov2_embeddings(tmp_path):
    """``--base`` any SDXL pipeline with ``--metric dinov2``: here the random toy SDXL and a tiny random DINOv2 built
    from a config; the base's similarity equals the mean cosine that ``image_metrics`` computes on the same images."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    from gralora_diffusion.image_metrics import load_image_embedder, mean_cosine

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=56, patch_size=14)).save_pretrained(tmp_path / "dino")  # fmt: skip
    args = quality.parse_args(["--base", "toy", "--metric", "dinov2", "--metric_model", str(tmp_path / "dino"),
                               "--images", "2", "--sampling_steps", "2", "--batch", "1",
                               "--unrelated", "a red car"])  # fmt: skip
    assert args.metric == "dinov2" and args.guidance == 5.0  # SDXL's default, not the toy world's
    bench = quality.Bench(args)
    embed = load_image_embedder("dinov2", tmp_path / "dino", device="cpu")
    scores = bench.judge.scores(bench.instances, bench.base_subject, bench.base_unrelated, bench.base_unrelated)
    assert "recognised" not in scores
    assert scores["similarity"] == pytest.approx(mean_cosine(embed(bench.base_subject), embed(bench.instances)))
    assert scores["drift"] == pytest.approx(0.0, abs=1e-6)  # the base against itself
    result = bench.run("gralora-4", 1e-2, 2, seed=0)
    assert result["params"] > 0 and -1 <= result["similarity"] <= 1 and result["drift"] > 0


def test_resume_reuses_logged_runs_of_the_same_settings_only(tmp_path):
    out = tmp_path / "q.json"
    common = ["--methods", "gralora-4", "--tune_seeds", "5", "--lrs", "1e-3", "--budgets", "2"]
    tiny_run(out, *common, "--seeds", "0")
    log = out.with_suffix(".runs.jsonl")
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["seed"], r["steps"]) for r in lines] == [(5, 2), (0, 2)]
    lines[1]["similarity"] = 0.123456  # a marker: a reused run keeps it, a recomputed one cannot have it
    log.write_text("".join(json.dumps(r) + "\n" for r in lines))
    resumed = tiny_run(out, *common, "--seeds", "0", "1", "--resume")
    by_seed = {r["seed"]: r for r in resumed["runs"]}
    assert by_seed[0]["similarity"] == 0.123456 and set(by_seed) == {0, 1, 5}
    assert len(log.read_text().splitlines()) == 3  # only seed 1 was run and logged
    other = tiny_run(out, *common, "--seeds", "0", "--resume", "--images", "3")  # other settings: nothing reused
    assert all(r["similarity"] != 0.123456 for r in other["runs"])
