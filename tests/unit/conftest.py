"""tests/unit runs in-process: no subprocess, no launcher (`make test-fast`, under 2 minutes on 2 cores). A test that
needs to start a command belongs in tests/integration; one that needs several ranks uses tests.helpers.run_distributed
(forked gloo processes, no new interpreter)."""

from __future__ import annotations

import subprocess

import pytest


class _NoSubprocess(subprocess.Popen):
    def __init__(self, *args, **kwargs):
        raise RuntimeError("tests/unit runs in-process: move a test that starts a command to tests/integration")


@pytest.fixture(autouse=True)
def _in_process_only(monkeypatch):
    monkeypatch.setattr(subprocess, "Popen", _NoSubprocess)
