"""Time series data: CSV loading with clear errors, chronological splits, scaling and sliding windows."""

from __future__ import annotations

import csv
import datetime as dt
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

F32 = NDArray[np.float32]


class DataError(ValueError):
    """A problem with the input data, phrased so that the user knows what to fix."""


VEGA_PREFIX = "vega:"  # `--csv vega:NAME.csv`: a file shipped inside the vega_datasets package


def default_csv_path(name: str = "seattle-weather.csv") -> Path:
    """Return a CSV that ships inside the installed `vega_datasets` package (by default the Seattle weather).

    NOTE: found through the import system without importing the package (its __init__ pulls in
    pandas), and never fetched from the network.
    """
    spec = importlib.util.find_spec("vega_datasets")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"{name} ships in the vega_datasets package, which is not installed: pip install -e '.[train]' "
            "(make install-dev), or pass a CSV path"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "_data" / name
    if not path.is_file():
        known = sorted(p.name for p in path.parent.glob("*.csv"))
        raise DataError(f"vega_datasets has no {name}; its CSV files are {', '.join(known)}")
    return path


def csv_path(csv: str | None) -> Path:
    """The file a `--csv` value names: a path, `vega:NAME.csv` (shipped in vega_datasets), or None (the default)."""
    if csv is None:
        return default_csv_path()
    if csv.startswith(VEGA_PREFIX):
        return default_csv_path(csv[len(VEGA_PREFIX) :])
    return Path(csv)


@dataclass
class Series:
    """A multivariate time series read from a CSV: `values[N, F]` for `features`, plus the target column."""

    features: tuple[str, ...]
    target: str
    values: F32  # [N, F] raw feature values, file order (chronological)
    target_values: F32  # [N] raw target values
    times: list[str]  # [N] time labels (row numbers when the file has no time column)
    source: str  # where the data came from (for the model card)

    def __len__(self) -> int:
        return int(self.values.shape[0])


def load_csv(
    path: str | Path,
    target: str,
    features: tuple[str, ...] | None = None,
    time_col: str | None = None,
) -> Series:
    """Read a CSV with a header row into a `Series`.

    Every selected cell must be a finite number; a missing or non-numeric cell raises a
    `DataError` that names its line and column. Rows are taken in file order, which must be
    chronological; with `time_col`, a decreasing timestamp is an error too.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"CSV file not found: {path}")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise DataError(f"{path.name} is empty; expected a header row and data rows") from None
        # NOTE: without --features every column but the time column is an input, the target included
        feats = tuple(features) if features else tuple(h for h in header if h != time_col)
        wanted = [*feats, target] + ([time_col] if time_col else [])
        missing = list(dict.fromkeys(c for c in wanted if c not in header))
        if missing:
            raise DataError(f"{path.name} has no column(s) {missing}; its columns are {header}")
        idx = {c: header.index(c) for c in set(wanted)}
        rows: list[list[float]] = []
        times: list[str] = []
        for line_no, row in enumerate(reader, start=2):
            if not row or all(not cell.strip() for cell in row):
                continue  # NOTE: blank lines (often a trailing newline) are not data
            parsed: list[float] = []
            for col in (*feats, target):
                j = idx[col]
                cell = row[j].strip() if j < len(row) else ""
                if cell == "":
                    raise DataError(f"{path.name} line {line_no}, column {col!r}: missing value")
                try:
                    v = float(cell)
                except ValueError:
                    raise DataError(f"{path.name} line {line_no}, column {col!r}: {cell!r} is not a number") from None
                if not math.isfinite(v):
                    raise DataError(f"{path.name} line {line_no}, column {col!r}: {cell!r} is not finite")
                parsed.append(v)
            rows.append(parsed)
            times.append(row[idx[time_col]].strip() if time_col else str(line_no))
    if not rows:
        raise DataError(f"{path.name} has a header but no data rows")
    if time_col:
        keys = _time_keys(times)
        for i in range(1, len(times)):
            if keys[i] < keys[i - 1]:
                raise DataError(
                    f"{path.name}: {time_col!r} goes back in time at line {i + 2} "
                    f"({times[i]!r} after {times[i - 1]!r}); sort the file chronologically"
                )
    arr = np.asarray(rows, dtype=np.float32)
    return Series(
        features=feats,
        target=target,
        values=arr[:, : len(feats)],
        target_values=arr[:, len(feats)],
        times=times,
        source=path.name,
    )


def _time_keys(times: list[str]) -> list[float]:
    """Sort keys for a time column: numbers as numbers, else ISO-like dates ('/' or '-' separated)."""
    try:
        return [float(t) for t in times]
    except ValueError:
        pass
    try:
        return [dt.datetime.fromisoformat(t.replace("/", "-")).timestamp() for t in times]
    except ValueError:
        raise DataError(
            f"time column values such as {times[0]!r} are neither numbers nor ISO dates; "
            "leave out --time-col if the rows are already in order"
        ) from None


@dataclass(frozen=True)
class Split:
    """Chronological split boundaries: train is [0, train_end), val [train_end, val_end), test [val_end, n)."""

    n: int
    train_end: int
    val_end: int

    @classmethod
    def chronological(cls, n: int, train_frac: float, val_frac: float, min_part: int) -> Split:
        """Split `n` rows in time order; each part must hold at least `min_part` rows."""
        if not (0 < train_frac < 1 and 0 < val_frac < 1 and train_frac + val_frac < 1):
            raise DataError(f"train_frac={train_frac} and val_frac={val_frac} must be in (0, 1) and sum to less than 1")
        train_end = round(n * train_frac)
        val_end = round(n * (train_frac + val_frac))
        split = cls(n=n, train_end=train_end, val_end=val_end)
        sizes = {"train": train_end, "validation": val_end - train_end, "test": n - val_end}
        small = {k: v for k, v in sizes.items() if v < min_part}
        if small:
            raise DataError(
                f"{n} rows are too few: the {', '.join(small)} part(s) would hold {small} rows, "
                f"and each needs at least {min_part} (window + horizon); use more data or a shorter --window"
            )
        return split


@dataclass
class Scaler:
    """Per-column standardisation fitted on the training part only: z = (v - mean) / std."""

    mean: F32  # [F]
    std: F32  # [F]
    target_mean: float
    target_std: float

    @classmethod
    def fit(cls, values: F32, target: F32) -> Scaler:
        """Fit on training rows; a constant column gets std 1 so that scaling stays finite."""
        std = values.std(axis=0)
        std = np.where(std > 1e-8, std, 1.0)
        tstd = float(target.std())
        return cls(
            mean=values.mean(axis=0).astype(np.float32),
            std=std.astype(np.float32),
            target_mean=float(target.mean()),
            target_std=tstd if tstd > 1e-8 else 1.0,
        )

    def transform(self, values: F32) -> F32:
        return ((values - self.mean) / self.std).astype(np.float32)

    def transform_target(self, target: F32) -> F32:
        return ((target - self.target_mean) / self.target_std).astype(np.float32)

    def inverse_target(self, z: F32) -> F32:
        return (z * self.target_std + self.target_mean).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in self.std],
            "target_mean": self.target_mean,
            "target_std": self.target_std,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scaler:
        return cls(
            mean=np.asarray(d["mean"], dtype=np.float32),
            std=np.asarray(d["std"], dtype=np.float32),
            target_mean=float(d["target_mean"]),
            target_std=float(d["target_std"]),
        )


def future_targets(target: F32, horizon: int) -> F32:
    """Return `Y[N, horizon]` with `Y[t, k] = target[t + 1 + k]`, NaN where that lies past the end."""
    n = target.shape[0]
    out = np.full((n, horizon), np.nan, dtype=np.float32)
    for k in range(horizon):
        out[: n - 1 - k, k] = target[1 + k :]
    return out


def sliding_windows(
    x: F32, target: F32, start: int, end: int, window: int, horizon: int, stride: int = 1
) -> tuple[F32, F32]:
    """Cut windows of `window` steps from rows [start, end) whose every target also lies in [start, end).

    Returns `X[n, window, F]` and `Y[n, window, horizon]` where `Y[i, t, k]` is the target
    `k + 1` steps after input step `t` of window `i`.
    """
    if window < 1 or horizon < 1:
        raise DataError(f"window ({window}) and horizon ({horizon}) must be at least 1")
    last_start = end - window - horizon  # the final target row of the window is end - 1
    if last_start < start:
        raise DataError(
            f"rows [{start}, {end}) hold {end - start} steps, fewer than window + horizon = {window + horizon}"
        )
    fut = future_targets(target, horizon)
    starts = np.arange(start, last_start + 1, stride)
    xs = np.stack([x[s : s + window] for s in starts]).astype(np.float32)
    ys = np.stack([fut[s : s + window] for s in starts]).astype(np.float32)
    return xs, ys


def forecast_origins(split: Split, horizon: int, context: int) -> NDArray[np.int64]:
    """Forecast origins t of the test part: every t whose `horizon` future targets are all in the test part.

    The `context` rows that end at t may reach back into earlier parts: they are history known at t.
    """
    first = max(split.val_end, context - 1)
    last = split.n - 1 - horizon
    if last < first:
        raise DataError(f"the test part ({split.n - split.val_end} rows) is shorter than the horizon")
    return np.arange(first, last + 1, dtype=np.int64)
