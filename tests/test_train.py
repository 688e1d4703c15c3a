"""train.py: a step lowers the loss; save -> stop -> resume reproduces the uninterrupted run."""
import os

import pytest
import torch

import dit
import train
from diffusion import Diffusion


def test_train_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    m = dit.build(dit.TINY, depth=2)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    d = Diffusion.make()
    x, y = torch.rand(8, 1, 32, 32) * 2 - 1, torch.arange(8) % 10
    t, noise = torch.randint(0, 1000, (8,)), torch.randn(8, 1, 32, 32)
    losses = []
    for _ in range(6):
        loss = d.loss(m, x, y, t, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


def test_ema_warmup():
    assert train.ema_decay(0, 0.9999) == 0.1  # early EMA follows the model, not the random init
    assert train.ema_decay(10**6, 0.9999) == 0.9999


def args_for(out, data_dir, steps, resume=False):
    argv = ["--iters", str(steps), "--batch-size", "4", "--run-dir", out, "--data-dir", data_dir,
            "--ckpt-every", "2", "--seed", "3", "--out", os.path.join(out, "ema.pt")]
    return train.get_args(argv + (["--resume"] if resume else []))


def test_save_stop_resume_gives_the_same_losses(tmp_path, fake_fmnist):
    full = train.train(args_for(str(tmp_path / "a"), fake_fmnist, 5))
    # stops after its step-3 save
    first = train.train(args_for(str(tmp_path / "b"), fake_fmnist, 3))
    rest = train.train(args_for(str(tmp_path / "b"), fake_fmnist, 5, resume=True))
    # bit-exact continuation: model, opt, EMA and RNGs
    assert len(full) == 5 and first + rest == full
    a = torch.load(tmp_path / "a" / "state.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "state.pt", weights_only=True)
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    assert not [f for f in os.listdir(tmp_path / "b") if f.endswith(".tmp")]  # atomic writes
    model, cfg = dit.load_checkpoint(str(tmp_path / "b" / "ema.pt"))  # the exported EMA loads
    assert cfg["model"] == dit.TINY


def test_resume_refuses_another_config(tmp_path, fake_fmnist):
    import pytest
    train.train(args_for(str(tmp_path / "c"), fake_fmnist, 2))
    args = args_for(str(tmp_path / "c"), fake_fmnist, 4, resume=True)
    args.batch_size = 8
    with pytest.raises(ValueError, match="--resume"):
        train.train(args)


@pytest.mark.slow
def test_two_process_torchrun_matches_one_process(tmp_path, fake_fmnist):
    import json
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    common = ["--iters", "3", "--batch-size", "8", "--data-dir", fake_fmnist, "--ckpt-every", "100",
              "--log-every", "1", "--seed", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {"one": [sys.executable, "train.py"],
            "two": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node=2", "train.py"]}
    losses, states = {}, {}
    for name, cmd in runs.items():
        out = str(tmp_path / name)
        r = subprocess.run(cmd + common + ["--run-dir", out], cwd=root, capture_output=True,
                           text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        losses[name] = [json.loads(line)["loss"] for line in open(os.path.join(out, "log.jsonl"))]
        states[name] = torch.load(os.path.join(out, "state.pt"), weights_only=True)["model"]
    assert len(losses["one"]) == 3
    for a, b in zip(losses["one"], losses["two"]):
        assert abs(a - b) <= 1e-5 * abs(a)  # same global batch: equal up to float summation order
    for k in states["one"]:
        torch.testing.assert_close(states["two"][k], states["one"][k], atol=1e-5, rtol=1e-4)


def test_resume_applies_a_new_lr_and_never_repeats_a_logged_step(tmp_path, fake_fmnist, capsys):
    import json
    run = str(tmp_path / "r")
    train.train(args_for(run, fake_fmnist, 2))
    with open(os.path.join(run, "log.jsonl"), "a") as f:  # logged after the last state, then killed
        f.write(json.dumps({"step": 3, "loss": 1.0}) + "\n")
    args = args_for(run, fake_fmnist, 4, resume=True)
    args.lr, args.log_every = 0.1, 1
    seen = []
    import torch.optim
    orig = torch.optim.AdamW.step
    def spy(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return orig(self, *a, **k)
    torch.optim.AdamW.step = spy
    try:
        train.train(args)
    finally:
        torch.optim.AdamW.step = orig
    assert seen == [0.1, 0.1] and "--lr 0.1 (was 0.0003)" in capsys.readouterr().err
    steps = [json.loads(line)["step"] for line in open(os.path.join(run, "log.jsonl"))]
    assert steps == sorted(set(steps)) and steps[-2:] == [3, 4]


def test_non_finite_loss_stops_with_the_last_state_kept(tmp_path, fake_fmnist):
    import pytest
    run = str(tmp_path / "n")
    train.train(args_for(run, fake_fmnist, 2))
    before = open(os.path.join(run, "state.pt"), "rb").read()
    args = args_for(run, fake_fmnist, 4, resume=True)
    args.lr = 1e30  # blows the weights up: the next loss is not finite
    with pytest.raises(ValueError, match="loss is"):
        train.train(args)
    assert open(os.path.join(run, "state.pt"), "rb").read() == before
