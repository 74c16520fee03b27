"""The documentation stands alone: every reference resolves inside the repository."""
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
THIS_FILE = Path(__file__).resolve()
MARKDOWN_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
# documents that exist only outside this repository (a team's design notes)
EXTERNAL_DOCUMENT = re.compile(r"DESIGN(\.md| section)")


def tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    files = []
    for name in names:
        path = REPO / name
        if path.suffix in {".py", ".md", ".yaml", ".sh", ".toml", ".txt"} and path.is_file() and path != THIS_FILE:
            files.append(path)
    return files


def test_no_file_cites_documents_outside_the_repository():
    citing = [f"{path.relative_to(REPO)}:{number}: {line.strip()}"
              for path in tracked_text_files()
              for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
              if EXTERNAL_DOCUMENT.search(line)]
    assert not citing, "references to documents users do not have:\n" + "\n".join(citing)


def test_relative_links_in_markdown_resolve():
    broken = []
    for document in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target in MARKDOWN_LINK.findall(document.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (document.parent / target).exists():
                broken.append(f"{document.relative_to(REPO)} -> {target}")
    assert not broken, "links to missing files:\n" + "\n".join(broken)
