"""Run under torchrun: trains the built-in GPT with checkpoints; with PCOMPILE_TEST_KILL_AT=k
rank 1 kills itself (SIGKILL) at step k of the FIRST attempt, so torchrun restarts the group
and training resumes from the latest checkpoint."""
import os
import signal
import sys

import torch
import torch.distributed as dist

import pcompile
from pcompile import trainer
from pcompile.models import GPT, GPTConfig, gpt_inputs

CONFIG = GPTConfig(num_layers=2)
STEPS = 6


def run(out_dir: str, kill_at: int, attempt: int) -> None:

    def on_step(log: trainer.StepLog) -> None:
        if dist.get_rank() == 0:
            trainer.append_json_line(os.path.join(out_dir, "losses.jsonl"),
                                     {"attempt": attempt, "step": log.step, "loss": log.loss})
        if kill_at >= 0 and attempt == 0 and log.step == kill_at and dist.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGKILL)

    torch.manual_seed(0)
    trainer.train(GPT(CONFIG), lambda step: gpt_inputs(CONFIG, 8, seed=step), pcompile.Plan.uniform(dp=1, tp=2),
                  STEPS, checkpoint_dir=os.path.join(out_dir, "ckpt"), save_every=2, lr=1e-2, on_step=on_step)


def main(out_dir: str, kill_at: int) -> None:
    pcompile.init_distributed("gloo")
    torch.set_num_threads(1)
    run(out_dir, kill_at, int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
