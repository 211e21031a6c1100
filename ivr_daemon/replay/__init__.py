"""Replay tools for ivr_daemon: a FreeSWITCH event-socket simulator built from real captures."""
