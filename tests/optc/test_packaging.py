"""The installed package is what pyproject.toml lists: a sub-package missing from
[tool.setuptools] packages works in the editable install the tests use, but is absent from a
wheel (`pip install .`), where importing it fails."""

import tomllib

from conftest import ROOT


def test_every_source_package_is_listed_in_pyproject():
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setup["packages"])
    on_disk = set()
    for name, folder in setup["package-dir"].items():
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            rel = init.parent.relative_to(ROOT / folder)
            on_disk.add(".".join([name, *rel.parts]))
    assert on_disk - listed == set(), "packages missing from pyproject.toml [tool.setuptools] packages"
    assert listed - on_disk == set(), "pyproject.toml lists packages with no __init__.py"


def test_tests_mirror_the_top_level_folders():
    """Issue 14's layout: a test module lives under tests/<folder>/ for the top-level folder
    (optc, passes, backends, runtime, models) whose code it tests, so a reader finds a package's
    tests by its name."""
    mirrored = {"optc", "passes", "backends", "runtime", "models"}
    tests = ROOT / "tests"
    misplaced = [str(p.relative_to(tests)) for p in sorted(tests.rglob("test_*.py"))
                 if p.parent.parent != tests or p.parent.name not in mirrored]
    misplaced = [m for m in misplaced if not m.startswith(("peer_exports/", "cuda_emulator/"))]
    assert misplaced == [], f"test modules outside tests/{{{','.join(sorted(mirrored))}}}/"
    assert all((ROOT / name).is_dir() for name in mirrored)
