"""Drivers: one small module per transport, each turning a source into readings."""
