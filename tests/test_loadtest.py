"""kvsplice-loadtest against real servers on loopback (small models, bounded request counts), plus
fast checks of its parts that need no server.

The A/B pair uses a small checkpoint with DeepSeek-V2-Lite's latent:rope proportion (kv_lora_rank
128 : rope 16, as 512 : 64), so ratio 0.5 stores 64 + 16 = 80 values per token per layer instead
of 144: 1.8x the tokens per byte, as on the real model. (The built-in model, 64 : 16, gains only
80 / 48 = 1.67x at ratio 0.5.)
"""
from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from conftest import REPO_ROOT, metric, start_server, wait_until

from loadtest.capacity import CapacitySearch, SearchConfig, Trial
from loadtest.cli import main
from loadtest.client import CompletionClient, ServerInfo
from loadtest.formatting import num
from loadtest.lengths import LengthSpec
from loadtest.safety import UnsafeTarget, check_target
from loadtest.server_metrics import MetricsSnapshot, parse_metrics
from loadtest.runner import RunResult
from loadtest.stats import SLOs, quantile, summarize
from loadtest.workload import Workload, WorkloadConfig

# Same KV budget on A and B, with max_num_seqs far above it so that the cache decides capacity.
# At ratio 1.0 a token costs 4 layers x 144 values x 4 B = 2304 B: 6 MB = 162 blocks of 16 tokens.
# A capacity request (110 words = 111 prompt tokens, 16 output) peaks at 126 cached tokens = 8
# blocks: 20 fit. At ratio 0.5 (1280 B per token): 292 blocks, 36 fit. Short outputs keep trials
# quick: a request lasts tens of ms, less than a /metrics sampling interval, and the server's own
# high-water mark of running requests still sees all N at once.
KV_BUDGET = "6000000"
SERVER_ARGS = ["--kv-cache-bytes", KV_BUDGET, "--max-num-seqs", "256", "--max-model-len", "256"]
CAPACITY_WORKLOAD = ["--input-len", "110", "--output-len", "16"]


@pytest.fixture(scope="module")
def servers(tmp_path_factory) -> dict:
    """A (ratio 1.0) and B (ratio 0.5) of the V2-Lite-proportioned small model, and a built-in-model
    server for the test that kills its server; started at once to share the start-up time."""
    import torch

    from kvsplice.checkpoints import build_small_checkpoint

    model = build_small_checkpoint(tmp_path_factory.mktemp("lite128") / "model", "lite", seed=0,
                                   dtype=torch.bfloat16, hidden_size=64, intermediate_size=192,
                                   moe_intermediate_size=48, kv_lora_rank=128)
    contexts = {"a": start_server("--model", str(model), *SERVER_ARGS),
                "b": start_server("--model", str(model), *SERVER_ARGS, "--compression-ratio", "0.5"),
                "victim": start_server()}
    # conftest's start_server waits for /health before returning; entering all three from threads
    # starts them together. Each one that started is stopped at the end, whatever else happened.
    with ThreadPoolExecutor(len(contexts)) as pool:
        futures = {name: pool.submit(context.__enter__) for name, context in contexts.items()}
        errors = {name: future.exception() for name, future in futures.items()}
    try:
        failed = [error for error in errors.values() if error is not None]
        if failed:
            raise failed[0]
        yield {name: future.result() for name, future in futures.items()}
    finally:
        for name, context in contexts.items():
            if errors[name] is None:
                context.__exit__(None, None, None)


def run_tool(*args: str) -> int:
    return main([*args, "--no-progress"])


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def markdown_rows(report: str, heading: str) -> dict[str, list[str]]:
    """The first table under `heading`, as run id -> cells."""
    section = report.split(f"## {heading}\n", 1)[1]
    rows = {}
    for line in section.splitlines()[2:]:
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0].isdigit():
            rows[cells[0]] = cells
    return rows


# ---------------------------------------------------------------- against real servers


def test_sweep_outputs_agree_with_each_other_and_the_server(servers, tmp_path):
    url = servers["a"].base_url
    prompt_before = metric(url, "kvsplice:prompt_tokens_total")
    generated_before = metric(url, "kvsplice:generation_tokens_total")
    out = tmp_path / "sweep"

    code = run_tool("sweep", "--url", url, "--concurrency", "1,4", "--max-requests", "8", "--input-len", "20",
                    "--output-len", "8", "--out", str(out))

    assert code == 0
    for name in ("results.json", "summary.csv", "requests.csv", "report.md", "throughput.png", "latency.png",
                 "kv_usage.png"):
        assert (out / name).stat().st_size > 0, name
    doc = json.loads((out / "results.json").read_text())
    assert doc["status"] == "complete"
    summaries = [run["summary"] for run in doc["runs"]]
    assert [s["value"] for s in summaries] == [1, 4]
    assert [s["peak_in_flight"] for s in summaries] == [1, 4]

    # JSON: requests -> summary; ignore_eos makes every output exactly 8 tokens.
    for run, s in zip(doc["runs"], summaries):
        assert (s["completed"], s["failed"]) == (8, 0)
        assert s["completion_tokens"] == sum(r["completion_tokens"] for r in run["requests"]) == 64
        assert s["prompt_tokens"] == sum(r["prompt_tokens"] for r in run["requests"])
        for r in run["requests"]:
            assert r["prompt_tokens"] == r["prompt_words"] + 1  # one token per word, plus BOS
            assert 0 < r["ttft_s"] <= r["e2e_s"]
            # One ITL per chunk after the first; tokens hidden in other chunks are counted apart.
            assert len(r["itl_s"]) == r["chunks"] - 1
            assert r["chunks"] + r["unattributed_tokens"] == r["completion_tokens"]
        assert s["output_token_throughput"] == pytest.approx(64 / s["duration_s"])
        # The tool's own server-side deltas match its client counts.
        assert s["server_metrics"]["generation_tokens"] == s["completion_tokens"]
        assert s["server_metrics"]["prompt_tokens"] == s["prompt_tokens"]
        assert s["server_metrics"]["preemptions"] == 0

    # The server's counters, read by this test, agree with what the tool counted.
    assert metric(url, "kvsplice:generation_tokens_total") - generated_before == sum(s["completion_tokens"] for s in summaries)
    assert metric(url, "kvsplice:prompt_tokens_total") - prompt_before == sum(s["prompt_tokens"] for s in summaries)

    # CSV == JSON.
    rows = read_csv(out / "summary.csv")
    assert len(rows) == 2
    for row, s in zip(rows, summaries):
        assert int(row["completed"]) == s["completed"] and int(row["completion_tokens"]) == s["completion_tokens"]
        for column, value in (("output_token_throughput", s["output_token_throughput"]),
                              ("ttft_ms_p90", s["ttft_ms"]["p90"]), ("e2e_ms_median", s["e2e_ms"]["median"])):
            assert float(row[column]) == pytest.approx(value)
    requests = read_csv(out / "requests.csv")
    for s in summaries:
        mine = [r for r in requests if int(r["run_id"]) == s["run_id"]]
        assert sum(r["ok"] == "True" for r in mine) == s["completed"]
        assert sum(int(r["completion_tokens"]) for r in mine) == s["completion_tokens"]

    # Markdown == JSON (same formatting as the report).
    report = (out / "report.md").read_text()
    table = markdown_rows(report, "Load runs")
    for s in summaries:
        cells = table[str(s["run_id"])]
        assert cells[4:8] == [str(s["completed"]), "0", num(s["request_throughput"], 2),
                              num(s["output_token_throughput"], 1)]
    accounting = markdown_rows(report, "Token accounting")
    for s in summaries:
        assert accounting[str(s["run_id"])][5:7] == [str(s["completion_tokens"])] * 2


def test_rate_mode_with_exact_token_timing(servers, tmp_path):
    out = tmp_path / "rate"
    code = run_tool("rate", "--url", servers["a"].base_url, "--rate", "20", "--max-requests", "6",
                    "--input-len", "8:16", "--output-len", "12", "--seed", "3", "--token-timing", "logprobs",
                    "--out", str(out), "--no-plots")
    assert code == 0
    run = json.loads((out / "results.json").read_text())["runs"][0]
    assert run["summary"]["completed"] == 6 and run["summary"]["mode"] == "rate"
    assert all(8 <= r["prompt_words"] <= 16 for r in run["requests"])
    # With logprobs every chunk names its tokens: one ITL per token after the first.
    assert all(len(r["itl_s"]) == r["completion_tokens"] - 1 == 11 for r in run["requests"])
    assert run["summary"]["unattributed_tokens"] == 0
    starts = sorted(r["start_s"] for r in run["requests"])
    assert starts[-1] - starts[0] > 0  # spread out by the arrival process, not sent at once


def test_compare_measures_the_kvsplice_capacity_gain(servers, tmp_path):
    url_a, url_b = servers["a"].base_url, servers["b"].base_url
    reported = metric(url_b, "kvsplice:kv_cache_capacity_tokens") / metric(url_a, "kvsplice:kv_cache_capacity_tokens")
    out = tmp_path / "compare"
    started = time.monotonic()

    code = run_tool("compare", "--url-a", url_a, "--url-b", url_b, *CAPACITY_WORKLOAD, "--trial-waves", "1",
                    "--confirm-waves", "2", "--limit", "64", "--concurrency", "4", "--max-requests", "8",
                    "--out", str(out))

    elapsed = time.monotonic() - started
    assert code == 0
    doc = json.loads((out / "results.json").read_text())
    capacity = doc["comparison"]["capacity"]
    assert capacity["a_confirmed"] and capacity["b_confirmed"]
    assert not capacity["a_at_limit"] and not capacity["b_at_limit"]
    assert capacity["ratio"] >= 1.7
    assert capacity["ratio"] == pytest.approx(reported, rel=0.10)
    assert capacity["reported_ratio"] == pytest.approx(reported)
    # Decided by KV blocks: the measured capacity is what the cache holds at this request length.
    for label in ("A", "B"):
        result = doc["capacity"][label]
        assert result["capacity"] <= result["kv_estimate"] <= 1.1 * result["capacity"] + 1
    assert [p["label"] for p in doc["comparison"]["points"]] == ["concurrency 4"]
    for name in ("compare.png", "capacity_search.png", "kv_usage.png", "report.md"):
        assert (out / name).stat().st_size > 0, name
    assert "capacity B/A: 1.8" in (out / "report.md").read_text()
    print(f"compare took {elapsed:.1f}s; capacities {capacity['a']} / {capacity['b']}")


# The same KV footprint, 126 cached tokens = 8 blocks a request, so the same capacity on A: 162
# blocks hold 20. Short: 16 decode steps, tens of ms (the capacity workload above); too many requests
# wait for blocks. Long: 96 decode steps; too many requests are all admitted with their short
# prompts and preempt one another as they grow.
SHORT_REQUESTS = CAPACITY_WORKLOAD
LONG_REQUESTS = ["--input-len", "30", "--output-len", "96"]


@contextlib.contextmanager
def cpu_burner() -> Iterator[None]:
    """A process that keeps one core busy for as long as the block runs."""
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        burner.kill()
        burner.wait()


@pytest.mark.parametrize("workload, loaded", [(SHORT_REQUESTS, False), (LONG_REQUESTS, False), (SHORT_REQUESTS, True)],
                         ids=["short", "long", "short-with-cpu-burner"])
def test_capacity_does_not_depend_on_request_length_or_machine_load(servers, tmp_path, workload, loaded):
    url = servers["a"].base_url
    blocks = metric(url, "kvsplice:kv_cache_capacity_tokens") // 16
    expected = int(blocks // 8)
    out = tmp_path / "capacity"
    with cpu_burner() if loaded else contextlib.nullcontext():
        code = run_tool("capacity", "--url", url, *workload, "--start", str(expected - 4), "--trial-waves", "1",
                        "--confirm-waves", "2", "--out", str(out), "--no-plots")
    assert code == 0
    result = json.loads((out / "results.json").read_text())["capacity"]["server"]
    assert (result["capacity"], result["confirmed"], result["at_limit"]) == (expected, True, False)
    trials = {(t["concurrency"], t["phase"]): t for t in result["trials"]}
    assert trials[(expected + 1, "search")]["reasons"]  # one more does not fit, and says why
    assert all(t["passed"] for t in result["trials"] if t["concurrency"] <= expected)


def test_a_server_killed_mid_run_ends_the_run_with_partial_results(servers, tmp_path):
    server = servers["victim"]
    out = tmp_path / "killed"
    tool = subprocess.Popen(
        [sys.executable, "-m", "loadtest", "concurrency", "--url", server.base_url, "-c", "2", "--max-requests", "2000",
         "--input-len", "16", "--output-len", "32", "--out", str(out), "--no-progress", "--no-plots"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: metric(server.base_url, "kvsplice:request_success_total") >= 3, timeout=60,
                   message="a few finished requests")
        server.process.kill()  # no drain: the server vanishes mid-stream
        _, stderr = tool.communicate(timeout=60)
    finally:
        if tool.poll() is None:
            tool.kill()

    assert tool.returncode == 1
    assert "server gone" in stderr and server.base_url in stderr
    doc = json.loads((out / "results.json").read_text())
    assert doc["status"] == "partial" and "server gone" in doc["error"]
    summary = doc["runs"][0]["summary"]
    assert summary["completed"] >= 3 and summary["aborted"].startswith("server gone")
    assert (out / "report.md").exists() and (out / "summary.csv").exists()


def test_a_failing_server_ends_the_run_after_a_streak_of_failures(servers, tmp_path):
    # Prompts longer than the context: every request is refused with a 400, like a server in trouble.
    out = tmp_path / "failing"
    code = run_tool("concurrency", "--url", servers["a"].base_url, "-c", "2", "--input-len", "300", "--output-len", "4",
                    "--max-consecutive-failures", "5", "--out", str(out), "--no-plots")
    assert code == 1
    summary = json.loads((out / "results.json").read_text())["runs"][0]["summary"]
    assert summary["completed"] == 0 and summary["failed"] >= 5
    assert set(summary["failure_reasons"]) == {"HTTP 400"}
    assert summary["aborted"].startswith("5 requests failed in a row; last: HTTP 400: prompt (301 tokens)")


def test_the_duration_limit_stops_a_run(servers, tmp_path):
    out = tmp_path / "timed"
    code = run_tool("concurrency", "--url", servers["a"].base_url, "-c", "2", "--input-len", "8", "--output-len", "200",
                    "--duration-s", "1", "--grace-s", "0", "--out", str(out), "--no-plots")
    assert code == 0
    summary = json.loads((out / "results.json").read_text())["runs"][0]["summary"]
    assert summary["stop_reason"] == "duration"
    assert summary["cancelled"] == 2 and summary["failed"] == 0  # cut off at the limit, not failures
    assert summary["duration_s"] >= 1.0  # ran until the limit (how long after it is the machine's business)


def test_an_unreachable_server_is_reported(tmp_path, capsys):
    from conftest import free_port

    out = tmp_path / "nobody"
    code = run_tool("concurrency", "--url", f"http://127.0.0.1:{free_port()}", "--out", str(out), "--no-plots")
    assert code == 1
    assert "cannot reach" in capsys.readouterr().err
    assert json.loads((out / "results.json").read_text())["status"] == "partial"


# ---------------------------------------------------------------- no server needed


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://127.9.9.9", "http://localhost:1", "http://[::1]:8000/"])
def test_loopback_targets_are_allowed(url):
    assert check_target(url, allow_remote=False) == url.rstrip("/")


def test_remote_targets_need_allow_remote(capsys):
    with pytest.raises(UnsafeTarget, match="--allow-remote"):
        check_target("http://example.com:8000", allow_remote=False)
    assert check_target("http://10.0.0.5:8000", allow_remote=True) == "http://10.0.0.5:8000"
    with pytest.raises(SystemExit) as exit_info:
        main(["concurrency", "--url", "http://10.0.0.5:8000"])
    assert exit_info.value.code == 2
    assert "--allow-remote" in capsys.readouterr().err


def test_workload_is_reproducible_per_request_index():
    config = WorkloadConfig(input_len=LengthSpec.parse("10:20"), output_len=LengthSpec.parse("5"), seed=7)
    a, b = Workload(config), Workload(config)
    assert [a.request(i) for i in (3, 0, 1)] == [b.request(i) for i in (3, 0, 1)]
    assert a.request(0) != a.request(1)
    assert all(10 <= a.request(i).prompt_words <= 20 for i in range(50))
    assert Workload(WorkloadConfig(seed=8)).request(0) != Workload(WorkloadConfig(seed=7)).request(0)


def test_shared_prefix_starts_every_prompt():
    config = WorkloadConfig(input_len=LengthSpec.fixed(5), seed=3, shared_prefix_len=40)
    requests = [Workload(config).request(i) for i in range(4)]
    prefix = requests[0].prompt.split()[:40]
    assert all(r.prompt.split()[:40] == prefix and r.prompt_words == 45 for r in requests)
    assert len({r.prompt for r in requests}) == 4  # the rest differs
    other_seed = Workload(WorkloadConfig(input_len=LengthSpec.fixed(5), seed=4, shared_prefix_len=40)).request(0)
    assert other_seed.prompt.split()[:40] != prefix
    with pytest.raises(ValueError, match="shared-prefix-len"):
        WorkloadConfig(shared_prefix_len=-1).validate()


def test_text_and_jsonl_workloads(tmp_path):
    text = tmp_path / "book.txt"
    text.write_text("one two three four five six seven eight nine ten")
    workload = Workload(WorkloadConfig(kind="text", path=str(text), input_len=LengthSpec.fixed(4)))
    prompt = workload.request(0).prompt.split()
    assert len(prompt) == 4 and " ".join(prompt) in "one two three four five six seven eight nine ten one two three"
    lines = tmp_path / "prompts.jsonl"
    lines.write_text('{"prompt": "hello there", "max_tokens": 7}\n\n{"text": "a b c"}\n')
    workload = Workload(WorkloadConfig(kind="jsonl", path=str(lines), output_len=LengthSpec.fixed(3)))
    specs = sorted((workload.request(i).prompt, workload.request(i).max_tokens) for i in range(2))
    assert specs == [("a b c", 3), ("hello there", 7)]
    with pytest.raises(ValueError, match="--dataset-path"):
        WorkloadConfig(kind="text").validate()


def test_long_workload_fills_the_context():
    workload = Workload(WorkloadConfig(kind="long", output_len=LengthSpec.fixed(32)), max_model_len=1024)
    assert workload.request(0).prompt_words == int(1024 * 0.9) - 32


class _ScriptedSearch(CapacitySearch):
    """The search logic alone: a trial at n passes when `passes(n, phase)` says so."""

    def __init__(self, passes):
        target = SimpleNamespace(label="A", url="http://127.0.0.1:1",
                                 first_metrics=MetricsSnapshot(0.0, running=0.0, preemptions=0.0))
        super().__init__(target, None, SearchConfig(limit=1024), clock0=0.0)
        self._passes = passes

    async def _trial(self, n: int, phase: str) -> bool:
        passed = self._passes(n, phase)
        self.result.trials.append(Trial(n, phase, passed, [], {}))
        return passed


def test_capacity_search_doubles_then_bisects_then_confirms():
    result = asyncio.run(_ScriptedSearch(lambda n, phase: n <= 37).run())
    assert (result.capacity, result.confirmed, result.at_limit) == (37, True, False)
    assert [t.concurrency for t in result.trials] == [1, 2, 4, 8, 16, 32, 64, 48, 40, 36, 38, 37, 37]
    # A steady run that fails at what the search found steps down until one holds.
    result = asyncio.run(_ScriptedSearch(lambda n, phase: n <= (35 if phase == "confirm" else 37)).run())
    assert (result.capacity, result.confirmed) == (35, True)
    # Never failing up to the limit: a lower bound, said so.
    result = asyncio.run(_ScriptedSearch(lambda n, phase: True).run())
    assert (result.capacity, result.at_limit) == (1024, True)


def test_quantile_interpolates_like_numpy():
    assert quantile([1, 2, 3, 4], 0.5) == 2.5
    assert quantile([5], 0.99) == 5
    assert quantile(list(range(101)), 0.9) == 90


def test_metrics_parsing_sums_and_reads_counters():
    text = "\n".join([
        "# TYPE kvsplice:num_requests_waiting gauge",
        'kvsplice:num_requests_waiting{model_name="m"} 2.0',
        "# TYPE kvsplice:num_preemptions_total counter",
        'kvsplice:num_preemptions_total{model_name="m"} 5.0',
        "# TYPE kvsplice:request_success_total counter",
        'kvsplice:request_success_total{finished_reason="length",model_name="m"} 7.0',
        ""])
    snapshot = parse_metrics(text, t_s=1.5)
    assert (snapshot.waiting, snapshot.preemptions, snapshot.finished) == (2.0, 5.0, {"length": 7.0})
    assert snapshot.kv_usage is None


def _run_with(after: MetricsSnapshot | None, samples: list[MetricsSnapshot]) -> RunResult:
    run = RunResult("A", "concurrency 4", "concurrency", 4.0)
    run.before = MetricsSnapshot(0.0, running=0.0, waiting=0.0, running_peak=9.0, prompt_tokens=100.0)
    run.after, run.samples = after, samples
    return run


def test_peak_running_is_the_servers_mark_after_the_run():
    # The samples caught at most 2 running; the server's own mark says 4 ran at once.
    samples = [MetricsSnapshot(t, running=r, running_peak=p) for t, r, p in ((0.1, 1.0, 1.0), (0.2, 2.0, 4.0))]
    after = MetricsSnapshot(0.3, running=0.0, waiting=0.0, running_peak=4.0, prompt_tokens=164.0)
    summary = summarize(_run_with(after, samples), SLOs())
    assert summary["server_metrics"]["peak_running"] == 4.0
    assert summary["notes"] == []


def test_peak_running_is_zero_when_no_request_reached_the_engine():
    # Every request refused before scheduling: the mark (9) is an earlier run's.
    after = MetricsSnapshot(0.3, running=0.0, waiting=0.0, running_peak=9.0, prompt_tokens=100.0)
    assert summarize(_run_with(after, []), SLOs())["server_metrics"]["peak_running"] == 0.0


def test_a_server_without_the_peak_series_is_judged_on_samples_with_a_note():
    text = "\n".join(["# TYPE vllm:num_requests_running gauge", 'vllm:num_requests_running{model_name="m"} 0.0', ""])
    after = parse_metrics(text, 0.3, prefix="vllm:")
    assert after.running == 0.0 and after.running_peak is None
    samples = [MetricsSnapshot(0.1, running=3.0), MetricsSnapshot(0.2, running=2.0)]
    summary = summarize(_run_with(after, samples), SLOs())
    assert summary["server_metrics"]["peak_running"] == 3.0
    assert any("no num_requests_running_peak" in note and "2 samples" in note for note in summary["notes"])


def _sse(*events: dict | str, gap_s: float = 0.0):
    async def body():
        for event in events:
            yield f"data: {event if isinstance(event, str) else json.dumps(event)}\n\n".encode()
            await asyncio.sleep(gap_s)
    return body()


def _complete(handler) -> object:
    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            client = CompletionClient(http, ServerInfo("http://127.0.0.1:1", "m", 64), {}, time.perf_counter())
            spec = Workload(WorkloadConfig()).request(0)
            return await client.complete(spec, client.new_result(spec))
    return asyncio.run(go())


def test_a_chunk_with_several_tokens_splits_its_gap():
    def chunk(text, tokens=None, finish=None):
        logprobs = {"tokens": tokens} if tokens else None
        return {"choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}]}

    events = [chunk("a"), chunk("bc", ["b", "c"]), chunk("d", finish="length"),
              {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4}}, "[DONE]"]
    result = _complete(lambda request: httpx.Response(200, content=_sse(*events, gap_s=0.03)))
    assert result.ok and (result.prompt_tokens, result.completion_tokens) == (9, 4)
    assert len(result.itl_s) == 3 and result.itl_s[0] == result.itl_s[1]  # the 2-token chunk: two equal halves
    # Each chunk came at least one scripted gap after the previous one (a busy machine only adds).
    assert 2 * result.itl_s[0] >= 0.9 * 0.03 and result.itl_s[2] >= 0.9 * 0.03
    assert result.unattributed_tokens == 0 and result.finish_reason == "length"


def test_errors_are_classified():
    refused = _complete(lambda request: httpx.Response(
        429, json={"error": {"message": "server overloaded"}}, headers={"Retry-After": "1"}))
    assert (refused.ok, refused.error_kind, refused.error) == (False, "HTTP 429", "server overloaded")
    in_band = _complete(lambda request: httpx.Response(200, content=_sse({"error": {"message": "boom"}}, "[DONE]")))
    assert (in_band.error_kind, in_band.error) == ("stream error", "boom")
    cut = _complete(lambda request: httpx.Response(200, content=_sse({"choices": [{"text": "a"}]})))
    assert cut.error_kind == "incomplete stream"
