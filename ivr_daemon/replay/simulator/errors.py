"""The simulator's own exceptions: raised at the test or tool driving it, never at a peer (peers get FreeSWITCH replies)."""

from __future__ import annotations


class SimulatorError(Exception):
    """Base of the simulator's own errors (never raised at a peer: peers get FreeSWITCH replies)."""


class NoSuchCall(SimulatorError, LookupError):
    """The uuid is not a live call of this simulator."""


class CallAlreadyExists(SimulatorError, ValueError):
    """new_call() was given the uuid of a call that is still up."""


class CommandNotReceived(SimulatorError, TimeoutError):
    """No matching command arrived before the timeout."""


class EventNotEmitted(SimulatorError, TimeoutError):
    """No matching event was emitted before the timeout."""


class SubscriptionNotMade(SimulatorError, TimeoutError):
    """No connection subscribed (to the wanted event) before the timeout."""


class NotAnEventFrame(SimulatorError, ValueError):
    """send_event_frame() was given bytes that are not complete, well-formed event frames."""


class UnknownHangupCause(SimulatorError, ValueError):
    """hangup() was given a cause FreeSWITCH does not know."""


class InvalidDtmfDigit(SimulatorError, ValueError):
    """dtmf() was given something other than one of 0-9 * # A-D."""
