"""The README's first screen, walked as a new user would: its commands, taken from between the walkthrough
markers and run as written (the `teskd train` lines with tiny-size overrides added), one after another in
one shell, in a fresh `git clone` of the committed repository, on a small synthetic CIFAR-100 in the npz
layout that $TESKD_DATA points at. Each step's exit status and the lines a user is told to expect are checked."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO

START, END = "<!-- walkthrough:start -->", "<!-- walkthrough:end -->"
# appended to every `teskd train` (a later key=value wins): a 1-epoch, 1/16-width run on a few images
TINY = ("model.width_mult=0.0625", "data.subset_per_class=2", "data.test_subset_per_class=1", "train.epochs=1",
        "train.progress=false")
TRAIN_PER_CLASS, TEST_PER_CLASS = 2, 2
CLASSES = [f"class{i:02d}" for i in range(100)]


def walkthrough_commands(readme: str) -> list[str]:
    """The commands of the bash block between the markers, continuation lines joined, comment lines dropped."""
    assert readme.count(START) == 1 and readme.count(END) == 1, "the README needs exactly one pair of markers"
    block = readme[readme.index(START) + len(START):readme.index(END)]
    fenced = re.fullmatch(r"\s*```bash\n(.*?)```\s*", block, re.S)
    assert fenced, "the walkthrough markers must hold one ```bash block"
    joined = fenced.group(1).replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def tiny(command: str) -> str:
    if not command.startswith("teskd train "):
        return command
    head, sep, tail = command.partition(" --out ")
    assert sep, f"a walkthrough train command without --out: {command}"
    return f"{head} {' '.join(TINY)}{sep}{tail}"


def write_cifar100_npz(root: Path) -> Path:
    folder = root / "cifar100"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        y = np.array([c for _ in range(per_class) for c in range(100)], dtype=np.int64)
        x = rng.integers(0, 256, (len(y), 32, 32, 3), dtype=np.uint8)
        np.savez(folder / f"{name}.npz", x=x, y=y, classes=np.array(CLASSES))
    return folder


def walk(clone: Path, commands: list[str], env: dict) -> list[tuple[str, int, str]]:
    """Runs the commands in one bash, as typed into one terminal; returns (command, exit status, output) each."""
    script = []
    for i, command in enumerate(commands):
        # the braces on their own lines: a trailing `# comment` of the command must not swallow the redirection
        script += [f"echo '@@step {i}'", "{", command, "} 2>&1", f"echo \"@@status {i} $?\""]
    proc = subprocess.run(["bash", "-c", "\n".join(script)], cwd=clone, env=env, capture_output=True, text=True,
                          timeout=1500)
    assert proc.stderr == "", proc.stderr[-3000:]
    steps = []
    for i, command in enumerate(commands):
        match = re.search(rf"^@@step {i}\n(.*?)^@@status {i} (\d+)$", proc.stdout, re.S | re.M)
        assert match, f"step {i} ({command}) did not finish:\n{proc.stdout[-3000:]}"
        steps.append((command, int(match.group(2)), match.group(1)))
    return steps


def test_the_walkthrough_is_the_path_from_activation_to_a_prediction():
    commands = walkthrough_commands((REPO / "README.md").read_text(encoding="utf-8"))
    assert [c.split()[:2] for c in commands] == [
        ["source", ".venv/bin/activate"], ["teskd", "train"], ["teskd", "train"], ["teskd", "report"],
        ["teskd", "eval"], ["teskd", "export"], ["python", "-c"], ["teskd", "predict"]]
    assert tiny(commands[1]).endswith(" ".join(TINY) + " --out runs/first-teskd")


@pytest.mark.slow
def test_the_readme_walkthrough_runs_in_a_fresh_clone(tmp_path):
    clone = tmp_path / "teskd"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True, timeout=300)
    commands = walkthrough_commands((clone / "README.md").read_text(encoding="utf-8"))
    # `make install` stands in for this: an activate script putting this venv's teskd/python and the clone's code first
    (clone / ".venv" / "bin").mkdir(parents=True)
    (clone / ".venv" / "bin" / "activate").write_text(
        f"export PATH='{Path(sys.executable).parent}':\"$PATH\"\nexport PYTHONPATH='{clone / 'src'}'\n")
    data = write_cifar100_npz(tmp_path / "datasets")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TESKD_", "PYTHON"))}
    env["TESKD_DATA"] = str(tmp_path / "datasets")
    steps = walk(clone, [tiny(c) for c in commands], env)
    for command, status, output in steps:
        assert status == 0, f"{command}\nexited {status}:\n{output[-3000:]}"
    check_outputs(clone, data, [o for _, _, o in steps])


def check_outputs(clone: Path, data: Path, outputs: list[str]) -> None:
    _, train_teskd, train_ce, report, evaluate, export, _, predict = outputs
    assert "deployable weights: runs/first-teskd/deployed.safetensors" in train_teskd
    assert "deployable weights: runs/first-ce/deployed.safetensors" in train_ce
    rows = {line.split()[0]: line.split() for line in report.splitlines() if line.startswith("first-")}
    assert rows["first-ce"][1:3] == ["ce", "1"] and rows["first-teskd"][1:3] == ["teskd", "1"]
    assert (f"evaluated on cifar100: the full test split, {100 * TEST_PER_CLASS} images (all test images), "
            f"read from {data}") in evaluate
    assert "wrote first.safetensors (safetensors, " in export and "verified: " in export
    assert (clone / "first.safetensors").is_file()
    images = sorted(p.name for p in (clone / "my_images").iterdir())
    n = 100 * TEST_PER_CLASS  # four images evenly spaced; test.npz lists the classes 0..99 in turn
    assert images == sorted(f"{i}_{CLASSES[i % 100]}.png" for i in range(0, n, n // 4))
    lines = [line.split() for line in predict.splitlines() if line.startswith("my_images/")]
    assert sorted(line[0] for line in lines) == [f"my_images/{name}" for name in images]
    for line in lines:  # path, then 3 x (class, probability), best first
        assert len(line) == 7 and all(name in CLASSES for name in line[1::2])
        probs = [float(p) for p in line[2::2]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.001
