"""The suite's pytest plugin is fixtures/runtime/plugin.py, loaded with `-p` from pytest.ini's
addopts rather than from here: a plugin named there is registered before pytest looks for
conftests, and every xdist worker loads it the same way. Nothing else belongs in this file."""
