"""Learning-rate schedules against their closed forms, and the trainer applying them per group."""
import functools
import math
from pathlib import Path

import pytest
from conftest import compose_cfg
from hydra.utils import instantiate

from trainer.schedule import constant, cosine, wsd

SCHEDULES = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "configs" / "schedule").glob("*.yaml"))


def cosine_closed_form(it, lr, warmup, decay, min_lr):
    """nanoGPT's get_lr, written out independently."""
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it > decay:
        return min_lr
    ratio = (it - warmup) / (decay - warmup)
    return min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (lr - min_lr)


def test_cosine_is_nanogpts_schedule():
    sched = functools.partial(cosine, lr=3e-3, warmup_iters=10, decay_iters=110, min_lr=None)
    for it in range(130):
        assert sched(it) == pytest.approx(cosine_closed_form(it, 3e-3, 10, 110, 3e-4), rel=1e-12, abs=0)
    assert sched(0) == pytest.approx(3e-3 / 11) and sched(10) == 3e-3 and sched(60) == pytest.approx(1.65e-3)
    assert cosine(50, lr=1.0, warmup_iters=0, decay_iters=100, min_lr=0.0) == pytest.approx(0.5)


def test_wsd_warms_up_holds_then_decays_linearly():
    sched = functools.partial(wsd, lr=1.0, warmup_iters=10, decay_iters=200, decay_frac=0.25, min_lr=0.1)
    lrs = [sched(it) for it in range(220)]
    assert lrs[:10] == pytest.approx([(i + 1) / 11 for i in range(10)])
    assert lrs[10:150] == [1.0] * 140  # stable until the last 25% of 200 iterations
    for it in range(150, 200):  # linear from 1.0 at 150 to 0.1 at 200
        assert lrs[it] == pytest.approx(1.0 - 0.9 * (it - 150) / 50, rel=1e-12)
    assert lrs[200:] == [0.1] * 20
    assert wsd(100, lr=2.0, warmup_iters=0, decay_iters=100, decay_frac=0.5) == pytest.approx(0.2)  # min_lr: lr / 10
    with pytest.raises(ValueError, match="decay_frac"):
        wsd(0, lr=1.0, warmup_iters=0, decay_iters=100, decay_frac=1.5)


def test_constant():
    assert [constant(it, lr=0.5) for it in (0, 1, 1000)] == [0.5, 0.5, 0.5]
    assert [constant(it, lr=1.0, warmup_iters=3) for it in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_configs_read_the_trainer_keys(name):
    cfg = compose_cfg([f"schedule={name}", "optim.lr=2e-3", "warmup_iters=5", "max_iters=50", "min_lr=1e-4"])
    sched = instantiate(cfg.schedule)
    assert sched(0) == pytest.approx(2e-3 / 6)  # every schedule warms up the same way
    assert sched(20) == pytest.approx({"cosine": cosine_closed_form(20, 2e-3, 5, 50, 1e-4),
                                       "wsd": 2e-3, "constant": 2e-3}[name])
    assert sched(49) == pytest.approx({"cosine": cosine_closed_form(49, 2e-3, 5, 50, 1e-4),
                                       "wsd": 2e-3 + (49 - 40) / 10 * (1e-4 - 2e-3), "constant": 2e-3}[name])


def test_default_schedule_is_cosine():
    assert compose_cfg([]).schedule._target_ == "trainer.schedule.cosine"


@pytest.mark.parametrize("schedule", ["wsd", "cosine"])
def test_trainer_sets_each_groups_lr_from_schedule_and_lr_scale(tmp_path, tiny_overrides, schedule):
    """optim=muon: Muon groups at the schedule's lr, its AdamW groups at lr * lr_scale."""
    from trainer.loop import Trainer

    overrides = tiny_overrides + ["optim=muon", f"schedule={schedule}", "max_iters=12", "eval_interval=0",
                                  "sample_tokens=0"]
    trainer = Trainer(compose_cfg(overrides), tmp_path / "run", overrides)
    groups = trainer.optimizer.param_groups
    assert [g["use_muon"] for g in groups] == [True, False]
    assert all(p.dim() == 2 for p in groups[0]["params"])
    scale = groups[1]["lr_scale"]
    sched = instantiate(trainer.cfg.schedule)
    seen = []
    original = trainer.optimizer.step

    def record(*args, **kwargs):
        seen.append([g["lr"] for g in groups])
        return original(*args, **kwargs)

    trainer.optimizer.step = record
    summary = trainer.fit()
    assert summary["status"] == "completed" and math.isfinite(summary["final_val_loss"])
    assert seen == [[sched(it), sched(it) * scale] for it in range(12)]


def test_decay_lr_false_means_a_constant_lr(tmp_path, tiny_overrides):
    from trainer.loop import Trainer

    overrides = tiny_overrides + ["decay_lr=false", "optim.lr=3e-3", "max_iters=0"]
    trainer = Trainer(compose_cfg(overrides), tmp_path / "run", overrides)
    assert [trainer.schedule(it) for it in (0, 5, 100)] == [3e-3] * 3
