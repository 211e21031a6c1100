"""The LLM client's POST: the request requests would send, written straight into urllib3's pool.

requests decides everything about the request once: the settled environment (proxies and
``NO_PROXY``, ``~/.netrc``, ``REQUESTS_CA_BUNDLE``, read when the client is made), the headers
(its defaults, the provider's, basic auth from netrc or the URL), the connection pool (the
lane-paced pools of ``paced.py``, through a proxy if one applies, TLS settings) and the URL to
put on the request line. Each request then goes to that pool's ``urlopen`` with the arguments
requests' adapter gives it, and the answer is urllib3's response.

Per request, requests itself cost about as much of the loop's CPU as the rest of sending a
request and reading its status line and headers: a PreparedRequest copied with its cookie jar
and hooks, the pool looked up again by a normalised key, the URL parsed three times, the
response wrapped (a Response, its headers copied case-insensitively, its cookies extracted
twice), urllib3's errors mapped to requests' own. In a burst of turns every request is sent
before any answer is read (the idle lane), so the last one waited for all of that 200 times.

What requests did besides, per request, and what became of it:

* Redirects: a 3xx with a ``Location`` is posted again through requests' Session, which
  follows it as before (a misconfigured URL; no LLM server redirects its API).
* Errors: urllib3's, unwrapped. ``str()`` of requests' wrapper was the wrapped error's, so the
  LlmErrors' messages are the same; what requests called ``ConnectTimeout`` (a MaxRetryError
  whose reason is a ConnectTimeoutError but not a NewConnectionError) is :func:`connect_timed_out`.
* Cookies: none kept. An LLM API is stateless; a ``Set-Cookie`` of its reply is not sent back.
"""

from __future__ import annotations

import json
import os

import requests
import requests.utils
import urllib3
import urllib3.connectionpool
import urllib3.exceptions

from ivr_daemon.llm.paced import LanePacedAdapter

# Keep-alive connections kept per LLM endpoint: one per turn in flight. At 256, a daemon that
# had fallen behind (1,000 calls asking within 10 s) opened a new connection for 983 of 1,000
# requests and closed 727 with a "Connection pool is full" warning each, which cost it more CPU
# per turn just when it had none to spare. An idle kept connection is a socket, nothing more.
LLM_POOL_CONNECTIONS = 1024

_REDIRECT_STATUSES = frozenset((301, 302, 303, 307, 308))


def connect_timed_out(exc: BaseException) -> bool:
    """True for urllib3's "could not connect in time" (requests' ConnectTimeout): a refused or
    unresolvable connection is a NewConnectionError, which urllib3 2 derives from it."""
    return (isinstance(exc, urllib3.exceptions.MaxRetryError)
            and isinstance(exc.reason, urllib3.exceptions.ConnectTimeoutError)
            and not isinstance(exc.reason, urllib3.exceptions.NewConnectionError))


def settled_session(url: str) -> requests.Session:
    """A Session with what requests reads from the environment for every request (proxies and
    ``NO_PROXY``, ``~/.netrc``, ``REQUESTS_CA_BUNDLE``) read once, for the one URL posted to,
    and lane-paced pools of up to LLM_POOL_CONNECTIONS kept-alive connections.

    Per request requests scans the whole environment and opens ``~/.netrc``: ~10 % of the
    loop's work in a burst of turns. The environment of a running daemon does not change.
    """
    session = requests.Session()
    # Every call in a turn holds a connection at once; urllib3's default pool of 10 would close
    # and reopen one per turn beyond that (and warn each time).
    adapter = LanePacedAdapter(pool_connections=4, pool_maxsize=LLM_POOL_CONNECTIONS)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    proxies = requests.utils.get_environ_proxies(url)
    netrc_auth = requests.utils.get_netrc_auth(url)
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    session.trust_env = False
    session.proxies.update(proxies)
    if netrc_auth:
        session.auth = netrc_auth
    if bundle:
        session.verify = bundle
    return session


class _Route:
    """Where one kind of request goes and with what: worked out by requests, once."""

    __slots__ = ("headers", "pool", "request_url")

    def __init__(self, session: requests.Session, url: str, headers: dict[str, str]):
        # A body-less request prepared as Session.post would: its defaults, these headers, auth.
        template = session.prepare_request(requests.Request("POST", url, headers=headers))
        adapter = session.get_adapter(url)
        # What HTTPAdapter.send works out before its urlopen; the pool is the one it would use.
        try:
            self.pool = adapter.get_connection_with_tls_context(template, session.verify, session.proxies,
                                                                session.cert)
        except urllib3.exceptions.LocationValueError as exc:
            raise requests.exceptions.InvalidURL(exc, request=template) from None
        adapter.cert_verify(self.pool, url, session.verify, session.cert)
        self.request_url = adapter.request_url(template, session.proxies)
        self.headers = dict(template.headers)
        self.headers.setdefault("Content-Type", "application/json")  # prepare_body's, before the auth's


class LlmTransport:
    """POSTs JSON to one URL and hands back urllib3's response, unread (``preload_content=False``).

    The caller reads it and, done or not, calls :func:`release`.
    """

    def __init__(self, url: str, timeout_s: float):
        self.url = url
        self.session = settled_session(url)
        self.adapter = self.session.get_adapter(url)
        self._timeout = urllib3.Timeout(connect=timeout_s, read=timeout_s)
        self._routes: dict[tuple, _Route] = {}

    def post(self, payload: dict, headers: dict[str, str]) -> urllib3.response.BaseHTTPResponse:
        """POST ``payload`` as JSON with ``headers`` (besides requests' defaults); urllib3's errors as they come."""
        key = tuple(headers.items())
        route = self._routes.get(key)
        if route is None:
            route = self._routes[key] = _Route(self.session, self.url, headers)
        # requests' json= encoding: ValueError for NaN, as requests' InvalidJSONError was.
        body = json.dumps(payload, allow_nan=False).encode("utf-8")
        response = route.pool.urlopen(
            "POST", route.request_url, body=body, headers={**route.headers, "Content-Length": str(len(body))},
            redirect=False, assert_same_host=False, preload_content=False, decode_content=False,
            retries=self.adapter.max_retries, timeout=self._timeout, chunked=False,
        )
        if response.status in _REDIRECT_STATUSES and response.get_redirect_location():
            release(response)
            # requests follows it as it always did (303: a GET; 307, 308: the POST again).
            response = self.session.post(self.url, json=payload, headers=headers,
                                         timeout=(self._timeout.connect_timeout, self._timeout.read_timeout),
                                         stream=True).raw
        return response

    def close(self) -> None:
        """Close every kept connection; a later post connects anew."""
        self._routes.clear()
        self.session.close()


def release(response: urllib3.response.BaseHTTPResponse) -> None:
    """What requests' Response.close does: a response not read to its end closes its connection
    (what is left of the reply would be the next request's answer); either way the connection
    goes back to its pool (closed, it reconnects when next taken)."""
    response.close()
    response.release_conn()
