"""Hypothesis against the core: whatever arrays, counters, snapshots and stream messages a transport hands it,
the DataPlane answers with a result or one of our errors, and the model only ever sees finite float32 inputs
and states of the right shape, within the step limit (a spy records every ONNX Runtime call)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from service.core.dataplane import DataPlane, Limits, StreamMessage, StreamOpen
from service.core.sessions import MemorySessionStore, Snapshot
from service.errors import ServeError
from service.grpc import converters as cv
from service.grpc._generated.lstm.v1 import lstm_service_pb2 as pb
from service.metrics import Metrics
from tests.fixtures import F32, FakeRuntime, fake_repo

LIMIT = 16


class SpyRuntime(FakeRuntime):
    """Records any call whose inputs or states a validated path should never have let through."""

    def __init__(self) -> None:
        super().__init__()
        self.violations: list[str] = []

    def run(self, x: F32, h0: F32, c0: F32) -> tuple[F32, F32, F32]:
        sig = self.signature
        if x.dtype != np.float32 or x.ndim != 3 or x.shape[2] != sig.features or not 1 <= x.shape[1] <= LIMIT:
            self.violations.append(f"x {x.dtype} {x.shape}")
        if not np.isfinite(x).all():
            self.violations.append("non-finite x")
        for name, s in (("h0", h0), ("c0", c0)):
            if s.shape != (sig.layers, x.shape[0], sig.hidden) or not np.isfinite(s).all():
                self.violations.append(f"{name} {s.shape} finite={np.isfinite(s).all()}")
        return super().run(x, h0, c0)


def arrays() -> st.SearchStrategy[np.ndarray]:
    values = st.floats(allow_nan=True, allow_infinity=True, width=64) | st.sampled_from([1e39, -1e39, 3.5e38, 0.0])
    shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=LIMIT + 2)
    return hnp.arrays(np.float64, shapes, elements=values) | hnp.arrays(np.int64, shapes)


async def with_plane(body: Any, rt: SpyRuntime | None = None) -> list[str]:
    rt = rt or SpyRuntime()
    repo = fake_repo(rt)
    store = MemorySessionStore({m.key: m.signature for m in repo.all()}, ttl=60, max_sessions=50)
    dp = DataPlane(repo, store, Metrics(), Limits(max_steps_per_call=LIMIT))
    await dp.start()
    try:
        await body(dp)
    finally:
        await dp.stop()
    return rt.violations


def run(body: Any, rt: SpyRuntime | None = None) -> list[str]:
    return asyncio.run(with_plane(body, rt))


def test_the_spy_sees_what_reaches_the_model() -> None:
    """The harness is wired: valid calls reach the spy, and it flags a bad state put in front of it."""
    rt = SpyRuntime()

    async def body(dp: DataPlane) -> None:
        sid = (await dp.create_session("fake", None, None)).session_id
        await dp.step(sid, np.zeros((2, 3)))
        await dp.predict("fake", None, np.ones((1, 3)))

    assert run(body, rt) == []
    assert rt.calls == [1, 1]
    bad = np.full((1, 1, 4), np.nan, np.float32)
    rt.run(np.zeros((1, 1, 3), np.float32), bad, bad)
    assert rt.violations == ["h0 (1, 1, 4) finite=False", "c0 (1, 1, 4) finite=False"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=arrays(), seq=st.none() | st.integers(min_value=-(2**70), max_value=2**70))
def test_steps_and_predictions_only_let_valid_inputs_reach_the_model(x: np.ndarray, seq: int | None) -> None:
    async def body(dp: DataPlane) -> None:
        sid = (await dp.create_session("fake", None, None)).session_id
        for call in (dp.step(sid, x, seq), dp.predict("fake", None, x), dp.step_batch([(sid, x, seq)])):
            with contextlib.suppress(ServeError):
                await call

    assert run(body) == []


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(h=arrays(), c=arrays(), steps=st.integers(-(2**70), 2**70), seq=st.integers(-(2**70), 2**70))
def test_imported_snapshots_never_put_a_bad_state_in_front_of_the_model(
    h: np.ndarray, c: np.ndarray, steps: int, seq: int
) -> None:
    async def body(dp: DataPlane) -> None:
        try:
            await dp.import_session("imported", Snapshot("fake", "1", steps, seq, h, c))  # type: ignore[arg-type]
        except ServeError:
            return
        with contextlib.suppress(ServeError):
            await dp.step("imported", np.zeros((1, 3), np.float32))

    assert run(body) == []


messages = st.lists(
    st.builds(
        StreamMessage,
        inputs=st.none() | arrays(),
        seq=st.none() | st.integers(-5, 5),
        open=st.none()
        | st.builds(
            StreamOpen,
            model=st.sampled_from([None, "fake", "nope"]),
            resume_session_id=st.sampled_from([None, "s1", "bad id"]),
            keep=st.booleans(),
        ),
    ),
    max_size=6,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msgs=messages)
def test_any_stream_of_messages_gets_replies_or_our_error(msgs: list[StreamMessage]) -> None:
    async def body(dp: DataPlane) -> None:
        await dp.create_session("fake", None, "s1")

        async def source() -> AsyncIterator[StreamMessage]:
            for m in msgs:
                yield m

        replies = 0
        try:
            async for _ in dp.stream(source()):
                replies += 1
        except ServeError:
            return
        assert replies == len(msgs)  # NOTE: one reply per message once the stream is open

    assert run(body) == []


floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
matrices = st.builds(
    pb.Matrix, rows=st.integers(0, 2**31 - 1) | st.integers(0, 8), cols=st.integers(0, 2**31 - 1) | st.integers(0, 8),
    data=st.lists(floats, max_size=40),
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(m=matrices, seq=st.none() | st.integers(0, 2**64 - 1), keep=st.booleans(),
       start=st.sampled_from(["none", "open", "resume"]), sid=st.text(max_size=20))  # fmt: skip
def test_any_grpc_message_decodes_to_a_shaped_array_or_our_error(
    m: pb.Matrix, seq: int | None, keep: bool, start: str, sid: str
) -> None:
    """Matrices with any declared shape and data, and stream requests built from them, become an array of
    exactly the declared shape or a ServeError (no other exception, no allocation from the declared shape)."""
    try:
        x = cv.to_array(m)
    except ServeError:
        pass
    else:
        assert x.shape == (m.rows, m.cols)
        assert x.dtype == np.float32
    req = pb.StreamRequest(inputs=m, keep=keep)
    if seq is not None:
        req.seq = seq
    if start == "open":
        req.open.CopyFrom(pb.CreateSessionRequest(model="fake", session_id=sid))
    elif start == "resume":
        req.resume_session_id = sid
    try:
        msg = cv.stream_message(req)
    except ServeError:
        return
    assert msg.inputs is not None
    assert msg.inputs.shape == (m.rows, m.cols)


@pytest.mark.parametrize("version", [None, 2, ["1"]])
def test_an_unload_version_that_is_not_a_string_is_refused_even_when_null(version: object) -> None:
    """`"version": null` is not "no version" (which would unload every version): leave the key out for that."""
    from service.core.infer import unload_parameters
    from service.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="version must be a string"):
        unload_parameters({"version": version})
    assert unload_parameters({}) == (None, False)
    assert unload_parameters({"version": "1", "force": True}) == ("1", True)
