"""Errors that name the right thing (issue 24, items 6 and 7): what a new user meets in the first hour, each
reproduced as the user met it and answered by the message they should have seen."""

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import teskd
from teskd.cli import CONFIG_KEYS, build_parser, main
from teskd.engine.signals import Interrupted
from teskd.errors import TeskdError

from conftest import REPO, hooked_trainer

FOLDER_CONFIG = str(REPO / "configs" / "imagefolder" / "small_resnet18_teskd.yaml")
CIFAR_CONFIG = str(REPO / "configs" / "cifar100" / "resnet18_ce.yaml")
CLASSES = ("ant", "bee", "cat")
# 4 images a class, batches of 4: an epoch is 3 batches
TINY = ["data.image_size=32", "data.eval_resize=36", "data.batch_size=4", "data.workers=0", "model.width_mult=0.0625",
        "train.epochs=2", "train.progress=false", "train.threads=1", "schedule.warmup_epochs=0"]


def image_tree(root: Path) -> Path:
    for split, n in (("train", 4), ("val", 2)):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new("RGB", (40, 40), (80 * c, 30 * i, 200 - 60 * c)).save(root / split / name / f"{i}.png")
    return root


def one_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return image_tree(tmp_path_factory.mktemp("first-hour") / "data")


@pytest.fixture(scope="module")
def mid_run(data) -> Path:
    """A run stopped by SIGTERM after the first batch of its first epoch: a mid-epoch last.pt, no best.pt."""
    run = data.parent / "mid"

    def stop_after_first_batch(trainer, n, out):
        if n == 1:
            trainer.stop_signal = "SIGTERM"
        return out

    trainer = hooked_trainer(FOLDER_CONFIG, [f"data.root={data}", *TINY], run, stop_after_first_batch)
    with pytest.raises(Interrupted, match="stopped at epoch 1, batch 1"):
        trainer.run()
    assert (run / "checkpoints" / "last.pt").is_file() and not (run / "checkpoints" / "best.pt").exists()
    return run


PARTIAL = "weights from the middle of epoch 1 (batch 1 of 3), partly trained"


# --- 6a. a mid-epoch checkpoint says so ---------------------------------------------------------------------


def test_eval_export_and_predict_say_a_mid_epoch_checkpoint_is_partly_trained(mid_run, data, tmp_path, capsys):
    last = mid_run / "checkpoints" / "last.pt"
    assert main(["eval", str(mid_run)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"checkpoint {last} (resnet18_imagenet/teskd): {PARTIAL}"
    assert "epoch 0" not in out
    assert main(["eval", str(mid_run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["epoch"] == 0 and result["partial"] == PARTIAL

    assert main(["export", str(mid_run), "--out", str(tmp_path / "m.safetensors")]) == 0
    out = capsys.readouterr().out
    assert f"from {last}: {PARTIAL}\n" in out and "(epoch 0)" not in out

    assert main(["predict", str(mid_run), str(data / "val" / "ant" / "0.png"), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["results"]  # stdout stays JSON: the note goes to stderr
    assert captured.err == f"note: {last} holds {PARTIAL}\n"


def test_a_finished_epoch_is_still_named_by_its_number(data, tmp_path, capsys):
    run = tmp_path / "done"
    assert main(["train", FOLDER_CONFIG, f"data.root={data}", *TINY, "train.epochs=1", "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == \
        f"checkpoint {run / 'checkpoints' / 'last.pt'} (epoch 1, resnet18_imagenet/teskd)"
    # 7g: a resumed run says where it goes on, once
    assert main(["train", "--resume", str(run), "train.epochs=2"]) == 0
    out = capsys.readouterr().out
    assert out.count("resuming after epoch 1 of 2: checkpoints/last.pt\n") == 1


def test_resume_of_a_new_folder_starts_it_and_does_not_call_it_stopped(data, tmp_path, capsys):
    """A sweep starts every run with --resume: a new folder is said to start, once; only a folder whose run wrote
    its config.yaml and was killed before its first checkpoint is said to have stopped before its first save."""
    run = tmp_path / "new"
    args = ["train", FOLDER_CONFIG, f"data.root={data}", *TINY, "train.epochs=1", "--resume", str(run)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count(f"{run} has no config.yaml yet: starting it from {FOLDER_CONFIG}\n") == 1
    assert "stopped before its first save" not in out
    shutil.rmtree(run / "checkpoints")
    (run / "metrics.jsonl").unlink()
    (run / "summary.json").unlink()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count(f"no checkpoint in {run} yet (stopped before its first save): starting the run again") == 1


def test_resuming_mid_epoch_says_the_epoch_and_batch(mid_run, tmp_path, capsys):
    run = Path(shutil.copytree(mid_run, tmp_path / "run"))
    assert main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert out.count("resuming from epoch 1 (batch 1 of 3): checkpoints/last.pt\n") == 1
    assert "resuming after" not in out


# --- 6b. --checkpoint best of a run that has none yet --------------------------------------------------------


@pytest.mark.parametrize("command", ["eval", "export", "predict"])
def test_best_of_a_run_without_one_names_what_it_has(mid_run, data, tmp_path, capsys, command):
    extra = {"eval": [], "export": ["--out", str(tmp_path / "x.safetensors")],
             "predict": [str(data / "val" / "ant" / "0.png")]}[command]
    assert main([command, str(mid_run), *extra, "--checkpoint", "best"]) == 2
    assert one_error(capsys) == (
        f"error: {mid_run} has no best checkpoint yet (checkpoints/best.pt is written once an evaluated epoch "
        f"improves); it has checkpoints/last.pt: use the last checkpoint")


def test_a_run_folder_without_any_checkpoint_is_not_asked_whether_it_is_one(mid_run, tmp_path, capsys):
    run = tmp_path / "early"
    run.mkdir()
    shutil.copy(mid_run / "config.yaml", run / "config.yaml")
    assert main(["eval", str(run)]) == 2
    assert one_error(capsys) == f"error: {run} has no checkpoint yet (it stopped, or is still, before its first save)"


# --- 6c. the model argument is an image, a text file or a folder of images -----------------------------------

USAGE = "teskd predict MODEL IMAGES..., where MODEL is a run folder, .pt, .safetensors, .onnx or .pt2"


def test_swapped_predict_arguments_name_the_image_and_the_order(data, capsys):
    image = data / "val" / "ant" / "0.png"
    assert main(["predict", str(image), str(data / "val")]) == 2
    assert one_error(capsys) == f"error: {image} is not a model file (a PNG image?): {USAGE}"
    assert main(["predict", str(data / "val"), str(image)]) == 2
    assert one_error(capsys) == (f"error: {data / 'val'} is not a teskd run directory (it has no config.yaml or "
                                 f"checkpoints/: it holds images): {USAGE}")


@pytest.mark.parametrize("name, content, kind", [
    ("notes.txt", b"hello\n", " (a text file?)"),
    ("photo.jpeg.bak", b"\xff\xd8\xff\xe0" + b"\0" * 20, " (a JPEG image?)"),
    ("anim.gif", b"GIF89a" + b"\0" * 20, " (a GIF image?)"),
    ("pic.webp", b"RIFF\x10\0\0\0WEBPVP8 " + b"\0" * 20, " (a WebP image?)"),
    ("paper.pdf", b"%PDF-1.7\n" + b"\0" * 20, " (a PDF document?)"),
    ("empty", b"", " (an empty file?)"),
    ("blob.dat", bytes(range(200, 240)), ""),
])
def test_a_file_that_is_no_model_is_named_before_it_is_loaded(tmp_path, capsys, name, content, kind):
    path = tmp_path / name
    path.write_bytes(content)
    assert main(["predict", str(path), str(tmp_path)]) == 2
    assert one_error(capsys) == f"error: {path} is not a model file{kind}: {USAGE}"
    # eval and export (and the Python API) say it with what a model may be instead of predict's usage
    assert main(["eval", str(path)]) == 2
    assert one_error(capsys) == (f"error: {path} is not a model file{kind}; a model is a run folder, .pt, "
                                 f".safetensors, .onnx or .pt2")
    with pytest.raises(TeskdError, match="is not a model file"):
        teskd.load(path)


def test_checkpoint_content_is_loaded_whatever_its_suffix_and_a_damaged_pt_is_called_corrupt(mid_run, data, tmp_path,
                                                                                           capsys):
    renamed = tmp_path / "model.weights"  # torch.save's zip archive: recognised by its content
    shutil.copy(mid_run / "checkpoints" / "last.pt", renamed)
    assert main(["predict", str(renamed), str(data / "val" / "ant" / "0.png")]) == 0
    capsys.readouterr()
    bad = tmp_path / "last.pt"  # a checkpoint's suffix: read as one, and its damage named as such
    bad.write_text("hello")
    assert main(["predict", str(bad), str(data / "val")]) == 2
    assert one_error(capsys).startswith(f"error: checkpoint {bad} is corrupt or not a teskd checkpoint")


# --- 6d. predict --device names --device ---------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_predict_on_a_missing_gpu_names_its_own_option(mid_run, data, capsys):
    assert main(["predict", str(mid_run), str(data / "val"), "--device", "cuda"]) == 2
    assert one_error(capsys) == "error: --device cuda but no CUDA GPU is available (use --device cpu or auto)"
    out = str(data.parent / "x")
    assert main(["train", FOLDER_CONFIG, f"data.root={data}", "train.device=cuda", "--out", out]) == 2
    assert one_error(capsys) == "error: train.device=cuda but no CUDA GPU is available (use train.device=cpu or auto)"


# --- 6e. --resume / --out of a folder of images; the Python API's spelling -----------------------------------


def test_resume_of_a_folder_of_images_says_what_it_is_and_suggests_nothing_refused(data, capsys):
    images = data / "train"  # class folders of images
    expected = (f"error: cannot resume {images}: it is not a teskd run directory (it holds ant, bee, cat, which teskd "
                f"did not write: a folder of images?); --resume continues a folder written by teskd train (with "
                f"config.yaml); to train on images, give their folder as data.root; for a new run, choose a new or "
                f"empty --out")
    assert main(["train", "--resume", str(images)]) == 2
    assert one_error(capsys) == expected
    assert main(["train", FOLDER_CONFIG, "--resume", str(images)]) == 2  # was: "refusing to --overwrite"
    assert one_error(capsys) == expected
    flat = data / "val" / "ant"  # the images themselves
    assert main(["train", FOLDER_CONFIG, "--out", str(flat)]) == 2  # was: "use --resume ... or --overwrite"
    assert one_error(capsys) == (f"error: --out {flat} is not a teskd run directory (it holds 0.png, 1.png, which "
                                 f"teskd did not write: a folder of images?); choose a new or empty --out")
    assert sorted(p.name for p in flat.iterdir()) == ["0.png", "1.png"]  # nothing written there


def test_the_python_api_spells_its_own_arguments(data, mid_run, tmp_path):
    images = data / "val" / "ant"
    with pytest.raises(TeskdError) as err:
        teskd.train(None, out=images, resume=True)
    assert "resume=True continues a folder written by teskd train" in str(err.value)
    assert "choose a new or empty out" in str(err.value) and "--" not in str(err.value)
    with pytest.raises(TeskdError) as err:
        teskd.train(None, out=images, overwrite=True)
    assert str(err.value) == (f"refusing to overwrite {images}: it is not a teskd run directory (it holds 0.png, "
                              f"1.png, which teskd did not write); choose another out")
    with pytest.raises(TeskdError) as err:
        teskd.train(None, out=mid_run)
    assert str(err.value) == (f"run directory {mid_run} already exists and is not empty; use resume=True to continue "
                              f"it or overwrite=True to replace it")
    with pytest.raises(TeskdError, match=r"^resume=True and overwrite=True contradict each other; pass one of them$"):
        teskd.train(None, out=mid_run, resume=True, overwrite=True)
    missing = tmp_path / "missing"
    with pytest.raises(TeskdError) as err:
        teskd.train(None, out=missing, resume=True)
    assert str(err.value).endswith(f"pass the config too: teskd.train(CONFIG, out={str(missing)!r}, resume=True))")
    file = tmp_path / "file.txt"
    file.write_text("keep")
    with pytest.raises(TeskdError, match=r"^out='.*file\.txt' is an existing file, not a run directory; choose "
                                         r"another out$"):
        teskd.train(None, out=file)


def test_the_python_api_export_spells_its_own_arguments(mid_run, tmp_path, capsys):
    first = tmp_path / "net.safetensors"
    teskd.export(mid_run, "safetensors", out=first)
    with pytest.raises(TeskdError, match=r"^.*net\.safetensors exists; pass overwrite=True to replace it"):
        teskd.export(mid_run, "safetensors", out=first)
    with pytest.raises(TeskdError, match=r"^out='.*' is a folder; give a file name"):
        teskd.export(mid_run, "safetensors", out=tmp_path)
    assert main(["export", str(mid_run), "--out", str(first)]) == 2  # the command line keeps its flags
    assert "pass --overwrite to replace it" in one_error(capsys)


def test_the_cli_keeps_its_flags(mid_run, tmp_path, capsys):
    assert main(["train", CIFAR_CONFIG, "--out", str(mid_run)]) == 2
    assert one_error(capsys) == (f"error: run directory {mid_run} already exists and is not empty; use --resume "
                                 f"{mid_run} to continue it or --overwrite to replace it")
    assert main(["train", "--resume", str(tmp_path / "missing")]) == 2
    assert one_error(capsys).endswith(f"pass the config too: teskd train CONFIG --resume {tmp_path / 'missing'})")


# --- 6f. unknown names, before the data ----------------------------------------------------------------------


def test_an_unknown_architecture_is_named_before_the_data_and_lists_library_names(tmp_path, capsys, monkeypatch):
    import teskd.data.pipeline as pipeline

    def no_data(*args, **kwargs):
        raise AssertionError("the data was read before the names were checked")

    monkeypatch.setattr(pipeline, "build_data", no_data)
    out = str(tmp_path / "run")
    # the data path is wrong too: the name is what the user hears about (it was hidden behind the path before)
    assert main(["train", CIFAR_CONFIG, "model.arch=resnet81", "data.root=/nonexistent", "--out", out]) == 2
    err = one_error(capsys)
    assert err.startswith("error: model.arch: unknown architecture 'resnet81'; known: resnet18, ")
    assert err.endswith(", vgg19, or tv:NAME / timm:NAME for torchvision/timm models")
    assert main(["train", CIFAR_CONFIG, "data.dataset=cifar1000", "data.root=/nonexistent", "--out", out]) == 2
    assert one_error(capsys) == ("error: data.dataset: unknown dataset 'cifar1000'; known datasets: cifar10, cifar100, "
                                 "imagefolder, imagenet")
    # a library's names are its own: asked of the library when the run is assembled, still before the data
    assert main(["train", CIFAR_CONFIG, "model.arch=tv:resnet1000", "data.root=/nonexistent", "--out", out]) == 2
    assert one_error(capsys).startswith("error: unknown torchvision classification model 'resnet1000'; similar: ")
    assert not (tmp_path / "run").exists()
    # commands that read no data name it too, with the library names
    assert main(["info", CIFAR_CONFIG, "model.arch=resnet81"]) == 2
    assert one_error(capsys).endswith("vgg19, or tv:NAME / timm:NAME for torchvision/timm models")


def test_known_and_library_names_pass_the_check():
    from teskd.config import load_config
    from teskd.launch import check_names

    check_names(load_config(CIFAR_CONFIG, ["model.arch=tv:resnet18"]))
    check_names(load_config(FOLDER_CONFIG))


# --- 7h-j. help ----------------------------------------------------------------------------------------------


def _actions(parser: argparse.ArgumentParser, prefix: str = "teskd"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, f"{prefix} {name}")
            for choice in action._choices_actions:  # the one-line summary of each command
                yield f"{prefix} {choice.dest}", choice
        else:
            yield prefix, action


def test_every_argument_of_every_command_has_help():
    missing = [f"{where}: {'/'.join(a.option_strings) or a.dest}" for where, a in _actions(build_parser())
               if not (a.help or "").strip() or a.help == argparse.SUPPRESS]
    assert missing == []


def test_help_is_plain_text_and_train_says_where_the_keys_are(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    assert "``" not in top and "teskd COMMAND --help" in " ".join(top.split())
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Every config key, its default and meaning: docs/configuration.md#every-key" in text
    page, anchor = CONFIG_KEYS.split("#")
    headings = [line for line in (REPO / page).read_text(encoding="utf-8").splitlines() if line.startswith("#")]
    assert any(h.lstrip("#").strip().lower().replace(" ", "-") == anchor for h in headings)


# --- 7m. gradients under DDP have their parameters' strides --------------------------------------------------


def test_gradients_are_given_their_parameters_strides_without_a_copy():
    from teskd.engine.runtime import match_gradient_strides

    net = torch.nn.Sequential(torch.nn.Conv2d(16, 8, 1), torch.nn.Conv2d(8, 8, 3, padding=1, groups=8))
    net.to(memory_format=torch.channels_last)
    assert match_gradient_strides(net) == 2  # the 1x1 kernel and the depthwise one (size-1 dimensions)
    features = torch.randn(2, 16, 1, 1).contiguous(memory_format=torch.channels_last)  # 1x1 features
    net(features).sum().backward()
    images = torch.randn(2, 16, 5, 5).contiguous(memory_format=torch.channels_last)
    net(images).sum().backward()
    for p in net.parameters():
        assert p.grad.stride() == p.stride(), (tuple(p.shape), p.grad.stride(), p.stride())
    # a real difference in layout is not relabelled (that would reorder the values)
    from teskd.engine.runtime import _with_strides

    grad = torch.arange(6.0).reshape(2, 3, 1, 1)
    other = _with_strides((2, 3, 1, 1), (1, 2, 1, 1))(grad)
    assert other is grad
