"""benchmarks/pretrain_speed.py: its --smoke run times every mode and prints the table."""
import subprocess
import sys

from benchmarks.pretrain_speed import minkowski_available
from tests.conftest import REPO_ROOT


def parse_markdown_table(text: str) -> list[dict[str, str]]:
    """Rows of the first markdown table in ``text`` as {header: cell}."""
    lines = [line.strip().strip("|") for line in text.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].split("|")]
    return [dict(zip(header, (cell.strip() for cell in line.split("|")))) for line in lines[2:]]


def test_speed_benchmark_smoke_mode_prints_table(tmp_path):
    output = tmp_path / "speed.md"
    command = [sys.executable, "-m", "benchmarks.pretrain_speed", "--smoke", "--output", str(output)]
    run = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"--smoke failed:\n{run.stderr[-3000:]}"

    rows = {row["mode"]: row for row in parse_markdown_table(run.stdout)}
    expected = {"sparse", "masked", "dense"} | ({"minkowski"} if minkowski_available() else set())
    assert set(rows) == expected, f"table modes {sorted(rows)}, expected {sorted(expected)}"
    for mode, row in rows.items():
        assert float(row["images/s"]) > 0, f"{mode}: images/s {row['images/s']}"
        assert float(row["peak memory (MiB)"]) > 0, f"{mode}: peak memory {row['peak memory (MiB)']}"
    for flops in ["encoder GFLOPs/img", "step GFLOPs/img"]:
        sparse, masked = float(rows["sparse"][flops]), float(rows["masked"][flops])
        assert sparse < masked, f"{flops}: sparse {sparse} should be below masked {masked}"
    assert rows["masked"]["vs masked"] == "1.00x"
    assert parse_markdown_table(output.read_text()) == parse_markdown_table(run.stdout), "--output differs from stdout"


def test_profile_smoke_mode_splits_the_step_into_phases_and_operators():
    from benchmarks.profile_step import PHASES, main

    results = {result["mode"]: result for result in main(["--smoke", "--backends", "sparse", "dense", "--top", "4"])}
    assert set(results) == {"sparse", "dense"}
    for mode, result in results.items():
        phases = result["phases_ms"]
        assert set(phases) == set(PHASES)
        assert all(phases[phase] > 0 for phase in PHASES), f"{mode}: a phase took no time: {phases}"
        assert result["step_ms"] == sum(phases.values())
        operators = result["operators_ms"]
        assert len(operators) == 4 and all(name.startswith("aten::") for name in operators)
        assert list(operators.values()) == sorted(operators.values(), reverse=True), f"{mode}: not sorted"
        assert sum(operators.values()) <= result["operator_total_ms"] <= 1.05 * result["step_ms"], (
            f"{mode}: operator self times {result['operator_total_ms']} ms exceed the step {result['step_ms']} ms")


def test_agreement_cost_smoke_mode_measures_both_checks_on_two_ranks(capsys):
    from benchmarks.agreement_cost import main

    results = main(["--smoke"])
    assert set(results) == {0, 1}
    for rank in (0, 1):
        assert set(results[rank]) == {"store agreement", "gloo all-reduce on a side group"}
        assert all(value > 0 for value in results[rank].values())
    assert "| store agreement |" in capsys.readouterr().out
