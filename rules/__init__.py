"""cityops rules package."""
