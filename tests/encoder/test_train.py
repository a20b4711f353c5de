"""Pretraining mechanics on tiny runs: schedules, exact resume, torchrun sync, collapse monitors."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from encoder.checkpoint import load_checkpoint
from encoder.specs import load_encoder
from encoder.train import build_param_groups, build_model, cosine_schedule, teacher_start_share, train
from radgen.config import load_config

TINY = [
    "model.arch=vit_tiny", "model.embed_dim=48", "model.depth=2", "model.num_heads=3",
    "model.img_size=56", "model.drop_path_rate=0.1", "model.layerscale_init=0.1",
    "ssl.out_dim=64", "ssl.hidden_dim=64", "ssl.bottleneck_dim=32",
    "crops.global_size=56", "crops.local_size=28", "crops.n_local=2",
    "optim.batch_size=4", "optim.epochs=4", "optim.steps_per_epoch=4", "optim.warmup_epochs=1",
    "optim.freeze_last_layer_epochs=1", "teacher.warmup_temp_epochs=1", "teacher.momentum=0.9",
    "data.image_size=64", "train.progress=false", "train.checkpoint_every=0", "train.log_every=1",
]


def _images(n: int = 24, seed: int = 0) -> list[torch.Tensor]:
    """Smooth random 'radiographs' (1, 64, 64) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 1, 6, 6, generator=g)
    return list(torch.nn.functional.interpolate(low, size=64, mode="bicubic").clamp(0, 1))


def _cfg(out: Path, *extra: str):
    return load_config("encoder", [], [f"out={out}", *TINY, *extra])


def _log(out: Path) -> list[dict]:
    with open(out / "log.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_cosine_schedule():
    s = cosine_schedule(1.0, 0.0, 10, warmup=2)
    assert len(s) == 10 and s[0] == 0.0 and s[2] == pytest.approx(1.0)
    assert np.all(np.diff(s[2:]) <= 0) and s[-1] > 0.0


def test_param_groups_layer_decay_and_no_weight_decay(tmp_path: Path):
    model = build_model(_cfg(tmp_path))
    groups = build_param_groups(model, layer_decay=0.5, patch_embed_lr_mult=0.2)
    by_param = {id(p): g for g in groups for p in g["params"]}
    bb = model.student["backbone"]
    depth = len(bb.blocks)
    assert by_param[id(bb.blocks[depth - 1].mlp.fc1.weight)]["lr_mult"] == pytest.approx(0.5)
    assert by_param[id(bb.blocks[0].mlp.fc1.weight)]["lr_mult"] == pytest.approx(0.5**depth)
    assert by_param[id(bb.patch_embed.proj.weight)]["lr_mult"] == pytest.approx(0.5 ** (depth + 1) * 0.2)
    assert by_param[id(bb.blocks[0].attn.qkv.bias)]["wd_mult"] == 0.0
    assert by_param[id(bb.pos_embed)]["wd_mult"] == 0.0
    assert by_param[id(bb.blocks[0].attn.qkv.weight)]["wd_mult"] == 1.0
    last = [g for g in groups if g["is_last_layer"]]
    assert last and all(".last_layer." in n for n, p in model.student.named_parameters()
                        if any(p is q for g in last for q in g["params"]))


def test_exact_resume(tmp_path: Path):
    """2N steps in one run == N steps, stop, resume, N more (losses and weights)."""
    full, split = tmp_path / "full", tmp_path / "split"
    images = _images()
    train(_cfg(full, "optim.max_steps=8"), images)
    train(_cfg(split, "optim.max_steps=4"), images)
    assert load_checkpoint(split / "checkpoint.pt")["step"] == 4
    train(_cfg(split, "optim.max_steps=8"), images)
    a, b = _log(full), _log(split)
    assert [r["step"] for r in b] == [str(i) for i in range(8)]
    for ra, rb in zip(a, b):
        for k in ("loss", "dino", "ibot", "koleo"):
            assert abs(float(ra[k]) - float(rb[k])) <= 1e-6 * max(1.0, abs(float(ra[k])))
        assert ra["teacher_start_share"] == rb["teacher_start_share"]  # carried across the resume
    # the teacher's EMA share of its starting weights: the product of the momentum schedule so far
    mom = [float(r["momentum"]) for r in a]
    assert float(a[-1]["teacher_start_share"]) == pytest.approx(float(np.prod(mom)), rel=1e-4)
    assert teacher_start_share(np.array(mom), 0) == 1.0
    wa = load_checkpoint(full / "checkpoint.pt")["model"]
    wb = load_checkpoint(split / "checkpoint.pt")["model"]
    assert wa.keys() == wb.keys()
    assert max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa) <= 1e-6
    # The checkpoint rebuilds its own encoder.
    enc = load_encoder(full / "checkpoint.pt")
    assert enc(torch.zeros(1, 3, 56, 56))["cls"].shape == (1, 48)


def test_deterministic_mode_trains_the_same(tmp_path: Path):
    """``train.deterministic=true`` runs the whole SSL step on the CPU under
    ``torch.use_deterministic_algorithms`` (no op refuses) and follows the same trajectory: the
    first loss identical (the forward is unchanged), later ones to float rounding (the position
    grid's gradient is summed in another order)."""
    images = _images()
    try:
        train(_cfg(tmp_path / "det", "optim.max_steps=3", "train.deterministic=true"), images)
    finally:
        torch.use_deterministic_algorithms(False)
    train(_cfg(tmp_path / "def", "optim.max_steps=3"), images)
    a, b = _log(tmp_path / "det"), _log(tmp_path / "def")
    assert a[0]["loss"] == b[0]["loss"]
    for ra, rb in zip(a, b):
        assert abs(float(ra["loss"]) - float(rb["loss"])) <= 1e-5 * max(1.0, abs(float(rb["loss"])))


def test_last_layer_frozen_in_first_epoch(tmp_path: Path):
    out = tmp_path / "f"
    cfg = _cfg(out, "optim.max_steps=3")
    torch.manual_seed(cfg.seed)
    before = build_model(cfg).student["dino_head"].last_layer.parametrizations.weight.original1.clone()
    train(cfg, _images())
    after = load_checkpoint(out / "checkpoint.pt")["model"]["student.dino_head.last_layer.parametrizations.weight.original1"]
    assert torch.equal(before, after)


def test_loss_falls_and_monitors_healthy(tmp_path: Path):
    """The cpu_tiny-style recipe (low fixed teacher temperature, no LayerScale damping) on a
    tiny run: the loss falls well below its start and the monitors end healthy."""
    out = tmp_path / "h"
    train(_cfg(out, "optim.epochs=10", "optim.steps_per_epoch=4", "model.layerscale_init=1.0",
               "teacher.warmup_temp=0.01", "teacher.temp=0.01", "optim.lr_scaling=none",
               "optim.base_lr=0.001"), _images(32))
    rows = _log(out)
    first = float(rows[0]["loss"])
    late = [float(r["loss"]) for r in rows[-10:]]
    assert np.mean(late) < 0.8 * first, f"loss did not fall: {first:.3f} -> {np.mean(late):.3f}"
    assert sum(r["collapse"] == "ok" for r in rows[-10:]) >= 5
    assert float(rows[-1]["teacher_info"]) > 0.3


def test_collapse_flagged_with_hot_teacher_and_no_centring(tmp_path: Path):
    out = tmp_path / "c"
    train(_cfg(out, "optim.max_steps=6", "ssl.center_momentum=1.0", "teacher.temp=5.0",
               "teacher.warmup_temp=5.0"), _images())
    rows = _log(out)
    assert rows[-1]["collapse"] == "uniform"


def test_sigterm_saves_checkpoint(tmp_path: Path):
    """Preemption: SIGTERM during training writes a checkpoint at the step reached."""
    data = tmp_path / "imgs"
    data.mkdir()
    from PIL import Image

    for i, im in enumerate(_images(16)):
        Image.fromarray((im[0].numpy() * 255).astype(np.uint8)).save(data / f"{i}.png")
    exe = Path(sys.executable).parent / "radgen"
    out = tmp_path / "p"
    proc = subprocess.Popen([str(exe), "pretrain-encoder", "--data", str(data), "--out", str(out), *TINY,
                             "optim.epochs=1000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    import time

    deadline = time.time() + 120
    while time.time() < deadline and not (out / "log.csv").is_file():
        time.sleep(0.2)
    time.sleep(2.0)
    proc.terminate()
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-2000:]
    assert "preempted" in stdout
    step = load_checkpoint(out / "checkpoint.pt")["step"]
    assert step >= 1 and len(_log(out)) == step


def test_sigterm_to_process_group_with_workers(tmp_path: Path):
    """SIGTERM to the whole process group (SLURM, timeout, kill -- -PGID) reaches the DataLoader
    workers too: they ignore it, so the main process finishes the step, checkpoints and exits 143."""
    import signal
    import time

    from PIL import Image

    data = tmp_path / "imgs"
    data.mkdir()
    for i, im in enumerate(_images(16)):
        Image.fromarray((im[0].numpy() * 255).astype(np.uint8)).save(data / f"{i}.png")
    out = tmp_path / "p"
    proc = subprocess.Popen([str(Path(sys.executable).parent / "radgen"), "pretrain-encoder", "--data", str(data),
                             "--out", str(out), *TINY, "optim.epochs=1000", "data.num_workers=2", "train.device=cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((out / "log.csv").is_file() and
                                              len((out / "log.csv").read_text().splitlines()) >= 2):
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 143 and "Traceback" not in stderr, stderr[-2000:]
    assert "preempted" in stdout
    step = load_checkpoint(out / "checkpoint.pt")["step"]
    assert step >= 1 and len(_log(out)) == step


def _torchrun(data: Path, out: Path, *extra: str) -> None:
    """2 ranks on the CPU (gloo) whatever GPUs the machine has (with auto, rank 1 needs a second GPU)."""
    bindir = Path(sys.executable).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([str(bindir / "torchrun"), "--standalone", "--nproc_per_node=2",
                          str(bindir / "radgen"), "pretrain-encoder", "--data", str(data), "--out", str(out),
                          *TINY, "train.verify_sync=true", "optim.batch_size=2", "train.device=cpu", *extra],
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("pretrain-encoder:") == 1  # rank 0 alone prints the summary


@pytest.mark.slow
def test_torchrun_ddp_and_fsdp(tmp_path: Path):
    """2 ranks on CPU (gloo): identical weights on both ranks after every step; FSDP sharding
    gives the same run as DDP replication; an FSDP run resumes exactly."""
    data = tmp_path / "imgs"
    data.mkdir()
    from PIL import Image

    for i, im in enumerate(_images(16)):
        Image.fromarray((im[0].numpy() * 255).astype(np.uint8)).save(data / f"{i}.png")
    _torchrun(data, tmp_path / "ddp", "optim.max_steps=4", "train.strategy=ddp")
    _torchrun(data, tmp_path / "fsdp", "optim.max_steps=4", "train.strategy=fsdp")
    _torchrun(data, tmp_path / "resumed", "optim.max_steps=2", "train.strategy=fsdp")
    _torchrun(data, tmp_path / "resumed", "optim.max_steps=4", "train.strategy=fsdp")
    logs = {name: _log(tmp_path / name) for name in ("ddp", "fsdp", "resumed")}
    ck = {name: load_checkpoint(tmp_path / name / "checkpoint.pt") for name in logs}
    for name in logs:
        assert len(logs[name]) == 4
        assert all(float(r["sync_diff"]) == 0.0 for r in logs[name])
        assert ck[name]["world_size"] == 2 and ck[name]["global_batch"] == 4
    assert ck["fsdp"]["strategy"] == "fsdp" and ck["ddp"]["strategy"] == "ddp"
    for other in ("fsdp", "resumed"):
        for a, b in zip(logs["ddp"], logs[other]):
            assert float(a["loss"]) == pytest.approx(float(b["loss"]), abs=1e-5)
        for k, v in ck["ddp"]["model"].items():
            torch.testing.assert_close(ck[other]["model"][k], v, atol=1e-6, rtol=0)
    # gradient accumulation (FSDP reduce-scatters only after the last micro-batch)
    for strategy in ("ddp", "fsdp"):
        _torchrun(data, tmp_path / f"accum_{strategy}", "optim.max_steps=2", "optim.accum_steps=2",
                  f"train.strategy={strategy}")
    a, b = (load_checkpoint(tmp_path / f"accum_{s}" / "checkpoint.pt")["model"] for s in ("ddp", "fsdp"))
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, atol=1e-6, rtol=0)


def test_init_from_hf_folder_and_dinov2_pth(tmp_path: Path):
    """model.init_from starts pretraining from published-layout weights (as RAD-DINO did)."""
    from encoder.vit import ViTConfig, ViTEncoder
    from encoder.weights import save_hf_dinov2

    torch.manual_seed(3)
    src = ViTEncoder(ViTConfig(arch="vit_tiny", embed_dim=48, depth=2, num_heads=3, img_size=112,
                               layerscale_init=0.1))
    save_hf_dinov2(src, tmp_path / "hf")
    torch.save(src.state_dict(), tmp_path / "dinov2.pth")
    for init in (tmp_path / "hf", tmp_path / "dinov2.pth"):
        model = build_model(_cfg(tmp_path / "o", f"model.init_from={init}"))
        bb = model.student["backbone"]
        assert torch.equal(bb.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)
        assert bb.pos_embed.shape == (1, 1 + 16, 48)  # 112-px grid resized to the 56-px model
        assert torch.equal(model.teacher["backbone"].blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)


def test_load_full_state_accepts_position_keyed_optimizer_state():
    """Checkpoints written before name-keyed optimizer state still resume (single process)."""
    from encoder.distributed import full_state, load_full_state

    def make():
        m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
        return m, torch.optim.AdamW(m.parameters(), lr=0.1)

    torch.manual_seed(0)
    m, opt = make()
    m(torch.randn(5, 3)).sum().backward()
    opt.step()
    old_style = opt.state_dict()  # keyed 0, 1, 2, 3
    m2, opt2 = make()
    load_full_state(m2, opt2, m.state_dict(), old_style)
    _, by_name = full_state(m, opt)
    _, again = full_state(m2, opt2)
    for k, st in by_name["state"].items():
        torch.testing.assert_close(again["state"][k]["exp_avg"], st["exp_avg"])


# Two ranks started by hand (what torchrun sets up), so the test can signal one of them and read
# each one's outcome. Rank 0 alone sees the stop: SIGTERM from the test, or a collapse flag faked
# on rank 0 only (rank 1's is faked 'ok'). Each rank prints its outcome as one JSON line.
_RANK_SCRIPT = r"""
import json, sys
import torch
import encoder.train as et
from encoder.distributed import close_distributed
from encoder.guards import TrainingStopped
from radgen.config import load_config

mode, out, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
g = torch.Generator().manual_seed(0)
images = list(torch.nn.functional.interpolate(torch.rand(16, 1, 6, 6, generator=g), size=64,
                                              mode="bicubic").clamp(0, 1))
rank = int(__import__("os").environ["RANK"])
if mode == "collapse":
    et.collapse_flags = lambda *a: "dominant" if rank == 0 else "ok"
try:
    s = et.train(load_config("encoder", [], [f"out={out}", *overrides]), images)
    res = {"status": s["status"], "steps": s["steps"]}
except TrainingStopped as exc:
    res = {"status": "stopped", "message": str(exc).split(":")[0]}
print(json.dumps({"rank": rank, **res}), flush=True)
close_distributed()
"""


def _two_ranks(tmp_path: Path, mode: str, overrides: list[str]) -> list[subprocess.Popen]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT)
    import json

    procs = []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, str(script), mode, str(tmp_path / "out"), json.dumps(overrides)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _outcomes(procs: list[subprocess.Popen], timeout: float = 120) -> list[dict]:
    import json

    res = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            assert p.returncode == 0, err[-3000:]
            res.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return res


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_ranks_stop_together_on_sigterm(tmp_path: Path, strategy: str):
    """SIGTERM reaches rank 0 only: both ranks stop after the same step and the checkpoint (a
    collective under FSDP) is written at that step."""
    import signal
    import time

    over = [*TINY, "optim.batch_size=2", "optim.epochs=1000", "train.device=cpu", f"train.strategy={strategy}"]
    procs = _two_ranks(tmp_path, "sigterm", over)
    log = tmp_path / "out" / "log.csv"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.is_file() and len(log.read_text().splitlines()) >= 3):
        time.sleep(0.1)
    procs[0].send_signal(signal.SIGTERM)
    a, b = _outcomes(procs)
    assert a["status"] == b["status"] == "preempted" and a["steps"] == b["steps"] >= 2
    assert load_checkpoint(tmp_path / "out" / "checkpoint.pt")["step"] == a["steps"]


@pytest.mark.slow
def test_ranks_stop_together_on_collapse(tmp_path: Path):
    """The collapse monitor flags on rank 0 only: both ranks stop at the same step."""
    over = [*TINY, "optim.batch_size=2", "optim.max_steps=8", "train.device=cpu", "train.stop_on_collapse=2"]
    a, b = _outcomes(_two_ranks(tmp_path, "collapse", over))
    assert a == {"rank": 0, "status": "stopped", "message": "pretrain step 1"}
    assert b == {"rank": 1, "status": "stopped", "message": "pretrain step 1"}
