"""A node lost and restarted: two torchrun agents as two nodes on this machine, one killed mid-run and started again.

    python benchmarks/multinode_restart.py [--steps 100] [--kill-after 10] [--restart-after 5] [--shared-store]

Runs a small digits config (a tiny DiT, a checkpoint every 2 steps, no grids or dumps) as a reference,
`torchrun --standalone --nproc-per-node=2`, and then three times as two nodes: two agents with `--nnodes=2
--nproc-per-node=1 --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:PORT --max-restarts=3` and
TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (docs/cluster.md says why): node A, the head node (started first, it hosts the
rendezvous store), and node B, each with an address of its own (`--local-addr` 127.0.0.1 or 127.0.0.2, both this
machine), which sets their group ranks. Once the run has written the checkpoint of step --kill-after, one node's
agent and worker are killed with SIGKILL:
  1. node B as group rank 1, started again --restart-after seconds later: node A's worker loses its peer and fails,
     its agent restarts it into a new rendezvous round, node B joins it, both ranks resume from the newest checkpoint;
  2. the same with node B as group rank 0 (the host of the process group's store);
  3. node A, the head node: node B's agent must end by itself (the rendezvous store is gone); both are started again.
Each case passes when both agents exit 0, rank 0 is on the expected node, and the final checkpoint (weights, EMA,
optimizer state) is bit-identical to the reference's; the script prints PASS or FAIL. `--shared-store` leaves
torchrun's default (the store shared with the workers) on, with which cases 1 and 2 fail on torch 2.14.1. CPU, gloo;
about 90 s on a 2-core CPU (too slow for the test suite).
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


class TwoNodes:
    """Two torchrun agents on this machine as the two nodes of one job: node A, the head node (it hosts the
    rendezvous store), and node B, each with an address of its own. The rendezvous numbers the nodes in the order of
    their addresses, so `node_b_rank` chooses node B's group rank."""

    def __init__(self, config, logs, node_b_rank, shared_store):
        self.port = free_port()
        common = ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{self.port}",
                  "--rdzv-id=soflow-multinode-check", "--max-restarts=3"]
        addresses = dict(zip("AB", ("127.0.0.1", "127.0.0.2") if node_b_rank == 1 else ("127.0.0.2", "127.0.0.1")))
        self.commands = {node: torchrun_command(config, [*common, f"--local-addr={addresses[node]}"]) for node in "AB"}
        self.logs = {node: f"{logs}_node_{node.lower()}.log" for node in "AB"}
        self.env = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "0" if shared_store else "1"}
        self.agents = {}

    def start(self, node):
        self.agents[node] = start(self.commands[node], self.logs[node], **self.env)
        if node == "A":
            # Both agents match the endpoint's address here, and the first to bind it hosts the rendezvous store; on
            # a cluster, the head node (the endpoint's host) does. Node A starts first so that it is the head node.
            wait_for_listener(self.port, self.agents["A"])

    def rank_zero(self):
        """The node whose console has a resumption (rank 0 prints it): "A" or "B" ("" if none, "AB" if both)."""
        return "".join(node for node in "AB" if "resumed from" in read_text(self.logs[node]))


def lose_and_restart_node(config, run, logs, lost, node_b_rank, args):
    """The job on two nodes; node `lost` ("A" or "B") killed after checkpoint --kill-after, and started again (node
    B) after --restart-after seconds, or (node A, the head node) once node B's agent has ended, together with node B.
    Returns (whether every check passed, the line of the last resumption in the run's log)."""
    nodes = TwoNodes(config, logs, node_b_rank, args.shared_store)
    nodes.start("A")
    nodes.start("B")
    wait_for(os.path.join(run, "ckpts", f"{args.kill_after}.pt"), nodes.agents["A"], timeout=1200)
    killed = kill_node(nodes.agents[lost])
    killed_at = time.time()
    newest = max(int(n[:-3]) for n in os.listdir(os.path.join(run, "ckpts")) if n.endswith(".pt"))
    print(f"  node {lost} killed, agent and {killed} worker, after checkpoint {newest}.pt", flush=True)
    if newest >= args.steps:
        kill_node(nodes.agents["B" if lost == "A" else "A"])
        raise SystemExit(f"FAIL: the run had finished before node {lost} was killed; raise --steps (logs: {logs}*)")
    survivor_failed = True
    if lost == "A":
        status_b = finish([nodes.agents["B"]], timeout=120)[0]
        survivor_failed = status_b not in (0, None)
        print(f"  node B's agent ended by itself with status {status_b}, {time.time() - killed_at:.0f} s after the "
              f"kill; both nodes started again", flush=True)
        restart = "AB"
    else:
        time.sleep(args.restart_after)
        restart = "B"
    for node in restart:
        nodes.start(node)
    status = finish([nodes.agents[node] for node in "AB"], timeout=300)
    final = os.path.join(run, "ckpts", f"{args.steps}.pt")
    identical = status == (0, 0) and os.path.exists(final) and same_final_state(args.expected, final)
    with open(os.path.join(run, "log.txt")) as f:
        resumed = [line.strip() for line in f if "resumed from" in line]
    rank_zero = nodes.rank_zero()
    print(f"  exit statuses {status}, {time.time() - killed_at:.0f} s after the kill; rank 0 then on node "
          f"{rank_zero or '?'}; final checkpoint " + ("bit-identical to" if identical else "NOT identical to") +
          " the reference's", flush=True)
    expected_rank_zero = "B" if node_b_rank == 0 else "A"
    return identical and survivor_failed and rank_zero == expected_rank_zero, resumed[-1] if resumed else None


CASES = {  # name: (the node killed, node B's group rank)
    "node_b_rank_1": ("B", 1),
    "node_b_rank_0": ("B", 0),
    "head_node": ("A", 1),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--kill-after", type=int, default=10, help="kill a node once this step's checkpoint exists")
    p.add_argument("--restart-after", type=float, default=5, help="seconds between node B's death and its restart")
    p.add_argument("--shared-store", action="store_true",
                   help="leave torchrun's rendezvous store shared with the workers (its default; fails on torch "
                        "2.14.1)")
    args = p.parse_args(argv)
    from config import write_variant
    tmp = tempfile.mkdtemp(prefix="multinode_")
    configs = {name: write_variant(os.path.join(ROOT, "configs", "digits_demo.yaml"), os.path.join(tmp, name + ".yaml"),
                                   working_dir=os.path.join(tmp, name), total_steps=args.steps, **SMALL)
               for name in ("reference", *CASES)}
    began = time.time()
    reference = start(torchrun_command(configs["reference"], ["--standalone", "--nproc-per-node=2"]),
                      os.path.join(tmp, "reference.log"))
    if reference.wait() != 0:
        raise SystemExit(f"FAIL: the reference run failed; see {tmp}/reference.log")
    print(f"reference (--standalone, 2 ranks, {args.steps} steps): {time.time() - began:.0f} s", flush=True)
    args.expected = os.path.join(tmp, "reference", "ckpts", f"{args.steps}.pt")
    results = {}
    for name, (lost, node_b_rank) in CASES.items():
        print(f"two nodes, node B group rank {node_b_rank}, node {lost} lost:", flush=True)
        results[name], resumed = lose_and_restart_node(configs[name], os.path.join(tmp, name), os.path.join(tmp, name),
                                                       lost, node_b_rank, args)
        print(f"  {resumed or 'never resumed'}: " + ("pass" if results[name] else "FAIL"), flush=True)
    passed = all(results.values())
    print("PASS" if passed else f"FAIL ({', '.join(n for n, ok in results.items() if not ok)}): see the logs in {tmp}",
          flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
