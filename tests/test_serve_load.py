"""`llava-gguf serve` under load, on loopback and bounded: 32 clients x 10 requests on the shipped model
(--parallel 4), a mix of images and questions, greedy. Every answer must equal LLaVA.generate_from_image's in
this process (a fresh model) for the same image and question: 0 errors, 0 wrong answers. The server's
resident memory before and after, its peak, and the p50/p95 request latency go to
test-results/serve-load.json and are printed."""
from __future__ import annotations

import json
import os
import statistics
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import openai
import pytest

from llava_gguf import LLaVA
from llava_gguf.demo import shapes
from llava_gguf.gguf.pairing import locate_pair
from support import image_uri, serve_process, user_turn

CLIENTS = 32
REQUESTS = 10  # per client
PAIRS = 40  # distinct (image, question) pairs, each asked 8 times over the run by different clients
MAX_TOKENS = 12
BUDGET = 100.0  # seconds for the whole load (the run fails past it rather than hang)
MAX_RSS_GROWTH_KIB = 128 * 1024  # a leak of anything per request (an image, a response) shows past this
RESULTS = Path(__file__).resolve().parents[1] / "test-results" / "serve-load.json"


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of `pid`, in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time `pid` has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


@pytest.fixture(scope="module")
def pairs():
    return [(sc.image(), q.text) for sc, q in shapes.questions("test", 100, PAIRS)]


@pytest.fixture(scope="module")
def expected(shipped_gguf, pairs):
    """Each pair's greedy answer from a fresh LLaVA in this process (nothing shared with the server)."""
    with LLaVA(*locate_pair(shipped_gguf), n_threads=2) as m:
        return [m.generate_from_image(image, question, temperature=0, max_tokens=MAX_TOKENS)
                for image, question in pairs]


def test_32_clients_x_10_requests_no_errors_no_wrong_answers(shipped_gguf, pairs, expected):
    assert len(set(expected)) > 3  # different images and questions: different answers to tell apart
    uris = [image_uri(image) for image, _ in pairs]
    with serve_process(shipped_gguf, "--parallel", "4", "--threads", "2", "--model-alias", "shapes",
                       "--queue", str(CLIENTS)) as url:
        pid = url.proc.pid
        warm = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        for k in range(4):  # every sequence used once: the memory measured after is the load's, not the start's
            warm.chat.completions.create(model="shapes", messages=[user_turn(pairs[k][1], uris[k])], temperature=0,
                                         max_tokens=MAX_TOKENS)
        before, cpu_before, load_before = memory_kib(pid), cpu_seconds(pid), os.getloadavg()[0]
        latencies: list[float] = []
        errors: list[str] = []
        wrong: list[tuple[int, str, str]] = []
        lock = threading.Lock()
        deadline = time.monotonic() + BUDGET
        start = threading.Barrier(CLIENTS)

        def run_client(c: int) -> None:
            api = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
            start.wait(30)
            for i in range(REQUESTS):
                if time.monotonic() > deadline:
                    with lock:
                        errors.append(f"client {c}: out of time before request {i}")
                    return
                k = (c * 7 + i * 13) % PAIRS  # clients interleave pairs: the same image in several sequences
                t0 = time.perf_counter()
                try:
                    r = api.chat.completions.create(model="shapes", messages=[user_turn(pairs[k][1], uris[k])],
                                                    temperature=0, max_tokens=MAX_TOKENS)
                    answer = r.choices[0].message.content
                except Exception as e:  # noqa: BLE001 - every failure is counted and reported
                    with lock:
                        errors.append(f"client {c} request {i}: {type(e).__name__}: {str(e)[:200]}")
                    continue
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    if answer != expected[k]:
                        wrong.append((k, answer, expected[k]))

        t_start = time.perf_counter()
        threads = [threading.Thread(target=run_client, args=(c,), daemon=True) for c in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(1.0, deadline - time.monotonic() + 30))
        wall = time.perf_counter() - t_start
        alive = sum(t.is_alive() for t in threads)
        after, cpu_used = memory_kib(pid), cpu_seconds(pid) - cpu_before
        with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
            counts = dict(line.rsplit(" ", 1) for line in r.read().decode().splitlines() if not line.startswith("#"))

    report = {"clients": CLIENTS, "requests_per_client": REQUESTS, "requests": len(latencies) + len(errors),
              "completed": len(latencies), "errors": len(errors), "wrong_answers": len(wrong),
              "distinct_pairs": PAIRS, "max_tokens": MAX_TOKENS, "parallel": 4, "wall_seconds": round(wall, 2),
              "requests_per_second": round(len(latencies) / wall, 2) if wall else None,
              "latency_p50_seconds": round(statistics.median(latencies), 3) if latencies else None,
              "latency_p95_seconds": round(percentile(latencies, 0.95), 3) if latencies else None,
              "latency_max_seconds": round(max(latencies), 3) if latencies else None,
              "rss_before_kib": before["VmRSS"], "rss_after_kib": after["VmRSS"],
              "rss_growth_kib": after["VmRSS"] - before["VmRSS"], "rss_peak_kib": after["VmHWM"],
              "server_cpu_seconds": round(cpu_used, 2), "server_cpu_ms_per_request":
                  round(1000 * cpu_used / len(latencies), 1) if latencies else None,
              # the machine is shared: what else was running shows in the load average (2 cores here)
              "load_average_before": round(load_before, 2), "cpus": os.cpu_count()}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print("\nserve load:", json.dumps(report))
    assert alive == 0, f"{alive} clients still running after the budget"
    assert errors == [], errors[:5]
    assert wrong == [], wrong[:5]
    assert len(latencies) == CLIENTS * REQUESTS
    assert report["rss_growth_kib"] < MAX_RSS_GROWTH_KIB, report
    # the server's own count agrees: every request (and the 4 warm-up ones) accepted, none failed or cancelled
    assert float(counts['llava_gguf_requests_total{outcome="accepted"}']) == CLIENTS * REQUESTS + 4
    for outcome in ("failed", "cancelled", "rejected_queue_full"):
        assert float(counts[f'llava_gguf_requests_total{{outcome="{outcome}"}}']) == 0, outcome
    assert float(counts["llava_gguf_queue_depth"]) == 0
