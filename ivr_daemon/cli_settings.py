"""What every ``ivr-daemon`` subcommand shares: its exit codes and the settings-or-exit step.

Kept apart from :mod:`ivr_daemon.cli` (which monkey-patches on import) so that subcommands
living with their subsystem (:mod:`ivr_daemon.records.cli`) say a bad setting the same way.
"""

from __future__ import annotations

import sys

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2  # a bad setting or argument (systemd's RestartPreventExitStatus)
EXIT_AUTH = 3


def config_error(problem) -> int:
    """Say a configuration error on stderr, one line; EXIT_CONFIG, for the caller to return."""
    print(f"ivr-daemon: configuration error: {problem}", file=sys.stderr)
    return EXIT_CONFIG


def settings_or_exit(args):
    """The settings (the environment over ``--env-file``); a bad one exits 2 with its message."""
    from ivr_daemon.config import ConfigError, load_settings

    try:
        return load_settings(dotenv_path=args.env_file)
    except ConfigError as exc:
        raise SystemExit(config_error(exc)) from None


def agents_or_exit(settings):
    """The agents of AGENTS_FILE; a bad file exits 2 with its message."""
    from ivr_daemon.agents import load_agents
    from ivr_daemon.config import ConfigError

    try:
        return load_agents(settings)
    except ConfigError as exc:
        raise SystemExit(config_error(exc)) from None


__all__ = ["EXIT_AUTH", "EXIT_CONFIG", "EXIT_FAILED", "EXIT_OK", "agents_or_exit", "config_error",
           "settings_or_exit"]
