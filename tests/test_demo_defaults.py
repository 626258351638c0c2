"""scripts/demo.sh's defaults: the numbers the README states are those of one torch thread per run."""

from pathlib import Path

from test_demo import archive, demo_env, run_demo  # noqa: F401  (archive is a fixture)


def test_demo_trains_and_evaluates_with_one_thread_by_default(tmp_path: Path, archive):  # noqa: F811
    env = demo_env(tmp_path, archive, DEMO_DRY_RUN="1")
    del env["DEMO_THREADS"]
    proc = run_demo(env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    commands = [line for line in lines if line.startswith(("teskd train", "teskd eval"))]
    assert len(commands) == 3
    for line in commands:
        assert line.split().count("train.threads=1") == 1, line


def test_demo_threads_overrides_the_default(tmp_path: Path, archive):  # noqa: F811
    proc = run_demo(demo_env(tmp_path, archive, DEMO_DRY_RUN="1", DEMO_THREADS="0"))
    assert proc.returncode == 0, proc.stderr
    train = [line for line in proc.stdout.splitlines() if line.startswith("teskd train")]
    assert len(train) == 2 and all("train.threads=0" in line.split() for line in train)


def test_demo_ends_by_saying_how_to_reach_teskd(tmp_path: Path, archive):  # noqa: F811
    proc = run_demo(demo_env(tmp_path, archive, DEMO_DRY_RUN="1"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == (
        "To run teskd yourself: source .venv/bin/activate in your shell (or call .venv/bin/teskd); the README's "
        "first section walks from training to a prediction from your own export.")
