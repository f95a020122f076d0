"""The docs: the site builds without warnings, the README stays a front door, and the config
reference is the code's."""

import re
import subprocess
import sys

from conftest import ROOT


def test_site_builds_strictly(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "site" / "config" / "index.html").is_file()


def test_readme_is_a_front_door_linking_the_docs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    links = re.findall(r"\]\((docs/[^)#]+)", readme)
    assert len(links) >= 8
    for link in links:
        assert (ROOT / link).is_file(), link


def test_config_reference_is_generated_from_the_code():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from config_reference import reference
    finally:
        sys.path.pop(0)
    page = (ROOT / "docs" / "config.md").read_text()
    assert page == reference(), "run: python scripts/config_reference.py > docs/config.md"
