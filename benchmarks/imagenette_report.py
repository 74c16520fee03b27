"""The Imagenette study's report: the comparison table (markdown) and its plot, from ``study.json``'s dict.

Fine-tuning numbers with several seeds are "mean ± half the range"; a gain of one seed is
fine-tune top-1 minus scratch top-1 of the same seed (same data order, augmentation and head).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from engine.logging import format_duration

_logger = logging.getLogger("imagenette_study")

AIMED_GAIN = 12.0  # points over scratch / the random encoder at the winning setting: fine-tune and 20-NN
KNN_K = 20


def mean_and_spread(values: Sequence[float], signed: bool = False) -> str:
    """``51.20`` for one value, ``51.20 ± 0.35`` (mean ± half the range) for several."""
    number = f"{np.mean(values):+.2f}" if signed else f"{np.mean(values):.2f}"
    return number if len(values) == 1 else f"{number} ± {(max(values) - min(values)) / 2:.2f}"


def arm_label(results: dict, name: str) -> str:
    roles = ((results["reference"], "reference"), (results["winner"], "winner"), (results["long"], "longer budget"))
    role = ", ".join(label for arm, label in roles if arm == name)
    return f"**{name}** ({role})" if role else name


def comparison_rows(results: dict) -> list[str]:
    rows = []
    for name, arm in results["arms"].items():
        setting, pretraining = arm["arm"], arm["pretraining"]
        finetune = [run["acc1"] for run in arm["finetune"].values()]
        scratch = [run["acc1"] for run in arm["scratch"].values()]
        gains = arm["gains"]
        rows.append(
            f"| {arm_label(results, name)} | {setting['input_size']} | {setting['stem_stride']} "
            f"| {setting['grid']}x{setting['grid']} of {setting['mask_patch']} px | {setting['mask_ratio']:g} "
            f"| {setting['budget_minutes']:g} | {pretraining['train_s'] / 60:.1f} | {pretraining['epochs']} "
            f"| {pretraining['images_seen']:,} | {pretraining['images_per_s']:.1f} | {len(finetune)} "
            f"| {mean_and_spread(finetune)} | {mean_and_spread(scratch)} "
            f"| {mean_and_spread(list(gains['finetune'].values()), signed=True)} "
            f"| {gains['linear_probe']:+.2f} | {gains['knn']:+.2f} |")
    return rows


def knn_curve_rows(results: dict) -> list[str]:
    rows = []
    for name, arm in results["arms"].items():
        curve = ", ".join(f"{point['train_minutes']:.0f} min: {point['knn_top1']:.1f}"
                          for point in arm["pretraining"]["knn_curve"])
        rows.append(f"| {name} | {curve} | {arm['linear_probe']['random']['knn_acc1']:.2f} |")
    return rows


def cost_rows(results: dict) -> list[str]:
    rows = []
    for name, arm in results["arms"].items():
        pretraining, runs = arm["pretraining"], [*arm["finetune"].values()]
        rows.append(f"| {name} | {arm['calibration']['images_per_s']:.1f} | {pretraining['images_per_s']:.1f} "
                    f"| {pretraining['train_s'] / 60:.1f} | {pretraining['knn_s'] / 60:.1f} "
                    f"| {np.mean([run['images_per_s'] for run in runs]):.1f} "
                    f"| {np.mean([run['wall_s'] for run in runs]) / 60:.1f} |")
    return rows


def aims_text(results: dict) -> str:
    verdict = {True: "met", False: "not met"}
    aims, winner = results["aims"], results["arms"][results["winner"]]["gains"]
    text = (f"Aims at the winner ({results['winner']}): fine-tune gain >= +{AIMED_GAIN:.0f} "
            f"({winner['finetune_mean']:+.2f}, {verdict[aims['finetune_gain']]}); {KNN_K}-NN gain >= "
            f"+{AIMED_GAIN:.0f} ({winner['knn']:+.2f}, {verdict[aims['knn_gain']]})")
    if results["long"] is not None:
        longer = results["arms"][results["long"]]
        text += (f"; the fine-tune gain grows with the budget ({longer['gains']['finetune_mean']:+.2f} after "
                 f"{longer['arm']['budget_minutes']:g} min vs {winner['finetune_mean']:+.2f}, "
                 f"{verdict[aims['gain_grows_with_budget']]})")
    return text + "."


def markdown_report(results: dict) -> str:
    """``study.md``: what was compared, the comparison table, the k-NN curves, the costs, the aims, the command."""
    settings, reference = results["settings"], results["arms"][results["reference"]]
    probe = reference["linear_probe"]["fcmae"]
    lines = [
        f"# Small-image FCMAE settings at equal pretraining time: {settings['model']} on Imagenette",
        "",
        f"Each arm pretrains on {reference['pretraining']['unlabelled_images']:,} train images (labels unused) for "
        f"its budget of minutes of training updates on this machine (the epochs set by a calibration of its "
        f"images/s), then is fine-tuned on {probe['labelled_images']:,} labelled train images "
        f"({settings['finetune_epochs']} epochs), as is the same model from random initialisation (scratch), and "
        f"probed (linear probe, {KNN_K}-NN) against a random encoder of the same geometry; top-1 on "
        f"{probe['val_images']:,} val images (chance {100 / probe['classes']:.0f}%), all at the arm's input size. "
        f"Fine-tuning columns: mean ± half the range over the seeds (gains paired by seed). Compute time of all "
        f"steps {format_duration(results['compute_s'])}.",
        "",
        "| arm | input (px) | stem stride | mask grid | mask ratio | budget (min) | pretraining (min) | epochs "
        "| images seen | img/s | seeds | fine-tune top-1 (%) | scratch top-1 (%) | fine-tune gain | linear-probe gain "
        f"| {KNN_K}-NN gain |",
        "|---" * 16 + "|",
        *comparison_rows(results),
        "",
        aims_text(results),
        "",
        f"k-NN monitor during pretraining (minutes of training updates: {KNN_K}-NN top-1 (%); 0 min = the "
        "initialised encoder):",
        "",
        f"| arm | curve | random encoder ({KNN_K}-NN top-1) |",
        "|---|---|---|",
        *knn_curve_rows(results),
        "",
        "Costs (pretraining img/s: calibrated and actual; k-NN monitor passes are outside the budget):",
        "",
        "| arm | calibrated img/s | pretraining img/s | pretraining updates (min) | k-NN monitor (min) "
        "| fine-tune img/s | fine-tune run (min) |",
        "|---" * 7 + "|",
        *cost_rows(results),
        "",
        f"Command: `{results['command']}`",
        "",
    ]
    return "\n".join(lines)


def pyplot():
    """matplotlib's pyplot on the file-only backend, or None (logged) when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _logger.warning("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    return plt


def plot_study(results: dict, path: Path) -> Optional[Path]:
    """Left: every arm's k-NN curve against minutes of pretraining updates. Right: each arm's
    fine-tune (error bar: half the seed range), linear-probe and k-NN gains. PNG; None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    arms = results["arms"]
    figure, (curve_axis, gain_axis) = plt.subplots(1, 2, figsize=(13, 4.5), dpi=120)
    for name, arm in arms.items():
        curve = arm["pretraining"]["knn_curve"]
        curve_axis.plot([point["train_minutes"] for point in curve], [point["knn_top1"] for point in curve], "o-",
                        label=name)
    curve_axis.set_xlabel("minutes of pretraining updates")
    curve_axis.set_ylabel(f"{KNN_K}-NN top-1 (%)")
    curve_axis.set_title("k-NN monitor during pretraining")
    positions, width = np.arange(len(arms)), 0.27
    finetune = [arm["gains"]["finetune_mean"] for arm in arms.values()]
    spread = [arm["gains"]["finetune_spread"] / 2 for arm in arms.values()]
    gain_axis.bar(positions - width, finetune, width, yerr=spread, capsize=3, label="fine-tune")
    gain_axis.bar(positions, [arm["gains"]["linear_probe"] for arm in arms.values()], width, label="linear probe")
    gain_axis.bar(positions + width, [arm["gains"]["knn"] for arm in arms.values()], width, label=f"{KNN_K}-NN")
    gain_axis.axhline(AIMED_GAIN, color="grey", linestyle="--", label=f"aim +{AIMED_GAIN:.0f}")
    gain_axis.axhline(0, color="black", linewidth=0.8)
    gain_axis.set_xticks(positions, list(arms), rotation=20, ha="right", fontsize=7)
    gain_axis.set_ylabel("gain over scratch / random encoder (points)")
    gain_axis.set_title("what pretraining buys, per arm")
    for axis in (curve_axis, gain_axis):
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
