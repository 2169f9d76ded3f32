"""Surface files: bitwise round trip, atomic writes, clear errors on bad files, seed means."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from landscape.surface import (FORMAT, SPEC_KEYS, Surface, load_surface, mean_surface, mismatched_keys,
                               save_surface, surface_paths)


def quadratic_surface(scale: float = 1.0, seed: int = 0, n: int = 9, with_directions: bool = True,
                      missing: int = 0) -> Surface:
    """L = 0.3 + scale (α² + β²/2) + noise, accuracy decreasing with loss; `missing` trailing NaNs."""
    alphas = np.linspace(-1.0, 1.0, n)
    betas = np.linspace(-0.5, 0.5, n + 2)  # non-square on purpose: catches (nx, ny) transposes
    grid_a, grid_b = np.meshgrid(alphas, betas, indexing="ij")  # (nx, ny)
    rng = np.random.default_rng(seed)
    loss = 0.3 + scale * (grid_a**2 + 0.5 * grid_b**2) + 0.01 * rng.random(grid_a.shape)
    accuracy = 1.0 / (1.0 + loss)
    if missing:
        loss.reshape(-1)[-missing:] = np.nan
        accuracy.reshape(-1)[-missing:] = np.nan
    directions = (rng.standard_normal((4, 6)).astype(np.float32), rng.standard_normal((4, 6)).astype(np.float32))
    spec = {key: None for key in SPEC_KEYS} | {
        "format": FORMAT, "checkpoint_hash": f"hash{seed}", "space": "prompt", "directions": "gradient",
        "normalization": "filter", "seed": 0, "split": "test", "subset_hash": "abc", "model": "tiny",
        "dtype": "float32", "points": 0, "seconds": 1.5, "method": "pt", "created": "2024-01-01T00:00:00"}
    return Surface(alphas, betas, loss, accuracy, spec, *(directions if with_directions else (None, None)))


def assert_bitwise_equal(a: Surface, b: Surface) -> None:
    for key in ("alphas", "betas", "loss", "accuracy", "direction_1", "direction_2"):
        x, y = getattr(a, key), getattr(b, key)
        assert (x is None) == (y is None), key
        if x is not None:
            assert x.dtype == y.dtype and x.shape == y.shape, key
            assert x.tobytes() == y.tobytes(), key  # bitwise, NaN payloads included


@pytest.mark.parametrize("with_directions", [True, False])
def test_round_trip_is_bitwise(tmp_path: Path, with_directions: bool) -> None:
    surface = quadratic_surface(with_directions=with_directions, missing=5)
    npz_path, json_path = save_surface(surface, tmp_path / "sub" / "pt_seed0")
    assert (npz_path.name, json_path.name) == ("pt_seed0.npz", "pt_seed0.json")
    loaded = load_surface(tmp_path / "sub" / "pt_seed0.npz")
    assert_bitwise_equal(surface, loaded)
    assert loaded.spec == surface.spec
    assert loaded.spec["points"] == surface.loss.size - 5 == loaded.points_done
    assert not loaded.is_complete
    # JSON is human-diffable: indent=2, sorted keys.
    text = json_path.read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    # Atomic writes leave no temp files behind.
    assert sorted(p.name for p in npz_path.parent.iterdir()) == ["pt_seed0.json", "pt_seed0.npz"]


def test_any_suffix_names_the_same_pair(tmp_path: Path) -> None:
    expected = (tmp_path / "x.npz", tmp_path / "x.json")
    for name in ("x", "x.npz", "x.json"):
        assert surface_paths(tmp_path / name) == expected


def test_overwrite_replaces_previous_surface(tmp_path: Path) -> None:
    save_surface(quadratic_surface(missing=20), tmp_path / "s")
    complete = quadratic_surface()
    save_surface(complete, tmp_path / "s")
    loaded = load_surface(tmp_path / "s")
    assert loaded.is_complete and loaded.spec["points"] == complete.loss.size


def test_grid_helpers() -> None:
    surface = quadratic_surface(n=9)
    i, j = surface.center_index
    assert surface.alphas[i] == 0.0 and surface.betas[j] == 0.0
    assert surface.center_loss == surface.loss[i, j]
    empty = Surface.empty(surface.alphas, surface.betas, {"method": "pt"})
    assert empty.points_done == 0 and empty.shape == surface.shape
    assert set(SPEC_KEYS) <= set(empty.spec) and empty.spec["format"] == FORMAT


@pytest.mark.parametrize("alphas, match", [
    (np.linspace(-1, 1, 4), "contain exactly 0.0"),  # even grid misses the centre
    (np.array([0.0, -1.0, 1.0]), "strictly increasing"),
])
def test_surface_rejects_bad_grids(alphas: np.ndarray, match: str) -> None:
    betas = np.array([-1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match=match):
        Surface(alphas, betas, np.zeros((alphas.size, 3)), np.zeros((alphas.size, 3)), {})


def _one_line_error(error_type, path: Path, match: str) -> str:
    with pytest.raises(error_type, match=match) as info:
        load_surface(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_files_are_reported(tmp_path: Path) -> None:
    message = _one_line_error(FileNotFoundError, tmp_path / "absent", "not found")
    assert "--surface" in message  # says how to mend it
    save_surface(quadratic_surface(), tmp_path / "s")
    (tmp_path / "s.json").unlink()
    _one_line_error(FileNotFoundError, tmp_path / "s", "s.json not found")


def test_corrupt_and_truncated_npz(tmp_path: Path) -> None:
    npz_path, _ = save_surface(quadratic_surface(), tmp_path / "s")
    data = npz_path.read_bytes()
    npz_path.write_bytes(data[: len(data) // 2])
    message = _one_line_error(ValueError, npz_path, "truncated or corrupt")
    assert "compute the surface again" in message
    npz_path.write_bytes(b"this is not a zip file at all")
    _one_line_error(ValueError, npz_path, "truncated or corrupt")
    npz_path.write_bytes(b"")
    _one_line_error(ValueError, npz_path, "truncated or corrupt")


def test_corrupt_json(tmp_path: Path) -> None:
    _, json_path = save_surface(quadratic_surface(), tmp_path / "s")
    json_path.write_text('{"format": ')
    _one_line_error(ValueError, json_path, "unreadable")
    json_path.write_bytes(b"\xff\xfe\x00garbage")
    _one_line_error(ValueError, json_path, "unreadable")
    json_path.write_text("[1, 2]")
    _one_line_error(ValueError, json_path, "JSON object")


def test_other_format_version(tmp_path: Path) -> None:
    _, json_path = save_surface(quadratic_surface(), tmp_path / "s")
    spec = json.loads(json_path.read_text())
    spec["format"] = "ptp-landscape-surface/1"
    json_path.write_text(json.dumps(spec))
    message = _one_line_error(ValueError, json_path, "ptp-landscape-surface/1")
    assert FORMAT in message and "recompute" in message


def test_missing_spec_keys(tmp_path: Path) -> None:
    _, json_path = save_surface(quadratic_surface(), tmp_path / "s")
    spec = json.loads(json_path.read_text())
    del spec["subset_hash"], spec["dtype"]
    json_path.write_text(json.dumps(spec))
    _one_line_error(ValueError, json_path, r"lacks keys \['subset_hash', 'dtype'\]")


def _rewrite_npz(npz_path: Path, **changes) -> None:
    with np.load(npz_path) as archive:
        arrays = {key: archive[key] for key in archive.files}
    arrays.update(changes)
    np.savez(npz_path, **{k: v for k, v in arrays.items() if v is not None})


def test_missing_arrays(tmp_path: Path) -> None:
    npz_path, _ = save_surface(quadratic_surface(), tmp_path / "s")
    _rewrite_npz(npz_path, accuracy=None)
    _one_line_error(ValueError, npz_path, r"lacks arrays \['accuracy'\]")


def test_shape_mismatches(tmp_path: Path) -> None:
    surface = quadratic_surface()
    npz_path, _ = save_surface(surface, tmp_path / "s")
    _rewrite_npz(npz_path, loss=surface.loss.T)  # the classic (ny, nx) mistake
    _one_line_error(ValueError, npz_path, r"inconsistent: loss has shape")
    _rewrite_npz(npz_path, loss=surface.loss, direction_2=surface.direction_2[:2])
    _one_line_error(ValueError, npz_path, "direction_1")
    _rewrite_npz(npz_path, direction_2=None)
    _one_line_error(ValueError, npz_path, "both be given")


def test_pickled_npz_is_refused(tmp_path: Path) -> None:
    npz_path, _ = save_surface(quadratic_surface(), tmp_path / "s")
    _rewrite_npz(npz_path, loss=np.array([{"a": 1}], dtype=object))
    _one_line_error(ValueError, npz_path, "truncated or corrupt")


def test_mean_surface_matches_numpy() -> None:
    seeds = [quadratic_surface(seed=s) for s in range(3)]
    for s in seeds[1:]:  # shared directions
        s.direction_1, s.direction_2 = seeds[0].direction_1, seeds[0].direction_2
    mean = mean_surface(seeds)
    np.testing.assert_array_equal(mean.loss, np.mean([s.loss for s in seeds], axis=0))
    np.testing.assert_array_equal(mean.accuracy, np.mean([s.accuracy for s in seeds], axis=0))
    assert mean.spec["checkpoint_hash"] == ["hash0", "hash1", "hash2"]
    assert mean.spec["method"] == "pt" and mean.spec["mean_of"] == 3 and mean.is_complete


def test_mean_surface_requires_shared_grid_and_directions() -> None:
    a, b = quadratic_surface(seed=0), quadratic_surface(seed=1)
    with pytest.raises(ValueError, match="other directions"):
        mean_surface([a, b])
    with pytest.raises(ValueError, match="another grid"):
        mean_surface([a, quadratic_surface(n=7)])
    with pytest.raises(ValueError, match="at least one"):
        mean_surface([])


def test_mean_surface_keeps_missing_points_missing() -> None:
    a = quadratic_surface(with_directions=False)
    b = quadratic_surface(with_directions=False, missing=3)
    assert mean_surface([a, b]).points_done == a.loss.size - 3


def test_mismatched_keys_ignores_progress() -> None:
    a, b = quadratic_surface(seed=0).spec, quadratic_surface(seed=1).spec
    assert mismatched_keys(a, b) == ["checkpoint_hash"]
    assert mismatched_keys(a, a | {"points": 99, "seconds": 3.0}) == []


def test_npz_is_a_plain_zip_without_pickles(tmp_path: Path) -> None:
    npz_path, _ = save_surface(quadratic_surface(), tmp_path / "s")
    with zipfile.ZipFile(npz_path) as archive:
        assert sorted(archive.namelist()) == sorted(
            f"{k}.npy" for k in ("alphas", "betas", "loss", "accuracy", "direction_1", "direction_2"))
