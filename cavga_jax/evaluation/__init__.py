"""Evaluation: inference, fitted maps, scoring and outputs."""
