"""scripts/demo.sh (`make demo`) at a tiny scale: data fallback, keeping the previous demo, the final evaluation."""

import hashlib
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO

DEMO = REPO / "scripts" / "demo.sh"
TRAIN_PER_CLASS, TEST_PER_CLASS = 2, 2
DEAD_PROXY = "http://127.0.0.1:9"  # any real download attempt fails at once instead of fetching 170 MB


def write_cifar100_python(root: Path) -> Path:
    """A tiny CIFAR-100 in the official python layout: root/cifar-100-python/{train,test,meta}."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        labels = [c for _ in range(per_class) for c in range(100)]
        split = {b"data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8), b"fine_labels": labels,
                 b"coarse_labels": [c // 5 for c in labels]}
        with open(folder / name, "wb") as f:
            pickle.dump(split, f, protocol=2)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"class{i}".encode() for i in range(100)],
                     b"coarse_label_names": [f"super{i}".encode() for i in range(20)]}, f, protocol=2)
    return folder


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """cifar-100-python.tar.gz holding the tiny dataset, as the official archive is laid out."""
    tmp = tmp_path_factory.mktemp("archive")
    folder = write_cifar100_python(tmp / "src")
    path = tmp / "cifar-100-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname="cifar-100-python")
    return path


def demo_env(tmp_path: Path, archive: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEMO_", "TESKD_"))}
    env.update({
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "TESKD_DATA": str(tmp_path / "no-data"),  # holds no cifar100/
        "DEMO_DATA_FALLBACK": str(tmp_path / "fallback"),  # instead of the repository's ./data
        "DEMO_OUT": str(tmp_path / "runs" / "demo"),
        "DEMO_EPOCHS": "1", "DEMO_PER_CLASS": "2", "DEMO_TEST_PER_CLASS": "1", "DEMO_WIDTH": "0.0625",
        "DEMO_THREADS": "1", "DEMO_EXTRA": "train.progress=false",
        "TESKD_CIFAR100_URL": archive.as_uri(),
        "TESKD_CIFAR100_MD5": hashlib.md5(archive.read_bytes()).hexdigest(),
        "http_proxy": DEAD_PROXY, "https_proxy": DEAD_PROXY, "HTTP_PROXY": DEAD_PROXY, "HTTPS_PROXY": DEAD_PROXY,
        "no_proxy": "", "NO_PROXY": "",
    })
    (tmp_path / "no-data").mkdir(exist_ok=True)
    env.update(extra)
    return env


def run_demo(env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(DEMO)], env=env, capture_output=True, text=True, timeout=timeout)


def download_overridable(tmp_path: Path, archive: Path) -> str | None:
    """None if teskd downloads from TESKD_CIFAR100_URL checking TESKD_CIFAR100_MD5; else why not."""
    code = ("import sys; from teskd.data.cifar import download_cifar; from teskd.errors import TeskdError\n"
            "try:\n    download_cifar('cifar100', sys.argv[1])\n"
            "except TeskdError as e:\n    print(e); sys.exit(3)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "probe")], capture_output=True, text=True,
                          env=demo_env(tmp_path, archive), timeout=120)
    if proc.returncode == 0:
        return None
    return f"teskd cannot download from TESKD_CIFAR100_URL with TESKD_CIFAR100_MD5 yet: {proc.stdout.strip()}"


def check_demo_output(proc, tmp_path: Path) -> str:
    out = proc.stdout
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    demo = tmp_path / "runs" / "demo"
    for method in ("ce", "teskd"):
        for name in ("summary.json", "deployed.safetensors", "metrics.jsonl"):
            assert (demo / method / name).is_file(), f"{method}/{name}"
    assert not (tmp_path / "runs" / "demo.partial").exists()
    # the report table and the plot with the comparable curves
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] in (["ce"], ["teskd"])}
    assert rows["ce"][1] == "ce" and rows["teskd"][1] == "teskd" and rows["teskd"][2] == "1"
    assert f"curves: {demo / 'curves.png'}" in out
    assert (demo / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the exported teacher, evaluated like a user's deployed model: on the whole test split
    data = (tmp_path / "fallback" / "cifar100").resolve()
    assert f"deployed network {demo / 'teskd' / 'deployed.safetensors'} (safetensors export, resnet18, width_mult 0.0625, 100 classes)" in out
    assert (f"evaluated on cifar100: the full test split, {100 * TEST_PER_CLASS} images (all test images), "
            f"read from {data}") in out
    assert "What these numbers mean: a 0.0625-width ResNet-18 trained for 1 epochs on 2 images per class" in out
    assert "README's Measured section" in out
    return out


def test_demo_uses_the_fallback_folder_and_keeps_the_previous_demo(tmp_path, archive):
    write_cifar100_python(tmp_path / "fallback" / "cifar100")  # downloaded by an earlier demo
    previous = tmp_path / "runs" / "demo"
    (previous / "ce").mkdir(parents=True)
    (previous / "ce" / "summary.json").write_text("{\"from\": \"the previous demo\"}")
    proc = run_demo(demo_env(tmp_path, archive))
    out = check_demo_output(proc, tmp_path)
    assert (f"data: {tmp_path / 'no-data'}/cifar100 does not hold CIFAR-100; using the copy downloaded earlier "
            f"in {tmp_path / 'fallback'}/cifar100") in out
    kept = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith("demo.")]
    assert len(kept) == 1 and f"the previous demo is kept in {kept[0]}" in out
    assert (kept[0] / "ce" / "summary.json").read_text() == "{\"from\": \"the previous demo\"}"
    assert not (tmp_path / "fallback" / "cifar100" / "cifar-100-python.tar.gz").exists()  # nothing downloaded


def test_demo_downloads_into_the_fallback_folder(tmp_path, archive):
    reason = download_overridable(tmp_path, archive)
    if reason:
        pytest.skip(reason)
    proc = run_demo(demo_env(tmp_path, archive))
    out = check_demo_output(proc, tmp_path)
    assert (f"data: {tmp_path / 'no-data'}/cifar100 does not hold CIFAR-100; downloading CIFAR-100 (about 170 MB, "
            f"MD5-checked) into {tmp_path / 'fallback'}/cifar100 from {archive.as_uri()}") in out
    assert (tmp_path / "fallback" / "cifar100" / "cifar-100-python.tar.gz").read_bytes() == archive.read_bytes()


def test_dry_run_prefers_the_offline_copy(tmp_path, archive):
    shared = tmp_path / "shared" / "cifar100"
    shared.mkdir(parents=True)
    (shared / "train.npz").write_bytes(b"")
    (shared / "test.npz").write_bytes(b"")
    proc = run_demo(demo_env(tmp_path, archive, TESKD_DATA=str(tmp_path / "shared"), DEMO_DRY_RUN="1"))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"data: CIFAR-100 from {shared}"
    train = [line for line in lines if line.startswith("teskd train")]
    assert len(train) == 2
    for line in train:
        assert f"data.root={shared} " in line and "data.download=false" in line and "--overwrite" in line
        assert f"--out {tmp_path / 'runs' / 'demo.partial'}/" in line  # never the previous demo's folder
        assert "data.test_subset_per_class=1" in line and "train.threads=1" in line
    assert any(line.startswith(f"teskd eval {tmp_path / 'runs' / 'demo'}/teskd/deployed.safetensors") for line in lines)
    assert not (tmp_path / "runs").exists()  # a dry run trains and moves nothing


def test_dry_run_without_teskd_data_falls_back_with_download(tmp_path, archive):
    env = demo_env(tmp_path, archive, DEMO_DRY_RUN="1")
    del env["TESKD_DATA"]
    proc = run_demo(env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].startswith(
        f"data: TESKD_DATA is not set; downloading CIFAR-100 (about 170 MB, MD5-checked) into "
        f"{tmp_path / 'fallback'}/cifar100")
    train = [line for line in proc.stdout.splitlines() if line.startswith("teskd train")]
    assert len(train) == 2 and all("data.download=true" in line for line in train)
