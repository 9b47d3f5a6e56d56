"""`qemuspec test FILE` (the declared cases, each on its own fresh restore) and `qemuspec warm key FILE`.

A case is ``[tests.NAME]`` with ``machine``, ``command`` and ``timeout``. Every case runs on a fresh
restore of its machine's checkpoint (runtime/fresh.py; the checkpoint is made first, once, when none
fits: a cold boot, the machine's ``setup`` commands, the save), N cases at a time, each its own qemu
on its own overlays, so no case sees another's writes. One line per case as it ends; JUnit XML with
``--junit``; the console, events, qemu log and output of failed cases kept with ``--keep-failed``;
exit 1 when any case failed (250 when a guest kernel crashed in one: runtime/crash.py).
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from qemuspec.cli.common import Context
from qemuspec.errors import QemuspecError, UsageError

if TYPE_CHECKING:
    from qemuspec.runtime.instance import Instance
    from qemuspec.spec.models import Case, File

OUTPUT_LIMIT = 1 << 20  # bytes of a case's output kept (the rest is counted, not stored)
PER_RESTORE_OVERHEAD = 96  # MiB a restore costs beyond the guest's RAM (qemu itself, TCG buffers)


@dataclass
class Result:
    name: str
    machine: str
    passed: bool = False
    code: int | None = None
    seconds: float = 0.0
    output: bytearray = field(default_factory=bytearray)
    dropped: int = 0
    error: str | None = None  # why it failed when the command did not decide it (timeout, boot)
    boot: str | None = None
    kept: str | None = None  # where --keep-failed put its files
    crash: dict | None = None  # the guest kernel crashed (runtime/crash.py's report)

    def text(self) -> str:
        more = f"\n[{self.dropped} more bytes not kept]" if self.dropped else ""
        return self.output.decode(errors="replace") + more

    def as_dict(self) -> dict[str, object]:
        return {
            "case": self.name,
            "machine": self.machine,
            "passed": self.passed,
            "exitcode": self.code,
            "seconds": round(self.seconds, 3),
            "boot": self.boot,
            **({"error": self.error} if self.error else {}),
            **({"kept": self.kept} if self.kept else {}),
            **({"crash": self.crash} if self.crash else {}),
        }


def selected(spec: File, patterns: list[str]) -> dict[str, Case]:
    """The cases ``-k`` picks: a pattern with * ? [ is a glob on the case name, else a substring;
    several patterns pick what any of them picks."""

    def picks(name: str) -> bool:
        return any(
            fnmatch.fnmatchcase(name, p) if any(c in p for c in "*?[") else p in name
            for p in patterns
        )

    return {n: c for n, c in spec.tests.items() if not patterns or picks(n)}


def default_jobs(memory_mib: int) -> int:
    """As many parallel restores as the host carries: its CPUs, and its available memory at the
    guest's RAM plus qemu's own share each."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    by_memory = available // (memory_mib + PER_RESTORE_OVERHEAD) if available else cpus
    return max(1, min(cpus, by_memory))


def test(
    ctx: Context,
    *,
    keyword: list[str],
    jobs: int | None,
    junit: str | None,
    keep_failed: str | None,
    allow_local_qemu: bool = False,
    allow_host_paths: bool = False,
) -> int:
    from qemuspec.cli.common import check_against_qemu, preflight
    from qemuspec.cli.img_commands import ensure_images
    from qemuspec.cli.run_command import Stopped, _raise, _reachable

    target = ctx.target
    spec, lines = target.load()
    if target.rest or target.machine_option:
        raise UsageError(
            f"test runs the cases of {target.path}; pick cases with -k PATTERN, not operands "
            f"({' '.join(target.rest + target.machine_option)})"
        )
    if not spec.tests:
        raise UsageError(
            f"{target.path} declares no test cases: add one, e.g.\n"
            f'[tests.kernel]\nmachine = "{next(iter(spec.machines))}"\ncommand = "uname -r"\ntimeout = "60s"'
        )
    cases = selected(spec, keyword)
    if not cases:
        raise UsageError(
            f"no case of {target.path} matches -k {' -k '.join(keyword)}: its cases are "
            f"{', '.join(spec.tests)}"
        )
    only = next(iter(spec.machines))
    machines = sorted({c.machine or only for c in cases.values()})
    for name in machines:
        if spec.machines[name].depends_on:
            raise UsageError(
                f"machine {name} depends on {', '.join(spec.machines[name].depends_on)}: a case runs on one "
                "machine (use the pytest plugin for several)"
            )
    preflight(
        spec,
        lines,
        target.path,
        machines,
        allow_local_qemu=allow_local_qemu,
        settings=ctx.settings,
        allow_host_paths=allow_host_paths,
        out=ctx.out,
    )
    for name in machines:
        _reachable(spec.machines[name], name, "auto", target.path, lines)
    ensure_images(ctx, spec, machines)
    check_against_qemu(spec, lines, target.path, machines)
    if jobs is not None and jobs < 1:
        raise UsageError(f"-j {jobs}: give at least 1 case at a time")
    n = jobs or default_jobs(max(spec.machines[m].memory for m in machines))
    out = ctx.out

    def report(message: str) -> None:
        if not (out.json or out.quiet):
            print(message, file=sys.stderr, flush=True)

    previous = {sig: signal.signal(sig, _raise) for sig in (signal.SIGTERM, signal.SIGHUP)}
    live: set[Instance] = set()
    lock = threading.Lock()
    began = time.monotonic()
    results: list[Result] = []
    try:
        from qemuspec.runtime import fresh

        for name in machines:  # each checkpoint once, before the cases share it
            machine = spec.machines[name]
            if fresh.unusable(machine, ctx.settings) is None and (
                fresh.find(name, machine, ctx.settings)[0] is None
            ):
                wanted = fresh.key(name, machine, ctx.settings)
                report(
                    f"{name}: {fresh.find(name, machine, ctx.settings, wanted)[1]}: booting cold to make checkpoint {wanted.digest}"
                )
                fresh.ensure(
                    name,
                    machine,
                    ctx.settings,
                    wanted=wanted,
                    report=report,
                    on_output=_said(report, name),
                )
        report(f"running {len(cases)} case(s), {min(n, len(cases))} at a time")
        from concurrent.futures import ThreadPoolExecutor, as_completed

        with ThreadPoolExecutor(max_workers=n, thread_name_prefix="case") as pool:
            futures = [
                pool.submit(_case, ctx, spec, case_name, case, only, keep_failed, live, lock)
                for case_name, case in cases.items()
            ]
            try:
                for future in as_completed(futures):
                    result = future.result()
                    results.append(result)
                    _print(out, result)
            except BaseException:
                for future in futures:
                    future.cancel()
                with lock:
                    for inst in list(live):
                        inst.kill()
                raise
    except Stopped as stop:
        print(
            f"qemuspec test: {signal.Signals(stop.signum).name}: every machine is stopped and its files removed",
            file=sys.stderr,
        )
        return 128 + stop.signum
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    order = list(cases)
    results.sort(key=lambda r: order.index(r.name))
    failed = [r for r in results if not r.passed]
    seconds = time.monotonic() - began
    if junit:
        write_junit(junit, target.path, results, seconds)
    summary = f"{len(results) - len(failed)} passed, {len(failed)} failed in {seconds:.1f} s"
    if out.json:
        out.line({"summary": summary, "passed": len(results) - len(failed), "failed": len(failed)})
    elif not out.quiet or failed:
        print(summary + (f": {', '.join(r.name for r in failed)}" if failed else ""))
    if any(r.crash for r in failed):
        from qemuspec.cli.common import GUEST_CRASHED

        return GUEST_CRASHED
    return 1 if failed else 0


def _said(report: Callable[[str], object], name: str) -> Callable[[str, bytes], None]:
    """Setup output as report lines, prefixed with the machine's name."""

    def said(stream: str, data: bytes) -> None:
        report(f"{name}: setup: {data.decode(errors='replace').rstrip()}")

    return said


def _case(
    ctx: Context,
    spec: File,
    case_name: str,
    case: Case,
    only: str,
    keep_failed: str | None,
    live: set,
    lock: threading.Lock,
) -> Result:
    """One case on its own fresh restore (its own temporary state root, removed afterwards)."""
    from qemuspec.errors import GuestCrashed, QMPTimeout
    from qemuspec.runtime import crash, fresh, guestrun
    from qemuspec.runtime.statedir import disown

    name = case.machine or only
    result = Result(case_name, name)
    root = tempfile.mkdtemp(prefix="qemuspec-test-")
    began = time.monotonic()

    def keep(stream: str, data: bytes) -> None:
        room = OUTPUT_LIMIT - len(result.output)
        result.output += data[: max(0, room)]
        result.dropped += max(0, len(data) - max(0, room))

    def prepare(inst: Instance) -> None:
        with lock:
            live.add(inst)

    inst = None
    try:
        with (
            crash.before_ready(name),
            fresh.started(
                ctx.target.path,
                name,
                ctx.settings,
                spec=spec,
                root=root,
                warm=True,
                prepare=prepare,
            ) as inst,
        ):
            result.boot = inst.boot
            how = guestrun.via(inst)
            try:
                with crash.Watch(inst, "panic", None, None) as watch:
                    result.code = watch.call(
                        guestrun.run,
                        inst,
                        guestrun.shell(case.command, how),
                        keep,
                        how=how,
                        deadline=time.monotonic() + case.timeout,
                    )
                result.passed = result.code == 0
            except QMPTimeout:
                result.error = f"timed out after {case.timeout:g} s"
            except GuestCrashed as crashed:  # the case fails with the report; its files are kept
                result.error = crash.text(crashed.report)
                result.crash = crashed.report
            result.seconds = time.monotonic() - began
            if not result.passed and keep_failed:
                result.kept = _keep(keep_failed, result, fresh.artifacts(inst))
    except GuestCrashed as crashed:  # before it was ready
        result.error = crash.text(crashed.report)
        result.crash = crashed.report
        result.seconds = time.monotonic() - began
    except QemuspecError as exc:
        result.error = str(exc)
        result.seconds = time.monotonic() - began
    finally:
        with lock:
            for started in list(live):
                if started.process is None or not started.running():
                    live.discard(started)
        disown(os.path.join(root, name))
        shutil.rmtree(root, ignore_errors=True)
    if result.error and keep_failed and result.kept is None:
        result.kept = _keep(keep_failed, result, {})
    return result


def _keep(directory: str, result: Result, files: dict[str, str]) -> str:
    """A failed case's console, events, qemu log and output into DIRECTORY/CASE/."""
    where = os.path.join(os.path.abspath(directory), result.name)
    os.makedirs(where, mode=0o700, exist_ok=True)
    for made in (os.path.dirname(where), where):  # the umask qemuspec runs under drops the x bit
        os.chmod(made, 0o700)
    for path in files.values():  # under their own names (runtime/filenames.py)
        try:
            shutil.copyfile(
                path, os.path.join(where, os.path.basename(path)), follow_symlinks=False
            )
        except OSError:
            pass
    with open(os.path.join(where, "output.txt"), "w", encoding="utf-8") as f:
        f.write(result.text())
        if result.error:
            f.write(f"\n[qemuspec: {result.error}]\n")
    return where


def _print(out, result: Result) -> None:
    if out.json:
        out.line(result.as_dict())
        return
    if result.passed:
        if not out.quiet:
            print(f"PASS {result.name} ({result.seconds:.1f} s, {result.boot})", flush=True)
        return
    why = result.error or f"exit {result.code}"
    from qemuspec.cli.common import printable

    print(f"FAIL {result.name}: {why} ({result.seconds:.1f} s)", flush=True)
    for line in result.text().splitlines()[-20:]:
        print(f"  {printable(line) if sys.stdout.isatty() else line}", flush=True)
    if result.kept:
        print(f"  kept: {result.kept}", flush=True)


def _xml_text(text: str) -> str:
    """Text XML 1.0 can carry: control characters (other than tab and line breaks) written as \\xNN."""
    return "".join(
        ch if ch in "\t\n\r" or (" " <= ch and ch not in "\ufffe\uffff") else f"\\x{ord(ch):02x}"
        for ch in text
    )


def write_junit(path: str, source: str, results: list[Result], seconds: float) -> None:
    """JUnit XML as CI systems read it: one testsuite (the file), one testcase per case with its
    output; a failure carries the exit code (or why) and the output."""
    import xml.etree.ElementTree as ET

    failures = sum(1 for r in results if not r.passed and not r.error)
    errors = sum(1 for r in results if r.error)
    suite_name = os.path.basename(source)
    suites = ET.Element("testsuites")
    suite = ET.SubElement(
        suites,
        "testsuite",
        name=suite_name,
        tests=str(len(results)),
        failures=str(failures),
        errors=str(errors),
        skipped="0",
        time=f"{seconds:.3f}",
    )
    for r in results:
        case = ET.SubElement(
            suite,
            "testcase",
            classname=f"{os.path.splitext(suite_name)[0]}.{r.machine}",
            name=r.name,
            time=f"{r.seconds:.3f}",
        )
        text = _xml_text(r.text())
        if r.error:
            element = ET.SubElement(case, "error", message=_xml_text(r.error.split("\n", 1)[0]))
            element.text = _xml_text(r.error) + ("\n" + text if text else "")
        elif not r.passed:
            element = ET.SubElement(case, "failure", message=f"exit code {r.code}")
            element.text = text
        ET.SubElement(case, "system-out").text = text
    tree = ET.ElementTree(suites)
    ET.indent(tree)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".junit-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            tree.write(f, encoding="utf-8", xml_declaration=True)
        os.replace(tmp, path)
    except BaseException:
        with __import__("contextlib").suppress(OSError):
            os.unlink(tmp)
        raise


def warm(ctx: Context, *, action: str) -> int:
    """`qemuspec warm key [FILE] [MACHINE...]`: each machine's checkpoint key (runtime/fresh.py), for
    a CI cache step; one machine prints the key alone, several print NAME KEY lines."""
    from qemuspec.runtime import fresh

    target = ctx.target
    names = target.machines()
    spec = target.spec
    rows = []
    for name in names:
        wanted = fresh.key(name, spec.machines[name], ctx.settings)
        found, why = fresh.find(name, spec.machines[name], ctx.settings, wanted)
        rows.append(
            {
                "machine": name,
                "key": wanted.digest,
                "saved": found is not None,
                "store": ctx.settings.checkpoints,
                **({} if found else {"why": why}),
            }
        )
    if ctx.out.json:
        ctx.out.data(rows)
    elif len(rows) == 1:
        print(rows[0]["key"])
    else:
        for row in rows:
            print(f"{row['machine']} {row['key']}")
    return 0
