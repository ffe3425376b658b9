"""``zhilu serve``: a trained run behind OpenAI's API, driven by the official ``openai`` client."""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch
from conftest import KEY, MICRO, Server, train, zhilu

from zhilu.serve.engine import Engine, SamplingParams
from zhilu.serve.loading import load_run


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(tmp_path_factory.mktemp("serve") / "tiny", "--steps", "20")


@pytest.fixture(scope="module")
def server(run: Path) -> Iterator[Server]:
    s = Server(run, "--api-key", KEY, "--model-name", "tiny", "--max-request-kb", "16", "--max-queue", "40")
    yield s
    s.close()


def complete(client: openai.OpenAI, prompt: str, **kw: object) -> openai.types.Completion:
    return client.completions.create(model="tiny", prompt=prompt, **kw)  # type: ignore[arg-type]


def test_streamed_text_joined_is_the_text_and_usage_counts_are_exact(server: Server, run: Path) -> None:
    client = server.client()
    whole = complete(client, "def main(", max_tokens=24, temperature=0)
    assert whole.choices[0].finish_reason == "length" and whole.system_fingerprint == f"step-{20}"
    assert whole.usage.prompt_tokens == len("def main(".encode())
    assert whole.usage.completion_tokens == 24 and whole.usage.total_tokens == 24 + 9
    chunks = list(complete(client, "def main(", max_tokens=24, temperature=0, stream=True,
                           stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == whole.choices[0].text and reasons == ["length"]
    assert chunks[-1].usage.completion_tokens == 24


def test_n_choices_and_seeds(server: Server) -> None:
    client = server.client()
    a = complete(client, "import ", max_tokens=12, temperature=1.0, n=3, seed=7)
    b = complete(client, "import ", max_tokens=12, temperature=1.0, n=3, seed=7)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # each choice draws its own tokens
    assert a.usage.completion_tokens == 36 and a.usage.prompt_tokens == len(b"import ")


def test_stop_sequences_end_the_text_before_them(server: Server) -> None:
    client = server.client()
    free = complete(client, "class ", max_tokens=40, temperature=1.0, seed=3).choices[0].text
    stop = free[10:12]
    cut = free.index(stop)
    stopped = complete(client, "class ", max_tokens=40, temperature=1.0, seed=3, stop=[stop])
    assert stopped.choices[0].text == free[:cut] and stopped.choices[0].finish_reason == "stop"
    streamed = complete(client, "class ", max_tokens=40, temperature=1.0, seed=3, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == free[:cut]


def test_bad_requests_get_the_clients_errors_and_the_server_goes_on(server: Server) -> None:
    client = server.client()
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="other", prompt="x")
    assert e.value.body["code"] == "model_not_found"
    for bad in ({"max_tokens": -1}, {"temperature": 5}, {"n": 100}, {"top_p": 0}, {"max_tokens": 10_000},
                {"stop": ["a", "b", "c", "d", "e"]}):
        with pytest.raises(openai.BadRequestError) as e:
            complete(client, "x", **bad)
        assert set(e.value.body) == {"message", "type", "param", "code"}
    with pytest.raises(openai.BadRequestError):
        complete(client, "x" * 5000)  # longer than the model's context
    with pytest.raises(openai.RateLimitError):  # 6 prompts x 8 choices: more than the queue's 40
        client.completions.create(model="tiny", prompt=["a", "b", "c", "d", "e", "f"], n=8)
    with pytest.raises(openai.AuthenticationError):
        complete(server.client("wrong"), "x")
    status, body = server.post("/v1/completions", b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, body = server.post("/v1/completions", json.dumps({"model": "tiny", "prompt": "x" * 40_000}).encode())
    assert status == 413 and body["error"]["code"] == "request_too_large"
    status, body = server.post("/v1/completions", json.dumps({"model": "tiny", "prompt": [1, 2, 99999]}).encode())
    assert status == 400 and body["error"]["param"] == "prompt"
    status, body = server.post("/v1/chat/completions", json.dumps(
        {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}).encode())
    assert status == 400 and "chat template" in body["error"]["message"]
    with urllib.request.urlopen(server.url + "/healthz") as r:  # needs no key
        assert json.loads(r.read())["status"] == "ok"
    assert complete(client, "x", max_tokens=2, temperature=0).choices[0].finish_reason == "length"


def test_models_and_metrics(server: Server) -> None:
    client = server.client()
    assert [(m.id, m.checkpoint_step) for m in client.models.list()] == [("tiny", 20)]  # type: ignore[attr-defined]
    from prometheus_client.parser import text_string_to_metric_families

    req = urllib.request.Request(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req) as r:
        names = {f.name for f in text_string_to_metric_families(r.read().decode())}
    assert {"zhilu_serve_requests", "zhilu_serve_generation_tokens", "zhilu_serve_time_to_first_token_seconds",
            "zhilu_serve_time_per_output_token_seconds", "zhilu_serve_queue_length", "zhilu_serve_batch_size",
            "zhilu_serve_checkpoint_step"} <= names


def test_32_concurrent_greedy_requests_give_what_each_gives_alone(server: Server) -> None:
    client = server.client()
    prompts = [f"def f{i}(x):\n    return " + "y" * (i % 7) for i in range(32)]
    alone = [complete(client, p, max_tokens=16, temperature=0).choices[0].text for p in prompts]
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(lambda p: complete(client, p, max_tokens=16, temperature=0).choices[0].text,
                                 prompts))
    assert together == alone


def test_generation_with_the_kv_cache_equals_generation_without_it(run: Path) -> None:
    loaded = load_run(run)

    class NoCache(torch.nn.Module):  # the same model, seen without make_cache
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.model(tokens)

    cached = Engine(loaded.model, loaded.step, loaded.max_seq_len, loaded.tokenizer)
    plain = Engine(NoCache(loaded.model), loaded.step, loaded.max_seq_len, loaded.tokenizer)
    assert cached.cache is not None and plain.cache is None
    params = SamplingParams(max_tokens=40, temperature=0)
    for prompt in ("def main(", "import os\n", "x"):
        ids = loaded.tokenizer.encode(prompt)
        a, b = cached.submit(ids, params), plain.submit(ids, params)
        assert cached.wait(a) == plain.wait(b) and a.tokens == b.tokens and len(a.tokens) == 40
    cached.close()
    plain.close()


def test_generate_prints_the_prompt_and_its_continuation(run: Path) -> None:
    result = zhilu("generate", str(run), "--prompt", "def main(", "--max-tokens", "8", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    loaded = load_run(run)
    engine = Engine(loaded.model, loaded.step, loaded.max_seq_len, loaded.tokenizer)
    want = engine.wait(engine.submit(loaded.tokenizer.encode("def main("), SamplingParams(8, 0)))
    assert result.stdout == "def main(" + want + "\n"
    bad = zhilu("generate", str(run), "--prompt", "x", "--max-tokens", "100000")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --max-tokens")


def test_serve_refuses_what_it_cannot_serve(tmp_path: Path, run: Path) -> None:
    result = zhilu("serve", str(tmp_path))
    assert result.returncode == 2 and result.stderr.startswith("error: RUN_DIR") and "config.toml" in result.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = zhilu("serve", str(run), "--port", str(taken.getsockname()[1]))
    assert result.returncode == 2 and result.stderr.startswith("error: --port")


def test_a_reload_under_load_fails_no_request_and_moves_to_the_newer_checkpoint(tmp_path: Path) -> None:
    run = train(tmp_path / "run", "--steps", "10")
    server = Server(run, "--reload", "--reload-interval", "0.2", "--model-name", "tiny")
    client = server.client()
    prompt = "def main("
    stop_at = time.monotonic() + 600
    results: list[tuple[str, str]] = []

    def client_loop() -> None:
        while time.monotonic() < stop_at:
            r = complete(client, prompt, max_tokens=12, temperature=0)
            results.append((r.system_fingerprint, r.choices[0].text))
            if r.system_fingerprint == "step-20":
                return

    try:
        with ThreadPoolExecutor(4) as pool:
            loops = [pool.submit(client_loop) for _ in range(4)]
            resumed = zhilu("train", *MICRO, "--out", str(run), "--steps", "20", "--resume")
            assert resumed.returncode == 0, resumed.stderr[-2000:]
            for f in loops:
                f.result()  # raises if any request failed
    finally:
        server.close()
    steps = {fp for fp, _ in results}
    assert steps == {"step-10", "step-20"}, steps
    newer = load_run(run)
    assert newer.step == 20
    engine = Engine(newer.model, newer.step, newer.max_seq_len, newer.tokenizer)
    want = engine.wait(engine.submit(newer.tokenizer.encode(prompt), SamplingParams(12, 0)))
    older = {text for fp, text in results if fp == "step-10"}
    assert {text for fp, text in results if fp == "step-20"} == {want}
    assert len(older) == 1  # each response from one checkpoint's weights
