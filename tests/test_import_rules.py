"""The import rules of ARCHITECTURE.md: which part of logitcache may import which.

Two views of the same rules. A static scan (ast) of every module of the distribution finds each
import, at the top of a module or inside a function alike, and names the file, line and rule it
breaks. Fresh interpreters then show what importing the light packages really loads, which also
catches an import that goes through another module.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CLIENT, SERVER, TRAINER = "logitcache.client", "logitcache.server", "logitcache.trainer"
BENCH, DEMO, CLI, STUBS = "logitcache.bench", "logitcache.demo", "logitcache.cli", "logitcache.v1"


@dataclass(frozen=True)
class Rule:
    """Modules under ``importers`` (but not under ``exempt``) import nothing under ``forbidden``."""

    id: str
    text: str
    importers: tuple[str, ...]
    forbidden: tuple[str, ...]
    exempt: tuple[str, ...] = ()

    def breaks(self, importer: str, target: str) -> bool:
        return (
            _under(importer, self.importers)
            and not _under(importer, self.exempt)
            and _under(target, self.forbidden)
        )


RULES = [
    Rule(
        "client",
        "client/ imports nothing from server/, trainer/, bench/, demo/ or the root CLI "
        "(nor logitcache.open_store, which reaches the server)",
        (CLIENT,),
        (SERVER, TRAINER, BENCH, DEMO, CLI, "logitcache.open_store"),
    ),
    Rule(
        "server",
        "server/ may import client/, and nothing from trainer/, bench/, demo/ or the CLI",
        (SERVER,),
        (TRAINER, BENCH, DEMO, CLI),
    ),
    Rule(
        "trainer",
        "trainer/ may import client/, and reaches a local store only through "
        "logitcache.open_store: nothing from server/, bench/, demo/ or the CLI",
        (TRAINER,),
        (SERVER, BENCH, DEMO, CLI),
    ),
    Rule(
        "bench-and-demo",
        "only the CLI imports bench/ and demo/ (bench may import demo)",
        ("logitcache",),
        (BENCH, DEMO),
        exempt=(CLI, BENCH, DEMO),
    ),
    Rule("demo", "demo/ imports nothing from bench/", (DEMO,), (BENCH,)),
    Rule(
        "protobuf",
        "the core never sees protobuf: only the gRPC adapter (server/grpc/, server/app.py), the "
        "client's wire and client modules, and the benchmarks that time the wire itself "
        "(bench/stream.py, bench/lookup.py, bench/soak.py) import the stubs",
        ("logitcache",),
        (STUBS, "google.protobuf"),
        exempt=(
            STUBS,
            "logitcache.server.grpc",
            "logitcache.server.app",
            "logitcache.client.wire",
            "logitcache.client.client",
            "logitcache.bench.stream",
            "logitcache.bench.lookup",
            "logitcache.bench.soak",
        ),
    ),
]


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


# ---- the modules of the distribution and their imports ---------------------------------------


@dataclass(frozen=True)
class Module:
    name: str
    path: Path

    @property
    def package(self) -> str:
        return self.name if self.path.name == "__init__.py" else self.name.rpartition(".")[0]


def distribution_modules() -> list[Module]:
    """Every module that pyproject.toml's packages and package-dir put into the wheel."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_dir: dict[str, str] = setuptools["package-dir"]
    modules = []
    for package in setuptools["packages"]:
        root = max((p for p in package_dir if _under(package, (p,))), key=len)
        folder = REPO / package_dir[root] / package[len(root) :].lstrip(".").replace(".", "/")
        for path in sorted(folder.glob("*.py")):
            stem = path.stem
            modules.append(Module(package if stem == "__init__" else f"{package}.{stem}", path))
    return modules


def imports(module: Module) -> Iterator[tuple[int, str]]:
    """(line, imported name) for each import; ``from a import b`` imports ``a.b``."""
    for node in ast.walk(ast.parse(module.path.read_text(), str(module.path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                yield node.lineno, base if alias.name == "*" else f"{base}.{alias.name}"


MODULES = distribution_modules()


def test_the_scan_sees_every_part_of_the_tree():
    names = {m.name for m in MODULES}
    for expected in ("logitcache", "logitcache.cli", CLIENT, "logitcache.client.wire", SERVER,
                     "logitcache.server.grpc.servicer", TRAINER, BENCH, DEMO, STUBS):  # fmt: skip
        assert expected in names, f"{expected} is not among the distribution's modules"


def test_the_scan_finds_relative_and_lazy_imports(tmp_path):
    path = tmp_path / "wire.py"
    path.write_text(
        "from . import space\n"
        "from ..server.store import Store\n"
        "def f():\n"
        "    import logitcache.trainer.stream\n"
    )
    found = list(imports(Module("logitcache.client.wire", path)))
    assert found == [
        (1, "logitcache.client.space"),
        (2, "logitcache.server.store.Store"),
        (4, "logitcache.trainer.stream"),
    ]
    assert RULES[0].breaks("logitcache.client.wire", found[1][1])


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.id)
def test_static_imports_follow_the_rule(rule: Rule):
    violations = [
        f"{m.path.relative_to(REPO)}:{line}: {m.name} imports {target}"
        for m in MODULES
        for line, target in imports(m)
        if rule.breaks(m.name, target)
    ]
    assert not violations, f"rule: {rule.text}\n" + "\n".join(violations)


# ---- what importing really loads ----------------------------------------------------------------

_PROBE = """
import importlib, json, sys
modules, forbidden = json.loads(sys.argv[1]), json.loads(sys.argv[2])
loaded = []
for name in modules:
    before = set(sys.modules)
    importlib.import_module(name)
    new = sorted(m for m in set(sys.modules) - before
                 if any(m == f or m.startswith(f + ".") for f in forbidden))
    loaded += [[name, m] for m in new]
print(json.dumps(loaded))
"""


def loaded_by_importing(modules: list[str], forbidden: list[str]) -> list[str]:
    """Import ``modules`` one after the other in a fresh interpreter; which forbidden modules each
    one loaded first."""
    r = subprocess.run(
        [sys.executable, "-P", "-c", _PROBE, json.dumps(modules), json.dumps(forbidden)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr
    return [f"importing {name} loaded {m}" for name, m in json.loads(r.stdout)]


def modules_under(package: str) -> list[str]:
    return [m.name for m in MODULES if _under(m.name, (package,))]


@pytest.mark.parametrize(
    ("modules", "forbidden"),
    [
        (["logitcache"], ["vllm", SERVER, TRAINER, BENCH, DEMO, CLI]),
        (modules_under(CLIENT), ["vllm", SERVER, TRAINER, BENCH, DEMO, CLI]),
        (modules_under(TRAINER), ["vllm", SERVER, BENCH, DEMO, CLI]),
    ],
    ids=["logitcache", "client", "trainer"],
)
def test_importing_a_light_package_loads_neither_vllm_nor_the_server(modules, forbidden):
    loaded = loaded_by_importing(modules, forbidden)
    assert not loaded, "\n".join(loaded)
