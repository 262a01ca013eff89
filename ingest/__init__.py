"""Lossless MQTT → TimescaleDB ingest."""
