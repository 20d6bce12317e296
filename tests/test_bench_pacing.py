"""bench/krpo_overhead.py's pacing: a process runs one step at a time, and its paused time is not counted."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="pauses processes with POSIX signals")


@pytest.fixture(scope="module")
def paced_class():
    sys.path.insert(0, str(BENCH))  # krpo_overhead imports its sibling train_step
    try:
        spec = importlib.util.spec_from_file_location("krpo_overhead", BENCH / "krpo_overhead.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
        sys.modules.pop("train_step", None)
    return module.Paced


def stand_in(tmp_path: Path, body: str) -> list[str]:
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(body))
    return [sys.executable, str(script), str(tmp_path / "progress.txt")]


def test_a_step_is_its_running_time_without_the_pauses(paced_class, tmp_path):
    # Each step burns 0.2 s of CPU time, then appends a line: its running time does not depend
    # on how long it was held paused.
    cmd = stand_in(tmp_path, """
        import sys, time
        for _ in range(3):
            start = time.process_time()
            while time.process_time() - start < 0.2:
                pass
            with open(sys.argv[1], "a") as progress:
                progress.write("step\\n")
    """)
    run = paced_class("stand-in", cmd, tmp_path / "progress.txt", tmp_path / "worker.log")
    try:
        run.run_one_step()  # start-up and the first step
        steps = []
        for _ in range(2):
            time.sleep(2.0)  # held paused
            steps.append(run.run_one_step())
        run.finish()
    finally:
        run.process.kill()
        run.log.close()
    assert run.process.returncode == 0
    assert run.lines_seen == 3
    assert all(0.1 < step < 1.5 for step in steps), steps  # two seconds of pause would show as > 2.2 s


def test_a_run_that_dies_is_reported_with_its_output(paced_class, tmp_path):
    cmd = stand_in(tmp_path, """
        import sys
        print("cannot load the model")
        sys.exit(3)
    """)
    run = paced_class("broken", cmd, tmp_path / "progress.txt", tmp_path / "worker.log")
    with pytest.raises(RuntimeError, match=r"the broken run exited \(3\):\ncannot load the model"):
        run.run_one_step()
