"""bench.serve_ab: its --variant syntax (good and bad, no server), and one short A/B of two variants of the current
code on the tiny linear repository (table and JSON with both variants, positive throughput and CPU per request)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.serve_ab import Variant, check_variants, cpu_per_request_us, parse_variant

ROOT = Path(__file__).resolve().parents[2]


def test_variant_parsing_splits_label_cwd_env_and_flags():
    assert parse_variant("before=/tmp/before|") == Variant("before", Path("/tmp/before"))
    v = parse_variant("after=.|OMP_NUM_THREADS=1 MY_VAR='a b' --intra-op-threads 2 --auth-token x=y")
    assert v.label == "after" and v.cwd == Path(".")
    assert v.env == {"OMP_NUM_THREADS": "1", "MY_VAR": "a b"}
    assert v.flags == ["--intra-op-threads", "2", "--auth-token", "x=y"]  # `=` after the first flag is a value
    other = parse_variant("repo2=.|--model-repository /tmp/other")  # the server's argparse takes the last one
    assert other.flags == ["--model-repository", "/tmp/other"] and other.env == {}


@pytest.mark.parametrize("text, message", [
    ("no-separators", "expected LABEL=CWD|"),
    ("label=.", "expected LABEL=CWD|"),
    ("=.|", "empty label or CWD"),
    ("a=|--intra-op-threads 1", "empty label or CWD"),
    ("a=.|--log-format text", "--log-format is set by the harness"),
    ("a=.|--metrics-port=-1", "--metrics-port is set by the harness"),
    ("a=.|'unclosed", "No closing quotation"),
])
def test_bad_variants_are_refused(text, message):
    with pytest.raises(ValueError, match=message.replace("|", r"\|")):
        parse_variant(text)


def test_variants_need_distinct_labels_and_a_serving_package(tmp_path):
    check_variants([Variant("a", ROOT), Variant("b", ROOT)])
    with pytest.raises(ValueError, match="duplicate"):
        check_variants([Variant("a", ROOT), Variant("a", ROOT)])
    with pytest.raises(ValueError, match="no serving/ package"):
        check_variants([Variant("a", tmp_path)])


def test_cpu_per_request():
    assert cpu_per_request_us(1.0, 1.5, 100, 600) == pytest.approx(1000.0)
    assert cpu_per_request_us(1.0, 1.001, 5, 5) == pytest.approx(1000.0)  # no request: CPU over 1, not inf


@pytest.mark.parametrize("variant", ["a=.", "a=/no/such/dir|"])
def test_usage_errors_exit_2(tmp_path, variant):
    subprocess.run([sys.executable, str(ROOT / "bench" / "loadgen.py"), "tiny-repo", str(tmp_path / "repo")],
                   check=True, capture_output=True)
    result = subprocess.run([sys.executable, "-m", "bench.serve_ab", "--model-repository", str(tmp_path / "repo"),
                             "--variant", variant], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "error:" in result.stderr


@pytest.mark.slow  # two servers starting at once on 2 shared cores: ~25 s
def test_serve_ab_runs_two_variants(tmp_path):
    """Two servers of the current code up at once, one round at concurrency 1 with a short window."""
    repo = tmp_path / "repo"
    subprocess.run([sys.executable, str(ROOT / "bench" / "loadgen.py"), "tiny-repo", str(repo)],
                   check=True, capture_output=True)
    out = tmp_path / "ab.json"
    result = subprocess.run([sys.executable, "-m", "bench.serve_ab", "--model-repository", str(repo),
                             "--variant", "threads1=.|--intra-op-threads 1",
                             "--variant", "delay0=.|--max-queue-delay-us 0",
                             "--rounds", "1", "--concurrency", "1", "--window-seconds", "0.5",
                             "--warmup-seconds", "0.2", "--json", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout.split("variant ", 1)[1].splitlines()
    assert "server CPU us/req" in table[0]
    assert [line.split()[:2] for line in table[1:3]] == [["threads1", "1"], ["delay0", "1"]]
    assert table[1].split()[3] == "1.00"  # the first variant is the ratios' base
    data = json.loads(out.read_text())
    assert [r["label"] for r in data["summary"]] == ["threads1", "delay0"]
    assert sorted(r["label"] for r in data["runs"]) == ["delay0", "threads1"]
    for row in data["summary"]:
        assert row["concurrency"] == 1 and row["images_per_s"] > 0 and row["server_cpu_us_per_request"] > 0
    for run in data["runs"]:
        assert run["errors"] == {} and run["server_requests"] > 0
        # one client: every batch holds one request (the server's own exec counter, read from its metrics)
        assert run["requests_per_batch"] == pytest.approx(1.0)
    assert "req/batch" in table[0] and table[1].split()[-2] == "1.0"  # one round: one figure after it
