"""Live scoring arithmetic against a brute-force count of every (forecast, truth) pair."""

from __future__ import annotations

import numpy as np
import pytest

from service.card import CARD_SCHEMA, ModelCard
from service.core.scoring import Scoring
from service.runtime import Signature

K, F, TARGET = 4, 3, 1


def brute(x: np.ndarray, y: np.ndarray, since: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per horizon k: count, model and persistence absolute error sums over every origin t whose t + k is seen."""
    n = x.shape[0]
    count, model, pers = np.zeros(K, int), np.zeros(K), np.zeros(K)
    for k in range(1, K + 1):
        for t in range(n - k):
            if t + k < since:
                continue
            truth = float(x[t + k, TARGET])
            count[k - 1] += 1
            model[k - 1] += abs(float(y[t, k - 1]) - truth)
            pers[k - 1] += abs(float(x[t, TARGET]) - truth)
    return count, model, pers


def test_chunked_steps_score_every_forecast_once_as_its_truth_arrives() -> None:
    """Three sessions fed the same kind of series in different call sizes (some in one batch) score exactly
    the brute-force pairs: every forecast once, at its horizon, against the persistence of its origin."""
    rng = np.random.default_rng(3)
    sc = Scoring(K, TARGET)
    n = 40
    xs = [rng.normal(size=(n, F)).astype(np.float32) for _ in range(3)]
    ys = [rng.normal(size=(n, K)).astype(np.float32) for _ in range(3)]
    recs = [bytes(sc.width)] * 3
    totals = [np.zeros(K), np.zeros(K), np.zeros(K)]
    at = 0
    for t in (1, 1, 2, 7, 1, 3, 10, 15):  # NOTE: the three sessions in one batch, T from 1 to > K
        new, scored = sc.score(recs, np.stack([x[at : at + t] for x in xs]), np.stack([y[at : at + t] for y in ys]))
        recs = new
        totals[0] += scored.model.sum(axis=0)
        totals[1] += scored.persistence.sum(axis=0)
        totals[2] += scored.count.sum(axis=0)
        at += t
    assert at == n
    want = [brute(x, y) for x, y in zip(xs, ys, strict=True)]
    for rec, (count, model, pers) in zip(recs, want, strict=True):
        summary = sc.summary(rec)
        assert summary.scored
        assert [h.count for h in summary.horizons] == list(count)
        assert [h.mae for h in summary.horizons] == pytest.approx(model / count, rel=1e-12)
        assert [h.persistence_mae for h in summary.horizons] == pytest.approx(pers / count, rel=1e-12)
    assert totals[2].astype(int).tolist() == sum(w[0] for w in want).tolist()
    assert totals[0] == pytest.approx(sum(w[1] for w in want), rel=1e-12)
    assert totals[1] == pytest.approx(sum(w[2] for w in want), rel=1e-12)


def test_one_step_of_a_few_sessions_scores_bit_for_bit_as_the_array_path() -> None:
    """Scoring has a plain-Python path for one step of a few sessions (the usual call at low load) and an
    array path for the rest; over a run they give the same records and the same scores, to the bit."""
    rng = np.random.default_rng(11)
    sc = Scoring(K, TARGET)
    x = rng.normal(size=(3, 25, F)).astype(np.float32)
    y = rng.normal(size=(3, 25, K)).astype(np.float32)
    few, many = [bytes(sc.width)] * 3, [bytes(sc.width)] * 3
    padding = [bytes(sc.width)] * 6  # NOTE: 9 rows take the array path
    for t in range(25):
        few, by_python = sc.score(few, x[:, t : t + 1], y[:, t : t + 1])
        xs, ys = np.concatenate([x[:, t : t + 1]] * 3), np.concatenate([y[:, t : t + 1]] * 3)
        out, by_arrays = sc.score(many + padding, xs, ys)
        many, padding = out[:3], out[3:]
        assert np.array_equal(by_python.rows, by_arrays.rows[:3])
    assert few == many


def test_a_fresh_record_scores_nothing_until_a_forecast_is_resolved() -> None:
    sc = Scoring(K, TARGET)
    (rec,), scored = sc.score([bytes(sc.width)], np.ones((1, 1, F), np.float32), np.ones((1, 1, K), np.float32))
    assert scored.count.sum() == 0
    assert [(h.count, h.mae) for h in sc.summary(rec).horizons] == [(0, None)] * K


def test_a_fork_scores_from_the_fork_on_with_the_forecasts_made_before_it() -> None:
    """A scored fork resolves its origin's pending forecasts but counts only what it saw; an unscored one
    counts nothing, and its steps add nothing to the model's totals."""
    rng = np.random.default_rng(5)
    sc = Scoring(K, TARGET)
    x = rng.normal(size=(20, F)).astype(np.float32)
    y = rng.normal(size=(20, K)).astype(np.float32)
    (rec,), _ = sc.score([bytes(sc.width)], x[None, :12], y[None, :12])
    scored_fork, quiet_fork = sc.fork(rec, scored=True), sc.fork(rec, scored=False)
    (after,), _ = sc.score([scored_fork], x[None, 12:], y[None, 12:])
    count, model, _ = brute(x, y, since=12)
    got = sc.summary(after).horizons
    assert [h.count for h in got] == list(count)
    assert [h.mae for h in got] == pytest.approx(model / count)
    (quiet,), scored = sc.score([quiet_fork], x[None, 12:], y[None, 12:])
    assert scored.count.sum() == 0
    assert scored.model.sum() == 0
    assert not sc.summary(quiet).scored


def card(features: list[str], target: str) -> ModelCard:
    return ModelCard.model_validate({
        "schema": CARD_SCHEMA, "name": "m", "version": 1, "features": features, "target": target,
        "targets": [f"{target}+{k}" for k in range(1, 3)], "horizon": 2, "hidden_size": 4, "num_layers": 1,
    })  # fmt: skip


def test_only_a_model_whose_target_is_an_input_scores_and_the_others_say_why() -> None:
    sig = Signature(features=2, outputs=2, layers=1, hidden=4)
    sc, why = Scoring.for_model(card(["a", "b"], "b"), sig)
    assert sc is not None
    assert (sc.horizon, sc.target_index, why) == (2, 1, "")
    assert sc.ring_bytes == 2 * 2 * 4
    none, why = Scoring.for_model(card(["a", "b"], "c"), sig)
    assert none is None
    assert "target 'c' is not one of its input features" in why
