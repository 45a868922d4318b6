"""The gRPC transport: a thin adapter over the DataPlane (service `lstm.v1.Predictor`)."""
