"""The runtime stays light, and the README's Quickstart is what CI runs."""

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_export_and_calibration_import_under_the_edgevlm_namespace():
    import edgevlm.calibration
    import edgevlm.export
    import edgevlm.train

    assert Path(edgevlm.export.__file__).parent.name == "export"
    assert Path(edgevlm.calibration.__file__).parent.name == "calibration"
    assert Path(edgevlm.train.__file__).parent.name == "train"


def test_readme_quickstart_is_install_run_test_and_ci_runs_it():
    lines = subprocess.run(
        ["awk", "/^## Quickstart/{q=1} q&&/^```bash/{f=1;next} f&&/^```/{exit} f", str(ROOT / "README.md")],
        capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("pip install") and lines[2].startswith("pytest")
    assert "edgevlm run" in lines[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "/^## Quickstart/{q=1} q&&/^```bash/{f=1;next} f&&/^```/{exit} f" in ci  # the same extraction


def test_every_source_package_is_listed_for_installation():
    import configparser

    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    listed = set(config["options"]["packages"].split())
    found = set()
    roots = {"edgevlm": "edgevlm", "export": "edgevlm.export", "calibration": "edgevlm.calibration",
             "train": "edgevlm.train"}
    for folder, prefix in roots.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((prefix, *rel)))
    assert found == listed
