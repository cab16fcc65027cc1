"""`edgevlm serve` (edgevlm.server), spoken to with the official `openai` client on a loopback port: answers as the
pipeline gives them, streaming, response_format, concurrent clients, 503 when the queue is full, 4xx JSON errors
for whatever a client sends, and the metrics."""

import base64
import http.client as httplib
import io
import json
import threading
import time
import urllib.parse

import jsonschema
import openai
import pytest
import uvicorn
from conftest import random_image
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgevlm.pipeline import Pipeline
from edgevlm.runner import Runner
from edgevlm.server import Limits, create_app

KEY = "test-key"
ASK = dict(max_tokens=8, temperature=0, seed=1)


def data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def messages(text="What is shown?", url=None):
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": url or data_url(random_image())}}]}]


class Reply:
    def __init__(self, status: int, body: bytes, headers):
        self.status_code, self.text, self.headers = status, body.decode("utf-8", "replace"), headers

    def json(self):
        return json.loads(self.text)


def http(method: str, url: str, *, content: bytes | None = None, json_body=None, headers=None) -> Reply:
    """One HTTP request with the standard library; an error status is a Reply too. A server that answers an
    oversized body before reading it may close the connection while the body is still being sent: the reply
    is read all the same."""
    if json_body is not None:
        content, headers = json.dumps(json_body).encode(), {"content-type": "application/json", **(headers or {})}
    parts = urllib.parse.urlsplit(url)
    conn = httplib.HTTPConnection(parts.hostname, parts.port, timeout=120)
    try:
        try:
            conn.request(method, parts.path, body=content, headers=headers or {})
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = conn.getresponse()
        return Reply(reply.status, reply.read(), reply.headers)
    finally:
        conn.close()


@pytest.fixture(scope="module")
def served(tiny_bundle, tmp_path_factory):
    """A server over the tiny bundle on a free loopback port: (base URL, pipeline, runner, allowed folder)."""
    pipe = Pipeline.from_bundle(str(tiny_bundle))
    allowed = tmp_path_factory.mktemp("allowed")
    random_image(seed=4).save(allowed / "frame.png")
    runner = Runner(pipe, max_queue=2)
    app = create_app(runner, model="tiny", api_key=KEY, limits=Limits(max_body_bytes=2_000_000, allow_dir=allowed))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", pipe, runner, allowed
    server.should_exit = True
    thread.join(10)
    runner.close()


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def test_a_completion_is_the_pipelines_answer_with_its_intermediates(served, client):
    image = random_image(seed=2)
    reply = client.chat.completions.create(model="tiny", messages=messages(url=data_url(image)), **ASK)
    direct = served[1](image, "What is shown?", max_new_tokens=8, think_budget=8, temperature=0, seed=1)
    assert reply.choices[0].message.content == direct.answer
    extra = reply.model_extra["edgevlm"]
    assert extra["extraction"] == direct.extraction and extra["instruction"] == direct.instruction
    assert extra["timings"]["queue_ms"] >= 0 and reply.usage.completion_tokens > 0
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_streaming_gives_the_same_answer_and_the_intermediates_last(client):
    url = data_url(random_image(seed=3))
    plain = client.chat.completions.create(model="tiny", messages=messages(url=url), **ASK)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages(url=url), stream=True, **ASK))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == plain.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].model_extra["edgevlm"]["extraction"] == plain.model_extra["edgevlm"]["extraction"]


def test_response_format_constrains_the_answer(client):
    schema = {"type": "object", "properties": {"count": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["count"], "additionalProperties": False}
    reply = client.chat.completions.create(
        model="tiny", messages=messages("How many?"), max_tokens=24, seed=2,
        response_format={"type": "json_schema", "json_schema": {"name": "count", "schema": schema}})
    extra = reply.model_extra["edgevlm"]
    if extra["tokens"]["think"]["stop_reason"] != "constraint":
        jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
        assert extra["answer_json"] == json.loads(reply.choices[0].message.content)


def test_concurrent_clients_are_all_answered(served):
    replies = []

    def ask(i):
        # A client that retries a 503, as OpenAI's does by default: a third request that comes before the
        # runner has taken the first finds two waiting (max_queue 2) and is told to try again later.
        c = openai.OpenAI(base_url=served[0] + "/v1", api_key=KEY, max_retries=2, timeout=120)
        replies.append(c.chat.completions.create(model="tiny", messages=messages(url=data_url(random_image(seed=i))),
                                                 **ASK))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]  # one running, two waiting: max_queue 2
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(replies) == 3 and all(r.choices[0].message.content is not None for r in replies)


def test_a_full_queue_is_a_503_and_the_server_goes_on(served, client):
    base, pipe, runner, _ = served
    with pipe._slots:  # hold the models: one request runs (blocked), two wait, the next is refused
        pending = [threading.Thread(target=lambda: client.chat.completions.create(
            model="tiny", messages=messages(), **ASK)) for _ in range(3)]
        for t in pending:
            t.start()
            time.sleep(0.3)
        end = time.monotonic() + 30
        while runner.waiting < 2 and time.monotonic() < end:
            time.sleep(0.05)
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model="tiny", messages=messages(), **ASK)
        assert e.value.status_code == 503 and "max_queue=2" in e.value.message
    for t in pending:
        t.join(120)
    assert http("GET", base + "/health").json()["status"] == "ok"


def test_a_client_that_goes_away_cancels_its_waiting_request(served, client):
    base, pipe, runner, _ = served
    parts = urllib.parse.urlsplit(base)
    before = http("GET", base + "/metrics").text
    with pipe._slots:  # hold the models: the first request runs (blocked), the second waits
        first = threading.Thread(target=lambda: client.chat.completions.create(model="tiny", messages=messages(),
                                                                                **ASK))
        first.start()
        end = time.monotonic() + 30
        time.sleep(1.0)  # the worker has taken the first, and waits for the models
        gone = httplib.HTTPConnection(parts.hostname, parts.port, timeout=30)
        body = json.dumps({"messages": messages(), **ASK}).encode()
        gone.request("POST", "/v1/chat/completions", body=body, headers={"content-type": "application/json",
                                                                         "authorization": f"Bearer {KEY}"})
        while runner.waiting < 1 and time.monotonic() < end:
            time.sleep(0.05)
        assert runner.waiting == 1
        gone.close()  # the client goes away without reading its answer
        while runner.waiting and time.monotonic() < end:
            time.sleep(0.05)
        assert runner.waiting == 0  # withdrawn while the models were still held
    first.join(120)
    after = http("GET", base + "/metrics").text
    gone_count = [line for line in after.splitlines() if 'status="499"' in line]
    assert gone_count and gone_count[0] not in before


@pytest.mark.parametrize("body, status, needle", [
    (b"{not json", 400, "not valid JSON"),
    (json.dumps({"messages": []}).encode(), 400, "non-empty `messages`"),
    (json.dumps({"messages": [{"role": "user", "content": "no image"}]}).encode(), 400, "exactly one image_url"),
    (json.dumps({"messages": messages(url="data:image/png;base64,@@@")}).encode(), 400, "not valid base64"),
    (json.dumps({"messages": messages(url="/etc/passwd")}).encode(), 400, "not a file in the allowed folder"),
    (json.dumps({"messages": messages(url="../../etc/passwd")}).encode(), 400, "not a file in the allowed folder"),
    (json.dumps({"messages": messages(url="data:image/png;base64,aGVsbG8=")}).encode(), 400, "image"),
    (json.dumps({"messages": messages(), "max_tokens": 10**6}).encode(), 400, "this server allows"),
    (json.dumps({"messages": messages(), "temperature": "hot"}).encode(), 400, "temperature"),
    (json.dumps({"messages": messages(), "response_format": {"type": "json_schema"}}).encode(), 400,
     "response_format"),
    (json.dumps({"messages": messages(), "response_format": {"type": "json_schema", "json_schema": {
        "schema": {"type": "objekt"}}}}).encode(), 400, "invalid JSON schema"),
    (json.dumps({"messages": messages(), "response_format": {"type": "json_schema", "json_schema": {
        "schema": {"type": "integer", "x-guidance": [1]}}}}).encode(), 400, "x-guidance must be an object"),
    (b"x" * 2_000_001, 413, "over 2000000 bytes"),
])
def test_bad_requests_are_4xx_json_errors(served, body, status, needle):
    reply = http("POST", served[0] + "/v1/chat/completions", content=body,
                 headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"})
    assert reply.status_code == status, reply.text
    assert needle in reply.json()["error"]["message"]


def test_the_api_key_is_required_and_a_local_frame_is_read_from_the_allowed_folder(served):
    base, _, _, allowed = served
    denied = http("POST", base + "/v1/chat/completions", json_body={"messages": messages()})
    assert denied.status_code == 401 and denied.json()["error"]["type"] == "authentication_error"
    assert http("GET", base + "/v1/models", headers={"authorization": "Bearer wrong"}).status_code == 401
    local = http("POST", base + "/v1/chat/completions", json_body={"messages": messages(url="frame.png"), **ASK},
                 headers={"authorization": f"Bearer {KEY}"})
    assert local.status_code == 200 and local.json()["edgevlm"]["extraction"] is not None


def test_metrics_are_prometheus_text(served, client):
    client.chat.completions.create(model="tiny", messages=messages(), **ASK)
    text = http("GET", served[0] + "/metrics").text
    assert 'edgevlm_requests_total{status="200"}' in text and "edgevlm_queue_depth" in text
    assert 'edgevlm_stage_seconds_bucket{stage="extract",le="+Inf"}' in text
    assert "edgevlm_decode_tokens_per_second" in text


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=10)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(JSON, st.fixed_dictionaries({"messages": JSON}),
                      st.fixed_dictionaries({"messages": st.just(messages("q")),
                                             "max_tokens": st.integers(-2, 6) | st.text(max_size=3) | st.floats(),
                                             "temperature": JSON, "stream": JSON, "response_format": JSON})))
def test_whatever_a_client_posts_it_gets_json_and_never_a_5xx(served, body):
    reply = http("POST", served[0] + "/v1/chat/completions", json_body=body, headers={"authorization": f"Bearer {KEY}"})
    assert reply.status_code < 500, reply.text
    if reply.status_code != 200 or "text/event-stream" not in reply.headers.get("content-type", ""):
        reply.json()


def test_edgevlm_serve_starts_answers_health_and_stops(tiny_bundle):
    import os
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "edgevlm", "serve", "--bundle", str(tiny_bundle), "--port",
                             str(port), "--api-key", KEY], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        end = time.monotonic() + 120
        while True:
            try:
                health = http("GET", f"http://127.0.0.1:{port}/health")
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < end, proc.stderr.read().decode()
                time.sleep(0.2)
        assert health.status_code == 200 and health.json()["status"] == "ok"
        models = http("GET", f"http://127.0.0.1:{port}/v1/models", headers={"authorization": f"Bearer {KEY}"})
        assert models.json()["data"][0]["id"].startswith("llava")
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0, proc.stderr.read().decode()
