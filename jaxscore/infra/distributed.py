"""Multi-host initialisation: automatic on Cloud TPU VMs, explicit elsewhere."""

from __future__ import annotations

import dataclasses
import os

import jax


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """`initialize`'s arguments: an experiment config's `distributed` group."""

  coordinator_address: str = ""  # host:port of process 0; "" = environment/auto.
  num_processes: int = 0  # 0 = from the environment.
  process_id: int = -1  # -1 = from the environment.
  auto: bool = False  # True on Cloud TPU VM slices: JAX finds everything itself.


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, auto: bool = False) -> None:
  """Calls `jax.distributed.initialize` when running on more than one process.

  Arguments (from the config's `distributed` group) default to JAXSCORE_COORDINATOR,
  JAXSCORE_NUM_PROCESSES and JAXSCORE_PROCESS_ID; on a Cloud TPU VM slice JAX finds them
  itself (`auto`, or JAXSCORE_DISTRIBUTED=auto). A single process needs nothing.
  """
  coordinator_address = coordinator_address or os.environ.get("JAXSCORE_COORDINATOR")
  if num_processes is None and "JAXSCORE_NUM_PROCESSES" in os.environ:
    num_processes = int(os.environ["JAXSCORE_NUM_PROCESSES"])
  if process_id is None and "JAXSCORE_PROCESS_ID" in os.environ:
    process_id = int(os.environ["JAXSCORE_PROCESS_ID"])
  if coordinator_address:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  elif auto or os.environ.get("JAXSCORE_DISTRIBUTED") == "auto":
    jax.distributed.initialize()
