"""Worker process of the parallel NUTS chains: ``python -m bayes_fusion.infer.mcmc.worker IN OUT``.

Reads a pickled ``run_chain`` argument tuple from ``IN`` and writes its result to ``OUT``.
"""

import sys

import torch

from bayes_fusion.infer.mcmc.chains import run_chain

if __name__ == "__main__":
    job = torch.load(sys.argv[1], weights_only=False)
    torch.save(run_chain(*job), sys.argv[2])
