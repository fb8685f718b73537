"""The tests' fork server (tests/forkserver.py) gives what ``python -m flowvae`` gives: the exit
status, stdout and stderr apart, the working directory and environment asked for, a process of
its own (nothing one child imports is in the next), several at once, and a signal's status."""

import os
import signal
import time

from conftest import ROOT


def test_a_child_is_the_cli_in_a_process_of_its_own(fork_server, tmp_path):
    server = fork_server()
    (tmp_path / "probe_module_fs.py").write_text("X = 1\n")
    code = (
        "import os, sys; import probe_module_fs;"
        " print(os.getcwd(), os.environ['PROBE'], os.getpid());"
        " print('to stderr', file=sys.stderr); sys.exit(3)"
    )
    env = {**server.env, "PROBE": "yes"}
    first = server.run(code=code, cwd=tmp_path, env=env)
    cwd, probe, pid = first.stdout.split()
    assert (first.returncode, cwd, probe) == (3, str(tmp_path), "yes")
    assert first.stderr == "to stderr\n" and int(pid) not in (os.getpid(), server.proc.pid)
    again = server.run(code="import sys; print('probe_module_fs' in sys.modules)", cwd=ROOT)
    assert again.stdout == "False\n" and again.returncode == 0
    refused = server.run(["train", "--config", "no-such-config"], cwd=tmp_path)
    assert refused.returncode == 2 and refused.stdout == ""
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "no-such-config" in lines[0]
    assert list(tmp_path.iterdir()) == [tmp_path / "probe_module_fs.py"]


def test_children_run_at_once_and_report_signals(fork_server):
    server = fork_server()
    sleepers = [server.start(code="import time; time.sleep(60)") for _ in range(2)]
    quick = server.start(code="print('done')")
    assert quick.communicate(30) == ("done\n", "")
    t0 = time.monotonic()
    assert all(p.poll() is None for p in sleepers)
    sleepers[0].send_signal(signal.SIGKILL)
    os.killpg(sleepers[1].pid, signal.SIGTERM)  # each child leads a process group of its own
    assert [p.wait(30) for p in sleepers] == [-signal.SIGKILL, -signal.SIGTERM]
    assert time.monotonic() - t0 < 10
