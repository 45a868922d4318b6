"""Service settings: environment variables with the LSTM_SERVE_ prefix, or the same names as CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Everything the server can be told; each field is also a `lstm-serve serve --flag`."""

    model_config = SettingsConfigDict(env_prefix="LSTM_SERVE_", extra="forbid")

    models: Path = Field(Path("models"), description="model repository: <name>/<version>/model.onnx")
    host: str = Field("127.0.0.1", description="address to bind (REST and gRPC); 0.0.0.0 exposes the server")
    http_port: int = Field(8000, ge=0, le=65535, description="REST/WebSocket port (0: any free port)")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port (0: any free port)")
    model_poll_s: float = Field(
        10.0,
        ge=0,
        description="look for new <name>/<version>/ directories under --models this often, and load "
        "them without a restart (0: only through the repository API)",
    )
    live_scoring: bool = Field(
        True,
        description="score every session's forecasts as the truth arrives (models whose target is an input): "
        "Prometheus lstm_forecast_* and per session in GetSession; costs horizon*(horizon+1)*4 + 16*horizon + 17 "
        "bytes per session",
    )
    ort_threads: int = Field(1, ge=1, le=64, description="ONNX Runtime intra-op threads per model")
    max_batch_size: int = Field(64, ge=1, le=4096, description="most session steps coalesced into one ONNX call")
    block_rows: int = Field(
        256, ge=1, le=4096,
        description="rows of a packed step batch per ONNX call (its chunks run pipelined with the Python around them)",
    )  # fmt: skip
    max_queue_delay_ms: float = Field(
        1.0, ge=0, le=1000, description="longest a step waits for others to batch with (never when idle)"
    )
    max_queue: int = Field(4096, ge=1, description="queued step calls per model before new ones get 503")
    max_queue_wait_ms: float = Field(
        1000.0, ge=0, description="refuse (503) a step expected to wait longer in the queue (0: only --max-queue)"
    )
    session_ttl_s: float = Field(600.0, gt=0, description="an idle session expires after this many seconds")
    max_sessions: int = Field(100_000, ge=1, description="cap on open sessions across all models")
    session_cap_policy: Literal["reject", "evict_lru"] = Field(
        "reject", description="at the cap: reject new sessions (429) or evict the least recently used one"
    )
    state_store: str = Field(
        "memory",
        description="where sessions live: 'memory' (this process) or redis://host:port/db (shared by replicas)",
    )
    redis_key_prefix: str = Field(
        "lstm:",
        min_length=1,
        max_length=64,
        description="Redis: prefix of every key (several deployments on one Redis)",
    )
    redis_timeout_ms: float = Field(
        500.0, gt=0, le=60_000, description="Redis: longest wait for one operation before answering 503"
    )
    max_steps_per_call: int = Field(4096, ge=1, description="most time steps in one step call or prediction")
    max_body_bytes: int = Field(
        1024 * 1024, ge=1024, description="largest REST body or WebSocket message (parsed on the event loop)"
    )
    grpc_max_message_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="largest gRPC message")
    default_queue_timeout_s: float = Field(
        30.0,
        ge=0,
        description="a step that waited this long in the queue is answered 504 without running (0: never); "
        "clients set their own with the gRPC deadline or the REST header Request-Timeout",
    )
    stream_open_timeout_s: float = Field(
        30.0, gt=0, description="a stream (gRPC or WebSocket) must send its first message within this time"
    )
    grpc_keepalive_s: float = Field(
        30.0, gt=0, description="gRPC: ping an idle connection this often, so that a dead peer's streams end"
    )
    grpc_keepalive_timeout_s: float = Field(
        10.0, gt=0, description="gRPC: close a connection whose ping is not answered within this time"
    )
    snapshot: Path | None = Field(
        None,
        description="memory store: on shutdown write every session to this file, and restore them from it at start "
        "(then the file is removed)",
    )
    api_keys_file: Path | None = Field(
        None, description="API keys, one per line: REST, WebSocket and gRPC then need 'Authorization: Bearer <key>'"
    )
    metrics_auth: bool = Field(False, description="with API keys, /metrics needs a key too (health stays open)")
    tls_cert: Path | None = Field(None, description="TLS certificate (PEM) for REST and gRPC; with --tls-key")
    tls_key: Path | None = Field(None, description="TLS private key (PEM)")
    tls_client_ca: Path | None = Field(
        None, description="CA (PEM) that client certificates must chain to: mutual TLS on both transports"
    )
    workers: int = Field(
        1, ge=1, le=64, description="serving processes on this host, sharing both ports (SO_REUSEPORT); more than "
        "one needs a shared --state-store (Redis): a REST step or unary call may land on any of them",
    )  # fmt: skip
    reuse_port: bool = Field(
        False, description="bind both ports with SO_REUSEPORT, so that several servers on this host share them "
        "(--workers sets it for its processes)",
    )  # fmt: skip
    drain_seconds: float = Field(10.0, ge=0, description="on SIGTERM, how long in-flight work may take to finish")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.state_store != "memory" and not self.state_store.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                f"state_store {self.state_store!r} is neither 'memory' nor a Redis URL such as redis://localhost:6379/0"
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        for name in ("tls_cert", "tls_key", "tls_client_ca", "api_keys_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"--{name.replace('_', '-')} {path.name!r} is not a readable file")
        if self.snapshot is not None and self.state_store != "memory":
            raise ValueError("--snapshot is for the memory store; with Redis the sessions already outlive the server")
        if self.workers > 1 and self.state_store == "memory":
            raise ValueError(
                f"--workers {self.workers} needs a shared session store: a REST step or unary call may land on any "
                "worker, and each worker's memory holds only its own sessions; add --state-store "
                "redis://localhost:6379/0 (or run one worker)"
            )
        if not self.models.is_dir():
            raise ValueError(
                f"model repository {str(self.models)!r} is not a directory; pass --models DIR "
                "(a folder of <name>/<version>/model.onnx, such as the shipped 'models')"
            )
        return self
