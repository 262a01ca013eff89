"""cityops simulators package."""
