"""Progress of long non-training work: a bar on a terminal only, the duration always in the log."""
import fcntl
import logging
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

from engine.image_files import scan_folder
from engine.progress_bar import busy, busy_until_first, progress_bar
from image_folders import make_image_folder

REPO = Path(__file__).resolve().parent.parent


def output_on_a_terminal(code: str) -> str:
    """What ``python -c code`` prints when its stdout and stderr are a terminal."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 24 rows, 100 columns
    process = subprocess.Popen([sys.executable, "-c", code], stdout=terminal, stderr=terminal, cwd=REPO,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    os.close(terminal)
    chunks = []
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert process.wait(timeout=120) == 0, b"".join(chunks).decode(errors="replace")
    os.close(controller)
    return b"".join(chunks).decode(errors="replace")


def test_a_terminal_shows_the_bar_and_the_log_gets_the_duration():
    shown = output_on_a_terminal(
        "from engine.logging import setup_logging; from engine.progress_bar import progress_bar\n"
        "setup_logging()\n"
        "assert list(progress_bar(range(3), 'demo work', total=3, unit='batch')) == [0, 1, 2]\n")
    assert "demo work:   0%|" in shown and "| 0/3 [" in shown, shown  # tqdm's bar (first drawn empty)
    assert "demo work: 3 batches in" in shown, shown  # the log line


def test_without_a_terminal_there_is_no_bar_only_the_log_line(capsys, caplog):
    with caplog.at_level(logging.INFO):
        assert list(progress_bar(iter(range(5)), "piped work", unit="image")) == list(range(5))
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""  # pytest's capture is no terminal
    assert "piped work: 5 images in " in caplog.text


def test_busy_logs_the_duration_of_the_first_item_only(caplog):
    with caplog.at_level(logging.INFO):
        assert list(busy_until_first(iter("abc"), "first step")) == ["a", "b", "c"]
        assert list(busy_until_first(iter(()), "nothing")) == []
        with busy("one call"):
            pass
    assert [record.getMessage().split(":")[0] for record in caplog.records] == ["first step", "nothing", "one call"]


def test_a_folder_scan_shows_a_bar_on_a_terminal(tmp_path):
    make_image_folder(tmp_path / "images", classes=2, per_class=3)
    shown = output_on_a_terminal(f"from engine.image_files import scan_folder\n"
                                 f"assert len(scan_folder({str(tmp_path / 'images')!r}).index) == 6\n")
    assert f"scanning {tmp_path / 'images'}: 0image [" in shown, shown  # a count: the total is unknown
    assert len(scan_folder(tmp_path / "images").index) == 6
