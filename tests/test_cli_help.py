"""Every command-line program's -h states each flag's default at most once."""
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from engine.slurm import load_script

REPO = Path(__file__).resolve().parent.parent
DEFAULT_NOTE = re.compile(r"\(default\b")


def command_line_programs() -> list[str]:
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    return sorted(name for name in tracked if not name.startswith("tests/")
                  and 'if __name__ == "__main__":' in (REPO / name).read_text())


def help_entries(text: str) -> list[str]:
    """One string per option of an argparse help text: its invocation line(s) and help lines."""
    entries: list[list[str]] = []
    in_option = False
    for line in text.splitlines():
        if re.match(r"^  -", line):  # argparse indents options by two spaces, their help further
            entries.append([line.strip()])
            in_option = True
        elif in_option and re.match(r"^ {4,}\S", line):  # the option's wrapped help
            entries[-1].append(line.strip())
        else:  # a group title or description
            in_option = False
    return [" ".join(entry) for entry in entries]


def program_help(path: str, monkeypatch, capsys) -> str:
    """What ``python <path> -h`` (or ``python -m <module> -h``) prints, run in this process."""
    module = load_script(REPO / path) if "/" not in path else importlib.import_module(path[:-3].replace("/", "."))
    monkeypatch.setattr(sys, "argv", [path, "-h"])
    with pytest.raises(SystemExit) as stop:
        module.main()
    assert stop.value.code == 0
    return capsys.readouterr().out


def test_the_programs_are_found():
    programs = command_line_programs()
    assert {"pretrain.py", "finetune.py", "submitit_pretrain.py", "fcmae/visualize.py",
            "finetune/linear_probe.py"} <= set(programs) and len(programs) >= 12


@pytest.mark.parametrize("path", command_line_programs())
def test_help_states_each_default_at_most_once(path, monkeypatch, capsys):
    if path.startswith("submitit_"):
        pytest.importorskip("submitit")
    monkeypatch.setenv("COLUMNS", "120")
    entries = help_entries(program_help(path, monkeypatch, capsys))
    assert len(entries) >= 3, "help text not recognised"
    twice = [entry for entry in entries if len(DEFAULT_NOTE.findall(entry)) > 1]
    assert not twice, f"{path} -h states a default twice:\n" + "\n".join(twice)
