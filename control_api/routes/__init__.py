"""The REST routers of the control API, one module per resource."""
