"""The one writer: atomic files and folders with the umask's mode, strict JSON; package layering."""
import json
import math
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ptp_core.io import atomic_folder, dumps, to_json, write_json, write_text

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_and_folders_get_the_umask_mode(tmp_path, umask_027):
    assert _mode(write_text(tmp_path / "a.txt", "x")) == 0o640  # not mkstemp's 0600
    with atomic_folder(tmp_path / "run") as folder:
        write_json(folder / "x.json", {"a": 1})
    assert _mode(tmp_path / "run") == 0o750 and _mode(tmp_path / "run" / "x.json") == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "run"]  # no temp left


def test_every_written_result_honours_the_umask(tiny_bert_model, tmp_path, umask_027):
    """Checkpoints, surfaces and metric tables: group may read them."""
    from landscape.draw.tables import write_tables
    from landscape.surface import Surface, save_surface
    from ptp_core.checkpoint import save_checkpoint

    model = tiny_bert_model
    save_checkpoint(tmp_path / "ckpt", model.params, {"model": "m", "head": "classifier"}, log=[{"step": 1}])
    surface = Surface.empty(np.array([-1.0, 0.0, 1.0]), np.array([0.0]), {"space": "prompt"})
    surface.loss[:, 0] = [1.0, 0.5, 1.0]
    surface.accuracy[:] = 1.0
    save_surface(surface, tmp_path / "s")
    write_tables([{"checkpoint": "c", "method": "pt", "seed": 0, "center_loss": 0.5}], tmp_path / "tables")
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) >= 10
    assert all(_mode(p) == 0o640 for p in written), {str(p): oct(_mode(p)) for p in written}


def test_a_failed_folder_leaves_nothing_and_keeps_the_old_one(tmp_path):
    with atomic_folder(tmp_path / "run") as folder:
        write_text(folder / "old.txt", "old")
    with pytest.raises(RuntimeError):
        with atomic_folder(tmp_path / "run") as folder:
            write_text(folder / "new.txt", "new")
            raise RuntimeError("crash")
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["old.txt"]
    with pytest.raises(ValueError, match="--overwrite"):
        with atomic_folder(tmp_path / "run", overwrite=False):
            pass


def test_strict_json():
    value = {"nan": math.nan, "inf": -math.inf, "np": np.float32(0.5), "array": np.arange(3), "path": Path("a/b"),
             "tuple": (1, 2), 3: "int key"}
    assert json.loads(dumps(value)) == {"nan": None, "inf": None, "np": 0.5, "array": [0, 1, 2], "path": "a/b",
                                        "tuple": [1, 2], "3": "int key"}
    assert to_json([np.array([np.nan, 1.0])]) == [[None, 1.0]]
    with pytest.raises(TypeError, match="cannot be written as JSON"):
        dumps({"x": object()})


def test_ptp_core_never_imports_landscape():
    code = ("import sys, pkgutil, importlib, ptp_core\n"
            "for m in pkgutil.iter_modules(ptp_core.__path__): importlib.import_module('ptp_core.' + m.name)\n"
            "print(sorted(n for n in sys.modules if n.split('.')[0] == 'landscape'))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_check_output_folder(tmp_path):
    from ptp_core.io import check_output_folder

    check_output_folder(tmp_path / "new", overwrite=False)  # a missing folder is fine
    (tmp_path / "empty").mkdir()
    check_output_folder(tmp_path / "empty", overwrite=False)
    write_text(tmp_path / "file", "x")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="is a file; give a directory"):
            check_output_folder(tmp_path / "file", overwrite)
    write_text(tmp_path / "run" / "other.txt", "x")
    with pytest.raises(ValueError, match="holds other.txt, not a run"):
        check_output_folder(tmp_path / "run", overwrite=False)
    check_output_folder(tmp_path / "run", overwrite=True)
    check_output_folder(tmp_path / "run", overwrite=False, marker="connect.json")  # other content is no result
    write_text(tmp_path / "run" / "connect.json", "{}")
    with pytest.raises(ValueError, match="already holds connect.json"):
        check_output_folder(tmp_path / "run", overwrite=False, marker="connect.json")
