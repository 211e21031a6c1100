"""``ivr-daemon doctor`` against real parts: the FreeSWITCH simulator, a running asr-server
(pocketsphinx), a fake LLM server over HTTP, the real Piper voice, a real output directory;
each broken in turn."""

from __future__ import annotations

import io
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

from ivr_daemon import cli
from ivr_daemon.asr.pocketsphinx import PocketsphinxEngine
from ivr_daemon.asr.server import AsrServer
from ivr_daemon.doctor import FAIL, PASS, SKIP, Check, DoctorRun, Row, print_table, recogniser_url, run_checks
from ivr_daemon.replay.simulator import FreeswitchSimulator
from ivr_daemon.tts.piper import default_voice_path
from llm_fakes import FakeLlmServer
from harness import give_to

NO_SUCH_USER = "ivr-doctor-test-no-such-user"


@pytest.fixture(autouse=True)
def suite_logging_restored():
    """cli.main() configures logging for its command (quieter); later tests need conftest's DEBUG."""
    yield
    from ivr_daemon.logs import configure_logging

    configure_logging("DEBUG", "console")


@pytest.fixture(scope="module")
def asr_server():
    with AsrServer(PocketsphinxEngine(), port=0) as server:
        yield server


@pytest.fixture
def sim():
    with FreeswitchSimulator(password="s3cret") as simulator:
        yield simulator


@pytest.fixture
def llm():
    with FakeLlmServer("ollama", "Hello.") as server:
        yield server


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def vosk_conf(tmp_path: Path, url: str | None) -> Path:
    param = f'<param name="server-url" value="{url}"/>' if url else ""
    path = tmp_path / "vosk.conf.xml"
    path.write_text(f'<configuration name="vosk.conf"><settings>{param}'
                    f'<param name="return-json" value="0"/></settings></configuration>')
    return path


def environment(sim, llm, tmp_path: Path, **overrides: str) -> dict[str, str]:
    env = {
        "FREESWITCH_PORT": str(sim.port),
        "FREESWITCH_PASSWORD": "s3cret",
        "LLM_PROVIDER": "ollama",
        "LLM_API_URL": llm.url,
        "LLM_TIMEOUT": "5",
        # The null voice unless a test is about the voice: loading Piper takes seconds on a busy box.
        "TTS_ENGINE": "null",
        "TTS_OUTPUT_DIR": str(tmp_path / "tts"),
    }
    env.update(overrides)
    return env


def doctor_rows(env: dict[str, str], conf: Path | None, user: str = NO_SUCH_USER) -> dict[str, Row]:
    run = DoctorRun(env_file=None, environ=env, vosk_conf=conf, freeswitch_user=user, timeout_s=3.0)
    rows = run_checks(run)
    assert not run.esl, "the doctor left an event socket open"
    titles = [row.title for row in rows]
    assert len(set(titles)) == len(titles), titles
    return {row.title: row for row in rows}


def statuses(rows: dict[str, Row]) -> dict[str, str]:
    return {title: row.status for title, row in rows.items()}


ALL_FINE = {
    "settings parse": PASS,
    "FreeSWITCH event socket reachable": PASS,
    "event socket password accepted": PASS,
    "event subscription works": PASS,
    "mod_vosk loaded": PASS,
    "recogniser accepts a WebSocket": PASS,
    "LLM answers": PASS,
    "voice of agent default speaks": PASS,
    "TTS_OUTPUT_DIR writable": PASS,
    f"WAVs readable by {NO_SUCH_USER}": SKIP,
    "call-records database reachable": PASS,
}


def test_all_fine(sim, llm, asr_server, tmp_path):
    conf = vosk_conf(tmp_path, f"ws://127.0.0.1:{asr_server.address[1]}")
    rows = doctor_rows(environment(sim, llm, tmp_path, TTS_ENGINE="piper"), conf)
    assert statuses(rows) == ALL_FINE
    assert rows["LLM answers"].detail.startswith(f"ollama llama3 at {llm.url}: 'Hello.' in ")
    assert rows["LLM answers"].detail.endswith(" ms")
    assert rows["voice of agent default speaks"].detail.startswith("piper:en_US-joe-medium")
    assert rows["recogniser accepts a WebSocket"].detail == f"ws://127.0.0.1:{asr_server.address[1]} (from {conf})"
    # What FreeSWITCH was asked, on the wire, in order.
    lines = [c.line for c in sim.commands]
    assert lines[0] == "auth s3cret"
    assert lines[1].startswith("event plain DETECTED_SPEECH ")
    assert lines[2:4] == ["api module_exists mod_vosk", "exit"]
    assert llm.requests and llm.requests[0]["messages"][-1]["content"] == "Say hello."
    # The probe WAV is gone again.
    assert not [p for p in (tmp_path / "tts").iterdir() if p.is_file()]


def test_wrong_password(sim, llm, asr_server, tmp_path):
    conf = vosk_conf(tmp_path, f"ws://127.0.0.1:{asr_server.address[1]}")
    rows = doctor_rows(environment(sim, llm, tmp_path, FREESWITCH_PASSWORD="wrong"), conf)
    assert statuses(rows) == {**ALL_FINE, "event socket password accepted": FAIL,
                              "event subscription works": SKIP, "mod_vosk loaded": SKIP}
    assert "FREESWITCH_PASSWORD" in rows["event socket password accepted"].fix
    assert rows["mod_vosk loaded"].detail == "not checked: no authenticated event socket"


def test_switch_down(llm, asr_server, tmp_path):
    conf = vosk_conf(tmp_path, f"ws://127.0.0.1:{asr_server.address[1]}")
    port = free_port()
    rows = doctor_rows(environment(NoSwitch(port), llm, tmp_path), conf)
    assert statuses(rows) == {**ALL_FINE, "FreeSWITCH event socket reachable": FAIL,
                              "event socket password accepted": SKIP, "event subscription works": SKIP,
                              "mod_vosk loaded": SKIP}
    row = rows["FreeSWITCH event socket reachable"]
    assert row.detail == f"cannot connect to 127.0.0.1:{port}: Connection refused"
    assert "FREESWITCH_HOST/FREESWITCH_PORT" in row.fix


class NoSwitch:
    """Only a port, where no switch listens."""

    def __init__(self, port: int):
        self.port = port


def test_mod_vosk_missing(sim, llm, asr_server, tmp_path):
    sim.loaded_modules.discard("mod_vosk")
    conf = vosk_conf(tmp_path, f"ws://127.0.0.1:{asr_server.address[1]}")
    rows = doctor_rows(environment(sim, llm, tmp_path), conf)
    assert statuses(rows) == {**ALL_FINE, "mod_vosk loaded": FAIL}
    assert rows["mod_vosk loaded"].detail.startswith("module_exists mod_vosk: false")
    assert "load mod_vosk" in rows["mod_vosk loaded"].fix


def test_no_recogniser(sim, llm, tmp_path):
    url = f"ws://127.0.0.1:{free_port()}"
    conf = vosk_conf(tmp_path, url)
    rows = doctor_rows(environment(sim, llm, tmp_path), conf)
    assert statuses(rows) == {**ALL_FINE, "recogniser accepts a WebSocket": FAIL}
    row = rows["recogniser accepts a WebSocket"]
    assert row.detail == f"{url} (from {conf}): Connection refused"
    assert str(conf) in row.fix and "ivr-daemon asr-server" in row.fix


def test_something_else_on_the_recogniser_port(sim, llm, tmp_path):
    # A plain web server where the recogniser should be: the upgrade is refused.
    from gevent.pywsgi import WSGIServer

    def not_found(environ, start_response):
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"no websockets here"]

    web = WSGIServer(("127.0.0.1", 0), not_found, log=None)
    web.start()
    try:
        conf = vosk_conf(tmp_path, f"ws://127.0.0.1:{web.server_port}")
        rows = doctor_rows(environment(sim, llm, tmp_path, TTS_ENGINE="null"), conf)
    finally:
        web.stop()
    assert rows["recogniser accepts a WebSocket"].status == FAIL
    assert rows["recogniser accepts a WebSocket"].detail.endswith("the upgrade was refused with HTTP 404")


def test_the_event_socket_where_the_recogniser_should_be(sim, llm, tmp_path):
    conf = vosk_conf(tmp_path, f"ws://127.0.0.1:{sim.port}")
    rows = doctor_rows(environment(sim, llm, tmp_path, TTS_ENGINE="null"), conf)
    assert rows["recogniser accepts a WebSocket"].status == FAIL
    assert "not a WebSocket server" in rows["recogniser accepts a WebSocket"].detail


def test_llm_down(sim, asr_server, tmp_path):
    conf = vosk_conf(tmp_path, f"ws://127.0.0.1:{asr_server.address[1]}")
    with FakeLlmServer("ollama") as llm:
        env = environment(sim, llm, tmp_path, LLM_API_URL=f"http://127.0.0.1:{free_port()}/api/chat")
    rows = doctor_rows(env, conf)
    assert statuses(rows) == {**ALL_FINE, "LLM answers": FAIL}
    assert "cannot reach" in rows["LLM answers"].detail
    assert "LLM_API_URL" in rows["LLM answers"].fix


def test_broken_voice_model_file(sim, llm, asr_server, tmp_path):
    conf = vosk_conf(tmp_path, f"ws://127.0.0.1:{asr_server.address[1]}")
    real = default_voice_path()
    broken = tmp_path / "voice" / real.name
    broken.parent.mkdir()
    broken.write_bytes(real.read_bytes()[:4096])  # a download cut short
    shutil.copy(str(real) + ".json", str(broken) + ".json")
    rows = doctor_rows(environment(sim, llm, tmp_path, TTS_ENGINE="piper", PIPER_VOICE=str(broken)), conf)
    assert statuses(rows) == {**ALL_FINE, "voice of agent default speaks": FAIL}
    assert rows["voice of agent default speaks"].detail.startswith("tts_engine=piper: ")
    assert "PIPER_VOICE" in rows["voice of agent default speaks"].fix


def test_unwritable_output_dir(sim, llm, asr_server, tmp_path):
    conf = vosk_conf(tmp_path, f"ws://127.0.0.1:{asr_server.address[1]}")
    (tmp_path / "a-file").write_text("not a directory")
    rows = doctor_rows(environment(sim, llm, tmp_path, TTS_OUTPUT_DIR=str(tmp_path / "a-file" / "tts")), conf)
    # The default records database lives beside TTS_OUTPUT_DIR: under the same file, so it fails too.
    assert statuses(rows) == {**{k: v for k, v in ALL_FINE.items() if "readable" not in k},
                              "TTS_OUTPUT_DIR writable": FAIL, "call-records database reachable": FAIL}
    assert "cannot be created" in rows["TTS_OUTPUT_DIR writable"].detail


def test_output_dir_owned_by_another_user(sim, llm, asr_server, tmp_path):
    conf = vosk_conf(tmp_path, f"ws://127.0.0.1:{asr_server.address[1]}")
    foreign = tmp_path / "foreign"
    foreign.mkdir(mode=0o750)
    give_to(foreign, 65534, 65534)
    rows = doctor_rows(environment(sim, llm, tmp_path, TTS_OUTPUT_DIR=str(foreign)), conf)
    assert rows["TTS_OUTPUT_DIR writable"].status == FAIL
    assert "chown" in rows["TTS_OUTPUT_DIR writable"].detail


def test_wavs_readable_by_the_freeswitch_user(sim, llm, asr_server, tmp_path):
    """The user FreeSWITCH runs as ("nobody" stands in) must enter the directory and read the WAVs."""
    conf = vosk_conf(tmp_path, f"ws://127.0.0.1:{asr_server.address[1]}")
    root = Path(tempfile.mkdtemp(prefix="ivr-doctor-"))  # pytest's tmp_path is 0700: nobody could enter
    try:
        root.chmod(0o755)
        out = root / "tts"
        env = environment(sim, llm, tmp_path, TTS_OUTPUT_DIR=str(out))
        rows = doctor_rows(env, conf, user="nobody")
        row = rows["WAVs readable by nobody"]
        assert row.status == FAIL and row.detail == f"nobody cannot enter {out} (mode 0750)"
        # The fix the README gives: the directory's group is FreeSWITCH's, set-group-ID.
        give_to(out, gid=65534)
        out.chmod(0o2750)
        rows = doctor_rows(env, conf, user="nobody")
        assert rows["WAVs readable by nobody"].status == PASS, rows["WAVs readable by nobody"]
    finally:
        shutil.rmtree(root)


def test_bad_settings_skip_everything_after(tmp_path):
    rows = doctor_rows({"FREESWITCH_PORT": "eighty", "TTS_OUTPUT_DIR": str(tmp_path / "tts")}, None)
    assert rows["settings parse"].status == FAIL
    assert rows["settings parse"].detail.startswith("FREESWITCH_PORT: ")
    assert "FREESWITCH_PORT" in rows["settings parse"].fix
    assert {row.status for title, row in rows.items() if title != "settings parse"} == {SKIP}


def test_a_check_that_crashes_is_a_row_and_the_rest_still_run():
    def explodes(run):
        raise RuntimeError("boom")
        yield  # pragma: no cover

    def fine(run):
        yield Row(PASS, "ok")

    rows = run_checks(DoctorRun(environ={}), [Check("first", explodes), Check("second", fine)])
    assert [(r.title, r.status) for r in rows] == [("first", FAIL), ("second", PASS)]
    assert rows[0].detail == "the check itself failed: RuntimeError: boom"


def test_recogniser_url_sources(tmp_path):
    from ivr_daemon.config import load_settings

    settings = load_settings(environ={"ASR_HOST": "0.0.0.0", "ASR_PORT": "2800", "TTS_OUTPUT_DIR": str(tmp_path)})
    run = DoctorRun(vosk_conf=tmp_path / "missing.xml")
    assert recogniser_url(run, settings) == ("ws://127.0.0.1:2800", "ASR_HOST/ASR_PORT (no vosk.conf.xml found)")
    run.vosk_conf = vosk_conf(tmp_path, None)
    assert recogniser_url(run, settings) == ("ws://127.0.0.1:2700", f"{run.vosk_conf}, which sets no server-url: mod_vosk's default")
    run.vosk_conf = vosk_conf(tmp_path, "ws://10.1.2.3:2701")
    assert recogniser_url(run, settings) == ("ws://10.1.2.3:2701", str(run.vosk_conf))


def test_the_table_and_the_exit_code_of_the_command(sim, llm, asr_server, tmp_path, capsys, monkeypatch):
    conf = vosk_conf(tmp_path, f"ws://127.0.0.1:{asr_server.address[1]}")
    env_file = tmp_path / "doctor.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in environment(sim, llm, tmp_path).items()))
    for name in list(os.environ):
        if name.startswith(("FREESWITCH_", "LLM_", "TTS_", "PIPER_", "ASR_", "AGENTS_", "DATABASE_", "RECORDS_")):
            monkeypatch.delenv(name)
    argv = ["--env-file", str(env_file), "doctor", "--vosk-conf", str(conf), "--freeswitch-user", NO_SUCH_USER]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("✔ settings parse ")
    assert out.rstrip().endswith("10 fine, 1 not checked")  # no such user: neither fine nor a fault
    sim.loaded_modules.discard("mod_vosk")
    assert cli.main(argv) == 1
    out = capsys.readouterr().out
    assert "✘ mod_vosk loaded" in out
    assert "  fix: add <load module=\"mod_vosk\"/>" in out
    assert out.rstrip().endswith("9 fine, 1 to fix, 1 not checked")


def test_print_table_cuts_long_details_but_never_the_fix():
    out = io.StringIO()
    print_table([Row(FAIL, "x" * 1000, "do this", title="t")], out)
    first, fix = out.getvalue().splitlines()[:2]
    assert first.endswith("…") and len(first) < 300
    assert fix.strip() == "fix: do this"


def test_records_database_on_a_real_postgresql_then_down(sim, llm, asr_server, tmp_path, postgres):
    conf = vosk_conf(tmp_path, f"ws://127.0.0.1:{asr_server.address[1]}")
    url = postgres.new_database()
    rows = doctor_rows(environment(sim, llm, tmp_path, DATABASE_URL=url), conf)
    assert statuses(rows) == ALL_FINE
    detail = rows["call-records database reachable"].detail
    assert "PostgreSQL" in detail and "no tables yet" in detail, detail
    # Nothing listens where the URL points: a ✘ with the fix, and the password never shown.
    down = f"postgresql://ivr:hunter2@127.0.0.1:{free_port()}/ivr"
    rows = doctor_rows(environment(sim, llm, tmp_path, DATABASE_URL=down), conf)
    assert statuses(rows) == {**ALL_FINE, "call-records database reachable": FAIL}
    row = rows["call-records database reachable"]
    assert "hunter2" not in row.detail and "start the database server" in row.fix


def test_records_off_is_a_pass_that_says_so(sim, llm, asr_server, tmp_path):
    conf = vosk_conf(tmp_path, f"ws://127.0.0.1:{asr_server.address[1]}")
    rows = doctor_rows(environment(sim, llm, tmp_path, DATABASE_URL="off"), conf)
    assert statuses(rows) == ALL_FINE
    assert rows["call-records database reachable"].detail == "DATABASE_URL=off: no call records kept"


def test_llm_replicas_one_row_each_the_down_one_failing(sim, llm, asr_server, tmp_path):
    conf = vosk_conf(tmp_path, f"ws://127.0.0.1:{asr_server.address[1]}")
    down_port = free_port()
    env = environment(sim, llm, tmp_path,
                      LLM_API_URL=f"{llm.url},http://user:pw@127.0.0.1:{down_port}/api/chat")
    rows = doctor_rows(env, conf)
    up_title = f"LLM answers [replica 127.0.0.1:{llm.port}]"
    down_title = f"LLM answers [replica 127.0.0.1:{down_port}]"
    expected = {title: status for title, status in ALL_FINE.items() if title != "LLM answers"}
    assert statuses(rows) == {**expected, up_title: PASS, down_title: FAIL}
    assert rows[up_title].detail.startswith(f"ollama llama3 at 127.0.0.1:{llm.port}: 'Hello.' in ")
    assert "cannot reach" in rows[down_title].detail and "LLM_API_URL" in rows[down_title].fix
    assert "pw@" not in rows[down_title].detail  # the label, never the URL's credentials


ESL_TITLES = ("FreeSWITCH event socket reachable", "event socket password accepted", "event subscription works",
              "mod_vosk loaded")


def switch_rows(rows: dict[str, Row], *names: str) -> dict[str, dict[str, str]]:
    """The ESL rows of each switch: {name: {check title: status}}."""
    return {name: {title: rows[f"{title} [{name}]"].status for title in ESL_TITLES} for name in names}


@pytest.fixture
def sim_b():
    with FreeswitchSimulator(password="other") as simulator:
        yield simulator


def test_every_switch_of_freeswitch_hosts_gets_its_rows(sim, sim_b, llm, asr_server, tmp_path):
    sim_b.loaded_modules.discard("mod_vosk")  # the broken one
    conf = vosk_conf(tmp_path, f"ws://127.0.0.1:{asr_server.address[1]}")
    a, b = f"127.0.0.1:{sim.port}", f"127.0.0.1:{sim_b.port}"
    rows = doctor_rows(environment(sim, llm, tmp_path, FREESWITCH_HOSTS=f"{a},other@{b}"), conf)
    assert switch_rows(rows, a, b) == {a: dict.fromkeys(ESL_TITLES, PASS),
                                       b: {**dict.fromkeys(ESL_TITLES, PASS), "mod_vosk loaded": FAIL}}
    assert not any(title in rows for title in ESL_TITLES)  # no row without its switch
    assert rows[f"mod_vosk loaded [{b}]"].detail == f"{b}: module_exists mod_vosk: false (no speech events will come)"
    assert rows[f"mod_vosk loaded [{a}]"].detail == f"{a}: module_exists mod_vosk: true"
    # Each simulator was asked once, with its own password.
    assert [c.line for c in sim.commands][0] == "auth s3cret"
    assert [c.line for c in sim_b.commands][0] == "auth other"
    assert "api module_exists mod_vosk" in [c.line for c in sim_b.commands]


def test_a_wrong_password_or_a_switch_down_fails_only_that_switch(sim, sim_b, llm, asr_server, tmp_path):
    conf = vosk_conf(tmp_path, f"ws://127.0.0.1:{asr_server.address[1]}")
    a, b, down = f"127.0.0.1:{sim.port}", f"127.0.0.1:{sim_b.port}", f"127.0.0.1:{free_port()}"
    rows = doctor_rows(environment(sim, llm, tmp_path, FREESWITCH_HOSTS=f"{a},wrong@{b},{down}"), conf)
    not_in = {"event subscription works": SKIP, "mod_vosk loaded": SKIP}
    assert switch_rows(rows, a, b, down) == {
        a: dict.fromkeys(ESL_TITLES, PASS),
        b: {"FreeSWITCH event socket reachable": PASS, "event socket password accepted": FAIL, **not_in},
        down: {"FreeSWITCH event socket reachable": FAIL, "event socket password accepted": SKIP, **not_in},
    }
    assert f"the password of {b} in FREESWITCH_HOSTS" in rows[f"event socket password accepted [{b}]"].fix
    assert rows[f"FreeSWITCH event socket reachable [{down}]"].detail == f"cannot connect to {down}: Connection refused"
    assert "FREESWITCH_HOSTS" in rows[f"FreeSWITCH event socket reachable [{down}]"].fix
    assert rows["LLM answers"].status == PASS  # the rest of the doctor ran as usual


def test_the_socket_checks_skip_a_switch_without_a_socket_and_prefix_each_detail_with_its_switch(sim, sim_b, tmp_path):
    """check_esl_events and check_mod_vosk share their walk over the switches: a switch without an
    authenticated socket (refused password, nothing listening) is one skipped row in each, titled
    with that switch; a switch with one gets its probe, the detail starting with the switch."""
    from ivr_daemon.doctor import CHECKS

    socket_checks = CHECKS[:5]  # settings, reachable, password, events, mod_vosk: no LLM, voice or ASR
    assert [check.title for check in socket_checks][-2:] == ["event subscription works", "mod_vosk loaded"]
    a, b, down = f"127.0.0.1:{sim.port}", f"127.0.0.1:{sim_b.port}", f"127.0.0.1:{free_port()}"
    env = {"FREESWITCH_HOSTS": f"s3cret@{a},wrong@{b},{down}", "TTS_OUTPUT_DIR": str(tmp_path / "tts")}
    rows = {row.title: row for row in run_checks(DoctorRun(env_file=None, environ=env, timeout_s=3.0), socket_checks)}
    for title in ("event subscription works", "mod_vosk loaded"):
        assert title not in rows  # every row names its switch
        for name in (b, down):
            assert rows[f"{title} [{name}]"] == Row(SKIP, "not checked: no authenticated event socket",
                                                    title=f"{title} [{name}]")
        assert rows[f"{title} [{a}]"].status == PASS and rows[f"{title} [{a}]"].detail.startswith(f"{a}: ")
    assert rows[f"mod_vosk loaded [{a}]"].detail == f"{a}: module_exists mod_vosk: true"
    # Only the switch with a socket was asked.
    assert "api module_exists mod_vosk" in [c.line for c in sim.commands]
    assert not any(c.line.startswith(("event ", "api ")) for c in sim_b.commands)

    # One switch (FREESWITCH_HOST/PORT), nothing listening: no prefix, the checks' own titles.
    env = {"FREESWITCH_PORT": str(free_port()), "TTS_OUTPUT_DIR": str(tmp_path / "tts")}
    rows = {row.title: row for row in run_checks(DoctorRun(env_file=None, environ=env, timeout_s=3.0), socket_checks)}
    for title in ("event subscription works", "mod_vosk loaded"):
        assert rows[title] == Row(SKIP, "not checked: no authenticated event socket", title=title)
    # And with one reachable switch, the details carry no switch either.
    env["FREESWITCH_PORT"], env["FREESWITCH_PASSWORD"] = str(sim.port), "s3cret"
    rows = {row.title: row for row in run_checks(DoctorRun(env_file=None, environ=env, timeout_s=3.0), socket_checks)}
    assert rows["mod_vosk loaded"] == Row(PASS, "module_exists mod_vosk: true", title="mod_vosk loaded")
    assert rows["event subscription works"].status == PASS
    assert rows["event subscription works"].detail.startswith("+OK")
