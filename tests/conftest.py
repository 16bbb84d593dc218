"""Shared test setup: the project root on sys.path, and the `slow` marker.

Slow end-to-end checks are skipped unless UNIMED_SLOW=1; each has a short version that CI runs.
"""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long end-to-end check; run with UNIMED_SLOW=1")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("UNIMED_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow; set UNIMED_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
