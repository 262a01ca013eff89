"""Versioned SQL migrations, applied by cityops.db.migrate."""
