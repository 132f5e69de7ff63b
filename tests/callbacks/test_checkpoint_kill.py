"""SIGKILL at random moments while checkpoints are being saved, 50 times: every remaining checkpoint loads.

A small fork server imports torch and AtomicCheckpointIO once; for each trial it forks a child that saves
checkpoints in a loop exactly as PeriodicCheckpoint does (step file, `last` link, prune to the last 2) and SIGKILLs
it at a random moment, then loads every file left in the folder.
"""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

SERVER = textwrap.dedent("""
    import json, os, random, signal, sys, time
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from fluxlora.callbacks import AtomicCheckpointIO
    from fluxlora.callbacks.checkpoint import STEP_FILE, step_file

    folder, trials = Path(sys.argv[1]), int(sys.argv[2])
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1234)

    def steps():
        return sorted(int(m.group(1)) for p in folder.iterdir() if (m := STEP_FILE.match(p.name)))

    def saver():  # the forked child: save forever, like a training run with every_n_steps=1, keep_last=2
        io = AtomicCheckpointIO()
        step = (steps() or [0])[-1] + 1
        while True:
            ckpt = {"state_dict": {"w": torch.full((1 << 20,), float(step))},  # 4 MiB of LoRA-like weights
                    "optimizer_states": [{"exp_avg": torch.full((1 << 19,), float(step))}],
                    "global_step": step, "loops": {}}
            path = folder / step_file(step)
            io.save_checkpoint(ckpt, path)
            io.link(path, folder / "last.ckpt")
            for old in steps()[:-2]:
                io.remove_checkpoint(folder / step_file(old))
            step += 1

    report = {"trials": 0, "bad": [], "temps_seen": 0, "last_missing": 0, "steps": 0}
    t0 = time.monotonic()
    for trial in range(trials):
        pid = os.fork()
        if pid == 0:
            try:
                saver()
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.0, 0.12))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        report["trials"] += 1
        names = sorted(p.name for p in folder.iterdir())
        report["temps_seen"] += any(n.startswith(".") for n in names)
        if steps() and "last.ckpt" not in names:
            report["last_missing"] += 1
        for name in names:
            if name.startswith("."):
                continue  # a temp file a kill left: never under a checkpoint name
            try:
                c = torch.load(folder / name, weights_only=True)
                assert c["state_dict"]["w"][-1].item() == c["global_step"] == c["optimizer_states"][0]["exp_avg"][0]
            except Exception as e:
                report["bad"].append(f"trial {trial}: {name}: {type(e).__name__}: {e}")
        AtomicCheckpointIO.clean_stale_temps(folder)  # what the next run does before resuming
    report["steps"] = (steps() or [0])[-1]
    report["seconds"] = round(time.monotonic() - t0, 2)
    print(json.dumps(report), flush=True)
""")


@pytest.mark.slow
def test_sigkill_while_saving_never_leaves_a_torn_checkpoint(tmp_path):
    folder = tmp_path / "checkpoints"
    r = subprocess.run([sys.executable, "-c", SERVER, str(folder), "50"], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["trials"] == 50
    assert report["bad"] == []
    assert report["last_missing"] == 0  # `last` is never absent once a checkpoint exists
    assert report["temps_seen"] >= 5, report  # kills did land in the middle of writes
    assert report["steps"] >= 10, report
    for p in folder.iterdir():  # and what is left now loads here too
        assert torch.load(p, weights_only=True)["global_step"] > 0
