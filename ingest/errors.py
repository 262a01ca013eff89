"""Errors of the ingest package.

``IngestError`` is the root. ``DecodeError`` means a message cannot become
readings: it is dead-lettered with ``str(error)`` as the reason, never raised
out of the pipeline. ``StorageUnavailable`` means the database cannot take a
batch right now: the pipeline holds the batch and retries.
"""

from __future__ import annotations


class IngestError(Exception):
    """Root of the ingest errors."""


class DecodeError(IngestError):
    """A message that cannot be decoded or fails validation; the text is the reason."""


class StorageUnavailable(IngestError):
    """The database refused or lost a batch; retry after backoff."""
