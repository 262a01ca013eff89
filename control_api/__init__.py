"""cityops control_api package."""
