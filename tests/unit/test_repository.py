"""The model repository and the settings: versions, load failures, env and flags."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from service.repository import ModelLoadError, ModelRepository
from service.settings import Settings
from tests.conftest import ROOT, SHIPPED_MODEL


def repo_with_versions(tmp_path: Path, *versions: str) -> Path:
    for v in versions:
        shutil.copytree(SHIPPED_MODEL, tmp_path / "weather" / v)
    return tmp_path


def test_every_version_loads_and_the_newest_is_the_default(tmp_path: Path) -> None:
    """Versions 1, 2 and 10 load; the default is 10 (numeric order), and each is reachable by name."""
    repo = ModelRepository.load(repo_with_versions(tmp_path, "1", "2", "10"))
    assert repo.names() == ["weather"]
    assert [m.version for m in repo.versions("weather")] == ["1", "2", "10"]
    assert repo.get("weather").version == "10"
    assert repo.get("weather", "2").key == "weather/2"
    assert repo.get("weather").signature.features == 4


def test_a_model_without_a_card_in_its_metadata_takes_the_card_beside_it_or_one_from_the_graph(tmp_path: Path) -> None:
    """An ONNX file with no card in its metadata reads model.json beside it; with neither, names and sizes come
    from the graph (features x0.., outputs y0..) and the card says it was derived."""
    repo_with_versions(tmp_path, "1")
    path = tmp_path / "weather" / "1" / "model.onnx"
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    onnx.save(proto, str(path))
    card = ModelRepository.load(tmp_path).get("weather").card
    beside = json.loads((path.parent / "model.json").read_text())
    assert (card.features, card.hidden_size, card.derived) == (beside["features"], beside["hidden_size"], False)
    (path.parent / "model.json").unlink()
    card = ModelRepository.load(tmp_path).get("weather").card
    assert card.derived
    assert card.features == ["x0", "x1", "x2", "x3"]
    assert card.targets == [f"y{i}" for i in range(7)]
    assert (card.num_layers, card.hidden_size, card.horizon) == (beside["num_layers"], beside["hidden_size"], 7)
    (path.parent / "model.json").write_text('{"schema": "lstm-serve/model-card/v1", "name": "w"}')
    with pytest.raises(ModelLoadError, match=r"weather/1: invalid model card in model\.json: version"):
        ModelRepository.load(tmp_path)


def test_a_truncated_model_file_is_refused(tmp_path: Path) -> None:
    """A truncated file is a load error that says which model could not be loaded."""
    repo_with_versions(tmp_path, "3")
    path = tmp_path / "weather" / "3" / "model.onnx"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match=r"weather/3: cannot load model\.onnx"):
        ModelRepository.load(tmp_path)


def test_an_empty_repository_or_bad_version_directory_is_refused(tmp_path: Path) -> None:
    """No models, or a version directory that is not a positive integer, is a clear error."""
    with pytest.raises(ModelLoadError, match="no models found"):
        ModelRepository.load(tmp_path)
    repo_with_versions(tmp_path, "latest")
    with pytest.raises(ModelLoadError, match="positive integers"):
        ModelRepository.load(tmp_path)


def test_settings_come_from_env_with_the_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    """LSTM_SERVE_* environment variables set the matching settings; unsafe values are refused."""
    monkeypatch.setenv("LSTM_SERVE_HTTP_PORT", "8123")
    monkeypatch.setenv("LSTM_SERVE_MAX_BATCH_SIZE", "7")
    s = Settings(models=ROOT / "models")
    assert (s.http_port, s.max_batch_size, s.host) == (8123, 7, "127.0.0.1")
    with pytest.raises(ValueError, match="less than or equal to 65535"):
        Settings(models=ROOT / "models", grpc_port=70000)


def test_serve_command_reports_bad_settings_and_bad_models(tmp_path: Path) -> None:
    """`lstm-serve serve` exits 2 on a bad flag value and 1 on a broken repository, with the reason."""
    r = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--http-port", "abc"], capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 2
    assert "--http-port" in r.stderr
    assert "Traceback" not in r.stderr
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "1" / "model.onnx").write_bytes(b"not onnx")
    r = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--models", str(tmp_path)], capture_output=True, text=True
    )
    assert r.returncode == 1
    assert "cannot load models: m/1" in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "service.cli", "serve", "--help"], capture_output=True, text=True)
    for flag in ("--models", "--http-port", "--grpc-port", "--max-batch-size", "--session-ttl-s", "--drain-seconds"):
        assert flag in r.stdout


def test_limits_whose_answers_cannot_fit_a_grpc_message_are_refused() -> None:
    """A max_steps_per_call whose full answer exceeds the gRPC message limit stops the server at start."""
    from service.app import Server

    settings = Settings(models=ROOT / "models", max_steps_per_call=200_000, grpc_max_message_bytes=1024 * 1024)
    with pytest.raises(ValueError, match="lower --max-steps-per-call"):
        Server(settings)


def test_serve_command_explains_a_port_in_use() -> None:
    """A REST or gRPC port that is taken stops `lstm-serve serve` with exit 1 and which flag to change."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for flags, flag in ((["--http-port", port, "--grpc-port", "0"], "--http-port"),
                            (["--http-port", "0", "--grpc-port", port], "--grpc-port")):  # fmt: skip
            r = subprocess.run(
                [sys.executable, "-m", "service.cli", "serve", *flags], capture_output=True, text=True, cwd=ROOT
            )
            assert r.returncode == 1
            assert f"pick another {flag}" in r.stderr
            assert "Traceback" not in r.stderr
