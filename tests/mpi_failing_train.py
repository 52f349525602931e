"""The train command in which process 1 raises at its second step (run by test_distributed
under mpiexec): every process must stop, with process 1's message."""
import sys

from minireuse.__main__ import main
from minireuse.training.trainer import Trainer

run_step = Trainer.run_step


def failing_step(self, xb, yb, epoch, step, steps):
    if self.parallel.rank == 1 and self.opt.steps == 1:
        raise RuntimeError("injected failure on process 1 at its second step")
    return run_step(self, xb, yb, epoch, step, steps)


Trainer.run_step = failing_step
sys.exit(main(sys.argv[1:]))
