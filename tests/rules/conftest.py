"""The rules end-to-end tests run the ingest service, rules included."""

from tests.ingest.conftest import ingest_config, ingest_service

__all__ = ["ingest_config", "ingest_service"]
