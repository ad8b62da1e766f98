"""``logitcache bench stream`` as a user runs it: a real CLI process, a real store-only server."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_bench_stream_prints_a_rate_for_every_pass():
    r = subprocess.run(
        [sys.executable, "-P", "-m", "logitcache.cli", "bench", "stream", "--positions", "8192",
         "--seq-len", "256", "--top-k", "8", "--batch-records", "4", "--passes", "2"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    # One heading per store streamed ("local (DIR): ..."; an s3:// store adds its own).
    assert any(
        line.endswith("8,192 positions per pass, k=8, batches of 4 records") for line in lines
    )
    passes = [line.split() for line in lines if re.match(r"\s+[12] ", line)]
    assert [p[0] for p in passes] == ["1", "2"]
    assert all(int(p[1].replace(",", "")) > 0 for p in passes)
    assert re.search(r"^best: [\d,]+ positions/s", r.stdout, re.M)
