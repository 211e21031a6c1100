"""A child process of the daemon spoken to over two pipes: pickled frames, waited on by gevent.

The records process (``ivr_daemon/records/db_process.py``) and the LLM process
(``ivr_daemon/llm_process.py``) each read requests on their stdin and write replies to the file
descriptor their stdout had at start. The frames are ``multiprocessing.connection``'s (a length
prefix, then a pickle); the daemon's ends are non-blocking and read and written with gevent's
cooperative calls, so a greenlet waiting for a reply never blocks the loop.
"""

from __future__ import annotations

import os
import sys
from multiprocessing.connection import Connection

import gevent.os
import gevent.subprocess
from gevent.monkey import get_original

# gevent's os.close (monkey-patched) defers the close to the loop's next check phase, which a loop
# idle in a long wait (a reap's timeout) reaches only when that wait ends: the child would see
# its stdin end seconds late. These pipes are closed only when no greenlet waits on them.
close_now = get_original("os", "close")


class CooperativeConnection(Connection):
    """multiprocessing's framing and pickling, over non-blocking pipes waited on by gevent."""

    def _send(self, buf, write=gevent.os.nb_write):
        super()._send(buf, write)

    def _recv(self, size, read=gevent.os.nb_read):
        return super()._recv(size, read)

    def _close(self, _close=close_now):
        _close(self._handle)


def start_child(module: str) -> tuple[gevent.subprocess.Popen, CooperativeConnection, CooperativeConnection]:
    """``python -m module`` with a pipe on its stdin and one from its stdout: (process, requests, replies).

    The child's ends are closed here, so its death is seen as the end of the replies, and the
    daemon's death (however it dies) as the end of its stdin. OSError when it cannot start.
    """
    to_child_r, to_child_w = os.pipe()
    from_child_r, from_child_w = os.pipe()
    try:
        proc = gevent.subprocess.Popen([sys.executable, "-m", module],
                                       stdin=to_child_r, stdout=from_child_w, close_fds=True)
    except BaseException:
        for fd in (to_child_r, to_child_w, from_child_r, from_child_w):
            close_now(fd)
        raise
    close_now(to_child_r)
    close_now(from_child_w)
    for fd in (to_child_w, from_child_r):
        os.set_blocking(fd, False)
    return (proc, CooperativeConnection(to_child_w, readable=False),
            CooperativeConnection(from_child_r, writable=False))
