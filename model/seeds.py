"""Seed spread: the same recipe trained from several top-level seeds, scored on the same test part.

Each run is what `lstm-serve train --seed S` gives (with the default 5 members, an ensemble of seeds S..S+4);
its members are single models, so one set of runs shows both how far retraining can move the shipped kind of
model and how far a single model would move. The baselines do not depend on the seed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from model.config import TrainConfig
from model.evaluate import log_if_spread, save_figure
from model.train import load_series, train


def seed_spread(cfg: TrainConfig, seeds: list[int], progress: bool = True, log: Any = print) -> dict[str, Any]:
    """Train once per top-level seed; return each run's test MAE (model and members) and the baselines'."""
    from tqdm import tqdm

    series = load_series(cfg)
    runs: list[dict[str, Any]] = []
    baselines: dict[str, Any] = {}
    for seed in tqdm(seeds, desc="seeds", unit="seed", disable=not progress):
        run_cfg = dataclasses.replace(cfg, seed=seed, require_beats_persistence=False)
        ckpt = train(run_cfg, progress=False, log=lambda *_: None, series=series)
        test = ckpt["metrics"]["test"]
        members = ckpt["metrics"]["ensemble"]["member_test"]
        runs.append({
            "seed": seed,
            "member_seeds": ckpt["metrics"]["ensemble"]["member_seeds"],
            "lstm": {k: test["lstm"][k] for k in ("mae_h1", "mae_mean")},
            "members": [{k: m[k] for k in ("mae_h1", "mae_mean")} for m in members],
        })  # fmt: skip
        baselines = {
            m: {k: test[m][k] for k in ("mae_h1", "mae_mean")} for m in test if m not in ("lstm", "lstm_streaming")
        }
        log(f"seed {seed}: MAE {test['lstm']['mae_h1']:.3f} / {test['lstm']['mae_mean']:.3f}")
    return {"runs": runs, "baselines": baselines, "summary": summarize(runs), "config": cfg.to_dict()}


def distinct_members(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every single member once (runs from seeds 1 and 2 share members 2-5: the same seeds, the same models)."""
    by_seed = {seed: m for r in runs for seed, m in zip(r["member_seeds"], r["members"], strict=True)}
    return [by_seed[k] for k in sorted(by_seed)]


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Range of the runs' and of the single members' MAE, step 1 and over the horizon."""

    def span(values: list[float]) -> dict[str, float]:
        return {"min": round(min(values), 4), "max": round(max(values), 4), "mean": round(float(np.mean(values)), 4)}

    members = distinct_members(runs)
    return {
        "lstm": {k: span([r["lstm"][k] for r in runs]) for k in ("mae_h1", "mae_mean")},
        "members": {k: span([m[k] for m in members]) for k in ("mae_h1", "mae_mean")},
        "seeds": [r["seed"] for r in runs],
    }


def plot(result: dict[str, Any], path: Path, target: str) -> None:
    """Each run (and each of its members) as a point, step-1 MAE against the horizon mean; baselines as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    members = distinct_members(runs)
    seeds = sorted({k for r in runs for k in r["member_seeds"]})
    if len(members) > len(runs):
        ax.scatter([m["mae_h1"] for m in members], [m["mae_mean"] for m in members], color="tab:blue", alpha=0.3,
                   s=25, label=f"single models, seeds {min(seeds)}-{max(seeds)}")  # fmt: skip
    ax.scatter([r["lstm"]["mae_h1"] for r in runs], [r["lstm"]["mae_mean"] for r in runs], color="tab:blue", s=70,
               edgecolor="black", label=f"trained model, seeds {', '.join(str(r['seed']) for r in runs)}")  # fmt: skip
    colors = {"persistence": "tab:gray", "ridge": "tab:orange", "seasonal": "tab:green"}
    for name, m in result["baselines"].items():
        color = colors.get(name, "tab:red")
        ax.axvline(m["mae_h1"], color=color, ls=":", lw=1.2)
        ax.axhline(
            m["mae_mean"], color=color, ls="--", lw=1.2, label=f"{name} ({m['mae_h1']:.2f} / {m['mae_mean']:.2f})"
        )
    log_if_spread(ax, [m["mae_mean"] for m in result["baselines"].values()] + [r["lstm"]["mae_mean"] for r in runs])
    ax.set_xlabel(f"test MAE at step 1 ({target}); dotted: baselines")
    ax.set_ylabel(f"test MAE, mean over the horizon ({target}); dashed: baselines")
    ax.set_title("Spread over top-level seeds (same data, same test part)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def table(result: dict[str, Any]) -> str:
    """The runs as a markdown table: seed, members, MAE step 1 / mean; then the range of single members."""
    lines = ["| seed | member seeds | MAE step 1 | MAE mean over the horizon |", "|---|---|---|---|"]
    for r in result["runs"]:
        seeds = r["member_seeds"]
        members = f"{seeds[0]}-{seeds[-1]}" if len(seeds) > 1 else str(seeds[0])
        lines.append(f"| {r['seed']} | {members} | {r['lstm']['mae_h1']:.2f} | {r['lstm']['mae_mean']:.2f} |")
    s = result["summary"]
    for key, label in (("lstm", "range over seeds"), ("members", "range over single models")):
        h1, mean = s[key]["mae_h1"], s[key]["mae_mean"]
        lines.append(f"| {label} | | {h1['min']:.2f}-{h1['max']:.2f} | {mean['min']:.2f}-{mean['max']:.2f} |")
    return "\n".join(lines) + "\n"
