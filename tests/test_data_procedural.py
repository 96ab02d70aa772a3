"""Procedural dSprites: layout, geometry facts, sweeps, the fallback in load_dsprites, fidelity."""

import logging

import numpy as np
import pytest

from fastfvae.data import NUM_IMAGES, classes_of, index_of, load_dsprites, procedural_dsprites, values_of
from fastfvae.data.download import DSPRITES_FILENAME
from fastfvae.data.fidelity import best_match_iou, dataset_render_fn
from fastfvae.data.procedural import render, render_packed_rows

SQUARE, ELLIPSE, HEART = 0, 1, 2


@pytest.fixture(scope="session")
def full():
    """The full procedural set, rendered once per session (about 1-3 s)."""
    return procedural_dsprites()


def image(data, shape, scale, orient, posx, posy):
    return data.images_at(index_of(np.array([[0, shape, scale, orient, posx, posy]])))[0]


def centroid(img):
    rows, cols = np.nonzero(img)
    return rows.mean() + 0.5, cols.mean() + 0.5


def test_layout_dtype_and_order(full):
    assert full.packed.shape == (NUM_IMAGES, 512) and full.packed.dtype == np.uint8
    assert full.source == "procedural" and full.is_full
    assert np.array_equal(full.latents_classes, classes_of(np.arange(NUM_IMAGES)))
    assert np.array_equal(full.latents_values, values_of(full.latents_classes))
    assert procedural_dsprites() is full  # rendered once per process
    with pytest.raises(ValueError):
        full.packed[0, 0] = 1  # shared: read-only


def test_bulk_render_equals_the_per_row_renderer(full):
    rows = np.random.RandomState(3).randint(NUM_IMAGES, size=400)
    assert np.array_equal(render_packed_rows(classes_of(rows)), full.packed[rows])
    imgs = render(classes_of(rows[:20]))
    assert imgs.dtype == np.uint8 and set(np.unique(imgs)) <= {0, 1}
    assert np.array_equal(imgs, full.images_at(rows[:20]))


def test_square_sizes_and_centre(full):
    for s in range(6):  # side 19.2 px * scale = 10, 12, ..., 20 pixels, centred on pixel edge 16
        img = image(full, SQUARE, s, 0, 0, 0)
        half = 5 + s
        expected = np.zeros((64, 64), np.uint8)
        expected[16 - half:16 + half, 16 - half:16 + half] = 1
        assert np.array_equal(img, expected), s
    last = image(full, SQUARE, 0, 0, 31, 31)  # pos 1 -> centre 48
    assert np.array_equal(np.argwhere(last).min(0), [43, 43]) and np.array_equal(np.argwhere(last).max(0), [52, 52])


def test_positions_move_along_the_expected_axes(full):
    r0, c0 = centroid(image(full, HEART, 5, 0, 0, 0))
    rx, cx = centroid(image(full, HEART, 5, 0, 31, 0))
    ry, cy = centroid(image(full, HEART, 5, 0, 0, 31))
    assert cx - c0 == pytest.approx(32, abs=0.3) and rx == pytest.approx(r0, abs=0.3)  # posX: columns
    assert ry - r0 == pytest.approx(32, abs=0.3) and cy == pytest.approx(c0, abs=0.3)  # posY: rows, 0 at top


def test_orientation_facts(full):
    ellipse = image(full, ELLIPSE, 5, 0, 0, 0)
    rows, cols = np.nonzero(ellipse)
    assert np.ptp(cols) > np.ptp(rows) + 8  # long axis horizontal at orientation 0
    heart_row, _ = centroid(image(full, HEART, 5, 0, 0, 0))
    assert heart_row < 15  # mass above the centre: the tip points down
    turned = image(full, ELLIPSE, 5, 3, 0, 0)  # +0.48 rad: anticlockwise on screen
    upper_right, lower_right = turned[:16, 16:].sum(), turned[16:, 16:].sum()
    assert upper_right > lower_right + 20
    for shape in (SQUARE, ELLIPSE, HEART):  # 2*pi renders like 0
        assert np.array_equal(image(full, shape, 4, 39, 7, 9), image(full, shape, 4, 0, 7, 9))


def test_each_factor_sweep_changes_the_image(full):
    base = np.array([0, HEART, 3, 5, 10, 20])
    for k, size in zip(range(1, 6), (3, 6, 40, 32, 32)):
        classes = np.tile(base, (size, 1))
        classes[:, k] = np.arange(size)
        imgs = full.images_at(index_of(classes)).reshape(size, -1)
        steps = imgs[1:] != imgs[:-1]
        changed = steps.any(axis=1)
        if k == 3:  # orientation 39 (2*pi) is orientation 0 again, so it differs from 38
            assert changed.all()
        else:
            assert changed.all(), f"factor {k} has a step that leaves the image unchanged"
        assert len({row.tobytes() for row in imgs[: size - (k == 3)]}) == size - (k == 3)


def said(capsys, caplog) -> list[str]:
    """load_dsprites' log lines: logging records, or stderr lines where logging is unconfigured."""
    return [r.getMessage() for r in caplog.records if r.name == "fastfvae.data"] + \
        [line for line in capsys.readouterr().err.splitlines() if "dSprites" in line]


def test_load_dsprites_falls_back_to_procedural(tmp_path, monkeypatch, capsys, caplog, full):
    caplog.set_level(logging.INFO, logger="fastfvae.data")
    monkeypatch.setenv("FASTFVAE_HOME", str(tmp_path))
    assert load_dsprites() is full
    lines = said(capsys, caplog)
    assert len(lines) == 1 and "procedural" in lines[0]


def test_load_dsprites_prefers_the_cached_real_file(tmp_path, monkeypatch, capsys, caplog, full):
    from fastfvae.data import save_npz
    from fastfvae.data.dsprites import DSprites

    rows = np.arange(0, NUM_IMAGES, 9973)
    subset = DSprites(full.packed[rows], full.latents_classes[rows], full.latents_values[rows])
    save_npz(subset, tmp_path / DSPRITES_FILENAME)
    monkeypatch.setenv("FASTFVAE_HOME", str(tmp_path))
    loaded = load_dsprites(require_full=False)
    assert np.array_equal(loaded.packed, subset.packed) and loaded.source.endswith(DSPRITES_FILENAME)
    caplog.set_level(logging.INFO, logger="fastfvae.data")
    load_dsprites(require_full=False)
    lines = said(capsys, caplog)
    assert len(lines) == 1 and "real file" in lines[0]


def test_fidelity_on_a_sample_of_real_frames(shared_dir, full):
    path = shared_dir / "dsprites" / "real_frames.npz"
    if not path.exists():
        pytest.skip(f"{path} is absent: the real dSprites frames are needed for the fidelity check")
    frames = np.load(path)["frames"][::3]  # 107 of the 320 frames, every sweep represented
    report = best_match_iou(frames, dataset_render_fn(full))
    assert report.mean >= 0.998, f"mean best-match IoU {report.mean:.5f} < 0.998"
    assert report.min >= 0.985, f"min best-match IoU {report.min:.5f} < 0.985"


@pytest.mark.slow
def test_render_is_deterministic_across_thread_counts(full):
    from fastfvae.data.procedural import render_packed

    assert np.array_equal(render_packed(workers=1), full.packed)
    assert np.array_equal(render_packed(workers=3), full.packed)
