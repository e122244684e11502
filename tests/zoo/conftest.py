"""Zoo tests share the suite-wide setup in ``tests/conftest.py`` (slow sweeps on demand, one torch thread)."""
