"""Multi-process training (``train.num_processes > 1``): the train stage runs its trainer as a torchrun process group,
here gloo processes on CPU with the tiny model; the same training core as in-process, rank 0 writes the artifact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from pipeline_lib.artifacts import ArtifactRef, read_manifest, verify, write_table
from pipeline_lib.stages.train import TrainConfig
from pipeline_lib.methods import MethodConfig
from pipeline_lib.stages.train.worker import MARKER, TrainWorkerError
from pipeline_lib.stages.train import run as train

REPO = Path(__file__).resolve().parents[2]
# fp32 throughout, no warmup: the runs below differ only in how the batch of 4 pairs is split over processes.
# lr 1e-4: see _assert_same_training for why not larger.
COMMON = dict(learning_rate=1e-4, max_length=128, bf16=False, warmup_ratio=0.0, seed=0)


def _four_pairs(tiny_model, path: Path) -> ArtifactRef:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model.path)
    prompts = ["Write a poem about the river.", "List three words about music.", "Describe a city in one line.",
               "Tell me about the moon."]
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    df = pd.DataFrame({"prompt_id": list("abcd"), "prompt": prompts, "prompt_text": texts,
                       "chosen": ["the river is long and blue", "music song sound", "a big old city by the water",
                                  "the moon is bright tonight"],
                       "rejected": ["NO", "WORD WORD WORD WORD", "x", "moon moon"]})
    return write_table(df, path, name="pairs", producer="test")


def _weights(ref) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(f"{ref.path}/model.safetensors")


def _assert_same_training(a, b, base) -> None:
    """Same weights to 1e-5, and same gradient norms at every step (to float-summation noise).

    AdamW's first update is lr * g / (|g| + eps) per element: about lr * sign(g) wherever |g| >> eps. So the
    weights check the gradient's direction (a rank stepping on its own half would flip signs: differences of
    2 * lr), not its scale (a sum over ranks instead of a mean would pass); the logged ``grad_norm`` checks the scale.
    Where |g| is near eps the division amplifies summation noise: at lr 1e-3, 8 of ~427k elements differed by up to
    1.6e-5 (the rest by < 1e-6); at lr 1e-4 the same elements differ by 10x less, and every update (~lr) stays 5x
    above the tolerance (an equality of untouched weights would prove nothing)."""
    wa, wb, w0 = _weights(a), _weights(b), _weights(base)
    assert set(wa) == set(wb) == set(w0)
    diff = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    moved = max((wa[k] - w0[k]).abs().max().item() for k in wa)
    assert diff < 1e-5, diff
    assert moved > 5e-5, moved
    norms = [[r["grad_norm"] for r in read_manifest(x.path)["log_history"] if "grad_norm" in r] for x in (a, b)]
    assert len(norms[0]) == len(norms[1]) >= 1
    assert norms[0] == pytest.approx(norms[1], rel=1e-5)


def test_fsdp_sharded_parameters_train_like_one_process_and_save_the_whole_model(tiny_model, tmp_path):
    """``train.fsdp``: 2 gloo processes, each holding half of every decoder layer's parameters (FSDP2), one step on
    2 + 2 pairs, give the weights of 1 process x 4 pairs (the same argument as the DDP test: the reduce-scattered
    gradient is the mean over both ranks' pairs). The saved checkpoint is whole: rank 0 gathered every parameter,
    same names and shapes as the starting model, not a rank's shard."""
    torch.set_num_threads(1)
    pairs = _four_pairs(tiny_model, tmp_path / "pairs")
    one = train(tiny_model, pairs, TrainConfig(batch_size=4, max_steps=1, **COMMON), MethodConfig(),
                tmp_path / "one", quiet=True)
    rows: list[dict] = []
    sharded = train(tiny_model, pairs, TrainConfig(batch_size=2, num_processes=2, fsdp=True, max_steps=1, **COMMON),
                    MethodConfig(), tmp_path / "fsdp", on_log=rows.append, quiet=True)
    verify(sharded)
    # each rank held half of every parameter (a silent fallback to whole DDP copies would show 1.0)
    assert read_manifest(sharded.path)["metrics"]["local_parameter_share"] == pytest.approx(0.5, abs=1e-6)
    assert read_manifest(one.path)["metrics"]["local_parameter_share"] == 1.0
    # the reference pass (on a sharded copy of the starting model) gives zero rewards before the first step
    loss_row = next(r for r in rows if "loss" in r)
    assert loss_row["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)
    w, w0 = _weights(sharded), _weights(tiny_model)
    assert {k: v.shape for k, v in w.items()} == {k: v.shape for k, v in w0.items()}
    _assert_same_training(one, sharded, tiny_model)
    assert read_manifest(sharded.path)["config"]["fsdp"] is True


def _worker_pids(needle: str) -> list[int]:
    """Processes of this test's training run: torchrun and its workers carry the spec path on their command line."""
    pids = []
    for p in Path("/proc").iterdir():
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if p.name.isdigit() and "pipeline_lib.train_worker" in cmd and needle in cmd:
            pids.append(int(p.name))
    return pids


def test_two_gloo_processes_train_like_one_process_with_the_whole_batch(tiny_model, tmp_path, capfd):
    """One optimizer step on exactly 4 pairs: 2 processes x 2 pairs vs 1 process x 4. Each rank's loss is the mean
    over its 2 pairs and DDP averages the ranks' gradients, so the step's gradient is the mean over all 4 — the
    single process's gradient, up to summation order. TRL precomputes the reference log-probs on both ranks (each
    its half, gathered; ``AlignTrainer`` gives the in-memory dataset a directory both ranks read the columns from).
    Rank 0's log rows reach ``on_log`` in this process; quiet prints nothing."""
    torch.set_num_threads(1)
    pairs = _four_pairs(tiny_model, tmp_path / "pairs")
    one = train(tiny_model, pairs, TrainConfig(batch_size=4, max_steps=1, **COMMON), MethodConfig(),
                tmp_path / "one", quiet=True)
    capfd.readouterr()
    rows: list[dict] = []
    t0 = time.monotonic()
    two = train(tiny_model, pairs, TrainConfig(batch_size=2, num_processes=2, max_steps=1, **COMMON), MethodConfig(),
                tmp_path / "two", on_log=rows.append, quiet=True)
    wall = time.monotonic() - t0
    out, err = capfd.readouterr()
    assert MARKER not in out + err and "torch.distributed" not in err, (out, err)
    verify(two)
    _assert_same_training(one, two, tiny_model)
    loss_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in loss_rows] == [1] and loss_rows[0]["max_steps"] == 1  # rank 0 only, once
    m1, m2 = read_manifest(one.path)["metrics"], read_manifest(two.path)["metrics"]
    assert m2["steps"] == 1 and m2["n_pairs"] == 4
    for key in ("train_loss", "last_loss", "last_rewards_margins"):  # logged values are gathered over the ranks
        assert m2[key] == pytest.approx(m1[key], abs=1e-4), key
    # before the step the policy is the reference: zero rewards mean each rank got its own pairs' reference columns
    assert loss_rows[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)
    assert loss_rows[0]["rewards/rejected"] == pytest.approx(0.0, abs=1e-5)
    assert not (tmp_path / "two" / "artifacts" / "train" / f"{Path(two.path).name}.work").exists()
    print(f"2-process train: {wall:.1f} s")


def test_two_rendezvous_groups_on_loopback_train_like_one_process(tiny_model, tmp_path, monkeypatch):
    """train.nnodes=2 (one process per "host"): the stage is one rendezvous member, a ``join`` process started
    beforehand the other; they meet at a c10d endpoint on 127.0.0.1 and train over gloo. One step of 2 groups x 2
    pairs gives the weights of 1 process x 4 pairs (as above); the announcement is gone afterwards."""
    import socket

    from pipeline_lib.stages.train.worker import announcement

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # both groups talk over the loopback interface only
    torch.set_num_threads(1)
    pairs = _four_pairs(tiny_model, tmp_path / "pairs")
    one = train(tiny_model, pairs, TrainConfig(batch_size=4, max_steps=1, **COMMON), MethodConfig(),
                tmp_path / "one", quiet=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        endpoint = f"127.0.0.1:{s.getsockname()[1]}"
    work = tmp_path / "two"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    joiner = subprocess.Popen([sys.executable, "-m", "pipeline_lib.train_worker", "join", "--work-dir", str(work),
                               "--rdzv-endpoint", endpoint, "--timeout", "300", "--quiet"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        t0 = time.monotonic()
        two = train(tiny_model, pairs, TrainConfig(batch_size=2, nnodes=2, rdzv_endpoint=endpoint, max_steps=1,
                                                   **COMMON), MethodConfig(), work, quiet=True)
        out, _ = joiner.communicate(timeout=120)
        wall = time.monotonic() - t0
    finally:
        if joiner.poll() is None:
            joiner.kill()
            joiner.wait()
    assert joiner.returncode == 0, out
    verify(two)
    _assert_same_training(one, two, tiny_model)
    assert read_manifest(two.path)["config"]["nnodes"] == 2
    assert not announcement(work, endpoint).exists()
    print(f"2 rendezvous groups: {wall:.1f} s")


def test_a_lora_ensemble_trains_each_member_with_two_processes(tiny_model, tmp_path):
    """train.ensemble=2 with num_processes=2: each LoRA member is its own 2-process training (same seeded LoRA
    initialisation on every rank; rank 0 merges and saves), and the averaged result equals the 1-process ensemble."""
    torch.set_num_threads(1)
    pairs = _four_pairs(tiny_model, tmp_path / "pairs")
    lora = dict(COMMON, learning_rate=5e-4, lora_r=4, ensemble=2, max_steps=1)
    one = train(tiny_model, pairs, TrainConfig(batch_size=4, **lora), MethodConfig(), tmp_path / "one", quiet=True)
    rows: list[dict] = []
    two = train(tiny_model, pairs, TrainConfig(batch_size=2, num_processes=2, **lora), MethodConfig(),
                tmp_path / "two", on_log=rows.append, quiet=True)
    assert sorted(r["ensemble_member"] for r in rows if "loss" in r) == [0, 1]
    assert len(read_manifest(two.path)["ensemble_members"]) == 2
    _assert_same_training(one, two, tiny_model)


def test_a_failing_worker_raises_its_error_instead_of_hanging(tiny_model, tmp_path):
    missing = ArtifactRef(kind="table", name="pairs", path=str(tmp_path / "no-such-pairs"), sha256="0" * 64, rows=4)
    t0 = time.monotonic()
    with pytest.raises(TrainWorkerError) as e:
        train(tiny_model, missing, TrainConfig(batch_size=2, num_processes=2, max_steps=1, **COMMON),
              MethodConfig(), tmp_path / "work", quiet=True)
    msg = str(e.value)
    assert "training with 2 process(es) failed" in msg
    assert "ArtifactError: no manifest at" in msg and "no-such-pairs" in msg and "(rank" in msg
    assert "--- last output ---" in msg
    assert time.monotonic() - t0 < 120


def test_an_interrupted_stage_stops_its_training_processes(tiny_model, tmp_path):
    """An exception in the stage while the workers train (here from on_log; a KeyboardInterrupt or a cancelled
    task alike) reaches the caller, and torchrun and its workers are gone when it does."""
    pairs = _four_pairs(tiny_model, tmp_path / "pairs")

    def stop(row):
        raise KeyboardInterrupt("stop at step 1")

    with pytest.raises(KeyboardInterrupt, match="stop at step 1"):
        train(tiny_model, pairs, TrainConfig(batch_size=2, num_processes=2, max_steps=50, **COMMON), MethodConfig(),
              tmp_path / "work", on_log=stop, quiet=True)
    assert not _worker_pids(str(tmp_path))


def test_deepspeed_config_is_checked_before_any_process_starts(tiny_model, tmp_path):
    pairs = ArtifactRef(kind="table", name="pairs", path=str(tmp_path), sha256="0" * 64, rows=4)
    with pytest.raises(FileNotFoundError, match=r"train.deepspeed=.*nope.json: no such file"):
        train(tiny_model, pairs, TrainConfig(deepspeed=str(tmp_path / "nope.json")), MethodConfig(), tmp_path)
    zero3 = tmp_path / "zero3.json"
    zero3.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ValueError, match=r"train.deepspeed=.*ZeRO stage 3 is not supported"):
        train(tiny_model, pairs, TrainConfig(deepspeed=str(zero3)), MethodConfig(), tmp_path)
    if not torch.cuda.is_available():  # the shipped sample parses, and is refused on a machine without a GPU
        with pytest.raises(ValueError, match=r"train.deepspeed=.*DeepSpeed needs a GPU"):
            train(tiny_model, pairs, TrainConfig(deepspeed=str(REPO / "configs/deepspeed/zero2.json")),
                  MethodConfig(), tmp_path)


_STAGE = """
import sys, json
from pipeline_lib.artifacts import ArtifactRef
from pipeline_lib.stages.train import TrainConfig
from pipeline_lib.methods import MethodConfig
from pipeline_lib.models import resolve
from pipeline_lib.stages.train import run as train
pairs, cfg = ArtifactRef.model_validate_json(sys.argv[1]), TrainConfig.model_validate_json(sys.argv[2])
work = sys.argv[3]
train(resolve("tiny:0"), pairs, cfg, MethodConfig(), work, quiet=True,
      on_log=lambda row: print(json.dumps(row), flush=True))
"""


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_kill_9_of_the_stage_takes_the_workers_down_and_the_rerun_resumes(tiny_model, tmp_path, fsdp):
    """The stage process is killed (-9) after step 2's log row (checkpoint-1 is complete by then; 6 more steps with
    their checkpoints keep the run from finishing first): torchrun and both workers die with it (death signals, no
    orphans). Running the stage again resumes from the last complete checkpoint and ends where 8 uninterrupted
    in-process steps on the whole batch end. Also with sharded parameters (FSDP: each rank saves and reloads its
    shards of the weights and optimizer state)."""
    torch.set_num_threads(1)
    pairs = _four_pairs(tiny_model, tmp_path / "pairs")
    cfg = TrainConfig(batch_size=2, num_processes=2, max_steps=8, save_steps=1, fsdp=fsdp, **COMMON)
    work = tmp_path / "work"
    stage = subprocess.Popen([sys.executable, "-c", _STAGE, pairs.model_dump_json(), cfg.model_dump_json(), str(work)],
                             stdout=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        for line in stage.stdout:
            if line.startswith("{") and json.loads(line).get("step") == 2:
                break
        pids = _worker_pids(str(work))
        assert len(pids) == 3, pids  # torchrun + 2 workers
        os.kill(stage.pid, signal.SIGKILL)
        stage.wait()
        deadline = time.monotonic() + 30
        while _worker_pids(str(work)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _worker_pids(str(work))
    finally:
        stage.kill()
    rows: list[dict] = []
    resumed = train(tiny_model, pairs, cfg, MethodConfig(), work, on_log=rows.append, quiet=True)
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps and steps[0] >= 2 and steps[-1] == 8, steps  # continued from a checkpoint, not from step 1
    print(f"resumed at step {steps[0]}")
    straight = train(tiny_model, pairs, TrainConfig(batch_size=4, max_steps=8, **COMMON), MethodConfig(),
                     tmp_path / "one", quiet=True)
    _assert_same_training(resumed, straight, tiny_model)
