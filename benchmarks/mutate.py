"""Mutation testing of the trust-critical code: does a test fail when a check is broken?

A small AST mutator (operator swaps, comparison flips, boundary +1, constant flips, ``if c:`` made
always/never true, returns replaced by None, statements deleted) applied one mutant at a time to a
copy of the tree, never to the checkout. Each mutant runs only the tests of a per-module map that
reached the mutated line in a traced baseline run, fastest first, stopping at the first failure.

Speed: a worker process per core imports pytest, the target code and the mapped test modules once,
then forks a child per mutant; the child swaps the mutated function's ``__code__`` into the live
function object (so every ``from x import f`` sees it) and runs pytest in-process. The mutated file is
also written into the worker's own tree copy, so a test's subprocess (a broker, a CLI) runs it too.
Mutations at module level change a constant by ``setattr``; class-level ones are not generated.

    python -m benchmarks.mutate --module collector/verify.py
    python -m benchmarks.mutate --all --budget 900 --jobs 2 --json /tmp/mutants.json
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# file -> (functions to mutate (qualname prefixes; empty = all), tests that guard it, fastest first)
MODULES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "collector/verify.py": (
        (),
        (
            "tests/test_ingest_checks.py",
            "tests/test_watermarks.py",
            "tests/test_verification.py",
            "tests/test_ingest_attacks.py",
        ),
    ),
    "collector/service.py": (
        ("Watermarks", "Collector.process", "Collector._store", "Collector._acknowledge", "_ack_entry"),
        (
            "tests/test_ingest_checks.py",
            "tests/test_watermarks.py",
            "tests/test_holes.py",
            "tests/test_ingest_store.py",
            "tests/test_verification.py",
            "tests/test_ingest_attacks.py",
        ),
    ),
    "agent/control.py": (
        ("AckGate",),
        ("tests/test_ack_gate.py", "tests/test_control_path.py", "tests/test_control_path_live.py"),
    ),
    "collector/ledger/__init__.py": (
        (
            "StoredInterval",
            "Rejection",
            "Ledger.store",
            "Ledger._count",
            "Ledger._conflicts",
            "Ledger.handled_seqs",
            "_chain_of",
        ),
        (
            "tests/test_ledger_store.py",
            "tests/test_ingest_checks.py",
            "tests/test_watermarks.py",
            "tests/test_ingest_store.py",
            "tests/test_ledger_backends.py",
        ),
    ),
    "agent/outbox.py": (
        (
            "AgentStore.emit",
            "AgentStore._advance",
            "AgentStore.unsent",
            "AgentStore.mark_sent",
            "AgentStore.ack",
            "AgentStore.reject",
            "AgentStore.rechain",
            "AgentStore._without_recovery",
            "AgentStore.ack_matching",
        ),
        (
            "tests/test_outbox_acks.py",
            "tests/test_outbox.py",
            "tests/test_watermarks.py",
            "tests/test_control_path.py",
            "tests/test_clock_step.py",
            "tests/test_publisher.py",
        ),
    ),
    "labmeter/machine_hours.py": (
        (),
        ("tests/test_machine_hours.py", "tests/test_hours.py", "tests/test_report_golden.py"),
    ),
    "labmeter/evidence.py": (
        (),
        (
            "tests/test_evidence_keys.py",
            "tests/test_evidence_trust.py",
            "tests/test_evidence.py",
            "tests/test_evidence_services.py",
        ),
    ),
    "labmeter/verify.py": (
        (),
        (
            "tests/test_verify_checks.py",
            "tests/test_evidence_keys.py",
            "tests/test_evidence_trust.py",
            "tests/test_evidence.py",
            "tests/test_evidence_services.py",
            "tests/test_energy_reports.py",
        ),
    ),
}

PACKAGES = {"agent": "agent", "collector": "collector", "drivers": "drivers", "systemd": "systemd"}
LOGGERS = {"log", "logger", "logging", "_log"}


@dataclass
class Mutant:
    file: str
    line: int
    col: int
    end_line: int
    end_col: int
    what: str
    replacement: str
    func: str  # outermost function's qualname, or "" for a module-level constant
    lines: tuple[int, int] = (0, 0)
    const_name: str = ""
    tests: list[str] = field(default_factory=list)
    outcome: str = ""
    seconds: float = 0.0


# ---------------------------------------------------------------- generating mutants

_CMP_SWAP: dict[type, type] = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
}
_BIN_SWAP: dict[type, type] = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.FloorDiv,
    ast.Div: ast.Mult,
    ast.FloorDiv: ast.Mult,
    ast.Mod: ast.FloorDiv,
    ast.BitOr: ast.BitAnd,
    ast.BitAnd: ast.BitOr,
}


def _is_log_call(node: ast.AST) -> bool:
    """A call whose only effect is a log line (``log.warning(...)``, ``self._log_limited(...)``)."""
    if not isinstance(node, ast.Call):
        return False
    f = node.func
    if isinstance(f, ast.Attribute):
        if isinstance(f.value, ast.Name) and f.value.id in LOGGERS:
            return True
        return f.attr.startswith("_log") or f.attr in ("debug", "info", "warning", "exception")
    return False


def _src(node: ast.AST) -> str:
    return ast.unparse(node)


class _Gen(ast.NodeVisitor):
    def __init__(self, file: str, prefixes: tuple[str, ...]) -> None:
        self.file = file
        self.prefixes = prefixes
        self.out: list[Mutant] = []
        self.stack: list[str] = []
        self.func = ""
        self.skip = 0

    def _want(self) -> bool:
        q = ".".join(self.stack)
        return not self.prefixes or any(q == p or q.startswith(p + ".") for p in self.prefixes)

    def add(self, node: ast.AST, what: str, replacement: str, const_name: str = "") -> None:
        if self.skip or (not self.func and not const_name):
            return
        self.out.append(
            Mutant(
                self.file,
                node.lineno,  # type: ignore[attr-defined]
                node.col_offset,  # type: ignore[attr-defined]
                node.end_lineno or node.lineno,  # type: ignore[attr-defined]
                node.end_col_offset or 0,  # type: ignore[attr-defined]
                what,
                replacement,
                self.func,
                const_name=const_name,
            )
        )

    # scopes
    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.stack.append(node.name)
        for stmt in node.body:
            if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                self.visit(stmt)
        self.stack.pop()

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.stack.append(node.name)
        outer = not self.func
        if outer:
            if not self._want():
                self.stack.pop()
                return
            self.func = ".".join(self.stack)
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            body = body[1:]  # the docstring
        for stmt in body:
            self.visit(stmt)
        if outer:
            self.func = ""
        self.stack.pop()

    visit_FunctionDef = _function
    visit_AsyncFunctionDef = _function

    def visit_Module(self, node: ast.Module) -> None:
        for stmt in node.body:
            if isinstance(stmt, ast.Assign | ast.AnnAssign) and not self.prefixes:
                target = stmt.targets[0] if isinstance(stmt, ast.Assign) else stmt.target
                v = stmt.value
                if (
                    isinstance(target, ast.Name)
                    and isinstance(v, ast.Constant)
                    and type(v.value) in (int, float)
                ):
                    self.add(v, f"{target.id} = {v.value!r} -> {v.value + 1!r}", repr(v.value + 1), target.id)
            elif isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                self.visit(stmt)

    def visit_JoinedStr(self, node: ast.JoinedStr) -> None:
        return  # message text

    # statements
    def visit_Expr(self, node: ast.Expr) -> None:
        if _is_log_call(node.value):
            return
        if isinstance(node.value, ast.Call | ast.Await) and "super()" not in _src(node):
            # (deleting super().__init__ changes the code's free variables: not swappable in place)
            self.add(node, f"delete `{_src(node)[:60]}`", "pass")
        self.generic_visit(node)

    def visit_Raise(self, node: ast.Raise) -> None:
        self.add(node, f"delete `{_src(node)[:60]}`", "pass")
        self.generic_visit(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        self.add(node, f"delete `{_src(node)[:60]}`", "pass")
        self.generic_visit(node)

    def visit_Continue(self, node: ast.Continue) -> None:
        self.add(node, "continue -> pass", "pass")

    def visit_Break(self, node: ast.Break) -> None:
        self.add(node, "break -> pass", "pass")

    def visit_If(self, node: ast.If) -> None:
        t = _src(node.test)[:60]
        self.add(node.test, f"if {t}: -> if True:", "True")
        self.add(node.test, f"if {t}: -> if False:", "False")
        self.generic_visit(node)

    def visit_While(self, node: ast.While) -> None:
        if not (isinstance(node.test, ast.Constant) and node.test.value is True):
            self.add(node.test, f"while {_src(node.test)[:60]}: -> while False:", "False")
        self.generic_visit(node)

    def visit_Return(self, node: ast.Return) -> None:
        v = node.value
        if v is not None:
            if isinstance(v, ast.Constant) and isinstance(v.value, bool):
                self.add(v, f"return {v.value} -> return {not v.value}", repr(not v.value))
            elif not (isinstance(v, ast.Constant) and v.value is None):
                self.add(v, f"return {_src(v)[:50]} -> return None", "None")
        self.generic_visit(node)

    def visit_Assert(self, node: ast.Assert) -> None:
        return

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:  # the annotation is never evaluated (from __future__ import annotations)
            self.visit(node.value)

    # expressions
    def visit_Compare(self, node: ast.Compare) -> None:
        for i, op in enumerate(node.ops):
            new = _CMP_SWAP.get(type(op))
            if new is None:
                continue
            m = ast.Compare(node.left, list(node.ops), node.comparators)
            m.ops[i] = new()
            self.add(node, f"`{_src(node)[:50]}` -> `{_src(m)[:50]}`", f"({_src(m)})")
        self.generic_visit(node)

    def visit_BinOp(self, node: ast.BinOp) -> None:
        new = _BIN_SWAP.get(type(node.op))
        if new is not None:
            m = ast.BinOp(node.left, new(), node.right)
            self.add(node, f"`{_src(node)[:50]}` -> `{_src(m)[:50]}`", f"({_src(m)})")
        self.generic_visit(node)

    def visit_BoolOp(self, node: ast.BoolOp) -> None:
        other = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        m = ast.BoolOp(other, node.values)
        self.add(node, f"`{_src(node)[:50]}` -> `{_src(m)[:50]}`", f"({_src(m)})")
        self.generic_visit(node)

    def visit_UnaryOp(self, node: ast.UnaryOp) -> None:
        if isinstance(node.op, ast.Not):
            self.add(node, f"`{_src(node)[:50]}` -> `{_src(node.operand)[:50]}`", f"({_src(node.operand)})")
        elif isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
            self.skip += 1
        self.generic_visit(node)
        if isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
            self.skip -= 1

    def visit_IfExp(self, node: ast.IfExp) -> None:
        t = _src(node.test)[:40]
        self.add(node.test, f"`{t} ? :` -> True", "True")
        self.add(node.test, f"`{t} ? :` -> False", "False")
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        if _is_log_call(node):
            return
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        v = node.value
        if isinstance(v, bool):
            self.add(node, f"{v} -> {not v}", repr(not v))
        elif isinstance(v, int | float) and not isinstance(v, bool):
            self.add(node, f"{v!r} -> {v + 1!r}", repr(v + 1))

    def visit_Subscript(self, node: ast.Subscript) -> None:
        self.visit(node.value)
        if not isinstance(node.slice, ast.Constant):  # x[0], d["key"]: an index, not a value
            self.visit(node.slice)


def generate(file: str, prefixes: tuple[str, ...], root: Path = ROOT) -> list[Mutant]:
    text = (root / file).read_text()
    tree = ast.parse(text)
    g = _Gen(file, prefixes)
    g.visit(tree)
    spans = _function_spans(tree)
    out = []
    for m in g.out:
        m.lines = spans.get(m.func, (m.line, m.end_line))
        try:
            compile(apply(text, m), file, "exec")
        except SyntaxError:
            continue
        out.append(m)
    return out


def _function_spans(tree: ast.Module) -> dict[str, tuple[int, int]]:
    spans: dict[str, tuple[int, int]] = {}

    def walk(body: list[ast.stmt], prefix: str) -> None:
        for n in body:
            if isinstance(n, ast.ClassDef):
                walk(n.body, prefix + n.name + ".")
            elif isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef):
                spans[prefix + n.name] = (n.lineno, n.end_lineno or n.lineno)

    walk(tree.body, "")
    return spans


def apply(text: str, m: Mutant) -> str:
    """The source with the node at m's span replaced (ast offsets are UTF-8 byte columns)."""
    lines = text.encode().splitlines(keepends=True)
    head = b"".join(lines[: m.line - 1]) + lines[m.line - 1][: m.col]
    tail = lines[m.end_line - 1][m.end_col :] + b"".join(lines[m.end_line :])
    return (head + m.replacement.encode() + tail).decode()


# ---------------------------------------------------------------- the tree copy


def make_tree(dest: Path) -> Path:
    """A copy of the checkout laid out as installed: labmeter/agent -> ../agent and so on."""
    ignore = shutil.ignore_patterns(".venv", ".git", "__pycache__", ".mypy_cache", ".ruff_cache", "*.pyc")
    shutil.copytree(ROOT, dest, ignore=ignore, symlinks=True)
    for name, folder in PACKAGES.items():
        link = dest / "labmeter" / name
        if not link.exists():
            link.symlink_to(Path("..") / folder)
    return dest


def _module_name(file: str) -> str:
    p = Path(file).with_suffix("")
    parts = list(p.parts)
    if parts[-1] == "__init__":
        parts.pop()
    if parts[0] != "labmeter":
        parts.insert(0, "labmeter")
    return ".".join(parts)


# ---------------------------------------------------------------- the worker (runs inside a tree copy)


class _Tracer:
    """Lines of the target files each test reaches, in this thread and the threads it starts."""

    def __init__(self, files: set[str]) -> None:
        self.files = files  # real paths: a module imported through labmeter/collector -> ../collector
        self.seen: dict[str, str | None] = {}
        self.hits: set[tuple[str, int]] = set()

    def __call__(self, frame: Any, event: str, arg: Any) -> Any:
        if event != "call":
            return None
        name = frame.f_code.co_filename
        real = self.seen.get(name, "")
        if real == "":
            real = os.path.realpath(name)
            real = self.seen[name] = real if real in self.files else None
        return self._local if real is not None else None

    def _local(self, frame: Any, event: str, arg: Any) -> Any:
        if event == "line":
            real = self.seen.get(frame.f_code.co_filename)
            if real is not None:
                self.hits.add((real, frame.f_lineno))
        return self._local


class _CoveragePlugin:
    def __init__(self, files: dict[str, str]) -> None:
        self.real = files  # realpath -> relative file
        self.lines: dict[str, dict[str, list[int]]] = {}
        self.seconds: dict[str, float] = {}
        self.passed: set[str] = set()
        self.failed: set[str] = set()

    def pytest_runtest_call(self, item: Any) -> None:
        pass

    def pytest_runtest_protocol(self, item: Any, nextitem: Any) -> None:
        import threading

        tracer = _Tracer(set(self.real))
        sys.settrace(tracer)
        threading.settrace(tracer)
        t0 = time.monotonic()
        self._current = (item.nodeid, tracer, t0)

    def pytest_runtest_logfinish(self, nodeid: str, location: Any) -> None:
        import threading

        sys.settrace(None)
        threading.settrace(None)  # type: ignore[arg-type]
        node, tracer, t0 = self._current
        self.seconds[node] = time.monotonic() - t0
        per: dict[str, list[int]] = {}
        for f, ln in tracer.hits:
            per.setdefault(self.real[f], []).append(ln)
        self.lines[node] = per

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.when == "call" and report.passed:
            self.passed.add(report.nodeid)
        if report.failed:
            self.passed.discard(report.nodeid)
            self.failed.add(report.nodeid)


_CHILD: list[int] = []


def _fork_run(fn: Any, timeout: float) -> tuple[str, float]:
    """Run fn() in a forked child in its own process group; its exit code is the outcome."""
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.setpgid(0, 0)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            code = int(fn())
        except BaseException:
            code = 3
        finally:
            os._exit(code)
    _CHILD[:] = [pid]
    deadline = t0 + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            rc = os.waitstatus_to_exitcode(status)
            break
        if time.monotonic() > deadline:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, sig)
                time.sleep(0.5)
            os.waitpid(pid, 0)
            return "timeout", time.monotonic() - t0
        time.sleep(0.02)
    _reap_group(pid)
    outcome = {0: "survived", 1: "killed"}.get(rc, f"error({rc})")
    return outcome, time.monotonic() - t0


def _reap_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)  # brokers a test left behind


def _live_function(module: Any, qualname: str) -> Any:
    obj: Any = module
    for part in qualname.split("."):
        d = vars(obj) if hasattr(obj, "__dict__") else {}
        obj = d[part] if part in d else getattr(obj, part)
    for attr in ("fget", "__func__", "__wrapped__"):
        while hasattr(obj, attr) and not hasattr(obj, "__code__"):
            obj = getattr(obj, attr)
    while hasattr(obj, "__wrapped__"):
        obj = obj.__wrapped__
    return obj


def _find_code(code: Any, qualname: str) -> Any:
    if getattr(code, "co_qualname", None) == qualname:
        return code
    for c in code.co_consts:
        if hasattr(c, "co_code"):
            found = _find_code(c, qualname)
            if found is not None:
                return found
    return None


def worker() -> None:
    """Read tasks from stdin, one JSON line each; answer one JSON line each."""
    import importlib

    tree = Path.cwd()

    def stop(*_: object) -> None:
        for pid in _CHILD:
            _reap_group(pid)
        os._exit(143)

    signal.signal(signal.SIGTERM, stop)
    sys.path.insert(0, str(tree))
    sys.dont_write_bytecode = True
    import pytest

    base = ["-q", "-p", "no:cacheprovider", "-p", "no:randomly", "-x", "--timeout=120"]
    for raw in sys.stdin:
        task = json.loads(raw)
        if task["kind"] == "baseline":
            files = {str((tree / f).resolve()): f for f in task["files"]}
            for f in task["files"]:
                importlib.import_module(_module_name(f))
            out = tree / f".baseline-{os.getpid()}.json"

            def run_baseline(
                files: dict[str, str] = files, out: Path = out, tests: list[str] = task["tests"]
            ) -> int:
                plugin = _CoveragePlugin(files)
                rc = pytest.main([*base[:-2], "--timeout=300", *tests], plugins=[plugin])
                out.write_text(
                    json.dumps(
                        {
                            "lines": plugin.lines,
                            "seconds": plugin.seconds,
                            "passed": sorted(plugin.passed),
                            "failed": sorted(plugin.failed),
                        }
                    )
                )
                return int(rc)

            outcome, secs = _fork_run(run_baseline, task["timeout"])
            empty = {"lines": {}, "seconds": {}, "passed": [], "failed": []}
            data = json.loads(out.read_text()) if out.exists() else empty
            out.unlink(missing_ok=True)
            # warm this process for the mutants: what the test modules import, imported once; the test
            # modules themselves again in each child (module-level values such as NOW = time.time() go stale)
            for t in task["tests"]:
                with contextlib.suppress(Exception):
                    importlib.import_module(Path(t).with_suffix("").as_posix().replace("/", "."))
            for name in [n for n in sys.modules if n.startswith("tests.test_")]:
                del sys.modules[name]
            data["outcome"], data["seconds_total"] = outcome, secs
            print(json.dumps(data), flush=True)
        elif task["kind"] == "mutant":
            m = Mutant(**{k: v for k, v in task["mutant"].items() if k in Mutant.__dataclass_fields__})
            path = tree / m.file
            original = path.read_text()
            mutated = apply(original, m)
            module = importlib.import_module(_module_name(m.file))
            try:
                path.write_text(mutated)

                def run_mutant(
                    m: Mutant = m, mutated: str = mutated, module: Any = module, path: Path = path
                ) -> int:
                    if m.func:
                        code = compile(mutated, str(path), "exec")
                        new = _find_code(code, m.func)
                        _live_function(module, m.func).__code__ = new
                    else:
                        setattr(module, m.const_name, ast.literal_eval(m.replacement))
                    return int(pytest.main([*base, *m.tests]))

                outcome, secs = _fork_run(run_mutant, task["timeout"])
            finally:
                path.write_text(original)
            print(json.dumps({"outcome": outcome, "seconds": secs}), flush=True)


# ---------------------------------------------------------------- the driver


class Worker:
    def __init__(self, tree: Path) -> None:
        tmp = tree / ".tmp"
        tmp.mkdir()
        env = dict(os.environ, PYTHONPATH=str(tree), PYTHONDONTWRITEBYTECODE="1", TMPDIR=str(tmp))
        self.proc = subprocess.Popen(
            [sys.executable, str(tree / "benchmarks" / "mutate.py"), "--worker"],
            cwd=tree,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.busy: Mutant | None = None

    def send(self, task: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(task) + "\n")
        self.proc.stdin.flush()

    def receive(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("mutation worker died")
        return dict(json.loads(line))

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.terminate()  # it stops the test run it is in (its process group) too
            self.proc.wait(timeout=10)


def select(m: Mutant, base: dict[str, Any], order: list[str]) -> list[str]:
    """Tests that passed unmutated and reached the mutated line (for a module constant: all of them)."""
    lo, hi = m.lines
    out = []
    for node in order:
        if node not in base["passed"]:
            continue
        lines = base["lines"].get(node, {}).get(m.file, [])
        if not m.func:
            out.append(node)  # a constant's users may not run a line here (a test reading it, an importer)
        elif any(lo <= ln <= hi for ln in lines) and any(m.line <= ln <= m.end_line for ln in lines):
            out.append(node)
    return out


def run(
    files: list[str], jobs: int, budget: float, only: str | None, exclude: set[str], out: Path | None = None
) -> dict[str, Any]:
    import select as sel

    t_start = time.monotonic()
    shm = Path("/dev/shm")  # tests fsync their ledgers: on a disk shared with other jobs that dominates
    work = Path(tempfile.mkdtemp(prefix="labmeter-mutate-", dir=shm if shm.is_dir() else None))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally below removes the copies
    report: dict[str, Any] = {"modules": {}, "mutants": []}
    workers: list[Worker] = []
    try:
        trees = [make_tree(work / f"tree{i}") for i in range(jobs)]
        workers = [Worker(t) for t in trees]
        for file in files:
            prefixes, tests = MODULES[file]
            tests = tuple(t for t in tests if (ROOT / t).exists() and t not in exclude)
            mutants = generate(file, prefixes)
            if only:
                wanted = only.split(",")
                mutants = [m for m in mutants if any(f"{m.file}:{m.line}".endswith(w) for w in wanted)]
            w0 = workers[0]
            w0.send({"kind": "baseline", "files": [file], "tests": list(tests), "timeout": 1800})
            base = w0.receive()
            order = sorted(base["seconds"], key=lambda n: base["seconds"][n])
            print(
                f"{file}: {len(mutants)} mutants; baseline {base['outcome']} in {base['seconds_total']:.0f} s, "
                f"{len(base['passed'])} tests",
                file=sys.stderr,
                flush=True,
            )
            for node in base["failed"]:
                print(f"  failed unmutated (left out): {node}", file=sys.stderr, flush=True)
            queue: list[Mutant] = []
            for m in mutants:
                m.tests = select(m, base, order)
                if not m.tests:
                    m.outcome = "uncovered"
                else:
                    queue.append(m)
            queue.reverse()
            idle = list(workers)
            done = 0
            busy: dict[int, tuple[Worker, Mutant]] = {}
            while queue or busy:
                over = time.monotonic() - t_start > budget
                while idle and queue and not over:
                    w, m = idle.pop(), queue.pop()
                    timeout = 60 + 3 * sum(base["seconds"].get(t, 1.0) for t in m.tests)
                    w.send({"kind": "mutant", "mutant": asdict(m), "timeout": timeout})
                    busy[w.proc.stdout.fileno()] = (w, m)  # type: ignore[union-attr]
                if over and queue:
                    for m in queue:
                        m.outcome = "not run"
                    queue.clear()
                if not busy:
                    break
                ready, _, _ = sel.select(list(busy), [], [], 5)
                for fd in ready:
                    w, m = busy.pop(fd)
                    r = w.receive()
                    m.outcome, m.seconds = r["outcome"], r["seconds"]
                    idle.append(w)
                    done += 1
                    if done % 25 == 0:
                        print(
                            f"  {done}/{len(mutants)} in {time.monotonic() - t_start:.0f} s", file=sys.stderr
                        )
                    if m.outcome in ("survived",) or m.outcome.startswith("error"):
                        print(f"  {m.outcome}: {m.file}:{m.line} {m.what}", file=sys.stderr, flush=True)
            counts: dict[str, int] = {}
            for m in mutants:
                counts[m.outcome] = counts.get(m.outcome, 0) + 1
            dead = counts.get("killed", 0) + counts.get("timeout", 0)
            scored = dead + counts.get("survived", 0) + counts.get("uncovered", 0)
            counts["score_pct"] = round(100 * dead / scored, 1) if scored else 0
            report["modules"][file] = counts
            report["mutants"].extend(asdict(m) for m in mutants)
            print(f"{file}: {counts}", file=sys.stderr, flush=True)
            if out is not None:  # after each module: a run cut short keeps what it measured
                out.write_text(json.dumps(report, indent=1))
    finally:
        for w in workers:
            try:
                w.close()
            except Exception:
                w.proc.kill()
        shutil.rmtree(work, ignore_errors=True)
    report["seconds"] = round(time.monotonic() - t_start)
    return report


def _print(report: dict[str, Any]) -> None:
    print(
        f"{'module':30} {'mutants':>7} {'killed':>6} {'timeout':>7} {'survived':>8} {'uncovered':>9} {'score':>6}"
    )
    for file, c in report["modules"].items():
        n = sum(v for k, v in c.items() if k != "score_pct")
        print(
            f"{file:30} {n:7} {c.get('killed', 0):6} {c.get('timeout', 0):7} {c.get('survived', 0):8} "
            f"{c.get('uncovered', 0):9} {c['score_pct']:5}%"
        )
    print(f"total {report['seconds']} s")
    for m in report["mutants"]:
        if m["outcome"] not in ("killed", "timeout"):
            print(f"{m['outcome']:9} {m['file']}:{m['line']} ({m['func'] or m['const_name']}) {m['what']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--module", action="append", help="a file of MODULES (repeatable)")
    ap.add_argument("--all", action="store_true", help="every file of MODULES")
    ap.add_argument(
        "--only",
        help="only mutants at these file:line ends, comma-separated (e.g. verify.py:212,verify.py:228)",
    )
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--budget", type=float, default=1800, help="seconds; mutants left then are 'not run'")
    ap.add_argument("--json", type=Path, help="write every mutant and its outcome here")
    ap.add_argument("--list", action="store_true", help="print the mutants and exit")
    ap.add_argument(
        "--exclude",
        action="append",
        default=[],
        help="leave this test file out of the maps (the 'before' score)",
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker()
        return 0
    files = list(MODULES) if args.all else (args.module or [])
    unknown = [f for f in files if f not in MODULES]
    if not files or unknown:
        ap.error(
            f"choose --all or --module from: {', '.join(MODULES)}" + (f" (not {unknown})" if unknown else "")
        )
    if args.list:
        for f in files:
            for m in generate(f, MODULES[f][0]):
                print(f"{m.file}:{m.line} ({m.func or m.const_name}) {m.what}")
        return 0
    report = run(files, args.jobs, args.budget, args.only, set(args.exclude), args.json)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    _print(report)
    return 0


def _iter_all() -> Iterator[Mutant]:
    for f, (prefixes, _tests) in MODULES.items():
        yield from generate(f, prefixes)


if __name__ == "__main__":
    sys.exit(main())
