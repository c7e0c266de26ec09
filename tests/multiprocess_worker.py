"""One process of the 2-process aligner test (run by test_multiprocess.py, not by pytest).

Usage: python multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_JSON
"""

import json
import os
import sys

import jax


def main():
  pid, nproc, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
  if nproc > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc,
                               process_id=pid, initialization_timeout=120)
  sys.path.insert(0, os.path.dirname(__file__))
  import numpy as np
  from test_align import _data, trainer as make_trainer

  from know2vec_jax.mesh import data_mesh
  trainer = make_trainer(_data(), mesh=data_mesh())
  hist = trainer.run(progress=False, log_every=1)
  params = [np.asarray(leaf.addressable_data(0)) for leaf in
            jax.tree.leaves(trainer.state["params"])]
  if jax.process_index() == 0:
    with open(out, "w") as f:
      json.dump({"losses": [h["loss"] for h in hist], "devices": jax.device_count(),
                 "processes": jax.process_count(),
                 "params": [p.ravel().tolist() for p in params]}, f)
  if nproc > 1:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main()
