"""lstm-serve: serve stateful LSTM forecasters over gRPC, REST and WebSocket."""
