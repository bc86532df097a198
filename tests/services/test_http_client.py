"""The service client against real servers on loopback: no credentials follow a redirect, a dribbling server cannot
outlast the deadline, a huge reply is capped, every malformed reply ends as the judge's own one-line error, and a
service that goes down is waited for or given up on as its outage policy says."""

import json
import logging
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import Restartable, Server

from opd.cli import main
from opd.services.http import JSONClient, OutagePolicy, ServiceError, ServiceOutage
from opd.tasks.arithmetic import make_example
from opd.teachers.judges import HTTPJudge, JudgeError

GOOD = json.dumps({"choices": [{"message": {"content": "Score: 7"}}]}).encode()


def reply(handler, body: bytes, status=200, headers=()):
    handler.send_response(status)
    for key, value in headers:
        handler.send_header(key, value)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def test_a_redirect_to_another_host_sends_it_nothing(monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "sk-secret")
    with Server(lambda h: reply(h, GOOD), host="127.0.0.2") as elsewhere:
        with Server(lambda h: reply(h, b"", 302, [("Location", elsewhere.url)])) as judge_server:
            judge = HTTPJudge(judge_server.url, "m", api_key_env="JUDGE_KEY", deadline=2, retries=2, backoff=0)
            with pytest.raises(JudgeError, match=f"redirected to {elsewhere.url}; redirects are not followed"):
                judge.score([make_example(1, 2)], ["x"])
        assert elsewhere.requests == []  # neither the key nor the request went there
        assert len(judge_server.requests) == 1  # not retried: a redirect will not go away
        assert judge_server.requests[0][1]["Authorization"] == "Bearer sk-secret"


def test_no_key_over_plain_http_except_to_loopback(monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "sk-secret")
    with pytest.raises(JudgeError, match="refusing to send an API key over plain http:// to judge.example.com"):
        HTTPJudge("http://judge.example.com", "m", api_key_env="JUDGE_KEY")
    HTTPJudge("https://judge.example.com", "m", api_key_env="JUDGE_KEY")  # https: fine (nothing is sent here)
    HTTPJudge("http://localhost:8000", "m", api_key_env="JUDGE_KEY")
    with pytest.raises(ServiceError, match="not in the URL"):
        JSONClient("https://user:pw@judge.example.com/v1")


def dribble(handler):
    handler.send_response(200)
    handler.send_header("Content-Length", "1000")
    handler.end_headers()
    for _ in range(100):  # at most 20 s, but the client hangs up long before
        handler.wfile.write(b" ")
        handler.wfile.flush()
        time.sleep(0.2)


def test_a_dribbling_server_cannot_outlast_the_deadline():
    with Server(dribble) as server:
        client = JSONClient(server.url, deadline=1.0, retries=0)
        started = time.monotonic()
        with pytest.raises(ServiceError, match="no complete reply within the 1 s deadline"):
            client.post({"x": 1})
        assert time.monotonic() - started < 2.0


def test_a_huge_reply_is_capped():
    huge = b"[" + b"0," * 4_000_000 + b"0]"  # 8 MB of valid JSON
    with Server(lambda h: reply(h, huge)) as server:
        with pytest.raises(ServiceError, match="larger than 65536 bytes"):
            JSONClient(server.url, deadline=5, retries=0, max_reply_bytes=65536).post({})


def truncated(handler):
    handler.send_response(200)
    handler.send_header("Content-Length", "500")
    handler.end_headers()
    handler.wfile.write(GOOD[:20])
    handler.wfile.flush()
    handler.connection.shutdown(socket.SHUT_RDWR)


@pytest.mark.parametrize(
    "respond, problem, error",
    [
        (truncated, "request failed", ServiceError),  # no reply at all: the service's error (the loop's stop)
        (lambda h: reply(h, b"\xff\xfe\x00garbage"), "the reply is not UTF-8", JudgeError),
        (lambda h: reply(h, b"<html>busy</html>"), "the reply is not JSON", JudgeError),
        (lambda h: reply(h, json.dumps({"choices": [{"message": {"content": 7}}]}).encode()), "not an OpenAI chat completion", JudgeError),
        (lambda h: reply(h, json.dumps([1, 2]).encode()), "not an OpenAI chat completion", JudgeError),
        (lambda h: reply(h, b"{}", 503), "HTTP 503", ServiceError),
    ],
    ids=["truncated", "not_utf8", "not_json", "content_is_a_number", "a_list", "http_503"],
)
def test_every_malformed_reply_is_retried_then_one_error(respond, problem, error):
    with Server(respond) as server:
        judge = HTTPJudge(server.url, "m", deadline=2, retries=1, backoff=0)
        with pytest.raises(error, match=f"gave no score after 2 attempts: .*{problem}") as raised:
            judge.score([make_example(1, 2)], ["x"])
        assert len(server.requests) == 2
    assert raised.value.__class__ is error  # a judge that answered wrongly is the judge's error, one that did not answer the service's


def test_a_judge_that_never_scores_stops_the_run_with_one_line(tmp_path, tiny_models, capsys):
    with Server(lambda h: reply(h, b"not json")) as server:
        cfg_args = [
            f"run.output_dir={tmp_path / 'run'}", f"student.path={tiny_models[1]}", f"teacher.path={tiny_models[0]}",
            "method.name=ovd", "method.ovd.judge=http", f"method.ovd.http.url={server.url}", "method.ovd.http.retries=0",
            "method.ovd.http.deadline=2", "train.steps=1", "train.prompts_per_step=2", "sampling.max_new_tokens=8",
            "eval.num_prompts=2", "eval.teacher=false", "log.progress_bar=false", "log.tensorboard=false", "log.plot=false",
        ]
        config = tmp_path / "ovd.yaml"
        config.write_text("run: {name: ovd}\n")
        assert main(["train", str(config), *cfg_args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("opd: error: judge at ") and "the reply is not JSON" in err[0]


# ----------------------------------------------------------------------------- outages (docs/cluster.md)


def counting(path, request):
    return {"echo": request}


def outage_client(server, action: str, seconds: float = 30.0) -> JSONClient:
    return JSONClient(server.base + "/x", deadline=2, retries=0, backoff=0.05, outage=OutagePolicy("x.url", "x.", action, seconds))


def test_a_service_that_answered_is_waited_for_through_its_outage(caplog):
    with Restartable(counting) as server:
        client = outage_client(server, "wait")
        assert client.post(1) == {"echo": 1}
        server.outage(lambda: True, seconds=1.0)
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="opd.services.http"):
            with ThreadPoolExecutor(4) as pool:  # a served teacher's concurrent requests share one outage
                replies = list(pool.map(client.post, [2, 3, 4, 5]))
        assert replies == [{"echo": n} for n in (2, 3, 4, 5)] and time.monotonic() - started >= 1.0
    assert server.outages == 1
    assert caplog.text.count("does not answer") == 1 and caplog.text.count("answers again, after") == 1
    assert "waiting up to 30 s for it (x.outage_seconds), the step paused" in caplog.text


def test_stop_gives_up_at_once_naming_the_service_and_its_policy():
    with Restartable(counting) as server:
        client = outage_client(server, "stop")
        client.post(1)
        server.outage(lambda: True, seconds=None)
        started = time.monotonic()
        with pytest.raises(ServiceOutage, match=rf"^an outage of x.url \({server.base}/x\): no reply \(x.outage=stop\); last error: request failed"):
            client.post(2)
        assert time.monotonic() - started < 1.0


def test_a_wait_ends_after_outage_seconds():
    with Restartable(counting) as server:
        client = outage_client(server, "wait", seconds=1.0)
        client.post(1)
        server.outage(lambda: True, seconds=None)
        started = time.monotonic()
        with pytest.raises(ServiceOutage, match=r"no reply for 1 s \(x.outage_seconds=1\); last error: request failed \(ConnectError"):
            client.post(2)
        assert 1.0 <= time.monotonic() - started < 3.0


def test_a_service_that_never_answered_is_a_mistake_not_an_outage():
    server = Restartable(counting).start()
    server.stop()  # nothing listens there any more
    with pytest.raises(ServiceError, match=r"^x.url \(.*\): no usable reply after 1 attempts: request failed") as raised:
        outage_client(server, "wait").post(1)
    assert type(raised.value) is ServiceError and raised.value.unavailable
