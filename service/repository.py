"""The model repository: every `<name>/<version>/model.onnx` under a directory, loaded with its card."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

from pydantic import ValidationError

from service.card import CARD_KEY, ModelCard
from service.core.scoring import Scoring
from service.errors import ModelNotFoundError
from service.runtime import ContractError, OnnxRuntime, Runtime, Signature

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """A model in the repository cannot be served; the message says which one and why."""


@dataclass(frozen=True)
class ModelVersion:
    """One loaded model version: its identity, card, signature and runtime."""

    name: str
    version: str
    card: ModelCard
    runtime: Runtime
    live_scoring: bool = True  # score forecasts as the truth arrives, when the model can (service/core/scoring.py)

    @property
    def key(self) -> str:
        return f"{self.name}/{self.version}"

    @cached_property
    def _scoring(self) -> tuple[Scoring | None, str]:
        if not self.live_scoring:
            return None, "live scoring is off on this server (--live-scoring false)"
        return Scoring.for_model(self.card, self.runtime.signature)

    @property
    def scoring(self) -> Scoring | None:
        """How this version's sessions score their forecasts; None when they do not (`scoring_off` says why)."""
        return self._scoring[0]

    @property
    def scoring_off(self) -> str:
        return self._scoring[1]

    @cached_property
    def signature(self) -> Signature:
        """The graph's signature, with the bytes of the live-scoring record its sessions keep."""
        sc = self.scoring
        return replace(self.runtime.signature, extra=sc.width if sc else 0)

    def describe(self) -> str:
        return f"model {self.name!r} version {self.version}"


def read_card(rt: OnnxRuntime, directory: Path, name: str, version: str) -> ModelCard:
    """The model's card: in the ONNX metadata (as our exporter and `lstm-serve card` write it), else a model.json
    beside the file, else one derived from the graph (features x0.., outputs y0..)."""
    where = "model.onnx's metadata"
    text = rt.metadata.get(CARD_KEY)
    if text is None and (directory / "model.json").is_file():
        where, text = "model.json", (directory / "model.json").read_text()
    sig = rt.signature
    if text is None:
        return ModelCard.from_graph(name, version, sig.features, sig.outputs, sig.layers, sig.hidden)
    try:
        return ModelCard.from_json(text)
    except ValidationError as e:
        err = e.errors()[0]
        at = ".".join(str(p) for p in err["loc"])
        at = f"{at}: " if at else ""
        raise ModelLoadError(f"{name}/{version}: invalid model card in {where}: {at}{err['msg']}") from None
    except ValueError as e:
        raise ModelLoadError(f"{name}/{version}: the model card in {where} is not JSON: {e}") from None


def load_version(directory: Path, threads: int = 1, live_scoring: bool = True) -> ModelVersion:
    """Load, check and warm up `<name>/<version>/model.onnx`; anything wrong is a `ModelLoadError` that says what."""
    name, version = directory.parent.name, directory.name
    if not (version.isascii() and version.isdigit()) or int(version) < 1:
        raise ModelLoadError(f"{name}/{version}: version directories must be positive integers")
    try:
        rt = OnnxRuntime(directory / "model.onnx", threads)
        rt.warmup()
    except ContractError as e:
        raise ModelLoadError(f"{name}/{version}: model.onnx does not have the explicit-state contract: {e}") from None
    except Exception as e:
        raise ModelLoadError(f"{name}/{version}: cannot load model.onnx: {e}") from None
    try:
        card = read_card(rt, directory, name, version)
    except ModelLoadError:
        raise
    except Exception as e:  # NOTE: an unreadable model.json (bytes that are not UTF-8, nesting too deep)
        raise ModelLoadError(f"{name}/{version}: cannot read model.json: {type(e).__name__}") from None
    sig = rt.signature
    if (len(card.features), card.horizon, card.num_layers, card.hidden_size) != (
        sig.features,
        sig.outputs,
        sig.layers,
        sig.hidden,
    ):
        raise ModelLoadError(
            f"{name}/{version}: the card says {len(card.features)} features, {card.horizon} outputs, "
            f"{card.num_layers} layers of {card.hidden_size}, but the graph has F={sig.features} O={sig.outputs} "
            f"L={sig.layers} H={sig.hidden}"
        )
    log.info("loaded %s/%s: F=%d O=%d L=%d H=%d C=%d%s", name, version, *sig.dims, " (no card)" * card.derived)
    return ModelVersion(name, version, card, rt, live_scoring)


class ModelRepository:
    """Name -> versions; the newest (highest) version is the default."""

    def __init__(self, models: list[ModelVersion]) -> None:
        self._by_name: dict[str, dict[str, ModelVersion]] = {}
        for m in sorted(models, key=lambda m: (m.name, int(m.version))):
            self._by_name.setdefault(m.name, {})[m.version] = m

    @classmethod
    def load(cls, root: Path, threads: int = 1, live_scoring: bool = True) -> ModelRepository:
        """Load and warm up every model under `root`; a broken model is a `ModelLoadError`."""
        found = [load_version(path.parent, threads, live_scoring) for path in sorted(root.glob("*/*/model.onnx"))]
        if not found:
            raise ModelLoadError(f"no models found: expected <name>/<version>/model.onnx under {root.name!r}")
        return cls(found)

    def add(self, m: ModelVersion) -> None:
        """One more version (the newest of its model if its number is the highest)."""
        versions = {**self._by_name.get(m.name, {}), m.version: m}
        self._by_name[m.name] = dict(sorted(versions.items(), key=lambda kv: int(kv[0])))

    def remove(self, name: str, version: str) -> None:
        versions = self._by_name[name]
        del versions[version]
        if not versions:
            del self._by_name[name]

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def versions(self, name: str) -> list[ModelVersion]:
        if name not in self._by_name:
            raise ModelNotFoundError(f"no model named {name!r}; available: {', '.join(self.names())}")
        return list(self._by_name[name].values())

    def get(self, name: str, version: str | None = None) -> ModelVersion:
        """The given version of a model, or its newest."""
        versions = self._by_name.get(name)
        if versions is None:
            raise ModelNotFoundError(f"no model named {name!r}; available: {', '.join(self.names())}")
        if not version:
            return list(versions.values())[-1]
        if version not in versions:
            raise ModelNotFoundError(f"model {name!r} has no version {version!r}; available: {', '.join(versions)}")
        return versions[version]

    def all(self) -> list[ModelVersion]:
        return [m for name in self.names() for m in self._by_name[name].values()]
