"""A bounded load test on loopback: 48 concurrent streaming clients, a third of them disconnecting mid-stream,
three rounds. The rest all finish whole; afterwards no slot, request or queue entry is left and memory is flat."""

import asyncio
import json
import os
import time

import httpx
import pytest

from servekit import Server, make_run

CLIENTS, TOKENS, ROUNDS = 48, 24, 3


def rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


async def client(http: httpx.AsyncClient, url: str, i: int, quit_after: int | None) -> dict:
    body = {"prompt": f"Hello {i}, how are", "max_tokens": TOKENS, "ignore_eos": True, "stream": True,
            "temperature": 0.8, "seed": i, "stream_options": {"include_usage": True}}
    chunks, usage, reason = 0, None, None
    async with http.stream("POST", url + "/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            if event["choices"]:
                chunks += 1
                reason = event["choices"][0]["finish_reason"] or reason
            else:
                usage = event["usage"]
            if quit_after is not None and chunks >= quit_after:
                # leaving the `async with` drops the connection mid-stream; on a loaded machine the server may
                # have written the whole answer already (coalesced chunks), and then it counts a 200, rightly
                return {"quit": True, "finished": reason is not None}
    return {"quit": False, "usage": usage, "reason": reason}


async def round_(url: str) -> list[dict]:
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        return await asyncio.gather(*(client(http, url, i, 3 if i % 3 == 0 else None) for i in range(CLIENTS)))


@pytest.mark.timeout(120)
def test_concurrent_streams_with_disconnects_leak_nothing(tmp_path):
    run = make_run(tmp_path, max_seq_len=64)
    with Server(run, max_batch=16, max_queue=CLIENTS) as srv:
        memory, finished_quitters = [], 0
        for _ in range(ROUNDS):
            start = time.monotonic()
            results = asyncio.run(round_(srv.url))
            assert time.monotonic() - start < 60
            done = [r for r in results if not r["quit"]]
            finished_quitters += sum(r["quit"] and r["finished"] for r in results)
            assert len(done) == CLIENTS - CLIENTS // 3
            assert all(r["reason"] == "length" and r["usage"]["completion_tokens"] == TOKENS for r in done)
            deadline = time.monotonic() + 10
            while any(srv.metric(m) for m in ("kiln_active_requests", "kiln_active_slots", "kiln_waiting_requests")):
                assert time.monotonic() < deadline, "a slot or request was left behind"
                time.sleep(0.05)
            assert sorted(srv.engine._free) == list(range(16))
            memory.append(rss_mb())
        assert memory[-1] - memory[0] < 40, memory     # flat after the first round's warm-up
        gone = srv.metric("kiln_requests_total", status="499")
        assert 0 < gone <= ROUNDS * (CLIENTS // 3) - finished_quitters
        assert srv.metric("kiln_requests_total", status="200") + gone == ROUNDS * CLIENTS
        assert srv.metric("kiln_time_to_first_token_seconds_count") == ROUNDS * CLIENTS
