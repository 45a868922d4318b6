"""The model repository: every `<name>/<version>/model.onnx` under a directory, loaded with its card."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from service.card import CARD_KEY, ModelCard
from service.errors import ModelNotFoundError
from service.runtime import OnnxRuntime, Runtime, Signature

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

    @property
    def key(self) -> str:
        return f"{self.name}/{self.version}"

    @property
    def signature(self) -> Signature:
        return self.runtime.signature

    def describe(self) -> str:
        return f"model {self.name!r} version {self.version}"


class ModelRepository:
    """Name -> versions; the newest (highest) version is the default."""

    def __init__(self, models: list[ModelVersion]) -> None:
        self._by_name: dict[str, dict[str, ModelVersion]] = {}
        for m in sorted(models, key=lambda m: (m.name, int(m.version))):
            self._by_name.setdefault(m.name, {})[m.version] = m

    @classmethod
    def load(cls, root: Path, threads: int = 1) -> ModelRepository:
        """Load and warm up every model under `root`; a broken model is a `ModelLoadError`."""
        found: list[ModelVersion] = []
        for path in sorted(root.glob("*/*/model.onnx")):
            name, version = path.parent.parent.name, path.parent.name
            if not version.isdigit() or int(version) < 1:
                raise ModelLoadError(f"{name}/{version}: version directories must be positive integers")
            try:
                rt = OnnxRuntime(path, threads)
                card = ModelCard.from_json(rt.metadata[CARD_KEY])
                rt.warmup()
            except KeyError:
                raise ModelLoadError(f"{name}/{version}: model.onnx has no model card in its metadata") from None
            except ValidationError as e:
                raise ModelLoadError(f"{name}/{version}: invalid model card: {e.errors()[0]['msg']}") from None
            except Exception as e:
                raise ModelLoadError(f"{name}/{version}: cannot load model.onnx: {e}") from None
            sig = rt.signature
            if (len(card.features), card.horizon, card.num_layers, card.hidden_size) != (
                sig.features,
                sig.outputs,
                sig.layers,
                sig.hidden,
            ):
                raise ModelLoadError(f"{name}/{version}: the card does not match the graph's dimensions {sig}")
            found.append(ModelVersion(name, version, card, rt))
            log.info("loaded %s/%s: F=%d O=%d L=%d H=%d", name, version, *sig.__dict__.values())
        if not found:
            raise ModelLoadError(f"no models found: expected <name>/<version>/model.onnx under {root.name!r}")
        return cls(found)

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
