"""Peak memory of growing a checkpoint with its Adam state: `flm grow` (streams one tensor at a time) against
growing it in memory (the whole old and the whole new state at once, as a script with the same library calls
would, and as `flm grow` did before it streamed).

A checkpoint of the flm-125m shape with a 32,768-token vocabulary (135M parameters, untied head; weights and
Adam moments filled with random values, 1.6 GB on disk) is grown to d_model 1024 and 16 heads (218M). Each
method runs in its own process; its peak resident memory (ru_maxrss) is reported with the sizes that bound it.

    python benchmarks/grow_memory.py --work /tmp/grow-memory     # ~10 GB of disk, a few minutes
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from flm.files import write_json_report

OLD = dict(n_layers=12, d_model=768, n_heads=12, head_dim=64, d_ff=3072, vocab_size=32768, max_seq_len=2048)
TARGET = "d_model=1024,n_heads=16,d_ff=4096"

IN_MEMORY = """
import sys, dataclasses
from pathlib import Path
from flm.checkpoint import find_checkpoint, load_model, load_train_state, persistent_tensors, read_meta, save_checkpoint
from flm.config import config_from_dict, model_config_from_dict
from flm.growth import grow_training
from flm.model import FLM
from flm.train.optim import adam_state_by_name, build_optimizer
ckpt = find_checkpoint(sys.argv[1])
meta = read_meta(ckpt, resume=True)
cfg, old = config_from_dict(meta["config"]), model_config_from_dict(meta["model"])
model = FLM(old)
load_model(ckpt, persistent_tensors(model))
opt = build_optimizer(model, cfg.train)
load_train_state(ckpt, opt)
new = dataclasses.replace(old, d_model=1024, n_heads=16, d_ff=4096)
grown, ramp, state = grow_training(model, adam_state_by_name(opt), new, ramp_steps=100, seed=cfg.train.seed, index=1)
meta.update(model=dataclasses.asdict(new), ramp=ramp.to_dict())
meta.pop("format"); meta.pop("step")
save_checkpoint(Path(sys.argv[2]) / "checkpoints", 10, grown, build_optimizer(grown, cfg.train, state), meta, 1)
"""


def make_checkpoint(run: Path) -> Path:
    """A 135M-parameter checkpoint at step 10 with a full Adam state (random values)."""
    import torch

    from flm.checkpoint import save_checkpoint
    from flm.config import Config, ModelConfig, config_to_dict
    from flm.model import FLM
    from flm.train.optim import build_optimizer

    cfg = ModelConfig(**OLD)
    run_cfg = Config(model=cfg)
    model = FLM(cfg)
    opt = build_optimizer(model, run_cfg.train)
    for group in opt.param_groups:
        for p in group["params"]:
            opt.state[p] = {"step": torch.tensor(10.0), "exp_avg": torch.randn_like(p) * 1e-3,
                            "exp_avg_sq": torch.rand_like(p) * 1e-6}
    meta = {"config": config_to_dict(run_cfg), "model": config_to_dict(cfg), "stage": 0, "ramp": None,
            "data": {"samples_seen": 0}}
    return save_checkpoint(run / "checkpoints", 10, model, opt, meta, keep_last=1)


def peak_rss(cmd: list[str]) -> tuple[float, float]:
    """(peak resident set of the command's process in GiB, seconds)."""
    t0 = time.perf_counter()
    wrapper = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 2**20, time.perf_counter() - t0


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/flm-grow-memory")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    ckpt = make_checkpoint(work / "old")
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        largest = max(math.prod(f.get_slice(k).get_shape()) for k in f.keys()) * 4
    results = {"machine": platform.processor() or platform.machine(), "old_checkpoint_gib": folder_bytes(ckpt) / 2**30,
               "largest_old_tensor_gib": largest / 2**30}
    flm = [sys.executable, "-m", "flm.cli.main", "grow", str(ckpt), "--to", TARGET, "--out", str(work / "streamed")]
    results["flm_grow_peak_gib"], results["flm_grow_seconds"] = peak_rss(flm)
    grown = work / "streamed" / "checkpoints" / "step_00000010"
    results["new_checkpoint_gib"] = folder_bytes(grown) / 2**30
    with safe_open(str(grown / "train_state.safetensors"), framework="pt") as f:
        ages = [k for k in f.keys() if k.endswith(".age")]
        age_bytes = sum(math.prod(f.get_slice(k).get_shape()) for k in ages)
    results["age_bytes_gib"] = age_bytes / 2**30  # one byte per entry of a grown tensor
    results["per_entry_float32_counts_gib"] = 4 * age_bytes / 2**30  # what a float32 count per entry takes
    script = work / "in_memory.py"
    script.write_text(IN_MEMORY)
    results["in_memory_peak_gib"], results["in_memory_seconds"] = peak_rss(
        [sys.executable, str(script), str(ckpt), str(work / "in_memory")])
    results["ratio_in_memory_over_flm_grow"] = results["in_memory_peak_gib"] / results["flm_grow_peak_gib"]
    print(json.dumps(results, indent=1))
    if args.json:
        write_json_report(args.json, results)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
