"""The downloader against a real HTTP server on 127.0.0.1 that can fail, cut responses short or ignore Range."""

import io
import re
import threading
import urllib.request
import zipfile
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from nanochat.data.__main__ import main
from nanochat.data.download import SOURCES, download
from nanochat.data.shards import check_shard, shard_name, write_shard
from nanochat.errors import UserError
from nanochat.paths import base_dir

N_SERVED = 5


class ShardServer:
    """Serves `files` by name; tests steer it through the dictionaries below (guarded by one lock)."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.fail: dict[str, int] = {}  # name -> how many more requests get HTTP 500
        self.cut: dict[str, int] = {}  # name -> the next response stops after this many body bytes
        self.serve_once: dict[str, bytes] = {}  # name -> a wrong body sent once
        self.ignore_range = False
        self.requests: list[tuple[str, str | None]] = []  # (name, Range header)
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/shards"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def ranges(self, name: str) -> list[str | None]:
        return [r for n, r in self.requests if n == name]

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                rng = self.headers.get("Range")
                with server.lock:
                    server.requests.append((name, rng))
                    failing = server.fail.get(name, 0) > 0
                    if failing:
                        server.fail[name] -= 1
                    cut = server.cut.pop(name, None)
                    body = server.serve_once.pop(name, None) or server.files.get(name)
                if body is None:
                    return self.send_error(404)
                if failing:
                    return self.send_error(500)
                status, start = 200, 0
                if rng and not server.ignore_range:
                    start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
                    if start >= len(body):
                        return self.send_error(416)
                    status = 206
                self.send_response(status)
                self.send_header("Content-Length", str(len(body) - start))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.end_headers()
                # HTTP/1.0: the connection closes after this handler, so a cut body ends early at the client.
                self.wfile.write(body[start:] if cut is None else body[start : start + cut])

        return Handler


def make_shard_bytes(tmp: Path, i: int) -> bytes:
    path = tmp / f"src_{i}.parquet"
    write_shard(path, [f"shard {i} document {j}: " + "lorem ipsum " * (j % 17) for j in range(400)])
    return path.read_bytes()


@pytest.fixture(scope="module")
def shard_bytes(tmp_path_factory) -> dict[str, bytes]:
    tmp = tmp_path_factory.mktemp("served")
    return {shard_name(i): make_shard_bytes(tmp, i) for i in range(N_SERVED)}


@pytest.fixture
def server(shard_bytes, monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)  # a CI proxy must not intercept 127.0.0.1
    srv = ShardServer(shard_bytes)
    srv.thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


@pytest.fixture
def sleeps() -> list[float]:
    return []


def fetch(server, out, n, sleeps, **kw):
    kw.setdefault("workers", 2)
    return download(
        "fineweb-edu", n, out, base_url=server.url, sleep=sleeps.append, show_progress=False, timeout=10, **kw
    )


def assert_identical(out: Path, shard_bytes, n: int):
    assert sorted(p.name for p in out.iterdir()) == [shard_name(i) for i in range(n)]  # no .part left
    for i in range(n):
        assert (out / shard_name(i)).read_bytes() == shard_bytes[shard_name(i)]


def test_full_download(server, shard_bytes, sleeps, tmp_path):
    out = tmp_path / "dl"
    paths = fetch(server, out, 3, sleeps)
    assert paths == [out / shard_name(i) for i in range(3)]
    assert_identical(out, shard_bytes, 3)
    assert Counter(n for n, _ in server.requests) == {shard_name(i): 1 for i in range(3)}
    assert all(r is None for _, r in server.requests) and sleeps == []
    assert [check_shard(p) for p in paths] == [400, 400, 400]


def test_rerun_skips_existing(server, shard_bytes, sleeps, tmp_path):
    out = tmp_path / "dl"
    fetch(server, out, 2, sleeps)
    assert len(server.requests) == 2
    assert fetch(server, out, 2, sleeps) == [out / shard_name(0), out / shard_name(1)]
    assert len(server.requests) == 2  # nothing fetched again
    fetch(server, out, 4, sleeps)
    assert sorted(n for n, _ in server.requests[2:]) == [shard_name(2), shard_name(3)]
    assert_identical(out, shard_bytes, 4)


def test_retries_with_exponential_backoff(server, shard_bytes, sleeps, tmp_path):
    out = tmp_path / "dl"
    name = shard_name(1)
    server.fail[name] = 2
    fetch(server, out, 3, sleeps, backoff=3.0)
    assert sleeps == [3.0, 9.0]
    assert len(server.ranges(name)) == 3 and len(server.ranges(shard_name(0))) == 1
    assert_identical(out, shard_bytes, 3)


def test_resumes_a_part_file_with_range(server, shard_bytes, sleeps, tmp_path):
    out = tmp_path / "dl"
    out.mkdir()
    name = shard_name(2)
    half = len(shard_bytes[name]) // 2
    (out / f"{name}.part").write_bytes(shard_bytes[name][:half])
    fetch(server, out, 3, sleeps)
    assert server.ranges(name) == [f"bytes={half}-"]
    assert_identical(out, shard_bytes, 3)


def test_finished_part_file_is_only_renamed(server, shard_bytes, sleeps, tmp_path):
    out = tmp_path / "dl"
    out.mkdir()
    (out / f"{shard_name(0)}.part").write_bytes(shard_bytes[shard_name(0)])
    fetch(server, out, 1, sleeps)
    assert server.requests == []
    assert_identical(out, shard_bytes, 1)


def test_part_longer_than_the_file_starts_over(server, shard_bytes, sleeps, tmp_path):
    out = tmp_path / "dl"
    out.mkdir()
    name = shard_name(0)
    size = len(shard_bytes[name])
    (out / f"{name}.part").write_bytes(b"y" * (size + 5))  # e.g. left by a different upload of the file
    fetch(server, out, 1, sleeps)
    assert server.ranges(name) == [f"bytes={size + 5}-", None]  # HTTP 416, then a fresh download
    assert_identical(out, shard_bytes, 1)


def test_cut_response_resumes_within_the_same_run(server, shard_bytes, sleeps, tmp_path):
    out = tmp_path / "dl"
    name = shard_name(0)
    server.cut[name] = 1000
    fetch(server, out, 1, sleeps)
    assert server.ranges(name) == [None, "bytes=1000-"]
    assert sleeps == [2.0]
    assert_identical(out, shard_bytes, 1)


def test_full_answer_to_a_range_request_replaces_the_part(server, shard_bytes, sleeps, tmp_path):
    out = tmp_path / "dl"
    out.mkdir()
    name = shard_name(0)
    (out / f"{name}.part").write_bytes(b"x" * 777)  # would corrupt the file if the 200 body were appended
    server.ignore_range = True
    fetch(server, out, 1, sleeps)
    assert server.ranges(name) == ["bytes=777-"]
    assert_identical(out, shard_bytes, 1)


def test_corrupt_transfer_restarts_from_scratch(server, shard_bytes, sleeps, tmp_path):
    out = tmp_path / "dl"
    name = shard_name(1)
    server.serve_once[name] = b"<html>rate limited</html>"
    fetch(server, out, 2, sleeps)
    assert server.ranges(name) == [None, None]  # the bad body was discarded, not resumed
    assert sleeps == [2.0]
    assert_identical(out, shard_bytes, 2)


def test_corrupt_existing_shard_is_downloaded_again(server, shard_bytes, sleeps, tmp_path):
    out = tmp_path / "dl"
    out.mkdir()
    (out / shard_name(0)).write_bytes(shard_bytes[shard_name(0)][:-100])  # truncated footer
    (out / shard_name(1)).write_bytes(shard_bytes[shard_name(1)])
    fetch(server, out, 2, sleeps)
    assert [n for n, _ in server.requests] == [shard_name(0)]
    assert_identical(out, shard_bytes, 2)


def test_permanent_failure_keeps_the_other_shards(server, shard_bytes, sleeps, tmp_path):
    out = tmp_path / "dl"
    out.mkdir()
    bad = shard_name(1)
    (out / bad).write_bytes(b"corrupt leftover")
    server.fail[bad] = 100
    with pytest.raises(UserError, match=bad) as err:
        fetch(server, out, 3, sleeps, attempts=3)
    assert "HTTP 500" in str(err.value) and str(out) in str(err.value)
    assert sleeps == [2.0, 4.0] and len(server.ranges(bad)) == 3
    assert sorted(p.name for p in out.iterdir()) == [shard_name(0), shard_name(2)]
    for i in (0, 2):
        assert (out / shard_name(i)).read_bytes() == shard_bytes[shard_name(i)]


def test_missing_file_is_not_retried(server, shard_bytes, sleeps, tmp_path):
    out = tmp_path / "dl"
    missing = shard_name(N_SERVED)
    with pytest.raises(UserError, match=missing) as err:
        fetch(server, out, N_SERVED + 1, sleeps)
    assert "404" in str(err.value) and f"1 of {N_SERVED + 1}" in str(err.value)
    assert len(server.ranges(missing)) == 1 and sleeps == []
    assert_identical(out, shard_bytes, N_SERVED)


def test_default_directory_and_injected_opener(server, shard_bytes, sleeps):
    seen = []
    real = urllib.request.build_opener()

    class CountingOpener:
        def open(self, request, timeout=None):
            seen.append(request.full_url)
            return real.open(request, timeout=timeout)

    paths = fetch(server, None, 2, sleeps, opener=CountingOpener())
    out = base_dir() / "data" / SOURCES["fineweb-edu"].dirname
    assert paths == [out / shard_name(0), out / shard_name(1)]
    assert sorted(seen) == [f"{server.url}/{shard_name(i)}" for i in range(2)]
    assert_identical(out, shard_bytes, 2)


def test_argument_errors(tmp_path):
    with pytest.raises(UserError, match="fineweb-edu") as err:
        download("fineweb", 1, tmp_path)
    assert "unknown data source 'fineweb'" in str(err.value)
    with pytest.raises(UserError, match="1823 shards but 1824"):
        download("fineweb-edu", 1824, tmp_path)
    with pytest.raises(UserError, match="positive"):
        download("fineweb-edu", 0, tmp_path)
    with pytest.raises(UserError, match="workers"):
        download("fineweb-edu", 1, tmp_path, workers=0)
    assert list(tmp_path.iterdir()) == []


def test_cli_download(server, shard_bytes, tmp_path, capsys):
    out = tmp_path / "cli"
    main(["download", "fineweb-edu", "-n", "2", "--out", str(out), "--base-url", server.url, "--quiet"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("2 fineweb-edu shards") and str(out) in lines[0]
    assert_identical(out, shard_bytes, 2)

    with pytest.raises(SystemExit) as exc:
        main(["download", "nope", "-n", "1", "--out", str(out), "--quiet"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown data source 'nope'")


def test_fetch_single_files_resumes_and_checks_text(server, sleeps, tmp_path, capsys):
    from nanochat.data.download import download_file

    body = ('[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "I am nanochat."}]\n' * 200).encode()
    server.files["identity_conversations.jsonl"] = body
    server.cut["identity_conversations.jsonl"] = 1000  # the first response stops short: the next one resumes
    url = f"{server.url}/identity_conversations.jsonl"
    path = download_file("identity", tmp_path, url=url, sleep=sleeps.append, timeout=10)
    assert path == tmp_path / "identity_conversations.jsonl" and path.read_bytes() == body
    assert server.ranges("identity_conversations.jsonl") == [None, "bytes=1000-"]
    assert download_file("identity", tmp_path, url=url) == path  # present: no request
    assert len(server.ranges("identity_conversations.jsonl")) == 2

    server.files["words_alpha.txt"] = b"\xff\xfe not utf-8"  # a corrupt body fails its check on every attempt
    with pytest.raises(UserError, match="could not download words"):
        download_file(
            "words", tmp_path, url=f"{server.url}/words_alpha.txt", sleep=sleeps.append, attempts=2, timeout=10
        )
    assert not (tmp_path / "words_alpha.txt").exists()

    server.files["words_alpha.txt"] = b"apple\nbanana\n"
    main(["fetch", "words", "--out", str(tmp_path), "--url", f"{server.url}/words_alpha.txt"])
    assert capsys.readouterr().out.startswith(f"words: {tmp_path / 'words_alpha.txt'}")
    with pytest.raises(SystemExit):
        main(["fetch", "wordz", "--out", str(tmp_path)])
    assert "unknown file 'wordz'; known files: eval_bundle, identity, words" in capsys.readouterr().err


BUNDLE = {
    "core.yaml": b"icl_tasks:\n- label: t\n  dataset_uri: x/t.jsonl\n",
    "eval_meta_data.csv": b"Eval Task,Random baseline\nt,25.0\n",
    "eval_data/x/t.jsonl": b"".join(b'{"query": "q%d", "choices": ["a", "b"], "gold": 0}\n' % i for i in range(100)),
}


def make_zip(members: dict[str, bytes], prefix: str = "eval_bundle/") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:  # stored: the member bytes sit verbatim in the zip
        if prefix:
            zf.writestr(prefix, b"")  # the directory entry, as `zip -r` writes it
        for name, data in members.items():
            zf.writestr(prefix + name, data)
    return buf.getvalue()


def assert_bundle(path: Path):
    found = {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    assert found == BUNDLE


def test_eval_bundle_resumes_unpacks_and_is_not_fetched_twice(server, sleeps, tmp_path):
    from nanochat.data.download import ensure_eval_bundle

    body = make_zip(BUNDLE)
    assert len(body) > 3000
    server.files["eval_bundle.zip"] = body
    server.cut["eval_bundle.zip"] = 1500  # the first response stops short: the next one resumes
    url = f"{server.url}/eval_bundle.zip"
    out = tmp_path / "home"
    (out / "eval_bundle").mkdir(parents=True)
    (out / "eval_bundle" / "core.yaml").write_bytes(b"stale")  # an incomplete leftover is replaced

    path = ensure_eval_bundle(out, url=url, sleep=sleeps.append, timeout=10)
    assert path == out / "eval_bundle"
    assert_bundle(path)  # core.yaml directly inside, not under eval_bundle/eval_bundle/
    assert server.ranges("eval_bundle.zip") == [None, "bytes=1500-"] and sleeps == [2.0]
    assert sorted(p.name for p in out.iterdir()) == ["eval_bundle"]  # no zip, .part or staging dir left

    assert ensure_eval_bundle(out, url=url) == path  # complete: no request
    assert len(server.requests) == 2
    assert_bundle(path)


def test_eval_bundle_corrupt_zip_is_fetched_again(server, sleeps, tmp_path):
    from nanochat.data.download import download_file

    body = make_zip(BUNDLE, prefix="")  # files at the zip's root work too
    data_at = body.index(BUNDLE["eval_data/x/t.jsonl"])
    corrupt = bytearray(body)
    corrupt[data_at + 10] ^= 0xFF  # still a zip (central directory intact) but the member's CRC is wrong
    assert zipfile.is_zipfile(io.BytesIO(bytes(corrupt)))
    server.files["eval_bundle.zip"] = body
    server.serve_once["eval_bundle.zip"] = bytes(corrupt)
    path = download_file("eval_bundle", tmp_path, url=f"{server.url}/eval_bundle.zip", sleep=sleeps.append, timeout=10)
    assert server.ranges("eval_bundle.zip") == [None, None]  # the bad body was discarded, not resumed
    assert sleeps == [2.0]
    assert_bundle(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval_bundle"]

    server.files["bad.zip"] = b"<html>rate limited</html>"  # never a zip: fails after the attempts
    with pytest.raises(UserError, match="could not download eval_bundle") as err:
        download_file(
            "eval_bundle", tmp_path / "other", url=f"{server.url}/bad.zip", sleep=sleeps.append, attempts=2, timeout=10
        )
    assert "zip" in str(err.value) and "after 2 attempts" in str(err.value)
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == []


def test_eval_bundle_without_core_yaml_names_what_is_missing(server, sleeps, tmp_path):
    from nanochat.data.download import ensure_eval_bundle

    server.files["partial.zip"] = make_zip({k: v for k, v in BUNDLE.items() if k != "core.yaml"})
    url = f"{server.url}/partial.zip"
    with pytest.raises(UserError) as err:
        ensure_eval_bundle(tmp_path, url=url, sleep=sleeps.append, timeout=10)
    msg = str(err.value)
    assert url in msg and "has no core.yaml at its root" in msg
    assert "eval_data" not in msg and "eval_meta_data.csv" not in msg
    assert list(tmp_path.iterdir()) == []  # no bundle, no zip, no staging dir


def test_eval_bundle_refuses_zip_slip(server, sleeps, tmp_path):
    from nanochat.data.download import ensure_eval_bundle

    out = tmp_path / "home"
    for evil in ("eval_bundle/../../escaped.txt", "/tmp/escaped_abs.txt"):
        members = dict(BUNDLE)
        members[evil] = b"pwned"
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for name, data in members.items():
                zf.writestr(zipfile.ZipInfo(name), data)  # ZipInfo keeps the name verbatim
        assert evil in zipfile.ZipFile(io.BytesIO(buf.getvalue())).namelist()
        server.files["evil.zip"] = buf.getvalue()
        url = f"{server.url}/evil.zip"
        with pytest.raises(UserError, match="unsafe member path") as err:
            ensure_eval_bundle(out, url=url, sleep=sleeps.append, timeout=10)
        assert url in str(err.value) and repr(evil) in str(err.value)
        assert list(out.iterdir()) == []  # nothing extracted, the zip deleted
    assert not (tmp_path / "escaped.txt").exists() and not Path("/tmp/escaped_abs.txt").exists()


def test_cli_fetch_eval_bundle_default_home(server, tmp_path, capsys):
    server.files["eval_bundle.zip"] = make_zip(BUNDLE)
    main(["fetch", "eval_bundle", "--url", f"{server.url}/eval_bundle.zip"])
    path = base_dir() / "eval_bundle"
    assert_bundle(path)
    size = sum(len(v) for v in BUNDLE.values())
    assert capsys.readouterr().out.strip() == f"eval_bundle: {path} (3 files, {size:,} bytes)"


# --- ClimbMix: the same download path, plus its fixed validation shard --------------------------------------------
VAL = shard_name(6542)


def test_climbmix_fetches_training_shards_and_its_validation_shard(server, shard_bytes, sleeps, tmp_path):
    from nanochat.data.shards import list_shards, split_shards

    server.files = {**shard_bytes, VAL: shard_bytes[shard_name(4)]}
    server.fail[VAL] = 2  # retried with backoff
    server.cut[shard_name(1)] = 1000  # a dropped connection: the same run resumes it with a Range request
    out = tmp_path / "climbmix"
    paths = download(
        "climbmix", 2, out, base_url=server.url, sleep=sleeps.append, show_progress=False, timeout=10, workers=1
    )
    assert paths == [out / shard_name(0), out / shard_name(1), out / VAL]
    assert sorted(p.name for p in out.iterdir()) == [shard_name(0), shard_name(1), VAL]  # no .part left
    for p in paths:
        assert p.read_bytes() == server.files[p.name]
    assert server.ranges(shard_name(1)) == [None, "bytes=1000-"]
    assert len(server.ranges(VAL)) == 3 and sorted(sleeps) == [2.0, 2.0, 4.0]
    train, val = split_shards(list_shards(out))
    assert val == [out / VAL] and train == paths[:2]  # validation is shard_06542, as nanochat's
    assert download("climbmix", 2, out, base_url=server.url, show_progress=False) == paths  # verified, not refetched
    assert len(server.requests) == 1 + 2 + 3  # shard 0 once, shard 1 twice (resumed), the validation shard 3 times


def test_climbmix_source_and_limits(tmp_path):
    assert SOURCES["climbmix"].base_url == "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
    with pytest.raises(
        UserError,
        match=r"climbmix publishes 6542 training shards \(and one validation shard\) "
        r"but 6543",
    ):
        download("climbmix", 6543, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_data_climbmix_config_reads_the_download_directory():
    from nanochat.configs import compose

    cfg = compose(["stage=base", "data=climbmix"])
    assert cfg.datamodule.dir == str(base_dir() / "data" / SOURCES["climbmix"].dirname)
    assert cfg.data.download == "climbmix"
