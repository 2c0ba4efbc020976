"""A node lost and restarted: two torchrun agents as two nodes on this machine, one killed mid-run and started again.

    python benchmarks/multinode_restart.py [--steps 40] [--kill-after 10]

Runs a small digits config (a tiny DiT, a checkpoint every 2 steps, no grids or dumps) three ways: (1) the reference,
`torchrun --standalone --nproc-per-node=2`; (2) two agents started as two nodes, `--nnodes=2 --nproc-per-node=1
--rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:PORT --max-restarts=3`, the second ("node B") killed with SIGKILL,
agent and worker, once the run has written the checkpoint of step --kill-after; (3) node B started again with the
same command. Node A's worker loses its peer, its agent restarts it and waits in the rendezvous; the restarted node B
joins, and both ranks resume from the newest checkpoint. The script checks that the job finishes and that its final
checkpoint (weights, EMA, optimizer state) is bit-identical to the reference's, and prints PASS or FAIL. CPU, gloo;
a few minutes on a 2-core CPU (too slow for the test suite). docs/cluster.md states what it checks and its result.
"""
import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SMALL = dict(hidden_size=32, depth=2, num_heads=2, batch_size=16, logging_steps=2, ckpt_saving_steps=2,
             eval_demo_steps=10 ** 9, eval_steps=10 ** 9, tracker="none", num_workers=0, ckpt_keep_last=None)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(config, node_args):
    return [sys.executable, "-m", "torch.distributed.run", *node_args, os.path.join(ROOT, "train.py"),
            "--config", config]


def start(command, log_path):
    """A torchrun agent in a session of its own, its output to `log_path`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log_path, "ab") as log:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def kill_node(agent):
    """SIGKILL to the agent and its workers (torchrun starts each worker in a session of its own)."""
    workers = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split()
    for pid in [agent.pid, *map(int, workers)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    agent.wait()
    return len(workers)


def wait_for(path, process, timeout):
    end = time.time() + timeout
    while not os.path.exists(path):
        if process.poll() is not None or time.time() > end:
            raise SystemExit(f"FAIL: {path} never appeared (agent exit status {process.poll()})")
        time.sleep(0.2)


def same_final_state(a, b):
    """Whether two checkpoints hold bit-identical weights, EMA and optimizer state."""
    import torch
    from checkpoints import load_checkpoint
    a, b = load_checkpoint(a), load_checkpoint(b)
    for key in ("model", "ema_model"):
        if a[key].keys() != b[key].keys() or not all(torch.equal(a[key][k], b[key][k]) for k in a[key]):
            return False
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        if not all(torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])) for k in sa):
            return False
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--kill-after", type=int, default=10, help="kill node B once this step's checkpoint exists")
    args = p.parse_args(argv)
    from config import write_variant
    tmp = tempfile.mkdtemp(prefix="multinode_")
    configs = {name: write_variant(os.path.join(ROOT, "configs", "digits_demo.yaml"), os.path.join(tmp, name + ".yaml"),
                                   working_dir=os.path.join(tmp, name), total_steps=args.steps, **SMALL)
               for name in ("reference", "two_nodes")}
    began = time.time()
    reference = start(torchrun_command(configs["reference"], ["--standalone", "--nproc-per-node=2"]),
                      os.path.join(tmp, "reference.log"))
    if reference.wait() != 0:
        raise SystemExit(f"FAIL: the reference run failed; see {tmp}/reference.log")
    print(f"reference (--standalone, 2 ranks): {time.time() - began:.0f} s", flush=True)

    node_args = ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
                 "--rdzv-id=soflow-multinode-check", "--max-restarts=3"]
    command = torchrun_command(configs["two_nodes"], node_args)
    run = os.path.join(tmp, "two_nodes")
    node_a = start(command, os.path.join(tmp, "node_a.log"))
    node_b = start(command, os.path.join(tmp, "node_b.log"))
    wait_for(os.path.join(run, "ckpts", f"{args.kill_after}.pt"), node_a, timeout=1200)
    killed = kill_node(node_b)
    newest = max(int(n[:-3]) for n in os.listdir(os.path.join(run, "ckpts")) if n.endswith(".pt"))
    print(f"node B killed (agent and {killed} worker) after checkpoint {newest}.pt", flush=True)
    time.sleep(30)  # past the rendezvous' keep-alive (3 x 5 s), so that the dead node is out of the next round
    node_b = start(command, os.path.join(tmp, "node_b.log"))
    status = node_a.wait(), node_b.wait()
    with open(os.path.join(run, "log.txt")) as f:
        resumed = [line.strip() for line in f if "resumed from" in line]
    final = os.path.join(run, "ckpts", f"{args.steps}.pt")
    identical = all(s == 0 for s in status) and os.path.exists(final) and same_final_state(
        os.path.join(tmp, "reference", "ckpts", f"{args.steps}.pt"), final)
    print(f"two nodes: exit statuses {status}; {resumed[-1] if resumed else 'never resumed'}; {time.time() - began:.0f} s "
          f"in all", flush=True)
    print(("PASS: the final checkpoint is bit-identical to the uninterrupted run's" if identical else
           f"FAIL: see the logs in {tmp}"), flush=True)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
