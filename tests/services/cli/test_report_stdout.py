"""`--json` commands: standard output carries the report alone (services/cli/common.stdout_for_the_report_only).

Ray's raylet and workers write warnings to the descriptor they inherit, and C libraries write to descriptor 1
directly: redirecting Python's `sys.stdout` alone would leave both in the JSON. Run in a fresh process, because the
redirection is of the process's real descriptor."""

import json
import subprocess
import sys
import textwrap

from services.cli.main import main

NOISY = textwrap.dedent("""
    import os, subprocess, sys
    from services.cli.common import print_report, stdout_for_the_report_only

    print("before")
    with stdout_for_the_report_only():
        print("python noise")
        os.write(1, b"descriptor noise\\n")
        subprocess.run([sys.executable, "-c", "print('child noise')"], check=True)
        print_report({"ok": 1})
    print("after")
""")


def test_stdout_is_the_report_alone_whoever_writes_to_it():
    done = subprocess.run([sys.executable, "-c", NOISY], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == 'before\n{\n  "ok": 1\n}\nafter\n'
    for noise in ("python noise", "descriptor noise", "child noise"):
        assert noise in done.stderr


def test_bench_engine_json_is_parseable_with_progress_on_stderr(capsys):
    assert main(["bench", "engine", "--preset", "tiny", "--chunks", "1", "--json", "--device", "cpu",
                 "--sessions", "2"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert "bench tiny" in captured.err          # the progress bar, on stderr
    batch = report["batch"]
    assert batch["pool_view"]["copied_bytes_per_step"] == 0 and batch["pool_view"]["slots"] == [0, 1]
    assert batch["gathered"]["slots"] == [0, 2] and batch["gathered"]["copied_bytes_per_step"] > 0
