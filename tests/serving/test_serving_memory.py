"""Memory that stays bounded whatever is sent, through a real server: eight concurrent requests of four
~700-byte WebPs declaring 4000x4000, and eight of four RGBA 4096x4096 PNGs, each peak under 512 MiB, and the
resident set back near idle afterwards (bench.memory's scenarios; slow: ~30 s of decoding).
Run: .venv/bin/python -m pytest tests/serving/test_serving_memory.py -q -m slow -s"""

from __future__ import annotations

import argparse
import time

import pytest

from bench.memory import Memory, run_scenario

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("scenario", ["webp", "png"])
def test_huge_canvases_hold_bounded_memory_and_give_it_back(model_repository, helpers, scenario):
    with helpers.ServerProcess(model_repository, "--backend", "onnx", log_level="info").start() as server:
        memory = Memory(server.proc.pid)
        idle = memory.rss_mib()
        row = run_scenario(scenario, server, memory, argparse.Namespace(settle_seconds=0))
        print(f"\n{scenario}: {row}")
        assert row["outcomes"] == {"OK": 8}
        assert row["peak_mib"] <= 512
        for _ in range(100):  # the trim runs once a second after growth; give it a generous while
            if memory.rss_mib() <= idle + 50:
                break
            time.sleep(0.1)
        assert memory.rss_mib() <= idle + 50, (idle, memory.rss_mib())
