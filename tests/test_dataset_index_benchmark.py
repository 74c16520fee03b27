"""benchmarks/dataset_index.py: its --smoke run measures every dataset kind and the folder scan."""
from benchmarks.dataset_index import KINDS, main


def test_smoke_run_shows_workers_copying_a_list_of_tuples_but_not_the_index():
    results = main(["--smoke"])
    rows = {row["kind"]: row for row in results["rows"]}
    assert set(rows) == set(KINDS) and all(row["entries"] == 20_000 for row in rows.values())
    growth = {kind: row["worker_uss_after_mib"] - row["worker_uss_before_mib"] for kind, row in rows.items()}
    assert growth["list of tuples"] > 2.0, f"20,000 tuples touched by a worker should copy megabytes: {growth}"
    assert growth["ImageFiles"] < growth["list of tuples"] / 4, f"the index was copied by the workers: {growth}"
    assert growth["ImageFiles, saved index"] < growth["list of tuples"] / 4, growth
    tree = results["tree"]
    assert tree["files"] == 2_000 and tree["folders"] == 2
    assert all(tree[key] > 0 for key in ("imagefolder_s", "scan_folder_s", "currency_check_s"))
