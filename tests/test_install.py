"""The environment `make` builds is the locked one, setup.cfg's ranges end at the tested minors, and a version
outside them gives one warning line at import."""
import configparser
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from ptp_core.versions import TESTED, minor, untested

ROOT = Path(__file__).resolve().parents[1]


def locked() -> dict[str, str]:
    lines = (ROOT / "requirements.lock").read_text().splitlines()
    return dict(line.split("==") for line in lines if line and not line.startswith("#"))


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.mark.skipif(Path(sys.prefix).resolve() != (ROOT / ".venv").resolve(),
                    reason="checks the environment `make` installs (.venv), not a user's own")
def test_make_installs_exactly_the_locked_versions():
    installed = {normal(d.metadata["Name"]): d.version for d in metadata.distributions()}
    differing = {name: (version, installed.get(normal(name))) for name, version in locked().items()
                 if (installed.get(normal(name)) or "").split("+")[0] != version}
    assert not differing, differing  # name: (locked, installed)


def test_setup_cfg_ranges_end_at_the_tested_minor_and_the_lock_is_inside_them():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    requirements = config["options"]["install_requires"] + config["options.extras_require"]["dev"]
    lock = locked()
    for name, (oldest, newest) in TESTED.items():
        (bound,) = re.findall(rf"^\s*{name}\b.*<\s*([\d.]+)\s*$", requirements, re.M)
        assert minor(bound) == (newest[0], newest[1] + 1), (name, bound)
        assert oldest <= minor(lock[name]) <= newest, (name, lock[name])


def test_an_untested_version_gives_one_warning_line_at_import():
    assert untested({"transformers": "5.25.0", "peft": "0.21.2"}) == []
    assert untested({"transformers": "5.25.0", "peft": None}) == []  # PEFT is optional
    (line,) = untested({"transformers": "5.31.0", "peft": "0.21.2"})
    assert "transformers 5.24.x to 5.25.x, not 5.31.0" in line
    fake = ("import importlib.metadata as m; real = m.version; "
            "m.version = lambda n: '0.30.1' if n == 'peft' else real(n); import ptp_core")
    result = subprocess.run([sys.executable, "-c", fake], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        f"<string>:1: UserWarning: {untested({'transformers': metadata.version('transformers'), 'peft': '0.30.1'})[0]}"]
