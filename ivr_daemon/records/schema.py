"""The records' tables, as SQLAlchemy Core metadata: what the migrations create and the queries use.

Times are UTC, stored without a zone (``DateTime``: SQLite has no zone type, and one rule for
both databases keeps the rows comparable). A turn's key is (call, index): writes are upserts by
key, so writing a record twice (a retry after a lost commit) changes nothing.
"""

from __future__ import annotations

from sqlalchemy import (JSON, Boolean, Column, DateTime, Float, ForeignKey, Index, Integer, MetaData, String, Table,
                        Text)

# Named constraints: Alembic can refer to them on every backend (SQLite included).
metadata = MetaData(naming_convention={
    "ix": "ix_%(table_name)s_%(column_0_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
})

MAX_UUID_CHARS = 128
MAX_NAME_CHARS = 64

calls = Table(
    "calls", metadata,
    Column("uuid", String(MAX_UUID_CHARS), primary_key=True),
    Column("agent", String(MAX_NAME_CHARS)),
    Column("caller_number", String(MAX_NAME_CHARS)),
    Column("variables", JSON, nullable=False, default=dict),  # the call's dynamic variables
    Column("started_at", DateTime, nullable=False),  # when the daemon first heard of the call
    Column("answered_at", DateTime),  # CHANNEL_ANSWER
    Column("ended_at", DateTime),  # CHANNEL_HANGUP_COMPLETE (or the daemon's shutdown)
    Column("hangup_cause", String(MAX_NAME_CHARS)),
    Column("transferred_to", String(MAX_NAME_CHARS)),  # the allowlisted target's name
    Index("ix_calls_started_at", "started_at"),
    Index("ix_calls_agent_started_at", "agent", "started_at"),
)

turns = Table(
    "turns", metadata,
    Column("call_uuid", String(MAX_UUID_CHARS), ForeignKey("calls.uuid"), primary_key=True),
    Column("turn_index", Integer, primary_key=True),  # 1, 2, ... as the call's log numbers them
    Column("started_at", DateTime, nullable=False),
    Column("transcript", Text, nullable=False),  # what the caller said (mod_vosk's final transcript)
    Column("reply", Text, nullable=False),  # what was sent to be played (the fallback phrase included)
    Column("heard", Text, nullable=False),  # what played to the end: the reply up to a barge-in
    Column("interrupted", Boolean, nullable=False),
    Column("used_fallback", Boolean, nullable=False),
    Column("llm_ms", Float),  # LLM request to its first sentence (streaming) or whole reply
    Column("tts_ms", Float),  # synthesis of the first sentence
    Column("first_audio_ms", Float),  # turn start to the first uuid_broadcast
    Column("tool_calls", JSON, nullable=False, default=list),  # [{"name", "arguments"}] as the LLM called them
)

__all__ = ["calls", "metadata", "turns"]
