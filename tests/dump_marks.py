"""A pytest plugin for tests/test_plugin.py only (`-p tests.dump_marks`): prints each collected
benchmark's marks, so that one collection answers many `-m` expressions (each one a pytest run of
its own would import torch and load the grid again)."""
import json


def pytest_collection_finish(session) -> None:
    for item in session.items:
        print("MARKS " + json.dumps([item.nodeid.split("::", 1)[1], sorted(m.name for m in item.iter_markers())]))
