"""The FreeSWITCH event socket layer: wire format, command builders, connection.

It knows nothing of calls, LLMs or TTS; everything above it talks to FreeSWITCH through
:class:`~ivr_daemon.esl.connection.EslClient` and the builders in
:mod:`ivr_daemon.esl.commands`.
"""
