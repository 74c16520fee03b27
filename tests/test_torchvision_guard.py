"""The CPU-torch torchvision guard: makes timm importable, and is a no-op where not needed."""
import subprocess
import sys

from tests.conftest import REPO_ROOT


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def test_timm_imports_after_models_guard():
    result = _run("import models, timm, torchvision; print(len(timm.list_models('convnextv2*')))")
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.strip()) >= 8


def test_guard_defines_schemas_only_when_extension_cannot_load():
    code = (
        "import models._torchvision_guard as g\n"
        "loads = g.torchvision_extension_loads()\n"
        "installed = g._library is not None\n"
        "print(loads, installed)\n"
    )
    result = _run("import models\n" + code)
    assert result.returncode == 0, result.stderr
    loads, installed = result.stdout.split()
    # exactly one of: the extension works, or the guard stepped in
    assert (loads == "True") != (installed == "True")


def test_guard_is_noop_when_torchvision_already_imported():
    code = (
        "import models._torchvision_guard as g, models, torchvision\n"
        "before = g._library\n"
        "print(g.install() is False and g._library is before)\n"
    )
    result = _run(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"
