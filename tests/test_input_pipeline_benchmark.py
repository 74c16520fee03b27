"""benchmarks/input_pipeline.py: --smoke times every pipeline path and divides step speeds by a worker's."""
import json

import pytest

from benchmarks.input_pipeline import PATHS, main


@pytest.mark.slow
def test_smoke_run_reports_pipeline_speeds_and_workers_needed(tmp_path):
    step_results = tmp_path / "steps.json"  # atto read from a pretrain_speed file, tiny timed now
    step_results.write_text(json.dumps({"machine": {"device": "cpu"}, "results": [
        {"model": "convnextv2_atto", "mode": "sparse", "input_size": 64, "mask_ratio": 0.6, "batch_size": 2,
         "amp": "none", "images_per_s": 120.0},
        {"model": "convnextv2_atto", "mode": "masked", "input_size": 64, "mask_ratio": 0.6, "batch_size": 2,
         "amp": "none", "images_per_s": 1.0},
    ]}))
    output = tmp_path / "pipeline.md"
    results = main(["--smoke", "--models", "atto", "tiny", "--step-results", str(step_results),
                    "--output", str(output)])

    pipeline = results["pipeline"]
    assert [(row["num_workers"], row["decode"] != "full") for row in pipeline[:len(PATHS)]] == \
        [(workers, fast) for _, workers, fast in PATHS]
    assert all(row["images_per_s"] > 0 and row["images_per_cpu_s"] > 0 for row in pipeline)
    steps = {step["model"]: step for step in results["steps"]}
    assert steps["convnextv2_atto"]["images_per_s"] == 120.0 and steps["convnextv2_atto"]["source"] == str(step_results)
    assert steps["convnextv2_tiny"]["source"] == "timed now" and steps["convnextv2_tiny"]["images_per_s"] > 0

    report = output.read_text()
    worker_full = next(row["images_per_cpu_s"] for row in pipeline if row["num_workers"] == 1 and row["decode"] == "full")
    atto_row = next(line for line in report.splitlines() if line.startswith("| atto |"))
    assert atto_row.split("|")[7].strip() == f"{120.0 / worker_full:.2f}", atto_row
    assert json.loads(output.with_suffix(".json").read_text())["steps"][0]["images_per_s"] == 120.0
