"""The model card: what a model says about itself, inside its ONNX metadata and beside it as model.json."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

CARD_SCHEMA = "lstm-serve/model-card/v1"
CARD_KEY = "model_card"  # key of the card in the ONNX metadata_props


class ScalerCard(BaseModel):
    """The training-set scaler baked into the graph (for information: clients send raw units)."""

    mean: list[float]
    std: list[float]
    target_mean: float
    target_std: float


class ModelCard(BaseModel):
    """A validated model card; unknown extra keys are kept."""

    model_config = ConfigDict(extra="allow", frozen=True)

    schema_: str = Field(alias="schema")
    name: str = Field(min_length=1)
    version: int = Field(ge=1)
    description: str = ""
    features: list[str] = Field(min_length=1)
    target: str
    targets: list[str] = Field(min_length=1)
    horizon: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    num_layers: int = Field(ge=1)
    # NOTE: what our trainer knows and another exporter may not: optional
    scaler: ScalerCard | None = None
    dataset: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    versions: dict[str, Any] = Field(default_factory=dict)
    created: str = ""
    derived: bool = False  # True: the file has no card; names and sizes were read from the graph

    @model_validator(mode="after")
    def _consistent(self) -> ModelCard:
        if self.schema_ != CARD_SCHEMA:
            raise ValueError(f"unknown card schema {self.schema_!r}; expected {CARD_SCHEMA!r}")
        if len(self.targets) != self.horizon:
            raise ValueError(f"{len(self.targets)} target names for horizon {self.horizon}")
        if self.scaler is not None and not (len(self.scaler.mean) == len(self.scaler.std) == len(self.features)):
            raise ValueError("scaler length does not match the number of features")
        return self

    @classmethod
    def from_graph(cls, name: str, version: str, features: int, outputs: int, layers: int, hidden: int) -> ModelCard:
        """The card of a model file that has none: features x0.., outputs y0.., sizes from the graph."""
        return cls.model_validate(
            {
                "schema": CARD_SCHEMA,
                "name": name,
                "version": int(version),
                "description": "no model card: names and sizes read from the graph (add one with `lstm-serve card`)",
                "features": [f"x{i}" for i in range(features)],
                "target": "",
                "targets": [f"y{i}" for i in range(outputs)],
                "horizon": outputs,
                "hidden_size": hidden,
                "num_layers": layers,
                "derived": True,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        return cls.model_validate(json.loads(text))

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True)
