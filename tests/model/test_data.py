"""CSV loading, splitting, scaling and windowing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model.data import (
    DataError,
    Scaler,
    Split,
    default_csv_path,
    forecast_origins,
    future_targets,
    load_csv,
    sliding_windows,
)


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "series.csv"
    p.write_text(text)
    return p


def test_default_dataset_is_read_from_the_installed_package() -> None:
    """The Seattle weather file comes from vega_datasets on disk: 1,461 rows of the four numeric columns."""
    s = load_csv(default_csv_path(), "temp_max", ("precipitation", "temp_max", "temp_min", "wind"), "date")
    assert len(s) == 1461
    assert s.values.shape == (1461, 4)
    assert s.times[0] == "2012/01/01"
    assert s.times[-1] == "2015/12/31"
    assert s.target_values[0] == pytest.approx(12.8)
    np.testing.assert_array_equal(s.values[:, 1], s.target_values)


def test_missing_cell_names_line_and_column(tmp_path: Path) -> None:
    """A missing value is an error that names the line and the column."""
    p = write(tmp_path, "t,a,b\n1,1.0,2.0\n2,,3.0\n")
    with pytest.raises(DataError, match=r"line 3, column 'a': missing value"):
        load_csv(p, "b", ("a", "b"), "t")


def test_non_numeric_cell_names_line_and_column(tmp_path: Path) -> None:
    """A non-numeric value is an error that names the line, the column and the value."""
    p = write(tmp_path, "t,a,b\n1,1.0,2.0\n2,3.0,oops\n")
    with pytest.raises(DataError, match=r"line 3, column 'b': 'oops' is not a number"):
        load_csv(p, "b", ("a", "b"), "t")


def test_non_finite_cell_is_rejected(tmp_path: Path) -> None:
    """NaN or Inf written in the file is refused like a missing value."""
    p = write(tmp_path, "a,b\n1.0,nan\n")
    with pytest.raises(DataError, match=r"line 2, column 'b': 'nan' is not finite"):
        load_csv(p, "b", ("a", "b"))


def test_unknown_column_lists_the_available_ones(tmp_path: Path) -> None:
    """Asking for a column the file does not have says which columns exist."""
    p = write(tmp_path, "a,b\n1,2\n")
    with pytest.raises(DataError, match=r"no column\(s\) \['c'\]; its columns are \['a', 'b'\]"):
        load_csv(p, "c", ("a",))


def test_time_going_backwards_is_an_error(tmp_path: Path) -> None:
    """Rows must be chronological when a time column is given."""
    p = write(tmp_path, "t,a\n2020-01-02,1\n2020-01-01,2\n")
    with pytest.raises(DataError, match="goes back in time at line 3"):
        load_csv(p, "a", ("a",), "t")


def test_features_default_to_every_column_but_time(tmp_path: Path) -> None:
    """Without --features every column but the time column is an input, the target included."""
    p = write(tmp_path, "t,a,b\n1,1,2\n2,3,4\n\n")
    s = load_csv(p, "b", None, "t")
    assert s.features == ("a", "b")
    np.testing.assert_array_equal(s.values, [[1, 2], [3, 4]])


def test_split_is_chronological_and_refuses_tiny_parts() -> None:
    """70/15/15 of 1,461 rows, in order; too few rows for a part is a clear error."""
    sp = Split.chronological(1461, 0.7, 0.15, min_part=63)
    assert (sp.train_end, sp.val_end, sp.n) == (1023, 1242, 1461)
    with pytest.raises(DataError, match="too few"):
        Split.chronological(100, 0.7, 0.15, min_part=63)
    with pytest.raises(DataError, match="sum to less than 1"):
        Split.chronological(100, 0.7, 0.4, min_part=1)


def test_scaler_is_fitted_on_the_training_part_only() -> None:
    """Mean and std come from the rows given (the training part), and a constant column stays finite."""
    x = np.array([[1.0, 5.0], [3.0, 5.0]], dtype=np.float32)
    sc = Scaler.fit(x, np.array([0.0, 2.0], dtype=np.float32))
    np.testing.assert_allclose(sc.mean, [2.0, 5.0])
    np.testing.assert_allclose(sc.std, [1.0, 1.0])
    np.testing.assert_allclose(sc.transform(np.array([[4.0, 5.0]], dtype=np.float32)), [[2.0, 0.0]])
    assert sc.inverse_target(sc.transform_target(np.array([7.0], dtype=np.float32)))[0] == pytest.approx(7.0)
    assert Scaler.from_dict(sc.to_dict()).to_dict() == sc.to_dict()


def test_windows_pair_each_step_with_the_next_horizon_targets() -> None:
    """Y[i, t, k] is the target k+1 steps after input step t, and no target leaves the part."""
    n = 20
    x = np.arange(n, dtype=np.float32)[:, None] * np.array([[1.0, 10.0]], dtype=np.float32)
    target = np.arange(n, dtype=np.float32) * 100
    xs, ys = sliding_windows(x, target, start=2, end=15, window=4, horizon=3)
    assert xs.shape == (7, 4, 2)
    assert ys.shape == (7, 4, 3)
    np.testing.assert_array_equal(xs[0, :, 0], [2, 3, 4, 5])
    np.testing.assert_array_equal(ys[0, 0], [300, 400, 500])
    np.testing.assert_array_equal(ys[-1, -1], [1200, 1300, 1400])
    assert ys.max() <= 14 * 100
    with pytest.raises(DataError, match="fewer than window"):
        sliding_windows(x, target, start=0, end=5, window=4, horizon=3)


def test_future_targets_and_test_origins() -> None:
    """Targets past the end are NaN; test origins keep their whole horizon inside the test part."""
    fut = future_targets(np.arange(5, dtype=np.float32), 2)
    np.testing.assert_array_equal(fut[0], [1, 2])
    assert np.isnan(fut[3, 1])
    assert np.isnan(fut[4]).all()
    origins = forecast_origins(Split(n=100, train_end=70, val_end=85), horizon=7, context=10)
    assert origins[0] == 85
    assert origins[-1] == 92
