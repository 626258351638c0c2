"""A diverged network whose evaluation gives NaN logits stops the run in one line instead of reporting an
accuracy (a tv:mnasnet0_5 run once finished 'normally' at top-1 1.00 % with BatchNorm running variance at 1e3)."""

import pytest
import torch

from teskd.cli import main
from teskd.engine.evaluate import NonFiniteEvaluation, evaluate

from conftest import REPO

CE = str(REPO / "configs" / "cifar100" / "resnet18_ce.yaml")


def test_evaluate_refuses_non_finite_logits():
    class Model(torch.nn.Module):
        def forward(self, x):
            out = torch.zeros(x.shape[0], 3)
            out[0, 1] = float("nan")
            return {"teacher": out, "student": torch.zeros(x.shape[0], 3)}

    batches = [(torch.zeros(4, 3, 8, 8), torch.tensor([0, 1, 2, 0]))]
    with pytest.raises(NonFiniteEvaluation, match=r"non-finite \(NaN or infinite\) logits \(teacher: 1 of 4 images\)"):
        evaluate(Model(), batches, torch.device("cpu"))


def test_training_stops_when_its_evaluation_is_not_finite(tmp_path, cifar100_root):
    """BatchNorm's running variance gone bad: training (batch statistics) stays finite, evaluation does not."""
    from teskd.config import load_config
    from teskd.launch import assemble
    from teskd.errors import TeskdError

    args = [f"data.root={cifar100_root}", "model.width_mult=0.125", "data.subset_per_class=2",
            "data.test_subset_per_class=1", "data.batch_size=100", "train.epochs=2", "train.progress=false",
            "train.threads=1"]
    run = tmp_path / "run"
    trainer = assemble(load_config(CE, args), run)

    def diverged(bn, args):
        if not bn.training:  # evaluation reads the running statistics
            bn.running_var.fill_(float("nan"))

    trainer.method.backbone.bn1.register_forward_pre_hook(diverged)
    with pytest.raises(TeskdError) as err:
        trainer.run()
    assert str(err.value) == (f"after epoch 1: the evaluation gave non-finite (NaN or infinite) logits (deployed: "
                              f"100 of 100 images): the network has diverged (e.g. BatchNorm running statistics "
                              f"blown up), so its accuracy is meaningless; stopped, the last good checkpoint is "
                              f"{run / 'checkpoints' / 'last.pt'}")
    assert not (run / "summary.json").exists()
