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
"""

from __future__ import annotations

import ipaddress
import json
import time
from typing import Any, Callable
from urllib.parse import urlsplit

import httpx2


class ServiceError(RuntimeError):
    """A remote service that cannot be used or gave no usable reply; the message says which and why.
    ``transient``: another attempt may succeed (a timeout, a 5xx, a truncated or malformed reply);
    ``problem``: set when every attempt failed, the last attempt's failure."""

    def __init__(self, message: str, transient: bool = False, problem: str | None = None):
        super().__init__(message)
        self.transient, self.problem = transient, problem


def _retry(message: str) -> ServiceError:
    return ServiceError(message, transient=True)


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
        max_reply_bytes: int = 1 << 20,
    ):
        check_url(url, with_credentials=api_key is not None)
        self.url, self.deadline, self.retries, self.backoff, self.max_reply_bytes = url, deadline, retries, backoff, max_reply_bytes
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._client = httpx2.Client(follow_redirects=False, trust_env=False, timeout=httpx2.Timeout(deadline))

    def post(self, payload: Any, read: Callable[[Any], Any] | None = None, url: str | None = None, method: str = "POST") -> Any:
        """The reply to ``payload`` — passed through ``read`` when given, which may refuse it by raising a transient
        ``ServiceError`` — retrying transient failures up to ``retries`` times with backoff. When every attempt
        failed, the ``ServiceError`` carries ``problem``, the last failure."""
        target = url or self.url
        problem = "no attempt made"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                reply = self.post_once(payload, target, method)
                return read(reply) if read is not None else reply
            except ServiceError as err:
                if not err.transient:
                    raise
                problem = str(err)
        raise ServiceError(f"{target}: no usable reply after {self.retries + 1} attempts: {problem}", problem=problem)

    def get(self, url: str, read: Callable[[Any], Any] | None = None) -> Any:
        """``GET url`` (an endpoint of the configured server), with the same deadline, retries and caps."""
        return self.post(None, read, url=url, method="GET")

    def post_once(self, payload: Any, url: str | None = None, method: str = "POST") -> Any:
        """One attempt: the parsed reply, or ``ServiceError`` (``transient`` when worth retrying)."""
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
                        raise _retry(f"HTTP {response.status_code}")
                    raise ServiceError(f"{url} answered HTTP {response.status_code}{_error_detail(response)}")
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > self.max_reply_bytes:
                        raise _retry(f"the reply is larger than {self.max_reply_bytes} bytes")
                    if time.monotonic() - started > self.deadline:
                        raise _retry(f"no complete reply within the {self.deadline:g} s deadline")
        except httpx2.TimeoutException:
            raise _retry(f"no complete reply within the {self.deadline:g} s deadline") from None
        except httpx2.HTTPError as err:  # connection refused or reset, a truncated body, a protocol error
            raise _retry(f"request failed ({type(err).__name__}: {err})") from None
        try:
            return json.loads(bytes(body).decode("utf-8"))
        except UnicodeDecodeError:
            raise _retry("the reply is not UTF-8") from None
        except json.JSONDecodeError:
            raise _retry("the reply is not JSON") from None

    def close(self) -> None:
        self._client.close()


def _error_detail(response, limit: int = 300) -> str:
    """The start of an error reply's message (vLLM explains a 400 there), for the one-line error."""
    try:
        text = response.read()[:4096].decode("utf-8", "replace")
        message = json.loads(text).get("error", {})
        message = message.get("message") if isinstance(message, dict) else message
        return f": {str(message)[:limit]}" if message else ""
    except Exception:  # noqa: BLE001 - the detail is a courtesy; the status code is the error
        return ""
