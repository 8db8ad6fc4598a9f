"""Joining a `jax.distributed` job for `duquant pack` on several processes, hosts or GPUs.

Each process runs the same `duquant pack` command with its own `--process-id`;
process `p` of `n` packs layers `p, p + n, ...` (`duquant_jax.checkpoint`),
process 0 writes the index after every process has written its layers. On CPU,
cross-process synchronisation needs JAX's gloo collectives, which `join` selects.
"""

from __future__ import annotations

def check_coordinator(address: str) -> tuple[str, int]:
    """`HOST:PORT` -> (host, port); a ValueError naming the address otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or any(c.isspace() or c == "/" for c in host) or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"coordinator address must be HOST:PORT with a port in 1..65535; got {address!r}")
    return host, int(port)


def join(coordinator: str, num_processes: int, process_id: int) -> None:
    """Initialises `jax.distributed` (before any other JAX call) as process `process_id` of `num_processes`."""
    check_coordinator(coordinator)
    for name, value, lo in (("num_processes", num_processes, 1), ("process_id", process_id, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ValueError(f"{name} must be an int >= {lo}; got {value!r}")
    if process_id >= num_processes:
        raise ValueError(f"process_id must be < num_processes = {num_processes}; got {process_id}")
    import jax

    if jax.config.jax_platforms in (None, "", "cpu") or "cpu" in str(jax.config.jax_platforms):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
