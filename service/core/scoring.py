"""Live accuracy: each session scores its own forecasts as the truth arrives.

A model whose target is one of its input features tells the server, at every step, the actual value of
something it forecast earlier: the output k of the step at origin t forecasts the target at t + k, and the
input of step t + k carries it. So every session keeps its last `horizon` forecasts (a ring of
`horizon * horizon` float32) and the target values at those origins (for the persistence forecast of the
same origin: the last value seen), and each step scores every forecast its target value resolves. The
errors add up per session (shown by GetSession) and per model version and horizon step (Prometheus).

The record is the session's `Signature.extra` bytes: the store keeps it beside the state and the batcher
changes it with the state, in the same commit, so a step that is not applied (a replay, a conflict, a
failure) is not scored, and reset or import start it again. All zeros is a fresh record.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from service.card import ModelCard
from service.runtime import F32, Signature

F64 = NDArray[np.float64]
FEW = 4  # NOTE: one step of up to this many sessions is scored in plain Python (faster than numpy's fixed costs)


OFF_AT = 16  # NOTE: the byte offset of `off` in every record (after n and since), whatever the horizon


def restart(record: bytes, off: bool | None = None) -> bytes:
    """A record started again (reset, import) that keeps whether its session scores (or sets it): an unscored
    what-if fork stays unscored. Empty for a model without a record."""
    if not record:
        return record
    flag = record[OFF_AT] if off is None else int(off)
    return bytes(OFF_AT) + bytes([flag]) + bytes(len(record) - OFF_AT - 1)


@dataclass(frozen=True)
class HorizonScore:
    """A session's live accuracy at one horizon step: forecasts scored and their mean absolute errors."""

    horizon: int  # k: forecasts made k steps before the value that scored them
    count: int
    mae: float | None  # None until one is scored
    persistence_mae: float | None  # the persistence forecast (the last value seen) at the same origins


@dataclass(frozen=True)
class SessionScore:
    """What a session's record says, for GetSession: scored is False for a session that does not score."""

    scored: bool
    horizons: list[HorizonScore]


@dataclass(frozen=True)
class Scored:
    """What one batch adds, per batch row: [B, 3, K] model error sums, persistence error sums and counts per
    horizon step (one array, so that adding a batch to the totals is one operation)."""

    rows: F64

    @property
    def model(self) -> F64:
        return self.rows[:, 0]

    @property
    def persistence(self) -> F64:
        return self.rows[:, 1]

    @property
    def count(self) -> F64:
        return self.rows[:, 2]


class Scoring:
    """The record layout and the scoring arithmetic for one model version (horizon K, target input column)."""

    def __init__(self, horizon: int, target_index: int) -> None:
        k = horizon
        self.horizon, self.target_index = k, target_index
        # NOTE: ring rows are origins, oldest first: row i of a record with n steps is origin n - K + i
        self.dtype = np.dtype([
            ("n", "<i8"),  # steps since the record started (create, reset, import)
            ("since", "<i8"),  # the step from which this session's own error sums count (a fork's n at the fork)
            ("off", "u1"),  # 1: this session's steps are not scored (a what-if fork)
            ("fc", "<f4", (k, k)),  # the forecasts of the last K origins
            ("last", "<f4", (k,)),  # the target values at those origins
            ("err", "<f8", (2, k)),  # this session's absolute error sums: model, persistence
        ])  # fmt: skip
        self.width = self.dtype.itemsize
        assert self.dtype.fields is not None
        assert self.dtype.fields["off"][1] == OFF_AT
        self._struct = struct.Struct(f"<qqB{k * k}f{k}f{2 * k}d")  # NOTE: the same record, for `_one_step`
        assert self._struct.size == self.width
        self._index: dict[int, tuple[NDArray[np.intp], NDArray[np.intp], NDArray[np.int64]]] = {}

    @classmethod
    def for_model(cls, card: ModelCard, sig: Signature) -> tuple[Scoring | None, str]:
        """The scoring of a model, or None and why it has none."""
        if not card.target:
            return None, (
                "its card names no target, so nothing says which input brings the actual values of its forecasts "
                "(name one with `lstm-serve card FILE --target NAME`)"
            )
        if card.target not in card.features:
            return None, (
                f"its target {card.target!r} is not one of its input features, so the inputs never bring the actual "
                "values of its forecasts"
            )
        if sig.outputs != card.horizon:
            return None, f"it has {sig.outputs} outputs for horizon {card.horizon}: not one forecast per horizon step"
        return cls(card.horizon, card.features.index(card.target)), ""

    @property
    def ring_bytes(self) -> int:
        return self.horizon * self.horizon * 4

    def _pairs(self, t: int) -> tuple[NDArray[np.intp], NDArray[np.intp], NDArray[np.int64]]:
        """For T new steps: the row (of ring + new forecasts) and column of the forecast that step t resolves at
        horizon k, as [K, T] arrays, and the origin offset t - k (valid when n + t - k >= 0)."""
        got = self._index.get(t)
        if got is None:
            k = np.arange(1, self.horizon + 1)[:, None]
            steps = np.arange(t)[None, :]
            rows = (self.horizon - k + steps).astype(np.intp)
            cols = np.broadcast_to(k - 1, rows.shape).astype(np.intp)
            got = (rows, cols, (steps - k).astype(np.int64))
            if len(self._index) < 64:
                self._index[t] = got
        return got

    def score(self, extras: list[bytes], x: F32, y: F32) -> tuple[list[bytes], Scored]:
        """Records after the steps x [B, T, F] with outputs y [B, T, O], and what those steps scored."""
        b = x.shape[0]
        if x.shape[1] == 1 and b <= FEW:
            return self._one_step(extras, x, y)
        raw, scored = self.score_rows(np.frombuffer(b"".join(extras), np.uint8).reshape(b, self.width), x, y)
        w = self.width
        flat = raw.tobytes()
        return [flat[i * w : (i + 1) * w] for i in range(b)], scored

    def score_rows(self, extra: NDArray[np.uint8], x: F32, y: F32) -> tuple[NDArray[np.uint8], Scored]:
        """`score` on records as one [B, width] array (a step block's), returning the new ones likewise."""
        t = x.shape[1]
        rec = np.ascontiguousarray(extra).view(self.dtype).reshape(-1).copy()
        n = rec["n"]
        actual = x[:, :, self.target_index]  # [B, T]
        forecasts = np.concatenate((rec["fc"], y), axis=1)  # [B, K + T, K]: origins oldest first
        lasts = np.concatenate((rec["last"], actual), axis=1)  # [B, K + T]
        rows, cols, offset = self._pairs(t)
        valid = ((n[:, None, None] + offset[None]) >= 0) & (rec["off"] == 0)[:, None, None]  # [B, K, T]
        truth = actual[:, None, :].astype(np.float64)
        model = np.where(valid, np.abs(forecasts[:, rows, cols].astype(np.float64) - truth), 0.0).sum(axis=2)
        pers = np.where(valid, np.abs(lasts[:, rows].astype(np.float64) - truth), 0.0).sum(axis=2)
        rec["fc"] = forecasts[:, t:]
        rec["last"] = lasts[:, t:]
        rec["n"] = n + t
        rec["err"][:, 0] += model
        rec["err"][:, 1] += pers
        per_row: F64 = np.stack((model, pers, valid.sum(axis=2)), axis=1, dtype=np.float64)
        return rec.view(np.uint8).reshape(len(rec), self.width), Scored(per_row)

    def _one_step(self, extras: list[bytes], x: F32, y: F32) -> tuple[list[bytes], Scored]:
        """`score` for one step of a few sessions (the usual call at low load) in plain Python on the unpacked
        record: numpy's fixed cost per operation is what a single row would pay otherwise. The same arithmetic
        (float32 values compared in double precision), so both paths give the same numbers."""
        kk, ring = self.horizon, self.horizon * self.horizon
        out, rows = [], np.zeros((len(extras), 3, kk))
        for r, extra in enumerate(extras):
            v = list(self._struct.unpack(extra))
            n, off = v[0], v[2]
            fc, last, err = v[3 : 3 + ring], v[3 + ring : 3 + ring + kk], v[3 + ring + kk :]
            truth = float(x[r, 0, self.target_index])
            resolved = 0 if off else min(n, kk)
            for k in range(1, resolved + 1):  # NOTE: origin n - k sits in ring row K - k; its horizon k is column k - 1
                m = abs(fc[(kk - k) * kk + k - 1] - truth)
                p = abs(last[kk - k] - truth)
                rows[r, 0, k - 1], rows[r, 1, k - 1] = m, p
                err[k - 1] += m
                err[kk + k - 1] += p
            rows[r, 2, :resolved] = 1.0
            out.append(self._struct.pack(n + 1, v[1], off, *fc[kk:], *y[r, 0].tolist(), *last[1:], truth, *err))
        return out, Scored(rows)

    def fork(self, extra: bytes, scored: bool) -> bytes:
        """The record of a session forked from one with record `extra`: the same ring (so the fork's next steps
        score forecasts made before the fork), its own error sums from zero, scored only when asked."""
        rec = np.frombuffer(extra, self.dtype).copy() if len(extra) == self.width else np.zeros(1, self.dtype)
        rec["err"] = 0.0
        rec["since"] = rec["n"]
        rec["off"] = 0 if scored else 1
        return rec.tobytes()

    def summary(self, extra: bytes) -> SessionScore:
        """A session's live accuracy from its record."""
        if len(extra) != self.width:
            extra = bytes(self.width)
        rec = np.frombuffer(extra, self.dtype)[0]
        if rec["off"]:
            return SessionScore(False, [])
        n, since = int(rec["n"]), int(rec["since"])
        horizons = []
        for k in range(1, self.horizon + 1):
            count = max(0, n - max(k, since))  # NOTE: step j scores horizon k when j >= k (and j >= since)
            mae = float(rec["err"][0, k - 1]) / count if count else None
            pers = float(rec["err"][1, k - 1]) / count if count else None
            horizons.append(HorizonScore(k, count, mae, pers))
        return SessionScore(True, horizons)
