"""pytest fixtures (plugin loaded by tests/conftest.py)."""
