"""benchmarks/shard_pipeline.py: --smoke times the folder, local shards and pipe: shards of the same images."""
import json

import pytest

from benchmarks.shard_pipeline import SOURCES, main


@pytest.mark.slow
def test_smoke_run_reports_each_source_and_its_ratio_to_the_folder(tmp_path):
    output = tmp_path / "shards.md"
    results = main(["--smoke", "--output", str(output)])
    rows = results["sources"]
    assert [row["source"] for row in rows] == list(SOURCES)
    assert all(row["images_per_s"] > 0 and row["images_per_cpu_s"] > 0 for row in rows)
    assert rows[0]["wall_vs_folder"] == 1.0
    assert rows[2]["cpu_vs_folder"] == pytest.approx(rows[2]["images_per_cpu_s"] / rows[0]["images_per_cpu_s"])
    assert json.loads(output.with_suffix(".json").read_text())["sources"][1]["source"] == "local shards"
    assert "| pipe:cat shards |" in output.read_text()
