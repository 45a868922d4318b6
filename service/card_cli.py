"""`lstm-serve card`: show the card a model file is served with, or write one into a file a user already has."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from service.card import CARD_KEY, CARD_SCHEMA, ModelCard


def add_card_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="the ONNX file (explicit-state contract), e.g. models/my-lstm/1/model.onnx")
    p.add_argument("--features", help="comma-separated input feature names, in the order of x's last axis")
    p.add_argument("--target", help="what the outputs forecast (named <target>[t+k] for output k)")
    p.add_argument("--outputs", help="comma-separated output names instead of <target>[t+k]")
    p.add_argument("--description", help="one sentence on what the model does")
    p.add_argument("--from-json", type=Path, help="a whole card as JSON (the flags above override its fields)")
    p.add_argument("--show", action="store_true", help="only print the card the server would use; write nothing")


def build_card(model: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The card for `model` from what it has now (its card, or one derived from the graph) and the flags."""
    from service.repository import read_card
    from service.runtime import OnnxRuntime

    rt = OnnxRuntime(model)
    name, version = model.parent.parent.name, model.parent.name
    card = read_card(rt, model.parent, name, version if version.isdigit() else "1").to_dict()
    if args.from_json is not None:
        card.update(json.loads(args.from_json.read_text()))
    sig = rt.signature
    if args.features:
        card["features"] = [f.strip() for f in args.features.split(",")]
    if args.target:
        card["target"] = args.target
        card["targets"] = [f"{args.target}[t+{k + 1}]" for k in range(sig.outputs)]
    if args.outputs:
        card["targets"] = [o.strip() for o in args.outputs.split(",")]
    if args.description:
        card["description"] = args.description
    changed = any((args.features, args.target, args.outputs, args.description, args.from_json))
    if changed:
        card.update(schema=CARD_SCHEMA, derived=False, created=card.get("created") or datetime.now(UTC).isoformat())
    if len(card["features"]) != sig.features:
        raise ValueError(f"the graph takes {sig.features} features (x's last axis); the card names {card['features']}")
    if len(card["targets"]) != sig.outputs:
        raise ValueError(f"the graph has {sig.outputs} outputs (y's last axis); the card names {card['targets']}")
    card.update(horizon=sig.outputs, num_layers=sig.layers, hidden_size=sig.hidden)
    ModelCard.model_validate(card)  # NOTE: never write a card the server would refuse
    return card


def run_card(args: argparse.Namespace) -> int:
    model: Path = args.model
    try:
        card = build_card(model, args)
    except ValidationError as e:
        err = e.errors()[0]
        print(f"error: invalid card: {'.'.join(str(p) for p in err['loc'])}: {err['msg']}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(card, indent=2, sort_keys=True)
    if args.show:
        print(text)
        return 0
    try:
        import onnx
    except ImportError:
        print("error: writing a card into an ONNX file needs the onnx package: pip install onnx", file=sys.stderr)
        return 1
    proto = onnx.load(str(model))
    kept = [p for p in proto.metadata_props if p.key != CARD_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    entry = proto.metadata_props.add()
    entry.key, entry.value = CARD_KEY, json.dumps(card, sort_keys=True)
    tmp = model.with_name(f".{model.name}.tmp")
    onnx.save(proto, str(tmp))
    tmp.replace(model)  # NOTE: a server polling the repository never sees a half-written file
    (model.parent / "model.json").write_text(text + "\n")
    print(f"wrote the card into {model} (and {model.parent / 'model.json'})")
    return 0
