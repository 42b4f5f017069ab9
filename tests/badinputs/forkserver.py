"""Runs the real command-line entry points in child processes, fast: this process imports the
commands once (and runs no torch kernel, so forking is safe), then forks one child per request.

Protocol: one JSON request per stdin line ``{"argv": [...], "cwd": ..., "fsize": bytes|null,
"timeout": s, "stdout": path, "stderr": path}``; one JSON reply per stdout line ``{"rc", "seconds",
"maxrss_kb", "timed_out"}``. ``argv[0]`` is ``gemma2-convert`` or ``gemma2-quantize``.
The child's exit code, stderr and peak RSS (``wait4``) are exactly what a user would see and cost.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import time


def _reset_peak_rss() -> None:
    """Start this process's peak-RSS record at its current RSS (a forked child inherits the parent's peak)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _child(req: dict, entry: dict) -> None:
    code = 1
    try:
        _reset_peak_rss()
        out = os.open(req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        err = os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(err, 2)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if req.get("fsize"):
            resource.setrlimit(resource.RLIMIT_FSIZE, (req["fsize"], req["fsize"]))
        os.chdir(req["cwd"])
        sys.argv = list(req["argv"])
        try:
            entry[sys.argv[0]]()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # a crash the entry point let through: make it visible to the test
        import traceback

        traceback.print_exc()
        code = 99
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _run(req: dict, entry: dict) -> dict:
    sys.stdout.flush()
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        _child(req, entry)
    timed_out = False
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        if time.perf_counter() - t0 > req.get("timeout", 120):
            os.kill(pid, signal.SIGKILL)
            _, status, usage = os.wait4(pid, 0)
            timed_out = True
            break
        time.sleep(0.005)
    return {"rc": os.waitstatus_to_exitcode(status), "seconds": time.perf_counter() - t0,
            "maxrss_kb": usage.ru_maxrss, "timed_out": timed_out}


def main() -> None:
    from gemma2_convert.cli.main import main as convert_main
    from gemma2_convert.cli.quantize import main as quantize_main
    import gemma2_convert.pipeline.convert  # noqa: F401  (everything a command imports lazily, imported once here)
    import gemma2_convert.pipeline.gguf  # noqa: F401
    import gemma2_convert.pipeline.inspect  # noqa: F401
    import gemma2_convert.pipeline.quantize  # noqa: F401
    import gemma2_convert.formats.tokenizer.spm  # noqa: F401  (imported once here, not in every child)
    import reference  # noqa: F401
    import rich.progress  # noqa: F401
    try:  # the Orbax reader's lazy import: tens of MB that would count as the child's growth
        import tensorstore  # noqa: F401
    except ImportError:
        pass

    entry = {"gemma2-convert": convert_main, "gemma2-quantize": quantize_main}
    sys.stdout.write('{"ready": true}\n')
    sys.stdout.flush()
    for line in sys.stdin:
        if line.strip():
            sys.stdout.write(json.dumps(_run(json.loads(line), entry)) + "\n")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
