"""Tests of lstm-serve."""
