"""Shared test utilities: generated data sets, config files and torchrun launches."""
import os
import pickle
import subprocess
import sys

import numpy as np
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_cifar_folder(root, per_batch=8, seed=0):
    """A CIFAR-10 python-format folder (5 training batches) of random images."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(1, 6):
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, per_batch)]}
        with open(os.path.join(folder, f"data_batch_{i}"), "wb") as f:
            pickle.dump(batch, f)
    return root


def write_config(base_name, path, **changes):
    with open(os.path.join(ROOT, "configs", base_name)) as f:
        cfg = yaml.safe_load(f)
    cfg.update(changes)
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return str(path)


def torchrun(script, args, nproc=2, env=None, check=True, timeout=600):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           os.path.join(ROOT, script), *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc
