"""download.sh against a local HTTP server on 127.0.0.1 serving a fake Meta model tree.

The server answers like Meta's CDN as far as download.sh can tell: the signed URL's `*` becomes
each file's path, the query string (the "signature") rides along, and byte ranges are honoured so
an interrupted download can resume. Every request is recorded, so "fetches nothing" is checked on
the wire. Each test runs once per downloader installed here (wget, curl).
"""

import hashlib
import os
import re
import shutil
import subprocess
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

DOWNLOAD_SH = Path(__file__).resolve().parent.parent / "download.sh"
DOWNLOADERS = [tool for tool in ("wget", "curl") if shutil.which(tool)]
SHARD_BYTES = 300_000  # big enough that a resumed download is visibly partial
SIGNATURE = "Policy=abc&Signature=def~ghi&Key-Pair-Id=K1"


class RangeHandler(SimpleHTTPRequestHandler):
    """Static files with `Range: bytes=N-` support; records (path, Range header) of every GET."""

    def do_GET(self):
        self.server.requests.append((self.path, self.headers.get("Range")))
        path = Path(self.translate_path(self.path))  # drops the query string
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        requested = self.headers.get("Range")
        start = int(re.fullmatch(r"bytes=(\d+)-", requested).group(1)) if requested else 0
        if start >= len(data) > 0:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.end_headers()
            return
        self.send_response(206 if requested else 200)
        if requested:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self.wfile.write(data[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """(root dir served, base URL, list of requests): a threaded HTTP server on 127.0.0.1."""
    root = tmp_path / "meta-cdn"
    root.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(RangeHandler, directory=str(root)))
    httpd.requests = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}", httpd.requests
    httpd.shutdown()
    httpd.server_close()


def write_model_folder(folder: Path, files: dict[str, bytes]) -> None:
    """A model folder as on Meta's server: the files plus checklist.chk of their md5 sums."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / "checklist.chk").write_text("".join(f"{hashlib.md5(d).hexdigest()}  {n}\n" for n, d in files.items()))


def fake_bytes(seed: int, n: int = SHARD_BYTES) -> bytes:
    return hashlib.sha256(str(seed).encode()).digest() * (n // 32)


def llama_3_2_tree(root: Path) -> dict[str, bytes]:
    files = {"params.json": b'{"dim": 2048}', "tokenizer.model": fake_bytes(1, 1000), "consolidated.00.pth": fake_bytes(2)}
    write_model_folder(root / "Llama-3.2-1B", files)
    return files


def llama_2_tree(root: Path) -> dict[str, bytes]:
    files = {"params.json": b'{"dim": 5120}', "consolidated.00.pth": fake_bytes(3), "consolidated.01.pth": fake_bytes(4)}
    write_model_folder(root / "llama-2-13b", files)
    tokenizer = fake_bytes(5, 1000)
    (root / "tokenizer.model").write_bytes(tokenizer)
    (root / "tokenizer_checklist.chk").write_text(f"{hashlib.md5(tokenizer).hexdigest()}  tokenizer.model\n")
    (root / "LICENSE").write_text("licence")
    (root / "USE_POLICY.md").write_text("policy")
    return {**files, "tokenizer.model": tokenizer}


def run(url: str, models: str, target: Path, downloader: str, *options: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PRESIGNED_URL": url, "MODEL_SIZE": models, "TARGET_FOLDER": str(target),
           "DOWNLOADER": downloader}
    return subprocess.run(["bash", str(DOWNLOAD_SH), *options], env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)


def signed(base: str) -> str:
    return f"{base}/*?{SIGNATURE}"


def parts_left(target: Path) -> list[Path]:
    return sorted(target.rglob("*.part"))


@pytest.mark.parametrize("downloader", DOWNLOADERS)
@pytest.mark.parametrize("model, folder, make_tree", [
    ("llama-3.2-1b", "llama-3.2-1b", llama_3_2_tree),
    ("Llama-2-13B", "llama-2-13b", llama_2_tree),  # names are case-insensitive
    ("13B", "llama-2-13b", llama_2_tree),  # Meta's Llama 2 spelling
    ("Llama3.2-1B", "llama-3.2-1b", llama_3_2_tree),  # llama-models' spelling
])
def test_good_checksums_pass_and_give_a_complete_checkpoint_dir(server, tmp_path, downloader, model, folder, make_tree):
    root, base, requests = server
    files = make_tree(root)
    target = tmp_path / "models"
    result = run(signed(base), model, target, downloader)
    assert result.returncode == 0, result.stderr
    for name, data in files.items():
        assert (target / folder / name).read_bytes() == data, name
    assert (target / folder / "checklist.chk").is_file()
    assert parts_left(target) == []
    assert requests and all(path.endswith("?" + SIGNATURE) for path, _ in requests)  # the signature rides along

    # A second run finds everything in place and fetches nothing.
    requests.clear()
    again = run(signed(base), model, target, downloader)
    assert again.returncode == 0, again.stderr
    assert requests == []


@pytest.mark.parametrize("downloader", DOWNLOADERS)
def test_corrupted_file_fails_loudly_naming_it_and_leaves_no_file_under_its_name(server, tmp_path, downloader):
    root, base, _ = server
    llama_3_2_tree(root)
    shard = root / "Llama-3.2-1B" / "consolidated.00.pth"
    shard.write_bytes(b"X" + shard.read_bytes()[1:])  # one byte flipped after the checklist was made
    target = tmp_path / "models"
    result = run(signed(base), "llama-3.2-1b", target, downloader)
    assert result.returncode != 0
    assert re.search(r"checksum mismatch for .*llama-3\.2-1b/consolidated\.00\.pth: expected [0-9a-f]{32}, got "
                     r"[0-9a-f]{32}", result.stderr), result.stderr
    assert not (target / "llama-3.2-1b" / "consolidated.00.pth").exists()
    assert parts_left(target) == []  # the corrupt bytes are not kept for a "resume" either
    assert (target / "llama-3.2-1b" / "params.json").is_file()  # files that matched are kept


@pytest.mark.parametrize("downloader", DOWNLOADERS)
def test_file_the_checklist_does_not_list_is_not_done(server, tmp_path, downloader):
    """It cannot be verified: the script fails naming it, and it never gets its final name."""
    root, base, _ = server
    files = llama_3_2_tree(root)
    checklist = root / "Llama-3.2-1B" / "checklist.chk"
    checklist.write_text("".join(line + "\n" for line in checklist.read_text().splitlines()
                                 if not line.endswith("consolidated.00.pth")))
    target = tmp_path / "models"
    result = run(signed(base), "llama-3.2-1b", target, downloader)
    assert result.returncode != 0
    assert re.search(r"error: .*llama-3\.2-1b/consolidated\.00\.pth is not listed in .*checklist\.chk, so it "
                     r"cannot be verified and is not done", result.stderr), result.stderr
    assert "matched its checksum" not in result.stderr
    assert not (target / "llama-3.2-1b" / "consolidated.00.pth").exists()
    assert (target / "llama-3.2-1b" / "consolidated.00.pth.part").read_bytes() == files["consolidated.00.pth"]


# Meta's spellings (its emails, its download scripts, llama-models) -> our folder and Meta's remote folder.
META_SPELLINGS = {
    "7B": ("llama-2-7b", "llama-2-7b"), "70B-chat": ("llama-2-70b-chat", "llama-2-70b-chat"),
    "8B": ("llama-3-8b", "8b_pre_trained"), "8b-Instruct": ("llama-3-8b-instruct", "8b_instruction_tuned"),
    "Meta-Llama-3-70B": ("llama-3-70b", "70b_pre_trained"),
    "Meta-Llama-3-70B-Instruct": ("llama-3-70b-instruct", "70b_instruction_tuned"),
    "Meta-Llama-3.1-8B-Instruct": ("llama-3.1-8b-instruct", "Llama-3.1-8B-Instruct"),
    "Llama3.1-70B": ("llama-3.1-70b", "Llama-3.1-70B"),
    "Llama3.1-405B:bf16-mp16": ("llama-3.1-405b-mp16", "Llama-3.1-405B-MP16"),
    "Meta-Llama-3.1-405B-Instruct": ("llama-3.1-405b-instruct", "Llama-3.1-405B-Instruct-MP8"),
    "Llama3.2-3B-Instruct": ("llama-3.2-3b-instruct", "Llama-3.2-3B-Instruct"),
}


@pytest.mark.parametrize("meta_name", META_SPELLINGS)
def test_meta_spellings_name_the_same_models(server, tmp_path, meta_name):
    _, base, requests = server
    ours, remote = META_SPELLINGS[meta_name]
    target = tmp_path / "models"
    result = run(signed(base), meta_name, target, DOWNLOADERS[0], "--dry-run")
    assert result.returncode == 0, result.stderr
    assert f"{meta_name} is {ours}" in result.stderr
    assert f"{base}/{remote}/checklist.chk -> {target}/{ours}/checklist.chk" in result.stdout, result.stdout
    assert requests == []


@pytest.mark.parametrize("downloader", DOWNLOADERS)
def test_interrupted_download_resumes_from_its_part_file(server, tmp_path, downloader):
    root, base, requests = server
    files = llama_3_2_tree(root)
    target = tmp_path / "models"
    half = SHARD_BYTES // 2
    (target / "llama-3.2-1b").mkdir(parents=True)
    (target / "llama-3.2-1b" / "consolidated.00.pth.part").write_bytes(files["consolidated.00.pth"][:half])
    result = run(signed(base), "llama-3.2-1b", target, downloader)
    assert result.returncode == 0, result.stderr
    assert (target / "llama-3.2-1b" / "consolidated.00.pth").read_bytes() == files["consolidated.00.pth"]
    assert (f"/Llama-3.2-1B/consolidated.00.pth?{SIGNATURE}", f"bytes={half}-") in requests


@pytest.mark.parametrize("downloader", DOWNLOADERS)
def test_complete_part_file_from_a_stopped_run_is_verified_and_renamed(server, tmp_path, downloader):
    """The server answers 416 (nothing left to send); the checksum then decides."""
    root, base, requests = server
    files = llama_3_2_tree(root)
    target = tmp_path / "models"
    (target / "llama-3.2-1b").mkdir(parents=True)
    (target / "llama-3.2-1b" / "consolidated.00.pth.part").write_bytes(files["consolidated.00.pth"])
    result = run(signed(base), "llama-3.2-1b", target, downloader)
    assert result.returncode == 0, result.stderr
    assert (target / "llama-3.2-1b" / "consolidated.00.pth").read_bytes() == files["consolidated.00.pth"]
    assert parts_left(target) == []


@pytest.mark.parametrize("downloader", DOWNLOADERS)
def test_dry_run_lists_every_file_and_fetches_nothing(server, tmp_path, downloader):
    root, base, requests = server
    llama_2_tree(root)
    target = tmp_path / "models"
    result = run(signed(base), "llama-2-13b", target, downloader, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert requests == []
    assert not target.exists()
    for name in ("tokenizer.model", "llama-2-13b/params.json", "llama-2-13b/consolidated.01.pth",
                 "llama-2-13b/checklist.chk"):
        assert f"{base}/{name} -> {target}/{name}" in result.stdout, name
    assert SIGNATURE not in result.stdout  # the signature is a credential: not printed


def test_missing_checklist_stops_before_any_weights_are_fetched(server, tmp_path):
    root, base, requests = server
    llama_3_2_tree(root)
    (root / "Llama-3.2-1B" / "checklist.chk").unlink()
    target = tmp_path / "models"
    result = run(signed(base), "llama-3.2-1b", target, DOWNLOADERS[0])
    assert result.returncode != 0
    assert "could not download Llama-3.2-1B/checklist.chk" in result.stderr
    assert "without it nothing can be verified" in result.stderr
    assert [path for path, _ in requests if "consolidated" in path] == []


@pytest.mark.parametrize("url, models, message", [
    ("{base}/no-star?{sig}", "llama-3.2-1b", r"the URL has no '\*'"),
    ("{base}/*?{sig}", "llama-3.2-1b,llama-5-1t", r"unknown model 'llama-5-1t' in MODEL_SIZE; known models: llama-2-7b "),
    ("", "llama-3.2-1b", r"no URL given: .* set PRESIGNED_URL"),
    ("{base}/*?{sig}", "", r"no models given: .* set MODEL_SIZE"),
])
def test_bad_input_is_an_error_before_anything_is_fetched(server, tmp_path, url, models, message):
    root, base, requests = server
    llama_3_2_tree(root)
    result = run(url.format(base=base, sig=SIGNATURE), models, tmp_path / "models", DOWNLOADERS[0])
    assert result.returncode != 0
    assert re.search(message, result.stderr), result.stderr
    assert requests == []


def test_help_names_the_environment_variables_and_every_model():
    result = subprocess.run(["bash", str(DOWNLOAD_SH), "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for word in ("PRESIGNED_URL", "MODEL_SIZE", "TARGET_FOLDER", "--dry-run", "llama-2-70b-chat",
                 "llama-3.1-405b", "llama-3.2-3b-instruct", "Meta's own names", "7B", "Meta-Llama-3.1-8B-Instruct"):
        assert word in result.stdout
