"""A node lost and restarted: two torchrun agents as two nodes on this machine, one killed mid-run and started again.

    python benchmarks/multinode_restart.py [--steps 100] [--kill-after 10] [--restart-after 5] [--shared-store]

Runs a small digits config (a tiny DiT, a checkpoint every 2 steps, no grids or dumps) as a reference,
`torchrun --standalone --nproc-per-node=2`, and then twice as two nodes: two agents with `--nnodes=2
--nproc-per-node=1 --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:PORT --max-restarts=3` and
TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (docs/cluster.md says why), node A (the head node: started first, it hosts the
rendezvous store) and node B. Each node has an address of its own (`--local-addr` 127.0.0.1 and 127.0.0.2, both this
machine); the rendezvous numbers the nodes in the order of their addresses, so the two cases make node B group rank 1
and then group rank 0 (the host of the process group's store). Once the run has written the checkpoint of step
--kill-after, node B's agent and worker are killed with SIGKILL; after --restart-after seconds the same command is
started there again. Node A's worker loses its peer and fails, its agent restarts it into a new rendezvous round,
the restarted node B joins it, and both ranks resume from the newest checkpoint. For each case the script checks that
both agents exit 0 and that the final checkpoint (weights, EMA, optimizer state) is bit-identical to the reference's,
and prints PASS or FAIL. `--shared-store` leaves torchrun's default (the store shared with the workers) on, which
fails on torch 2.14.1. CPU, gloo; about two minutes on a 2-core CPU (too slow for the test suite).
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


def start(command, log_path, **env):
    """A torchrun agent in a session of its own, its output to `log_path`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
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


def wait_for_listener(port, process, timeout=120):
    """Until something accepts connections on 127.0.0.1:`port` (node A's agent hosting the rendezvous store)."""
    end = time.time() + timeout
    while process.poll() is None and time.time() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise SystemExit(f"FAIL: node A's agent never hosted the rendezvous store (exit status {process.poll()})")


def wait_for(path, process, timeout):
    end = time.time() + timeout
    while not os.path.exists(path):
        if process.poll() is not None or time.time() > end:
            raise SystemExit(f"FAIL: {path} never appeared (agent exit status {process.poll()})")
        time.sleep(0.2)


def read_text(path):
    with open(path, errors="replace") as f:
        return f.read()


def finish(agents, timeout):
    """The agents' exit statuses; an agent still running after `timeout` seconds is killed (status None)."""
    end = time.time() + timeout
    for agent in agents:
        try:
            agent.wait(timeout=max(end - time.time(), 0))
        except subprocess.TimeoutExpired:
            kill_node(agent)
            agent.returncode = None
    return tuple(agent.returncode for agent in agents)


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


def lose_and_restart_node(config, run, logs, node_b_rank, args):
    """Node A and node B as two nodes; node B killed after checkpoint --kill-after and started again. Returns (the
    agents' exit statuses, the text of the last resumption in the run's log, the node whose console has it: rank 0
    after the restart, "A" or "B")."""
    port = free_port()
    common = ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
              "--rdzv-id=soflow-multinode-check", "--max-restarts=3"]
    addr_a, addr_b = ("127.0.0.1", "127.0.0.2") if node_b_rank == 1 else ("127.0.0.2", "127.0.0.1")
    command_a = torchrun_command(config, [*common, f"--local-addr={addr_a}"])
    command_b = torchrun_command(config, [*common, f"--local-addr={addr_b}"])
    env = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "0" if args.shared_store else "1"}
    node_a = start(command_a, logs + "_node_a.log", **env)
    # Both agents match the endpoint's address here, and the first to bind it hosts the rendezvous store; on a
    # cluster, the head node (the endpoint's host) does. Node A starts first so that it is the head node.
    wait_for_listener(port, node_a)
    node_b = start(command_b, logs + "_node_b.log", **env)
    wait_for(os.path.join(run, "ckpts", f"{args.kill_after}.pt"), node_a, timeout=1200)
    killed = kill_node(node_b)
    newest = max(int(n[:-3]) for n in os.listdir(os.path.join(run, "ckpts")) if n.endswith(".pt"))
    print(f"  node B (group rank {node_b_rank}) killed, agent and {killed} worker, after checkpoint {newest}.pt",
          flush=True)
    if newest >= args.steps:
        kill_node(node_a)
        raise SystemExit(f"FAIL: the run had finished before node B was killed; raise --steps (logs: {logs}*)")
    time.sleep(args.restart_after)
    node_b = start(command_b, logs + "_node_b.log", **env)
    status = finish([node_a, node_b], timeout=900)
    with open(os.path.join(run, "log.txt")) as f:
        resumed = [line.strip() for line in f if "resumed from" in line]
    rank_zero = [node for node in "AB" if "resumed from" in read_text(f"{logs}_node_{node.lower()}.log")]
    return status, resumed[-1] if resumed else "never resumed", "".join(rank_zero)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--kill-after", type=int, default=10, help="kill node B once this step's checkpoint exists")
    p.add_argument("--restart-after", type=float, default=5, help="seconds between node B's death and its restart")
    p.add_argument("--shared-store", action="store_true",
                   help="leave torchrun's rendezvous store shared with the workers (its default; fails on torch "
                        "2.14.1)")
    args = p.parse_args(argv)
    from config import write_variant
    tmp = tempfile.mkdtemp(prefix="multinode_")
    names = ("reference", "node_b_rank_1", "node_b_rank_0")
    configs = {name: write_variant(os.path.join(ROOT, "configs", "digits_demo.yaml"), os.path.join(tmp, name + ".yaml"),
                                   working_dir=os.path.join(tmp, name), total_steps=args.steps, **SMALL)
               for name in names}
    began = time.time()
    reference = start(torchrun_command(configs["reference"], ["--standalone", "--nproc-per-node=2"]),
                      os.path.join(tmp, "reference.log"))
    if reference.wait() != 0:
        raise SystemExit(f"FAIL: the reference run failed; see {tmp}/reference.log")
    print(f"reference (--standalone, 2 ranks, {args.steps} steps): {time.time() - began:.0f} s", flush=True)
    expected = os.path.join(tmp, "reference", "ckpts", f"{args.steps}.pt")
    passed = True
    for name, node_b_rank in zip(names[1:], (1, 0)):
        began = time.time()
        print(f"two nodes, node B group rank {node_b_rank}:", flush=True)
        run = os.path.join(tmp, name)
        status, resumed, rank_zero = lose_and_restart_node(configs[name], run, os.path.join(tmp, name), node_b_rank,
                                                           args)
        final = os.path.join(run, "ckpts", f"{args.steps}.pt")
        identical = status == (0, 0) and os.path.exists(final) and same_final_state(expected, final)
        passed = passed and identical and rank_zero == ("B" if node_b_rank == 0 else "A")
        print(f"  exit statuses {status}; {resumed} (rank 0 then on node {rank_zero or '?'}); "
              f"{time.time() - began:.0f} s; " +
              ("final checkpoint bit-identical to the reference's" if identical else "NOT identical"), flush=True)
    print("PASS" if passed else f"FAIL: see the logs in {tmp}", flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
