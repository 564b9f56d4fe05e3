"""Nothing left behind, and a moving bar: convert.py and reshard.py as real processes.

- Ctrl-C (SIGINT) and `kill` (SIGTERM) in the middle of a conversion or a reshard: the process
  ends (status 130 / 143) and its output's parent directory holds exactly what it held before.
- `kill -9` (SIGKILL) cannot be caught: its temporary directory stays, and the next write into the
  same parent removes it and says so (atomic.py, `remove_stale_temporaries`).
- On a terminal (a pty) both tools draw a tqdm bar per tensor; into a pipe, or with --quiet, none.

The processes are made slow where it matters (a sleep after a few tensors, or after the first
shard is saved) and say "started" when they get there, so each signal lands mid-write.
"""

import fcntl
import os
import pty
import signal
import struct
import subprocess
import sys
import termios
import textwrap
from pathlib import Path

import pytest

import atomic
import convert
from checkpoint import ShardedCheckpoint
from test_convert import no_leftovers, write_tiny_gguf
from test_reshard import make_one_shard

ROOT = Path(__file__).resolve().parent.parent
TINY_GGUF_TENSORS = 21  # 2 layers x 9 + embedding, final norm, output
SLOW_SECONDS = 60  # how long the slowed-down process waits for its signal (it never waits that long)

# Run convert.py's main with a source that stops for a while after two tensors.
SLOW_CONVERT = """
import sys, time
sys.path.insert(0, {root!r})
import convert
open_source = convert.open_source

def slow_source(src, tokenizer_path):
    source = open_source(src, tokenizer_path)
    read_all = source.tensors
    def tensors():
        for i, item in enumerate(read_all()):
            if i == 2:
                print("started", flush=True)
                time.sleep({sleep})
            yield item
    source.tensors = tensors
    return source

convert.open_source = slow_source
convert.main(sys.argv[1:])
"""

# Run reshard.py's main; stop for a while once the first shard is on disk (a real temporary directory).
SLOW_RESHARD = """
import sys, time
sys.path.insert(0, {root!r})
import torch, reshard
real_save = torch.save

def save_then_wait(obj, path):
    real_save(obj, path)
    print("started", flush=True)
    time.sleep({sleep})

torch.save = save_then_wait
sys.exit(reshard.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path)
    return path


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    return make_one_shard(tmp_path_factory.mktemp("ckpt"), llama2_style=False)


def start_slow(script: str, tmp_path: Path, *args: str) -> subprocess.Popen:
    """Start the slowed-down tool; return once it has begun writing (it printed "started")."""
    program = tmp_path / "slow.py"
    program.write_text(textwrap.dedent(script).format(root=str(ROOT), sleep=SLOW_SECONDS))
    proc = subprocess.Popen([sys.executable, str(program), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    line = proc.stdout.readline()
    if line.strip() != "started":
        proc.kill()
        pytest.fail(f"the slowed-down tool did not start: {line!r} {proc.communicate()[1]}")
    return proc


def stop(proc: subprocess.Popen, signum: int) -> tuple[int, str]:
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    return proc.returncode, stderr


def entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# --------------------------------------------------------------------------------------------
# Ctrl-C and kill: the temporary is removed on the way out
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum, status, message", [
    (signal.SIGINT, 130, "convert.py: interrupted; nothing was written\n"),
    (signal.SIGTERM, 128 + signal.SIGTERM, ""),
])
def test_convert_stopped_by_a_signal_leaves_nothing(tiny_gguf, tmp_path, signum, status, message):
    parent = tmp_path / "models"
    parent.mkdir()
    proc = start_slow(SLOW_CONVERT, tmp_path, str(tiny_gguf), str(parent / "out"))
    assert [name for name in entries(parent) if ".out.tmp-" in name]  # it is mid-write
    returncode, stderr = stop(proc, signum)
    assert (returncode, stderr) == (status, message)
    assert entries(parent) == []


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 128 + signal.SIGTERM)])
def test_reshard_stopped_by_a_signal_leaves_nothing(tiny_ckpt, tmp_path, signum, status):
    parent = tmp_path / "models"
    parent.mkdir()
    proc = start_slow(SLOW_RESHARD, tmp_path, str(tiny_ckpt), str(parent / "two"), "--shards", "2")
    (temporary,) = [p for p in parent.iterdir() if p.name.startswith(".two.tmp-")]
    assert list(temporary.glob("consolidated.*.pth"))  # a shard is on disk
    returncode, stderr = stop(proc, signum)
    assert returncode == status, stderr
    assert "Traceback" not in stderr
    assert entries(parent) == []


# --------------------------------------------------------------------------------------------
# kill -9: the next write into the same directory removes what the killed process left
# --------------------------------------------------------------------------------------------


def test_convert_killed_with_sigkill_is_cleaned_up_by_the_next_conversion(tiny_gguf, tmp_path, capfd):
    parent = tmp_path / "models"
    parent.mkdir()
    proc = start_slow(SLOW_CONVERT, tmp_path, str(tiny_gguf), str(parent / "out"))
    returncode, _ = stop(proc, signal.SIGKILL)
    assert returncode == -signal.SIGKILL
    (left,) = entries(parent)
    assert left.startswith(f".out.tmp-{proc.pid}-")  # the temporary names its writer

    convert.convert(tiny_gguf, parent / "other", progress=False)
    assert entries(parent) == ["other"]
    assert f"note: removed {parent / left}, left by process {proc.pid}" in capfd.readouterr().err


def test_reshard_killed_with_sigkill_is_cleaned_up_by_the_next_reshard(tiny_ckpt, tmp_path):
    parent = tmp_path / "models"
    parent.mkdir()
    proc = start_slow(SLOW_RESHARD, tmp_path, str(tiny_ckpt), str(parent / "two"), "--shards", "2")
    stop(proc, signal.SIGKILL)
    (left,) = entries(parent)
    again = subprocess.run([sys.executable, "reshard.py", str(tiny_ckpt), str(parent / "two"), "--shards", "2"],
                           cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert entries(parent) == ["two"]
    assert f"note: removed {parent / left}, left by process {proc.pid}" in again.stderr


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_only_temporaries_of_dead_processes_are_removed(tmp_path, capfd):
    gone, alive = dead_pid(), os.getpid()
    for name in (f".a.tmp-{gone}-abc123_x", f".b.tmp-{alive}-abc123_x", f".c.old-{gone}-abc123_x",
                 f".d.old-{gone}-abc123_x", ".e.tmp-abc123_x", "f.tmp-1-abc", "d"):
        (tmp_path / name).mkdir()
    (tmp_path / f".g.json.tmp-{gone}-k2j4h5g6").write_text("{")  # a file temporary
    atomic.remove_stale_temporaries(tmp_path)
    # Kept: a live writer's, an old directory whose new one never arrived (the only copy), and
    # names that are not ours.
    assert entries(tmp_path) == [f".b.tmp-{alive}-abc123_x", f".c.old-{gone}-abc123_x", ".e.tmp-abc123_x", "d",
                                 "f.tmp-1-abc"]
    assert capfd.readouterr().err.count("note: removed") == 3


def test_the_signal_handler_is_scoped_and_restored(tmp_path):
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    with atomic.atomic_path(tmp_path / "x.txt") as tmp:
        assert signal.getsignal(signal.SIGTERM) == atomic.raise_system_exit
        tmp.write_text("x")
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL

    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, mine)  # a program's own handler is left alone
    try:
        with atomic.atomic_dir(tmp_path / "d"):
            assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


# --------------------------------------------------------------------------------------------
# Progress: a bar on a terminal, none in a pipe or with --quiet
# --------------------------------------------------------------------------------------------


def run_on_a_terminal(args: list[str]) -> tuple[int, str]:
    """Run `python ARGS` with stdin, stdout and stderr on a pseudo-terminal; everything it showed."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 0 x 0 would hide the bar
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    shown = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(master)
    return proc.wait(timeout=120), shown.decode(errors="replace")


def test_convert_draws_a_bar_per_tensor_on_a_terminal_only(tiny_gguf, tmp_path):
    status, shown = run_on_a_terminal(["convert.py", str(tiny_gguf), str(tmp_path / "tty")])
    assert status == 0, shown
    assert "converting: 100%" in shown and f"{TINY_GGUF_TENSORS}/{TINY_GGUF_TENSORS}" in shown, shown
    assert "tensor/s" in shown

    status, shown = run_on_a_terminal(["convert.py", str(tiny_gguf), str(tmp_path / "quiet"), "--quiet"])
    assert status == 0 and "converting" not in shown and "wrote" in shown, shown

    piped = subprocess.run([sys.executable, "convert.py", str(tiny_gguf), str(tmp_path / "pipe")], cwd=ROOT,
                           capture_output=True, text=True)
    assert piped.returncode == 0 and piped.stderr == "" and piped.stdout == f"wrote {tmp_path / 'pipe'}\n"


def test_reshard_draws_a_bar_per_tensor_on_a_terminal_only(tiny_ckpt, tmp_path):
    n_tensors = 2 * len(ShardedCheckpoint(tiny_ckpt).layouts)
    status, shown = run_on_a_terminal(["reshard.py", str(tiny_ckpt), str(tmp_path / "tty"), "--shards", "2"])
    assert status == 0, shown
    assert "writing tty: 100%" in shown and f"{n_tensors}/{n_tensors}" in shown, shown

    status, shown = run_on_a_terminal(["reshard.py", str(tiny_ckpt), str(tmp_path / "quiet"), "--shards", "2",
                                       "--quiet"])
    assert status == 0 and "writing" not in shown and "wrote 2 shard(s)" in shown, shown

    piped = subprocess.run([sys.executable, "reshard.py", str(tiny_ckpt), str(tmp_path / "pipe"), "--shards", "2"],
                           cwd=ROOT, capture_output=True, text=True)
    assert piped.returncode == 0 and piped.stderr == f"wrote 2 shard(s) to {tmp_path / 'pipe'}\n"
