"""Deploy an experiment on loopback: a SuperLink and one SuperNode per client on 127.0.0.1.

    python scripts/flower_local_deploy.py CONFIG [--port 19093] [--timeout 3600]

Starts `flower-superlink` and N `flower-supernode`s (N = data.num_clients, node
i holding partition-id=i), runs the experiment with `flwr run`, and leaves its
results in runs/<id>/ like any run. Every process it starts is stopped at the
end, on success, error or Ctrl-C. On several machines the same commands apply
with the SuperLink's real address and TLS certificates instead of --insecure
(see README).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from aslora.config import load_config

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


def _start(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """A process in its own session, so that it and its children can be stopped together."""
    with log.open("w") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)


def _stop(process: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _wait_for_port(port: int, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"the SuperLink did not open {HOST}:{port} within {seconds:.0f} s")


def deploy(config_path: Path, port: int, timeout: float) -> Path:
    """Run the experiment on a loopback deployment; return its run directory."""
    config = load_config(config_path)  # fails before any process starts
    clients = config.data.num_clients
    bin_dir = Path(sys.executable).parent
    output = Path(config.output_dir) if Path(config.output_dir).is_absolute() else REPO / config.output_dir
    before = set(output.glob("*/summary.json"))
    processes: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory() as home:
        env = os.environ | {
            "FLWR_HOME": home,
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_TELEMETRY_ENABLED": "0",
            "RAY_USAGE_STATS_ENABLED": "0",
            # The app's dependencies are this environment; never install from the network.
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        }
        (Path(home) / "config.toml").write_text(
            f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "{HOST}:{port}"\ninsecure = true\n'
        )
        logs = Path(home) / "logs"
        logs.mkdir()
        try:
            processes.append(
                _start([str(bin_dir / "flower-superlink"), "--insecure", "--host", HOST, "--port", str(port)], logs / "superlink.log", env)
            )
            _wait_for_port(port)
            for i in range(clients):
                command = [
                    str(bin_dir / "flower-supernode"), "--insecure", "--superlink", f"{HOST}:{port}",
                    "--port", str(port + 1 + i), "--node-config", f"partition-id={i} num-partitions={clients}",
                ]
                processes.append(_start(command, logs / f"supernode-{i}.log", env))
            run = [str(bin_dir / "flwr"), "run", str(REPO), "loopback", "--stream",
                   "--run-config", f'config="{config_path.resolve()}"']
            subprocess.run(run, env=env, cwd=REPO, check=True, timeout=timeout)
        finally:
            for process in reversed(processes):
                _stop(process)
    written = sorted(set(output.glob("*/summary.json")) - before)
    if not written:
        raise RuntimeError("the deployed run wrote no results; see the SuperLink's log output above")
    return written[-1].parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, help="experiment TOML")
    parser.add_argument("--port", type=int, default=19093, help="SuperLink port; SuperNodes use the next N ports")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before the run is abandoned")
    args = parser.parse_args()
    print(f"results in {deploy(args.config, args.port, args.timeout)}")


if __name__ == "__main__":
    main()
