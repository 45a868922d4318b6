"""Drive a running lstm-serve with Triton's own client, as a Triton user would; print what came back as JSON.

Runs in its own virtualenv (tritonclient pins protobuf<7; `make triton-venv`), so it imports nothing from
lstm-serve: the test that starts it (tests/integration/test_kserve.py) checks every answer against ONNX Runtime.

    python drive.py HTTP_PORT GRPC_PORT MODEL SEQUENCES.npy > answers.json
"""

from __future__ import annotations

import json
import queue
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as tg
import tritonclient.http as th
from tritonclient.utils import InferenceServerException


def failure(e: InferenceServerException) -> dict[str, str]:
    return {"status": str(e.status()), "message": e.message()}


def tensor(mod: Any, x: np.ndarray, name: str = "x") -> Any:
    t = mod.InferInput(name, list(x.shape), "FP32")
    t.set_data_from_numpy(x.astype(np.float32))
    return t


def chunks(x: np.ndarray) -> list[np.ndarray]:
    """A sequence [T, F] in uneven pieces [1, t, F]: 1 step, then 5, then the rest."""
    return [x[None, a:b] for a, b in ((0, 1), (1, 6), (6, len(x)))]


def unary_side(mod: Any, url: str, model: str, seqs: np.ndarray, base: int) -> dict[str, Any]:
    c = mod.InferenceServerClient(url)
    out: dict[str, Any] = {
        "live": c.is_server_live(),
        "ready": c.is_server_ready(),
        "model_ready": c.is_model_ready(model),
    }
    if mod is th:
        out["server"] = c.get_server_metadata()
        out["metadata"] = c.get_model_metadata(model)
        out["config"] = c.get_model_config(model)
    else:
        out["server"] = c.get_server_metadata(as_json=True)
        out["metadata"] = c.get_model_metadata(model, as_json=True)
        out["config"] = c.get_model_config(model, as_json=True)["config"]
    # stateless: the whole first sequence in one request
    out["stateless"] = c.infer(model, [tensor(mod, seqs[0][None])]).as_numpy("y")[0].tolist()
    # a sequence over unary calls, uneven pieces, START on the first and END on the last
    got = []
    parts = chunks(seqs[1])
    for k, part in enumerate(parts):
        r = c.infer(model, [tensor(mod, part)], sequence_id=base + 1, sequence_start=k == 0,
                    sequence_end=k == len(parts) - 1)  # fmt: skip
        got.extend(r.as_numpy("y")[0].tolist())
    out["sequence"] = got
    # a string sequence id, and [T, F] without the batch dimension
    got = []
    for k, part in enumerate(parts):
        r = c.infer(model, [tensor(mod, part[0])], sequence_id=f"s-{base}", sequence_start=k == 0)
        got.extend(r.as_numpy("y").tolist())
    out["string_sequence"] = got
    errors: dict[str, Any] = {}
    for name, call in {
        "unknown_model": lambda: c.infer("no-such-model", [tensor(mod, seqs[0][None])]),
        "wrong_shape": lambda: c.infer(model, [tensor(mod, seqs[0][None, :, :-1])]),
        "missing_start": lambda: c.infer(model, [tensor(mod, seqs[0][None])], sequence_id=base + 99),
        "after_end": lambda: c.infer(model, [tensor(mod, seqs[1][None])], sequence_id=base + 1),
        "not_finite": lambda: c.infer(model, [tensor(mod, np.full((1, 2, seqs.shape[2]), np.nan))]),
    }.items():
        try:
            call()
            errors[name] = None
        except InferenceServerException as e:
            errors[name] = failure(e)
    out["errors"] = errors
    # the repository extension: index, load (nothing new to load), unload of the last model (refused)
    index = c.get_model_repository_index() if mod is th else c.get_model_repository_index(as_json=True)["models"]
    out["index"] = [{k: m.get(k, "") for k in ("name", "version", "state")} for m in index]
    c.load_model(model)
    try:
        c.unload_model(model)
        out["unload"] = None
    except InferenceServerException as e:
        out["unload"] = failure(e)
    c.close()
    return out


def stream_side(url: str, model: str, seqs: np.ndarray, base: int) -> dict[str, Any]:
    """Several sequences interleaved on one gRPC stream, sent without waiting, as async_stream_infer does."""
    c = tg.InferenceServerClient(url)
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    c.start_stream(callback=lambda result, error: answers.put((result, error)))
    plan = []
    pieces = {i: chunks(seqs[i]) for i in range(2, len(seqs))}
    for k in range(3):
        for i, parts in pieces.items():
            plan.append((i, k))
            c.async_stream_infer(model, [tensor(tg, parts[k])], request_id=f"{i}:{k}", sequence_id=base + i,
                                 sequence_start=k == 0, sequence_end=k == 2)  # fmt: skip
    c.async_stream_infer(model, [tensor(tg, seqs[2][None])], request_id="bad", sequence_id=base + 999)
    c.stop_stream()
    got: dict[str, list[Any]] = {str(i): [None, None, None] for i in pieces}
    order, errors = [], []
    while not answers.empty():
        result, error = answers.get()
        if error is not None:
            errors.append(error.message())
            order.append("error")
            continue
        rid = result.get_response().id
        order.append(rid)
        i, k = rid.split(":")
        got[i][int(k)] = result.as_numpy("y")[0].tolist()
    c.close()
    return {"sequences": {i: [row for part in parts for row in part] for i, parts in got.items()},
            "order": order, "plan": [f"{i}:{k}" for i, k in plan] + ["error"], "errors": errors}  # fmt: skip


def main() -> None:
    http_port, grpc_port, model, path = sys.argv[1:5]
    seqs = np.load(path)
    out = {
        "http": unary_side(th, f"127.0.0.1:{http_port}", model, seqs, 1000),
        "grpc": unary_side(tg, f"127.0.0.1:{grpc_port}", model, seqs, 2000),
        "stream": stream_side(f"127.0.0.1:{grpc_port}", model, seqs, 3000),
    }
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
