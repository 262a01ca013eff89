"""Shared core of cityops: settings, the command line, migrations, embedded services."""
