"""One JSON-over-HTTP client for the services a run talks to (a verbal judge, a served teacher).

What it guarantees, whatever the server does:

- a **total deadline per request** — connecting, sending and every byte of the reply — not a
  per-read timeout, so a server that dribbles one byte at a time cannot hang a run;
- **bounded retries** with exponential backoff for transient failures (connection errors,
  timeouts, HTTP 5xx/429, replies that are truncated, not UTF-8 or not JSON);
- **capped replies** (``max_reply_bytes``): a huge body is cut off and is an error, never
  read into memory;
- **credentials only for the configured host**: redirects are never followed (a redirect is
  an error naming its target), proxies and ``.netrc`` from the environment are ignored, and
  an API key is refused over plain ``http://`` except to a loopback address.

Every failure ends as one ``ServiceError`` whose message says what went wrong.

A service that has answered before and then stops answering (connections refused, timeouts, HTTP 5xx) is in an
*outage*; its ``OutagePolicy`` (docs/cluster.md) says what the request does once its retries are spent: ``wait`` —
keep trying, every few seconds, until the service answers again or ``seconds`` have passed since the outage began —
or ``stop`` at once. Either way a request that gives up raises ``ServiceOutage``, which the training loop turns into
a resumable stop at the step boundary. A service that never answered is a configuration mistake, not an outage: its
failure is an ordinary ``ServiceError`` after the retries.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal
from urllib.parse import urlsplit

import httpx2

log = logging.getLogger(__name__)

WAIT_POLL_S = 5.0  # during an outage under ``wait``, the longest pause between two attempts
WAIT_REPORT_S = 30.0  # and how often the wait is reported


class ServiceError(RuntimeError):
    """A remote service that cannot be used or gave no usable reply; the message says which and why.
    ``transient``: another attempt may succeed (a timeout, a 5xx, a truncated or malformed reply);
    ``unavailable``: the service did not answer at all (refused or dropped connections, timeouts, HTTP 5xx / 408 /
    429), as against answering something unusable; ``problem``: set when every attempt failed, the last attempt's
    failure."""

    def __init__(self, message: str, transient: bool = False, problem: str | None = None, unavailable: bool = False):
        super().__init__(message)
        self.transient, self.problem, self.unavailable = transient, problem, unavailable

    def __reduce__(self):  # keeps its attributes across ranks (``parallel.ranks`` passes errors as pickles)
        return (type(self), (str(self), self.transient, self.problem, self.unavailable))


@dataclass(frozen=True)
class OutagePolicy:
    """What a request does when a service that answered before stops answering: ``wait`` up to ``seconds`` for it to
    come back, or ``stop`` at once. ``service``: the config key that names the service; ``keys``: the prefix of its
    policy's keys (``<keys>outage``, ``<keys>outage_seconds``), for messages."""

    service: str
    keys: str
    action: Literal["wait", "stop"] = "wait"
    seconds: float = 600.0

    def gives_up(self, url: str, problem: str, waited_s: float) -> ServiceOutage:
        if self.action == "wait":
            waited = f" for {waited_s:.0f} s ({self.keys}outage_seconds={self.seconds:g})"
        else:
            waited = f" ({self.keys}outage=stop)" if self.keys else ""
        return ServiceOutage(f"an outage of {self.service} ({url}): no reply{waited}; last error: {problem}", self.service, url, problem)


class ServiceOutage(ServiceError):
    """A service that had answered stopped answering, and its ``OutagePolicy`` gave up on it (at once, or after
    waiting): the run stops at the step boundary with a checkpoint, resumable once the service is back."""

    def __init__(self, message: str, service: str, url: str, problem: str):
        super().__init__(message, transient=False, problem=problem, unavailable=True)
        self.service, self.url = service, url

    def __reduce__(self):
        return (ServiceOutage, (str(self), self.service, self.url, self.problem))


def _retry(message: str, unavailable: bool = False) -> ServiceError:
    return ServiceError(message, transient=True, unavailable=unavailable)


class _Outage:
    """One client's outage as its threads see it: when it began and when it was last reported (one report for all)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.began: float | None = None
        self.reported = 0.0
        self.ended = float("-inf")  # when a reply last ended an outage

    def enter(self, began: float, attempted: float | None = None) -> float | None:
        """The outage's start (``began`` if none is under way). An attempt made before another thread's reply ended the
        last outage (``attempted``) starts no new one: None, and it asks again at once."""
        with self.lock:
            if attempted is not None and attempted <= self.ended:
                return None
            if self.began is None:
                self.began = began
            return self.began

    def report_due(self, now: float) -> bool:
        with self.lock:
            if now - self.reported < WAIT_REPORT_S:
                return False
            self.reported = now
            return True

    def leave(self, sent: float) -> float | None:
        """A reply to a request sent at ``sent`` came: the outage is over, unless that request was sent before the
        outage began (it was in flight; its reply says nothing of the service now). How long the outage lasted
        (None when there was none, or another thread already said so)."""
        now = time.monotonic()
        with self.lock:
            if self.began is not None and sent < self.began:
                return None
            began, self.began, self.reported = self.began, None, 0.0
            self.ended = now
        return None if began is None else now - began


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_url(url: str, with_credentials: bool) -> None:
    """Refuse a URL that is not http(s), or that would carry credentials in the clear to another machine."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ServiceError(f"'{url}' is not an http:// or https:// URL")
    if parts.username or parts.password:
        raise ServiceError(f"'{parts.hostname}': put credentials in an environment variable, not in the URL")
    if with_credentials and parts.scheme == "http" and not is_loopback(parts.hostname):
        raise ServiceError(f"refusing to send an API key over plain http:// to {parts.hostname}; use https:// (plain http only to loopback)")


def same_origin(a: str, b: str) -> bool:
    pa, pb = urlsplit(a), urlsplit(b)
    return (pa.scheme, pa.hostname, pa.port) == (pb.scheme, pb.hostname, pb.port)


class JSONClient:
    """POST JSON to one URL and return the parsed JSON reply, within a deadline, retrying transient failures.

    ``url=`` on a call addresses another endpoint of the same server (same scheme, host and port; anything
    else is refused, so credentials never leave the configured host); ``method="GET"`` sends no body.
    """

    def __init__(
        self, url: str, api_key: str | None = None, deadline: float = 30.0, retries: int = 3, backoff: float = 1.0,
        max_reply_bytes: int = 1 << 20, outage: OutagePolicy | None = None,
    ):
        check_url(url, with_credentials=api_key is not None)
        self.url, self.deadline, self.retries, self.backoff, self.max_reply_bytes = url, deadline, retries, backoff, max_reply_bytes
        self.outage = outage
        self.answered = False  # a reply has come: from now on, no reply at all is an outage
        self._outage = _Outage()
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._client = httpx2.Client(follow_redirects=False, trust_env=False, timeout=httpx2.Timeout(deadline))

    def post(self, payload: Any, read: Callable[[Any], Any] | None = None, url: str | None = None, method: str = "POST") -> Any:
        """The reply to ``payload`` — passed through ``read`` when given, which may refuse it by raising a transient
        ``ServiceError`` — retrying transient failures up to ``retries`` times with backoff. When every attempt
        failed, the ``ServiceError`` carries ``problem``, the last failure; when the service had answered before and
        now did not answer at all, the outage policy decides (``ServiceOutage``)."""
        target = url or self.url
        first_failure = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                return self._attempt(payload, read, target, method)
            except ServiceError as err:
                if not err.transient:
                    raise
                last = err
                first_failure = first_failure if first_failure is not None else time.monotonic()
        if self.outage is not None and self.answered and last.unavailable:
            return self._through_outage(payload, read, target, method, first_failure, str(last))
        named = f"{self.outage.service} ({target})" if self.outage is not None else target
        raise ServiceError(f"{named}: no usable reply after {self.retries + 1} attempts: {last}", problem=str(last), unavailable=last.unavailable)

    def _attempt(self, payload: Any, read, target: str, method: str) -> Any:
        sent = time.monotonic()
        reply = self.post_once(payload, target, method, text=read is text_reply)
        self.answered = True
        lasted = self._outage.leave(sent)  # a reply, usable or not, ends an outage (for every thread of this client)
        if lasted is not None and self.outage is not None:
            log.warning("%s (%s) answers again, after %.0f s", self.outage.service, target, lasted)
        return read(reply) if read is not None else reply

    def _through_outage(self, payload: Any, read, target: str, method: str, first_failure: float, problem: str) -> Any:
        """The request's retries are spent on a service that answered before: ``stop`` gives up now; ``wait`` keeps
        trying until it answers or ``outage.seconds`` have passed since the outage began (shared by the client's
        threads, one of which reports the wait every ``WAIT_REPORT_S``)."""
        policy = self.outage
        began = self._outage.enter(first_failure)
        if policy.action == "stop":
            raise policy.gives_up(target, problem, time.monotonic() - began)
        pause = self.backoff or 1.0
        while True:
            now = time.monotonic()
            if self._outage.began is not None:  # (else another thread just had a reply: ask again at once)
                began = self._outage.began
                if now - began >= policy.seconds:
                    raise policy.gives_up(target, problem, now - began)
                if self._outage.report_due(now):
                    log.warning("%s (%s) does not answer%s (%s); waiting up to %g s for it (%soutage_seconds), the step paused",
                                policy.service, target, f" after {now - began:.0f} s" if now - began >= 1 else "", problem,
                                policy.seconds, policy.keys)
                time.sleep(min(pause, WAIT_POLL_S, max(0.0, began + policy.seconds - now)))
                pause *= 2
            attempted = time.monotonic()
            try:
                return self._attempt(payload, read, target, method)
            except ServiceError as err:
                if not err.transient:
                    raise
                if not err.unavailable:  # it answers again, but not usably: the usual retries of such a reply
                    return self._retry_unusable(payload, read, target, method, err)
                problem = str(err)
                # a new outage, if another thread's reply had ended the last before this attempt was made
                self._outage.enter(time.monotonic(), attempted)

    def _retry_unusable(self, payload: Any, read, target: str, method: str, err: ServiceError) -> Any:
        """A service back from an outage whose first reply was unusable: ``retries`` more attempts, then its error."""
        for attempt in range(self.retries):
            time.sleep(self.backoff * 2**attempt)
            try:
                return self._attempt(payload, read, target, method)
            except ServiceError as again:
                if not again.transient:
                    raise
                err = again
        raise ServiceError(f"{self.outage.service} ({target}): no usable reply after the outage and {self.retries + 1} attempts: {err}",
                           problem=str(err), unavailable=err.unavailable)

    def get(self, url: str, read: Callable[[Any], Any] | None = None) -> Any:
        """``GET url`` (an endpoint of the configured server), with the same deadline, retries and caps."""
        return self.post(None, read, url=url, method="GET")

    def post_once(self, payload: Any, url: str | None = None, method: str = "POST", text: bool = False) -> Any:
        """One attempt: the parsed reply (its text, with ``text``), or ``ServiceError`` (``transient`` when worth
        retrying)."""
        url = url or self.url
        if not same_origin(url, self.url):
            raise ServiceError(f"{url} is not on the configured server {self.url}; nothing is sent elsewhere")
        started = time.monotonic()
        body_kwargs = {"json": payload} if method != "GET" else {}
        try:
            with self._client.stream(method, url, headers=self._headers, **body_kwargs) as response:
                if response.is_redirect:
                    target = response.headers.get("location", "?")
                    raise ServiceError(f"{url} redirected to {target}; redirects are not followed (credentials stay with the configured host)")
                if response.status_code >= 400:
                    if response.status_code in (408, 429) or response.status_code >= 500:
                        raise _retry(f"HTTP {response.status_code}", unavailable=True)
                    raise ServiceError(f"{url} answered HTTP {response.status_code}{_error_detail(response)}")
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > self.max_reply_bytes:
                        raise _retry(f"the reply is larger than {self.max_reply_bytes} bytes")
                    if time.monotonic() - started > self.deadline:
                        raise _retry(f"no complete reply within the {self.deadline:g} s deadline", unavailable=True)
        except httpx2.TimeoutException:
            raise _retry(f"no complete reply within the {self.deadline:g} s deadline", unavailable=True) from None
        except httpx2.HTTPError as err:  # connection refused or reset, a truncated body, a protocol error
            raise _retry(f"request failed ({type(err).__name__}: {err})", unavailable=True) from None
        try:
            decoded = bytes(body).decode("utf-8")
            return decoded if text else json.loads(decoded)
        except UnicodeDecodeError:
            raise _retry("the reply is not UTF-8") from None
        except json.JSONDecodeError:
            raise _retry("the reply is not JSON") from None

    def close(self) -> None:
        self._client.close()


def text_reply(reply: str) -> str:
    """``read`` for an endpoint whose reply is plain text (e.g. vLLM's ``/v1/load_lora_adapter``): the text as it is."""
    return reply


def _error_detail(response, limit: int = 300) -> str:
    """The start of an error reply's message (vLLM explains a 400 there), for the one-line error."""
    try:
        text = response.read()[:4096].decode("utf-8", "replace")
        message = json.loads(text).get("error", {})
        message = message.get("message") if isinstance(message, dict) else message
        return f": {str(message)[:limit]}" if message else ""
    except Exception:  # noqa: BLE001 - the detail is a courtesy; the status code is the error
        return ""
