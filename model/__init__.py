"""Offline training: data, the LSTM, baselines, the NumPy reference and the ONNX exporter."""
