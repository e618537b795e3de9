"""benchmarks/quality.py end to end at a tiny budget: methods at one rank train the same number of parameters, the
lr pick follows its rule, and the table is what the runs say."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def tiny_run(out: Path, methods: list[str], seeds: list[str], lrs: list[str]) -> dict:
    command = [
        sys.executable, str(REPO / "benchmarks" / "quality.py"), "--methods", *methods, "--seeds", *seeds,
        "--lrs", *lrs, "--steps", "2", "--batch", "1", "--images", "1", "--sampling_steps", "2", "--out", str(out),
    ]  # fmt: skip
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True, timeout=600)
    return json.loads(out.read_text())


def test_quality_benchmark_tiny_run_writes_a_consistent_table(tmp_path):
    out = tmp_path / "quality.json"
    report = tiny_run(out, ["lora-16", "gralora-16"], ["0", "1"], ["1e-4", "1e-3"])
    markdown = out.with_suffix(".md").read_text()
    assert markdown.count("\n| ") == 4  # header, rule, one row per method
    assert report["base"] == "gralora_diffusion/assets/toy-sdxl-world"  # repo-relative, not this machine's path
    rows = {row["method"]: row for row in report["table"]}
    assert rows["lora-16"]["params"] == rows["gralora-16"]["params"] > 0  # equal budgets, as the table claims
    for method, row in rows.items():
        runs = [r for r in report["runs"] if r["method"] == method]
        assert len(runs) == 3  # two lrs on the first seed, then the second seed at the picked lr
        tuning = [r for r in runs if r["seed"] == 0]
        assert row["lr"] == max(tuning, key=lambda r: r["similarity"] - r["drift"])["lr"]
        chosen = [r["similarity"] for r in runs if r["lr"] == row["lr"]]
        assert sorted(chosen) == [row["similarity"]["min"], row["similarity"]["max"]]
        assert all(0 <= r["recognised"] <= 1 and -1 <= r["similarity"] <= 1 for r in runs)
    picked = {m: {r["seed"]: r["similarity"] for r in report["runs"] if r["method"] == m and r["lr"] == rows[m]["lr"]}
              for m in rows}  # fmt: skip
    wins = sum(picked["gralora-16"][s] > picked["lora-16"][s] for s in (0, 1))
    assert f"- gralora-16 vs lora-16: similarity higher on {wins} of 2 seeds" in markdown

    # A run depends on its method, lr and seed only, not on what ran before it in the process (adapter init once
    # drew from the shared generator, so changing the lr grid changed the first seed's results).
    alone = tiny_run(tmp_path / "alone.json", ["gralora-16"], ["0"], ["1e-3"])["runs"][0]
    earlier = next(r for r in report["runs"] if (r["method"], r["lr"], r["seed"]) == ("gralora-16", 1e-3, 0))
    assert {k: alone[k] for k in ("similarity", "recognised", "drift")} == {
        k: earlier[k] for k in ("similarity", "recognised", "drift")
    }
