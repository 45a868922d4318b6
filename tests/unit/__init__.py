"""Unit tests of the core with a fake runtime."""
