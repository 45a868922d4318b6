"""Training, export and parity tests."""
