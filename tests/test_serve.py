"""The HTTP server against the official ``openai`` client, on a live loopback port.

Per-row identity: a request's greedy output inside a mixed batch (other rows with other steers
and values, other prompt lengths and lengths to generate) equals the same request served alone,
on a tiny random model (all three steer kinds) and on the catalog model smollm2-135m.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

import steerport
from steerport.serve.app import ServerState
from steerport.serve.command import parse_named_steers
from steerport.serve.limits import Limits
from steerport.serve.live import live_server
from steerport.steer import Steer
from tests.serve_fixtures import tiny_steers
from tests.tiny import tiny_model

STEERS_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "steers"


@pytest.fixture(scope="module")
def tiny_server():
    lm = tiny_model("llama")
    # a long batching window so that concurrent requests surely share one batch
    state = ServerState.build(lm, tiny_steers(lm), model_name="tiny", limits=Limits(window_ms=400, max_tokens=64))
    with live_server(state) as url:
        yield state, url


def client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def _concurrently(fns):
    out = [None] * len(fns)
    errors = []

    def run(i, fn):
        try:
            out[i] = fn()
        except Exception as e:  # noqa: BLE001  (surfaced below)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return out


def _identity(state, url, model, cases):
    """cases: (prompt, max_tokens, steers, temperature, seed). Alone one by one, then all at once."""
    c = client(url)

    def ask(prompt, max_tokens, steers, temperature, seed):
        r = c.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=temperature,
                                 seed=seed, extra_body={"steers": steers})
        return r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens

    alone = [ask(*case) for case in cases]
    before = state.engine.stats["batches"]
    mixed = _concurrently([lambda case=case: ask(*case) for case in cases])
    assert state.engine.stats["batches"] == before + 1, "the concurrent requests did not share one batch"
    assert mixed == alone
    return alone


def test_models_and_steers_listing(tiny_server):
    _, url = tiny_server
    c = client(url)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    steers = httpx.get(url + "/v1/steers").json()["data"]
    by = {s["name"]: s for s in steers}
    assert set(by) == {"pos", "calm", "love", "wide", "tok"}
    assert by["pos"]["kind"] == "lm-steer" and by["love"]["kind"] == "actadd" and by["tok"]["kind"] == "token-prob"
    assert by["pos"]["positive"] == "positive sentiment"
    curve = by["pos"]["strength_curve"]
    assert [p["value"] for p in curve] == [-4.0, -2.0, -1.0, 1.0, 2.0, 4.0]
    kl = {p["value"]: p["kl"] for p in curve}
    assert 0 < kl[1.0] < kl[2.0] < kl[4.0]  # a real measurement: KL grows with |s|
    assert by["pos"]["allowed_range"] == [-10.0, 10.0]


def test_completion_and_chat_plain_and_streaming(tiny_server):
    state, url = tiny_server
    c = client(url)
    r = c.completions.create(model="tiny", prompt="The movie was", max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6 and r.usage.prompt_tokens == len(state.encode("The movie was"))
    chunks = list(c.completions.create(model="tiny", prompt="The movie was", max_tokens=6, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == 6
    steered = c.completions.create(model="tiny", prompt="The movie was", max_tokens=6, temperature=0,
                                   extra_body={"steers": {"pos": 8, "tok": 3}})
    assert steered.choices[0].text != r.choices[0].text
    assert steered.model_extra["steers"] == {"pos": 8.0, "tok": 3.0}

    msgs = [{"role": "user", "content": "I love this place"}]
    chat = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=5, temperature=0,
                                     extra_body={"steers": {"love": 2}})
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 5
    parts = list(c.chat.completions.create(model="tiny", messages=msgs, max_tokens=5, temperature=0, stream=True,
                                           extra_body={"steers": {"love": 2}}))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == chat.choices[0].message.content
    assert parts[-1].choices[0].finish_reason == "length"
    free = c.chat.completions.create(model="tiny", messages=msgs, temperature=0)  # no max_tokens: up to the limit
    assert 0 < free.usage.completion_tokens <= state.limits.max_tokens


def test_n_seed_and_stop(tiny_server):
    _, url = tiny_server
    c = client(url)
    r = c.completions.create(model="tiny", prompt="The", max_tokens=8, temperature=1.0, seed=7, n=3)
    again = c.completions.create(model="tiny", prompt="The", max_tokens=8, temperature=1.0, seed=7, n=3)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert [ch.text for ch in r.choices] == [ch.text for ch in again.choices]  # seeded
    assert len({ch.text for ch in r.choices}) > 1  # choices get different seeds
    assert r.usage.completion_tokens == 24
    full = c.completions.create(model="tiny", prompt="The movie", max_tokens=12, temperature=0).choices[0].text
    stop = full[3:5]
    cut = c.completions.create(model="tiny", prompt="The movie", max_tokens=12, temperature=0, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.text == full[: full.find(stop)]
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="tiny", prompt="The movie", max_tokens=12, temperature=0, stop=[stop], stream=True))
    assert streamed == cut.text


def test_mixed_batch_equals_alone_tiny(tiny_server):
    state, url = tiny_server
    cases = [
        ("The movie was", 10, {"pos": 3.0}, 0.0, 0),
        ("I love this place; the food is good", 6, {"love": 1.5, "tok": -2.0}, 0.0, 0),
        ("What", 12, {}, 0.0, 0),
        ("The weather today is mild", 3, {"calm": -4.0, "wide": 1.0, "pos": -1.0}, 0.0, 0),
        ("Researchers measured", 9, {"pos": 3.0}, 0.9, 11),  # sampled rows are reproducible too
    ]
    outs = _identity(state, url, "tiny", cases)
    assert len({o[0] for o in outs}) == len(outs)


def test_request_joining_a_running_batch_equals_alone(tiny_server):
    """A request that arrives while a batch decodes joins it (continuous batching), same output."""
    state, url = tiny_server
    c = client(url)
    a = {"model": "tiny", "prompt": "The movie was", "max_tokens": 60, "temperature": 0,
         "extra_body": {"steers": {"pos": 2.0}}}
    b = {"model": "tiny", "prompt": "I love this place; the food is good", "max_tokens": 8, "temperature": 0,
         "extra_body": {"steers": {"love": 1.0, "tok": -1.0}}}
    alone_a = c.completions.create(**a).choices[0].text
    alone_b = c.completions.create(**b).choices[0].text
    joined = state.engine.stats["joined"]
    stream = c.completions.create(**a, stream=True)
    parts = [next(iter(stream)).choices[0].text]  # A is decoding now
    got_b = c.completions.create(**b).choices[0].text
    parts += [ch.choices[0].text for ch in stream]
    assert state.engine.stats["joined"] == joined + 1, "B did not join the running batch"
    assert got_b == alone_b
    assert "".join(parts) == alone_a


@pytest.mark.integration
def test_mixed_batch_equals_alone_smollm2(catalog_model):
    lm = catalog_model("smollm2-135m")
    steers = {n: Steer.load(p) for n, p in parse_named_steers([
        f"positive={STEERS_DIR / 'smollm2-135m-sst2-positive.st'}",
        f"detox={STEERS_DIR / 'smollm2-135m-paradetox-nontoxic.st'}"]).items()}
    state = ServerState.build(lm, steers, model_name="smollm2-135m", limits=Limits(window_ms=400),
                              curve=False, keywords=False)
    with live_server(state) as url:
        cases = [
            ("The movie was", 12, {"positive": 4.0}, 0.0, 0),
            ("I went to the store and the clerk said", 8, {"positive": -4.0, "detox": 2.0}, 0.0, 0),
            ("Hello", 12, {}, 0.0, 0),
            ("The food at this restaurant", 10, {"detox": -3.0}, 0.0, 0),
        ]
        outs = _identity(state, url, "smollm2-135m", cases)
        assert outs[0][0] != outs[2][0]
        # the server's greedy output equals the library's steered generation
        want = steerport.generate(lm, ["The movie was"], [(steers["positive"], 4.0)], max_new_tokens=12)[0]
        assert outs[0][0] == want
        c = client(url)
        chat = c.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "Say hi"}],
                                         max_tokens=8, temperature=0, extra_body={"steers": {"positive": 2}})
        assert chat.choices[0].message.content.strip()


def test_explain_endpoint(tiny_server):
    state, url = tiny_server
    r = httpx.post(url + "/v1/explain", json={"steer": "pos", "text": "The movie was wonderful", "value": 2}).json()
    assert r["positive"] == "positive sentiment" and len(r["tokens"]) == len(state.encode("The movie was wonderful"))
    assert any(t["delta"] != 0 for t in r["tokens"][1:])


# --------------------------------------------------------------------------- bad requests

BAD = [
    ({"model": "tiny", "prompt": "x", "steers": {"nope": 1}}, 400, "unknown steer"),
    ({"model": "tiny", "prompt": "x", "steers": {"pos": "3"}}, 400, "must be a number"),
    ({"model": "tiny", "prompt": "x", "steers": {"pos": 11}}, 400, "outside the allowed range"),
    ({"model": "tiny", "prompt": "x", "steers": {"/etc/passwd": 1}}, 400, "files are never opened"),
    ({"model": "tiny", "prompt": "x", "steers": {"pos.st": 1}}, 400, "files are never opened"),
    ({"model": "tiny", "prompt": "x", "steers": [1, 2]}, 400, "steers must be an object"),
    ({"model": "tiny"}, 400, "prompt is required"),
    ({"model": "tiny", "prompt": "x " * 2000}, 400, "at most"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 100000}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "max_tokens": "many"}, 400, "max_tokens must be an integer"),
    ({"model": "tiny", "prompt": "x", "n": 50}, 400, "n must be"),
    ({"model": "tiny", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": "tiny", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": "tiny", "prompt": "x", "stop": 5}, 400, "stop"),
    ({"model": "tiny", "prompt": "x", "logprobs": 3}, 400, "not supported"),
    ({"model": "other", "prompt": "x"}, 404, "not served here"),
    ({"model": "tiny", "prompt": [999999]}, 400, "token ids"),
]


@pytest.mark.parametrize("body,status,message", BAD, ids=[m for _, _, m in BAD])
def test_bad_requests_are_4xx_and_server_survives(tiny_server, body, status, message):
    _, url = tiny_server
    r = httpx.post(url + "/v1/completions", json=body)
    assert r.status_code == status
    err = r.json()["error"]
    assert message in err["message"] and set(err) == {"message", "type", "param", "code"}
    assert client(url).completions.create(model="tiny", prompt="ok", max_tokens=1, temperature=0).choices


@pytest.mark.parametrize("raw,message", [
    (b'{"model": "tiny", "prompt": "x", "steers": {"pos": NaN}}', "finite"),
    (b'{"model": "tiny", "prompt": "x", "steers": {"pos": Infinity}}', "finite"),
    (b'{"model": "tiny", "prompt": ', "malformed JSON"),
    (b'\xff\xfe', "malformed JSON"),
    (b'[1, 2]', "JSON object"),
])
def test_malformed_bodies(tiny_server, raw, message):
    _, url = tiny_server
    r = httpx.post(url + "/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and message in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400


def test_chat_bad_messages_and_unknown_route(tiny_server):
    _, url = tiny_server
    for msgs in (None, [], [{"role": "wizard", "content": "x"}], [{"role": "user", "content": 3}]):
        r = httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": msgs})
        assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    r = httpx.get(url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    assert httpx.get(url + "/static/../app.py").status_code == 404
    with pytest.raises(openai.BadRequestError, match="unknown steer"):
        client(url).completions.create(model="tiny", prompt="x", extra_body={"steers": {"zzz": 1}})


def test_api_key_and_limits():
    lm = tiny_model("gpt2")
    # a long batching window keeps the first request waiting while the second one arrives
    state = ServerState.build(lm, tiny_steers(lm), model_name="tiny", api_key="s3cret", curve=False,
                              limits=Limits(max_concurrent=1, max_tokens=100, window_ms=1500), keywords=False)
    with live_server(state) as url:
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").completions.create(model="tiny", prompt="x", max_tokens=1)
        r = httpx.get(url + "/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(url + "/v1/models", headers={"Authorization": "s3cret"}).status_code == 401
        assert httpx.get(url + "/").status_code == 200  # the page itself holds no secret
        good = client(url, "s3cret")
        assert good.completions.create(model="tiny", prompt="x", max_tokens=2, temperature=0).usage.completion_tokens == 2
        # one slot: a second request while a stream is open gets 429
        headers = {"Authorization": "Bearer s3cret"}
        body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 100, "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", headers=headers, json=body) as s:
            lines = s.iter_lines()  # keep the iterator: dropping it closes the connection
            assert '"role": "assistant"' in next(lines)  # the first chunk comes before any token
            busy = httpx.post(url + "/v1/completions", headers=headers, json={"model": "tiny", "prompt": "x"})
            assert busy.status_code == 429 and busy.json()["error"]["type"] == "rate_limit_error"
        # the client went away mid-stream: its row is cancelled and the slot is free again
        deadline = time.monotonic() + 10
        while httpx.get(url + "/health").json()["active_requests"] and time.monotonic() < deadline:
            time.sleep(0.05)
        r = good.completions.create(model="tiny", prompt="x", max_tokens=2, temperature=0)
        assert r.usage.completion_tokens == 2
        assert httpx.get(url + "/health").json()["active_requests"] == 0


def test_serve_command_registration_and_bad_arguments(tmp_path):
    import typer
    from typer.testing import CliRunner

    from steerport.errors import SteerportError
    from steerport.serve.command import register

    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # two commands, so typer keeps the command name
    runner = CliRunner()
    r = runner.invoke(app, ["serve", "--help"])
    assert r.exit_code == 0 and "--api-key" in r.output and "--max-concurrent" in r.output
    for args, message in ((["--steer", "noequals"], "NAME=FILE.st"), (["--steer", "a b=x.st"], "a steer name"),
                          (["--steer", "a=x.st", "--steer", "a=y.st"], "given twice"),
                          (["--steer", f"a={tmp_path / 'missing.st'}"], "no such steer file"),
                          (["--max-batch", "0"], "at least 1")):
        r = runner.invoke(app, ["serve", "tiny-model", *args])
        assert isinstance(r.exception, SteerportError) and message in str(r.exception), (args, r.exception)
