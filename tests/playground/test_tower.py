"""The playground tower's labels and augmentation."""

import numpy as np

from playground.digitgrid import GRID, Grid
from playground.tower import EMPTY_CLASS, cell_classes, jittered, patch_cells


def test_patches_do_not_line_up_with_cells():
    rows, cols = patch_cells(88, 8)
    assert rows.shape == (121,) and rows.reshape(11, 11)[:, 0].tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 3]
    assert (rows.reshape(11, 11) == rows.reshape(11, 11)[:, :1]).all() and (cols[:11] == rows[::11]).all()
    aligned_rows, _ = patch_cells(96, 8)  # 3 patches per cell: aligned, which the study avoids
    assert np.bincount(aligned_rows.reshape(12, 12)[:, 0]).tolist() == [3, 3, 3, 3]


def test_cell_classes_mark_empty_cells():
    cells = (1, None) + (7,) * 14
    assert cell_classes(cells).tolist() == [1, EMPTY_CLASS] + [7] * 14


def test_jitter_moves_glyphs_inside_their_cells_only():
    cells = tuple(range(10)) + (None,) * 6
    grid = Grid(cells, tuple(range(10)) + (None,) * 6)
    drawn = np.asarray(grid.render())[..., 0]
    assert np.array_equal(np.asarray(jittered(grid, np.random.default_rng(0), 0))[..., 0], drawn)
    moved = np.asarray(jittered(grid, np.random.default_rng(0), 2))[..., 0]
    assert not np.array_equal(moved, drawn)
    assert (moved[72:, 48:] == 255).all()  # empty cells stay empty
    for position in range(GRID * GRID):  # ink stays in its cell (load_digits glyphs have blank borders)
        row, col = divmod(position, GRID)
        cell = (slice(row * 24, row * 24 + 24), slice(col * 24, col * 24 + 24))
        assert abs(int((255 - moved[cell]).sum()) - int((255 - drawn[cell]).sum())) <= 0.1 * (255 - drawn[cell]).sum()


def test_rotation_turns_glyphs_about_their_cell_centre():
    cells = tuple(range(10)) + (None,) * 6
    grid = Grid(cells, tuple(range(10)) + (None,) * 6)
    drawn = 255 - np.asarray(grid.render())[..., 0].astype(float)
    turned = 255 - np.asarray(jittered(grid, np.random.default_rng(1), 0, rotate=20.0))[..., 0].astype(float)
    assert (turned[72:, 48:] == 0).all()
    changed = 0
    for position in range(10):
        row, col = divmod(position, GRID)
        cell = (slice(row * 24, row * 24 + 24), slice(col * 24, col * 24 + 24))
        before, after = drawn[cell], turned[cell]
        changed += not np.allclose(before, after, atol=1)
        assert abs(after.sum() - before.sum()) <= 0.2 * before.sum()  # a turn keeps the ink
        ys, xs = np.mgrid[:24, :24]
        for axis in (ys, xs):  # ... and its centre of mass, give or take the turn of an off-centre glyph
            assert abs((axis * after).sum() / after.sum() - (axis * before).sum() / before.sum()) < 2.5
    assert changed >= 8
