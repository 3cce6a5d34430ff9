"""``--lvlm openai:URL1,URL2``: requests spread over replicas, a replica that goes down is taken out and its requests
retried on the other, concurrency limits, and the whole path through ``vlad detect --explain``."""

from __future__ import annotations

import json
import threading

import pytest

from tests.helpers.explain_data import good_reply
from tests.helpers.fake_openai import FakeOpenAI
from vlad.errors import ConfigError
from vlad.explain.backends import load_backend, parse_backend_spec
from vlad.explain.errors import LVLMUnavailable
from vlad.explain.pool import BackendPool

MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture
def pair():
    servers = [FakeOpenAI().start(), FakeOpenAI().start()]
    for name, s in zip("ab", servers, strict=True):
        s.replies = [f"from {name}"]
    yield servers
    for s in servers:
        s.stop()


def _pool(servers, **kwargs) -> BackendPool:
    pool = load_backend("openai:" + ",".join(s.url for s in servers) + "#fake-vlm", timeout=5)
    assert isinstance(pool, BackendPool)
    for key, value in kwargs.items():
        setattr(pool, key, value)
    return pool


def test_the_spec_lists_replicas_and_each_url_is_checked():
    parsed = parse_backend_spec("openai:http://a:8000/v1/, http://b:8000/v1#qwen")
    assert (parsed.target, parsed.model) == ("http://a:8000/v1,http://b:8000/v1", "qwen")
    assert str(parsed) == "openai:http://a:8000/v1,http://b:8000/v1#qwen"
    with pytest.raises(ConfigError, match="must start with http:// or https://"):
        parse_backend_spec("openai:http://a:8000/v1,b:8000/v1")


def test_requests_are_spread_over_the_replicas(pair):
    pool = _pool(pair)
    assert sorted(pool.complete(MSG) for _ in range(4)) == ["from a", "from a", "from b", "from b"]
    assert pool.spec == f"openai:{pair[0].url},{pair[1].url}#fake-vlm"


def test_a_replica_that_goes_down_mid_run_is_taken_out_and_its_requests_retried_elsewhere(pair):
    a, b = pair
    pool = _pool(pair)
    assert {pool.complete(MSG) for _ in range(2)} == {"from a", "from b"}
    a.kill()  # open connections dropped, new ones refused
    assert [pool.complete(MSG) for _ in range(4)] == ["from b"] * 4
    assert len(a.chat_requests()) == 1  # served before it went down
    assert pool.replicas[0].down is not None
    assert "".join(pool.stream(MSG)) == "from b"


def test_a_taken_out_replica_comes_back_after_its_health_check(pair):
    a, b = pair
    a.mode = "500"
    pool = _pool(pair, recheck_after=0.0)
    assert [pool.complete(MSG) for _ in range(2)] == ["from b"] * 2
    a.mode = "ok"
    for _ in range(50):
        pool.complete(MSG)
        if pool.replicas[0].down is None:
            break
        threading.Event().wait(0.02)
    assert pool.replicas[0].down is None
    assert "from a" in {pool.complete(MSG) for _ in range(4)}


def test_every_replica_down_names_each_one(pair):
    for s in pair:
        s.mode = "500"
    pool = _pool(pair)
    with pytest.raises(LVLMUnavailable, match=r"all 2 LVLM servers are down: http://127\.0\.0\.1:\d+/v1 \(") as info:
        pool.complete(MSG)
    assert "HTTP 500" in str(info.value)
    assert pool.list_models() == ["fake-vlm"]  # /v1/models still answers: both back


def test_concurrency_limit_per_replica_sends_the_overflow_to_the_other(pair):
    a, b = pair
    a.mode = b.mode = "slow"
    a.delay = b.delay = 0.3
    pool = _pool(pair, max_in_flight=1)
    replies: list[str] = []
    threads = [threading.Thread(target=lambda: replies.append(pool.complete(MSG))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(replies) == ["from a", "from a", "from b", "from b"]


def test_the_limit_comes_from_the_environment(monkeypatch, pair):
    monkeypatch.setenv("VLAD_LVLM_MAX_IN_FLIGHT", "2")
    assert _pool(pair).max_in_flight == 2
    monkeypatch.setenv("VLAD_LVLM_MAX_IN_FLIGHT", "many")
    with pytest.raises(ConfigError, match="VLAD_LVLM_MAX_IN_FLIGHT='many': give a whole number >= 1"):
        _pool(pair)


def test_detect_explains_every_image_with_the_replica_that_stays_up(pair, sample_images, tmp_path, capsys):
    from vlad.cli import main

    a, b = pair
    b.replies = [good_reply()]
    a.mode = "500"  # answers its health check, then fails every request of the run
    out = tmp_path / "out"
    lvlm = f"openai:{a.url},{b.url}#fake-vlm"
    args = ["detect", str(sample_images), "--object", "bottle", "--backbone", "random:tiny", "--device", "cpu"]
    assert main([*args, "--out", str(out), "--explain", "--lvlm", lvlm, "--format", "json"]) == 0
    rows = [json.loads(line) for line in (out / "report.jsonl").read_text().splitlines()]
    capsys.readouterr()
    assert len(rows) == 3
    assert all(r["explain_error"] is None and r["report"] is not None for r in rows)
    assert all(r["lvlm"] == lvlm for r in rows)
    assert len(b.chat_requests()) == 3  # every explanation came from b
    assert len(a.chat_requests()) == 1  # a failed once and was taken out
