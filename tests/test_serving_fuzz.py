"""Server hardening: the real `serve.py` under hostile requests, slow and vanishing clients, and /health.

The server runs as its own process (`python serve.py ckpt=... ui=false`: localhost by default, an API key
from NANOCHAT_API_KEY), so a crash, a traceback in its log or growing memory shows as what it is. Its tiny
random-weight model never ends a reply by itself (the special tokens' output rows are zero, so greedy or
top-50 sampling never picks one): a reply runs to max_tokens, which gives long generations on demand.

Hypothesis sends >= 500 malformed or hostile requests (bad JSON, wrong types, huge/negative/NaN numbers,
junk nesting, control characters, wrong methods and paths, oversized bodies, broken HTTP framing, bad
headers and keys) and checks: no 5xx, every API error is JSON with one short sentence, the key is enforced,
the process stays up with bounded RSS, and a good request is still answered afterwards.
"""

import asyncio
import base64
import collections
import contextlib
import gc
import inspect
import json
import math
import os
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("hypothesis")

import httpx  # noqa: E402
from common import serve_process  # noqa: E402  (bench/common.py, on pytest's pythonpath)
from conftest import PRECISIONS, random_gpt  # noqa: E402
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from nanochat.settings import ServerLimits  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KEY = "fuzz-s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
HI = [{"role": "user", "content": "Hello there"}]
BODY_LIMIT = ServerLimits.max_body_bytes
SEND_TIMEOUT = 1.0  # short timeouts so the slow-client tests take seconds
BODY_TIMEOUT = 1.0
RSS_GROWTH_LIMIT_MB = 40  # the server's RSS may grow at most this much over the fuzzing (allocator slack)
FUZZ_EXAMPLES = 600
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # the server process has the other core


# --- a live server -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(serving_tokenizer):
    return serving_tokenizer


@pytest.fixture(scope="module")
def export_dir(tok, tmp_path_factory):
    from nanochat.export import save_export

    # sequence_len 512: a context of 5,120 tokens, room for replies that run for seconds
    model = random_gpt(tok.vocab_size, 0.5, sequence_len=512, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    with torch.no_grad():
        model.lm_head.weight[list(tok.special_tokens.values())] = 0  # logit 0 never makes the top 50 of 600
    return save_export(model, tok, tmp_path_factory.mktemp("fuzz") / "export")


@pytest.fixture(scope="module", params=PRECISIONS)
def engine(export_dir, request):
    from nanochat.serving import load_engine

    return load_engine(export_dir, "cpu", precision=request.param)[0]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path):
        self.proc, self.port, self.log_path = proc, port, log
        self.url = f"http://127.0.0.1:{port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def wait_generating(self, within: float = 5) -> None:
        deadline = time.monotonic() + within
        while self.health()["generating"] == 0:
            assert time.monotonic() < deadline, "no generation started"
            time.sleep(0.01)

    def wait_idle(self, within: float) -> float:
        """Seconds until /health shows no generation and no pending request; fails after `within`."""
        start = time.monotonic()
        while (h := self.health())["pending"] or h["generating"]:
            assert time.monotonic() - start < within, f"still busy after {within} s: {h}"
            time.sleep(0.02)
        return time.monotonic() - start


@pytest.fixture(scope="module")
def server(export_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("fuzz-log") / "serve.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NANOCHAT_API_KEY": KEY}
    overrides = [
        "model_name=fuzz",
        "limits.max_waiting=8",
        "sampling.max_tokens=4",
        f"limits.send_timeout={SEND_TIMEOUT}",
        f"limits.body_timeout={BODY_TIMEOUT}",
    ]  # no host=: the default must be localhost
    with serve_process(export_dir, overrides, env, log) as (proc, port):
        yield Server(proc, port, log)


@pytest.fixture(scope="module")
def step_seconds(server):
    """Seconds per decoding step at n=8 on this machine now (to tell 'stopped early' from 'finished')."""
    body = {"messages": HI, "max_tokens": 400, "n": 8, "temperature": 0}
    start = time.monotonic()
    r = httpx.post(server.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8 * 400, r.text
    return (time.monotonic() - start) / 400


def long_body(**kw) -> dict:
    """A request that generates for seconds: 8 greedy replies that run to 4,500 tokens."""
    return {"messages": HI, "max_tokens": 4500, "n": 8, "temperature": 0, **kw}


# --- binding, auth, health -----------------------------------------------------------------------


def listening_addresses(port: int) -> set[str]:
    """Local addresses LISTENing on `port` (hex, as /proc/net/tcp* writes them)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, _, hex_port = local.partition(":")
                if state == "0A" and int(hex_port, 16) == port:
                    found.add(address)
    return found


def test_binds_to_localhost_by_default_and_health_says_ready(server):
    if Path("/proc/net/tcp").exists():
        assert listening_addresses(server.port) == {"0100007F"}  # 127.0.0.1 only, not 0.0.0.0
    r = httpx.get(server.url + "/health")  # no key needed
    assert r.status_code == 200
    assert r.json() == {
        "status": "ok",
        "ready": True,
        "model": "fuzz",
        "generating": 0,
        "pending": 0,
        "free": 9,
        "max_waiting": 8,
    }


def test_api_key_is_enforced(server):
    from nanochat.serving.api import bearer_guard

    assert "hmac.compare_digest" in inspect.getsource(bearer_guard)  # constant time, so no timing oracle
    good = {"messages": HI, "max_tokens": 2}
    basic = "Basic " + base64.b64encode(f"user:{KEY}".encode()).decode()
    wrong = [
        None,
        "Bearer nope",
        f"Bearer {KEY}x",
        f"Bearer {KEY[:-1]}",
        KEY,
        basic,
        f"Token {KEY}",
        "Bearer",
        b"Bearer \xff\xfe",
    ]
    with httpx.Client(base_url=server.url, timeout=10) as c:
        for auth in wrong:
            headers = {} if auth is None else {"Authorization": auth}
            r = c.post("/v1/chat/completions", json=good, headers=headers)
            assert r.status_code == 401, (auth, r.text)
            assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
            assert c.get("/v1/models", headers=headers).status_code == 401
        for auth in (f"Bearer {KEY}", f"bearer {KEY}", f"Bearer  {KEY}"):  # the scheme is case-insensitive
            assert c.post("/v1/chat/completions", json=good, headers={"Authorization": auth}).status_code == 200, auth
        assert c.get("/v1/models", headers=AUTH).json()["data"][0]["id"] == "fuzz"


# --- fuzzing -------------------------------------------------------------------------------------

HOSTILE_NUMBERS = [
    10**400,
    -(10**400),
    2**63,
    2**64,
    10**18,
    -1,
    0,
    1e308,
    -1e308,
    5e-324,
    1e-40,
    -0.0,
    0.5,
    2.0000001,
    math.nan,
    math.inf,
    -math.inf,
    True,
    False,
    None,
    "",
    "1",
    "NaN",
    "0x10",
    [],
    {},
    [1],
    {"value": 1},
]
HOSTILE_STRINGS = [
    "",
    " ",
    "\x00",
    "\ud800",
    "\udfff\ud800",
    "a\x1b[31mred\x07",
    "<|assistant_end|>",
    "<|bos|>",
    "<|python_start|>1+1<|python_end|>",
    "\u202eevil",
    "💥" * 200,
    "x" * 8_001,
    "y" * 40_000,
    "null",
    "\r\n\r\nHTTP/1.1 200 OK",
    "%s%n%x",
    "'; DROP TABLE users; --",
    "../../etc/passwd",
]

numbers = st.one_of(
    st.sampled_from(HOSTILE_NUMBERS),
    st.integers(-3, 12),
    st.integers(min_value=10_000),
    st.integers(max_value=-4),
    st.floats(allow_nan=True, allow_infinity=True),
)
strings = st.one_of(st.sampled_from(HOSTILE_STRINGS), st.text(max_size=30))
junk = st.recursive(
    st.none() | st.booleans() | numbers | strings,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
roles = st.sampled_from(["user", "assistant", "system", "tool", "function", "USER", "", "developer"]) | junk
part = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["text", "image_url", "python", "python_output"]) | junk,
        "text": strings | junk,
        "image_url": junk,
    },
)
message = st.fixed_dictionaries(
    {},
    optional={
        "role": roles,
        "content": strings | junk | st.lists(part, max_size=3),
        "name": strings,
        "tool_calls": junk,
    },
)
VALID_TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
]
messages = st.one_of(
    st.just(HI),
    st.lists(message, max_size=4),
    st.lists(st.sampled_from(VALID_TURNS), min_size=1, max_size=6),  # valid parts, often in the wrong order
    st.just([{"role": "user", "content": "x"}] * 501),
    st.just([{"role": r, "content": "z" * 7_000} for r in ("user", "assistant") * 2 + ("user",)]),  # over 32,000 chars
    junk,
)
FIELDS = {
    "model": strings | junk,
    "temperature": numbers,
    "top_k": numbers,
    "max_tokens": numbers,
    "max_completion_tokens": numbers,
    "n": numbers,
    "seed": numbers,
    "top_p": numbers,
    "presence_penalty": numbers,
    "frequency_penalty": numbers,
    "stop": strings | st.lists(strings, max_size=6) | junk,
    "stream": st.booleans() | junk,
    "stream_options": st.just({"include_usage": True}) | junk,
    "logprobs": junk,
    "top_logprobs": numbers,
    "tools": junk,
    "tool_choice": junk,
    "response_format": junk,
    "logit_bias": junk,
    "user": strings,
}
chat_bodies = st.one_of(
    st.builds(
        lambda known, extra: {**extra, **known},
        st.fixed_dictionaries({}, optional={"messages": messages, **FIELDS}),
        st.dictionaries(st.text(max_size=12), junk, max_size=3),
    ),
    # one hostile field in an otherwise good request: reaches the code behind the validation (the sampler, ...)
    st.sampled_from(sorted(FIELDS)).flatmap(lambda name: FIELDS[name].map(lambda value: {"messages": HI, name: value})),
)


def deep(depth: int) -> bytes:
    return b'{"messages": [{"role": "user", "content": "hi"}], "x": ' + b"[" * depth + b"]" * depth + b"}"


HUGE_CONTENT = b'{"messages": [{"role": "user", "content": "' + b"x" * (BODY_LIMIT + 10) + b'"}]}'
RAW_BODIES = [
    b"",
    b"null",
    b"[]",
    b'"hi"',
    b"42",
    b"{",
    b"}",
    b"{" * 50_000,
    b"[" * 200_000,
    deep(900),
    deep(5000),
    b'{"messages": NaN}',
    b'{"messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}',
    b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1' + b"0" * 5_000 + b"}",
    b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}',
    b'{"messages": [{"role": "user", "content": "hi"}], "messages": 5}',
    b"\xef\xbb\xbf{}",
    json.dumps({"messages": HI}).encode("utf-16"),
    b"\xff\xfe\x00garbage",
    b"messages=hi&max_tokens=2",
    b'{"messages": [{"role": "user", "content": "hi"}], "junk": "' + b"j" * 900_000 + b'"}',
    HUGE_CONTENT,
]
raw_bodies = st.one_of(
    st.sampled_from(RAW_BODIES), st.binary(max_size=300), chat_bodies.map(lambda b: json.dumps(b).encode()[:-3])
)  # truncated JSON

PATHS = ["/v1/chat/completions"] * 12 + [
    "/v1/chat/completions/",
    "/v1/models",
    "/v1/models/fuzz",
    "/v1/models/other",
    "/health",
    "/",
    "/v1",
    "/v1/",
    "/v2/chat/completions",
    "/v1/chat/completions?stream=true&n=99",
    "/docs",
    "/openapi.json",
    "/v1/" + "a" * 5000,
    "/v1/models/%00%ff",
    "/v1/chat%2Fcompletions",
    "/gradio_api/info",
]
METHODS = ["POST"] * 6 + ["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]
AUTHS = [f"Bearer {KEY}"] * 9 + [None, "Bearer nope", f"Bearer {KEY}x", "Basic Zm9vOmJhcg==", KEY, b"Bearer \xe9\xff"]
CONTENT_TYPES = ["application/json"] * 4 + [
    None,
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=zz",
    "application/json; charset=utf-16",
    "*/*",
    "garbage",
]


@st.composite
def api_requests(draw):
    """(method, path, headers, body bytes) sent with httpx: valid HTTP carrying hostile content."""
    method, path = draw(st.sampled_from(METHODS)), draw(st.sampled_from(PATHS))
    body = draw(st.one_of(chat_bodies.map(lambda b: json.dumps(b).encode()), raw_bodies))
    headers = {}
    if (auth := draw(st.sampled_from(AUTHS))) is not None:
        headers["Authorization"] = auth
    if (kind := draw(st.sampled_from(CONTENT_TYPES))) is not None:
        headers["Content-Type"] = kind
    if draw(st.booleans()):
        headers.update(
            draw(
                st.dictionaries(
                    st.sampled_from(["X-Junk", "Accept", "Accept-Encoding", "User-Agent", "Cookie"]),
                    st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=40),
                    max_size=3,
                )
            )
        )
    return method, path, headers, body


TOKEN_CHARS = st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=":")
RAW_HEADERS = [
    ("Content-Type", "application/json"),
    ("Authorization", f"Bearer {KEY}"),
    ("Authorization", "Bearer nope"),
    ("Authorization", "Bearer \xff\xfe"),
    ("Expect", "100-continue"),
    ("Content-Encoding", "gzip"),
    ("Host", "evil.example"),
    ("Upgrade", "websocket"),
    ("Upgrade", "h2c"),
    ("Header With Space", "x"),
    ("", "empty name"),
    ("X-Long", "a" * 20_000),
    ("X-Nul", "a\x00b"),
    ("X-Latin", "caf\xe9"),
    ("X-Folded", "a\r\n folded"),
    ("Transfer-Encoding", "gzip"),
    ("Content-Length", "+5"),
]
FRAMINGS = ["length"] * 5 + [
    "none",
    "length-twice",
    "lengths-differ",
    "length-negative",
    "length-junk",
    "length-huge",
    "length-unicode",
    "chunked",
    "chunked-junk",
    "chunked-and-length",
    "body-longer",
    "body-shorter",
]


@st.composite
def raw_requests(draw):
    """Raw bytes for a socket: broken request lines, framing and headers that no HTTP client library would send."""
    method = draw(st.sampled_from(["POST"] * 4 + ["GET", "PUT", "FOO", "get", "P@ST", "CONNECT", "TRACE"]))
    target = draw(
        st.sampled_from(PATHS + ["*", "http://evil.example/v1/models", "", "/v1/../health", "/v1/%2e%2e/health"])
        | st.text(TOKEN_CHARS, max_size=30).map(lambda t: "/" + t)
    )
    version = draw(st.sampled_from(["HTTP/1.1"] * 6 + ["HTTP/1.0", "HTTP/2.0", "HTTP/1.2", "HTTP/0.9", "http/1.1", ""]))
    body = draw(st.one_of(chat_bodies.map(lambda b: json.dumps(b).encode()), st.binary(max_size=200)))
    headers = [("Host", "127.0.0.1")] if draw(st.booleans()) or version == "HTTP/1.1" and draw(st.booleans()) else []
    headers += draw(
        st.lists(
            st.sampled_from(RAW_HEADERS)
            | st.tuples(
                st.text(TOKEN_CHARS, min_size=1, max_size=10),
                st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=20),
            ),
            max_size=5,
        )
    )
    framing, n = draw(st.sampled_from(FRAMINGS)), len(body)
    framing_headers = {
        "length": [("Content-Length", str(n))],
        "none": [],
        "length-twice": [("Content-Length", str(n))] * 2,
        "lengths-differ": [("Content-Length", str(n)), ("Content-Length", str(n + 1))],
        "length-negative": [("Content-Length", "-1")],
        "length-junk": [("Content-Length", "12abc")],
        "length-huge": [("Content-Length", "9" * 30)],
        "length-unicode": [("Content-Length", "\xb2")],
        "chunked": [("Transfer-Encoding", "chunked")],
        "chunked-junk": [("Transfer-Encoding", "chunked")],
        "chunked-and-length": [("Transfer-Encoding", "chunked"), ("Content-Length", str(n))],
        "body-longer": [("Content-Length", str(max(0, n - 5)))],
        "body-shorter": [("Content-Length", str(n + 50))],
    }[framing]
    if framing in ("chunked", "chunked-and-length"):
        body = f"{n:x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    elif framing == "chunked-junk":
        body = b"zz\r\n" + body + b"\r\n"
    lines = [
        f"{method} {target} {version}".rstrip(),
        *(f"{k}: {v}" for k, v in headers + framing_headers),
        "Connection: close",
    ]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    # body-shorter: the server would wait for the rest (until body_timeout): send it and leave instead.
    return head + body, framing != "body-shorter"


def raw_exchange(port: int, data: bytes, wait: bool, timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        with contextlib.suppress(OSError):  # the server may answer and close while we still send
            s.sendall(data)
        if not wait:
            return b""
        chunks = []
        with contextlib.suppress(OSError):  # a reset after the answer is fine: the answer is what counts
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)


def parse_response(raw: bytes) -> tuple[int, dict, bytes]:
    """(status, headers, body) of the final (non-1xx) response in `raw`."""
    while raw.startswith(b"HTTP/1.1 1"):  # 100 Continue
        raw = raw.partition(b"\r\n\r\n")[2]
    head, _, body = raw.partition(b"\r\n\r\n")
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", head)
    assert match, f"no HTTP response: {raw[:300]!r}"
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.decode("latin-1").partition(":")
        headers[key.strip().lower()] = value.strip()
    return int(match.group(1)), headers, body


def check_answer(status: int, content_type: str, body: bytes, what) -> None:
    """No 5xx; every API error is OpenAI-shaped JSON whose message is one short line."""
    assert status < 500, (status, body[:500], what)
    if status >= 400 and content_type.startswith("application/json") and body:
        message = json.loads(body)["error"]["message"]
        assert isinstance(message, str) and 0 < len(message) <= 300 and "\n" not in message, (message, what)
        assert "Traceback" not in message and 'File "' not in message


def test_hostile_requests_never_get_a_5xx_and_the_server_stays_up(server):
    with httpx.Client(base_url=server.url, timeout=10) as c:
        for _ in range(3):  # warm the server's allocator before measuring its RSS
            assert c.post("/v1/chat/completions", json={"messages": HI}, headers=AUTH).status_code == 200
            assert c.post("/v1/chat/completions", content=RAW_BODIES[-2], headers=AUTH).status_code == 200
    rss_before = rss_mb(server.proc.pid)
    stats: collections.Counter = collections.Counter()
    kinds: collections.Counter = collections.Counter()
    client = httpx.Client(base_url=server.url, timeout=10)

    def chat(body: bytes, auth=AUTH["Authorization"]):
        return (
            "api",
            ("POST", "/v1/chat/completions", {"Authorization": auth, "Content-Type": "application/json"}, body),
        )

    @settings(
        max_examples=FUZZ_EXAMPLES,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.one_of(api_requests().map(lambda r: ("api", r)), raw_requests().map(lambda r: ("raw", r))))
    @example(chat(HUGE_CONTENT))  # over the body limit: 413
    @example(chat(HUGE_CONTENT, auth="Bearer nope"))  # the key is checked first: 401
    @example(chat(RAW_BODIES[-2]))  # 900 kB of junk in an unknown field: under the limit, ignored
    @example(chat(json.dumps({"messages": HI, "temperature": 1e-40}).encode()))  # overflowed the sampler into NaN
    @example(chat(json.dumps({"messages": HI, "temperature": 10**400}).encode()))  # OverflowError in isfinite
    @example(chat(json.dumps({"messages": HI, "top_p": "p" * 100_000}).encode()))  # echoed 100 kB back
    # uvicorn answers the broken chunk with its own 400; the app's 401 after it raised in h11 (two tracebacks)
    @example(
        (
            "raw",
            (
                b"POST /v1/models/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                b"Connection: close\r\n\r\nzz\r\nabc\r\n",
                True,
            ),
        )
    )
    def hostile(case):
        kind, request = case
        kinds[kind] += 1
        if kind == "api":
            method, path, headers, body = request
            try:
                r = client.request(method, path, content=body, headers=headers)
            except httpx.TransportError as e:  # only an oversized body may be cut off (413 sent, connection closed)
                assert len(body) > BODY_LIMIT, (e, method, path, headers, body[:300])
                stats["closed during upload"] += 1
                return
            stats[r.status_code] += 1
            check_answer(
                r.status_code, r.headers.get("content-type", ""), r.content, (method, path, headers, body[:300])
            )
            if r.status_code < 300 and path.startswith("/v1") and headers.get("Authorization") not in AUTHS[:1]:
                raise AssertionError(
                    f"{method} {path} answered {r.status_code} with a wrong key {headers.get('Authorization')!r}"
                )
        else:
            data, wait = request
            answer = raw_exchange(server.port, data, wait)
            if not wait:
                stats["client left mid-body"] += 1
            elif not answer:
                stats["closed without answer"] += 1
            else:
                status, headers, body = parse_response(answer)
                stats[status] += 1
                check_answer(status, headers.get("content-type", ""), body, data[:300])
        assert server.alive(), f"the server died:\n{server.log()[-3000:]}"

    start = time.monotonic()
    try:
        hostile()
    finally:
        client.close()
        print(
            f"\nfuzz: {sum(kinds.values())} requests ({dict(kinds)}) in {time.monotonic() - start:.1f} s; "
            f"status histogram: {dict(sorted(stats.items(), key=str))}"
        )
    assert sum(kinds.values()) >= 500
    assert not [s for s in stats if isinstance(s, int) and s >= 500]
    assert stats["closed without answer"] == 0
    idle = server.wait_idle(within=10)
    rss_after = rss_mb(server.proc.pid)
    print(f"server RSS {rss_before:.1f} MB before, {rss_after:.1f} MB after (idle after {idle:.2f} s)")
    assert rss_after - rss_before < RSS_GROWTH_LIMIT_MB
    r = httpx.post(
        server.url + "/v1/chat/completions",
        json={"messages": HI, "max_tokens": 5, "n": 2, "temperature": 0},
        headers=AUTH,
        timeout=30,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["finish_reason"] for c in body["choices"]] == ["length", "length"] and body["usage"][
        "completion_tokens"
    ] == 10
    assert server.health()["ready"] is True


# --- slow and vanishing clients ------------------------------------------------------------------


def test_a_streaming_client_that_disconnects_frees_its_slot(server, step_seconds):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        with c.stream("POST", "/v1/chat/completions", json=long_body(stream=True), headers=AUTH) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            next(lines)
            server.wait_generating()
        left = time.monotonic()  # leaving the block closed the connection mid-stream
    freed = server.wait_idle(within=5)
    natural = 4500 * step_seconds
    print(f"\nslot freed {freed:.2f} s after the disconnect; the reply would have taken ~{natural:.1f} s more")
    assert freed < min(2.0, natural / 2), (freed, natural)
    assert time.monotonic() - left < natural  # still within the reply's natural time: it was stopped, not finished


def test_a_non_streaming_client_that_gives_up_frees_its_slot(server, step_seconds):
    with pytest.raises(httpx.ReadTimeout):  # the client stops waiting and closes the connection
        httpx.post(
            server.url + "/v1/chat/completions", json=long_body(), headers=AUTH, timeout=httpx.Timeout(10, read=0.5)
        )
    freed = server.wait_idle(within=5)
    assert freed < min(2.0, 4500 * step_seconds / 2), (freed, step_seconds)


def test_a_client_that_stops_reading_holds_no_one_up_and_is_dropped(server):
    """The engine never waits for a reader: a request behind a stalled stream waits only for its generation.

    The stalled client's chunks pile up in the socket buffers until a send has to wait; `send_timeout` later
    the server drops the client. On Linux loopback the buffers take ~3 MB (tcp_wmem's 4 MB maximum), and
    8 sampled replies of 4,500 tokens make ~5.7 MB of chunks in either precision. (Greedy replies will not do:
    this toy model's greedy text can settle into incomplete UTF-8, which the stream holds back, and in fp32 it sent
    1.1 MB for 3,000 tokens, all of it absorbed by the buffers. That the generation is cancelled when the drop comes
    before it ends is checked in-process below, where "the buffers are full" needs no megabytes.)
    """
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window, never read from
    stalled.connect(("127.0.0.1", server.port))
    body = json.dumps(long_body(stream=True, temperature=1.0, seed=0)).encode()
    stalled.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    try:
        server.wait_generating()
        start, answer = time.monotonic(), {}

        def good_request():
            answer["r"] = httpx.post(
                server.url + "/v1/chat/completions", json={"messages": HI, "max_tokens": 3}, headers=AUTH, timeout=60
            )
            answer["at"] = time.monotonic()

        thread = threading.Thread(target=good_request)
        thread.start()
        queued_until = start  # the last moment the good request was seen waiting (with batching it need not wait)
        while thread.is_alive():
            if server.health()["pending"] == 2:
                queued_until = time.monotonic()
            time.sleep(0.01)
        thread.join()
        assert answer["r"].status_code == 200
        waited, after_turn = answer["at"] - start, answer["at"] - queued_until
        assert after_turn < 1.0, (waited, after_turn)  # answered as soon as the stalled generation was over
        wmem = Path("/proc/sys/net/ipv4/tcp_wmem")
        if not wmem.exists() or int(wmem.read_text().split()[2]) > 4 << 20:
            return  # socket buffers that may hold the whole reply: then nothing ever waits in send
        while "dropped a streaming client that read nothing for 1 s" not in server.log():
            assert time.monotonic() - start < 30, server.log()[-2000:]
            time.sleep(0.05)
        print(
            f"\nbehind a client that stopped reading: waited {waited:.2f} s for its generation, answered "
            f"{after_turn:.2f} s after it; the client was dropped after {time.monotonic() - start:.1f} s"
        )
        server.wait_idle(within=2)
    finally:
        stalled.close()


def test_a_slow_body_gets_408_and_never_holds_a_slot(server):
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {KEY}\r\nContent-Length: 100\r\n".encode()
    )
    for _ in range(3):  # leaves mid-body: answered by nobody, logged as nothing (see the last live test)
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(head + b'\r\n{"messages"')
            time.sleep(0.05)
    slowloris = socket.create_connection(("127.0.0.1", server.port))  # headers that never end
    slowloris.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: 1\r\n")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(head + b'Connection: close\r\n\r\n{"messages"')
        start = time.monotonic()
        for _ in range(4):  # a byte now and then, never the whole body
            time.sleep(0.2)
            assert server.health()["pending"] == 0  # no slot is taken before the body is in
            with contextlib.suppress(OSError):
                s.sendall(b" ")
        answer = b""
        with contextlib.suppress(OSError):
            while chunk := s.recv(65536):
                answer += chunk
        elapsed = time.monotonic() - start
    status, headers, body = parse_response(answer)
    assert status == 408 and json.loads(body)["error"]["message"] == "the request body did not arrive within 1 s"
    assert BODY_TIMEOUT - 0.1 < elapsed < BODY_TIMEOUT + 2
    r = httpx.post(
        server.url + "/v1/chat/completions", json={"messages": HI, "max_tokens": 2}, headers=AUTH, timeout=30
    )
    assert r.status_code == 200  # the half-sent headers above hold a socket, nothing else
    slowloris.close()


def test_concurrent_and_cancelled_requests_leave_nothing_behind(server):
    """Waves of concurrent requests, a third abandoned mid-stream and a third given up on: back to idle, RSS flat."""

    async def one(client, i):
        body = {
            "messages": [{"role": "user", "content": f"Question {i}"}],
            "max_tokens": 100,
            "seed": i,
            "n": 1 + i % 3,
        }
        try:
            if i % 3 == 0:  # streams, and leaves after the first chunk
                async with client.stream(
                    "POST", "/v1/chat/completions", json={**body, "stream": True}, headers=AUTH
                ) as r:
                    async for _ in r.aiter_lines():
                        break
                    return r.status_code
            if i % 3 == 1:  # gives up waiting
                r = await client.post(
                    "/v1/chat/completions", json=body, headers=AUTH, timeout=httpx.Timeout(10, read=0.05)
                )
                return r.status_code
            r = await client.post("/v1/chat/completions", json=body, headers=AUTH)
            return r.status_code
        except httpx.ReadTimeout:
            return "gave up"

    async def wave(n):
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            return await asyncio.gather(*(one(client, i) for i in range(n)))

    rss = []
    outcomes = collections.Counter()
    for _ in range(3):
        outcomes.update(asyncio.run(wave(24)))
        server.wait_idle(within=10)
        rss.append(rss_mb(server.proc.pid))
    print(f"\nconcurrency: {dict(outcomes)}; server RSS after each wave: {[round(x, 1) for x in rss]} MB")
    assert set(outcomes) <= {200, 503, "gave up"} and outcomes[200] > 0  # 503: the queue (9 slots) was full
    assert rss[-1] - rss[0] < 20
    assert server.health()["free"] == 9  # every slot free again


def test_the_server_log_holds_no_traceback(server):
    log = server.log()
    assert server.alive()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-5000:]


# --- in-process: readiness states and KV caches -------------------------------------------------


class GatedModel(torch.nn.Module):
    """The real model, except that each forward waits for `gate` (or fails): while it is closed the worker
    looks stuck."""

    def __init__(self, model, fail: bool = False):
        super().__init__()
        self.model, self.fail, self.gate = model, fail, threading.Event()
        self.config, self.rotary_len = model.config, model.rotary_len

    def forward(self, *args, **kwargs):
        if self.fail:
            raise RuntimeError("CUDA out of memory (pretend)")
        assert self.gate.wait(20)
        return self.model(*args, **kwargs)


def gated_engine(engine, fail: bool = False):
    from nanochat.engine.engine import Engine

    model = GatedModel(engine.model, fail)
    return Engine(model, engine.tokenizer, use_tools=engine.use_tools, dtype=engine.dtype), model


def test_a_stream_whose_sends_stall_is_abandoned_and_its_generation_cancelled(engine, tok):
    from nanochat.serving.api import EventStream
    from nanochat.serving.generation import GenerationQueue
    from nanochat.serving.limits import validate_chat

    async def scenario():
        queue = GenerationQueue(engine, tok)
        job = queue.submit(validate_chat(HI, 0.0, None, 4500, tokenizer=tok, max_context=engine.max_context))

        async def chunks():  # what ChatCompletions._sse does with a job, minus the OpenAI shapes
            try:
                async for event in job.events():
                    yield f"data: {event}\n\n"
            finally:
                job.cancel()

        sent = []

        async def send(message):  # after a few chunks the client's buffers are full: a send never completes
            sent.append(message)
            if len(sent) > 5:
                await asyncio.sleep(3600)

        async def receive():  # and the client never disconnects either
            await asyncio.sleep(3600)

        start = time.monotonic()
        await EventStream(chunks(), send_timeout=0.3)({"type": "http", "asgi": {"spec_version": "2.3"}}, receive, send)
        abandoned = time.monotonic() - start
        while queue.pending or queue.generating:
            await asyncio.sleep(0.01)
        queue.shutdown()
        return abandoned, time.monotonic() - start

    abandoned, idle = asyncio.run(scenario())
    assert 0.3 <= abandoned < 1.0 and idle < abandoned + 0.5  # 4,500 steps would take ~5 s


def test_health_is_503_with_a_reason_until_ready_and_when_stuck_or_stopped(engine, tok):
    from fastapi.testclient import TestClient

    from nanochat.serving.api import create_app

    gated_eng, gated = gated_engine(engine)
    app = create_app(gated_eng, tok, "gated", limits=ServerLimits(stall_timeout=0.3))
    with TestClient(app) as c:
        time.sleep(0.4)  # longer than stall_timeout: still "warming up", which comes first
        r = c.get("/health")
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert (
            r.json()["ready"] is False
            and r.json()["reason"] == "the engine is warming up: its first generation has not finished"
        )
        gated.gate.set()
        deadline = time.monotonic() + 10
        while c.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        gated.gate.clear()  # the next generation hangs in its prefill
        answer = {}
        thread = threading.Thread(
            target=lambda: answer.update(r=c.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 3}))
        )
        thread.start()
        time.sleep(0.8)
        r = c.get("/health")
        assert r.status_code == 503 and r.json()["reason"].startswith("the generation worker has made no progress for ")
        assert r.json()["generating"] == 1 and r.json()["pending"] == 1
        gated.gate.set()
        thread.join(10)
        assert answer["r"].status_code == 200 and c.get("/health").status_code == 200
        app.state.queue.shutdown()
        r = c.get("/health")
        assert r.status_code == 503 and r.json()["reason"] == "the generation worker is shut down"

    with TestClient(create_app(gated_engine(engine, fail=True)[0], tok, "broken")) as c:
        deadline = time.monotonic() + 10
        while "failed" not in (reason := c.get("/health").json().get("reason", "")):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert reason == "the engine failed its warm-up generation (RuntimeError); see the server log"
        assert c.get("/health").status_code == 503


def test_cancelled_and_finished_jobs_leave_no_kv_cache(engine, tok):
    from nanochat.engine.kv_cache import KVCache
    from nanochat.serving.generation import GenerationQueue
    from nanochat.serving.limits import validate_chat

    def live_caches() -> int:
        gc.collect()
        return sum(type(o) is KVCache for o in gc.get_objects())

    async def scenario():
        queue = GenerationQueue(engine, tok, max_waiting=40)
        jobs = [
            queue.submit(validate_chat(HI, 0.0, None, 100, 1 + i % 4, tokenizer=tok, max_context=engine.max_context))
            for i in range(24)
        ]
        for i, job in enumerate(jobs):
            if i % 3 == 0:
                job.cancel()  # gone before its turn
            elif i % 3 == 1:
                async for _ in job.events():  # leaves after the first event
                    break
        for job in jobs[2::3]:
            assert [e async for e in job.events()][-1].reason == "length"  # runs to the end
        deadline = time.monotonic() + 20
        while queue.pending or queue.generating:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        queue.shutdown()

    before = live_caches()
    asyncio.run(scenario())
    assert live_caches() == before == 0
